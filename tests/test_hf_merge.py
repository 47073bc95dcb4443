"""Hugging Face checkpoints: merged at world sizes 1 and 2, checked against an independent float64
reference, against mergekit's ``linear`` merge (fp32) of the same inputs, and loaded by
safetensors and transformers."""
import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors import safe_open

import pmm_dist
from pmm_dist.formats.hf import HuggingFaceFormat

from .conftest import run_cli, start_python
from .helpers import assert_merged_within_one_ulp, ema, sma, ulp
from .hf_models import load_model_dir, make_run, save_checkpoint

SINGLE_STEPS = [100, 200, 300, 400]
SINGLE_MERGED = [200, 300, 400]                 # --method ema --alpha 0.2 --last 3
SHARDED_STEPS = [1000, 2000, 3000]
SHARDED_LAYOUT = [1, 2, 3]                      # shards per checkpoint: validation is per tensor, not per file
EXTRAS = {"model.rotary_emb.position_ids", "model.layers.0.self_attn.causal_mask"}  # int64 / bool buffers
WORLD_SIZES = [1, 2]
CASES = {
    "single": {"weights": ema(3, 0.2), "steps": SINGLE_MERGED},
    "sharded": {"weights": sma(3), "steps": SHARDED_STEPS},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    single = str(root / "run")
    make_run(single, SINGLE_STEPS, training_state=True)
    # A run directory may also hold a final save without a step number: not part of the run.
    final = os.path.join(single, "final")
    save_checkpoint(final, {"model.norm.weight": torch.zeros(3)}, {"model_type": "llama"})
    sharded = str(root / "sharded")
    dirs = make_run(sharded, SHARDED_STEPS, name="checkpoint-{}", num_shards=SHARDED_LAYOUT, extras=True)
    return {"single": single, "sharded": sharded, "sharded_dirs": dirs, "root": root}


def ckpt_dir(runs, case, step):
    return os.path.join(runs[case], f"step_{step}" if case == "single" else f"checkpoint-{step}")


# mergekit and transformers run in one separate process (their imports take ~6 s), started before
# pmm_dist's merges so that it imports and merges meanwhile: line 1 of its input is the mergekit
# jobs, line 2 (sent once pmm_dist's outputs exist) the directories to load with transformers.
EXTERNAL = r"""
import json, sys
import torch
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from transformers import AutoModelForCausalLM
for job in json.loads(sys.stdin.readline()):
    run_merge(MergeConfiguration.model_validate(job["config"]), job["out"],
              options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, device="cpu"))
report = {}
for path in json.loads(sys.stdin.readline()):
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    state = model.state_dict()
    report[path] = {"class": type(model).__name__, "missing": sorted(info["missing_keys"]),
                    "unexpected": sorted(info["unexpected_keys"]),
                    "mismatched": [str(m) for m in info["mismatched_keys"]],
                    "state": {k: state[k].tolist() for k in ("model.norm.weight",
                                                             "model.layers.1.mlp.down_proj.weight")}}
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def external_process(runs):
    jobs = {}
    for case, spec in CASES.items():
        models = [{"model": ckpt_dir(runs, case, step), "parameters": {"weight": w}}
                  for step, w in zip(spec["steps"], spec["weights"])]
        jobs[case] = {"out": str(runs["root"] / f"mergekit_{case}"),
                      "config": {"merge_method": "linear", "dtype": "float32", "parameters": {"normalize": False},
                                 "models": models}}
    proc = start_python(["-c", EXTERNAL], env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"})
    proc.stdin.write(json.dumps(list(jobs.values())) + "\n")
    proc.stdin.flush()
    yield proc, {case: job["out"] for case, job in jobs.items()}
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def merged(runs, external_process):
    dirs = runs["sharded_dirs"]
    commands = {}
    for world_size in WORLD_SIZES:
        commands["single", world_size] = ["merge", runs["single"], "--out",
                                          str(runs["root"] / f"single_ws{world_size}"), "--method", "ema",
                                          "--alpha", "0.2", "--last", "3", "--device", "cpu"]
        # Explicit checkpoint directories, in no particular order, format named.
        commands["sharded", world_size] = ["merge", dirs[1], dirs[2], dirs[0], "--out",
                                           str(runs["root"] / f"sharded_ws{world_size}"), "--format", "hf",
                                           "--device", "cpu", "--quiet"]
    with ThreadPoolExecutor(len(commands)) as pool:  # independent jobs (torchrun --standalone: own ports)
        futures = {key: pool.submit(run_cli, args, world_size=key[1]) for key, args in commands.items()}
    outputs = {}
    for key, future in futures.items():
        proc = future.result()
        assert proc.returncode == 0, proc.stdout + proc.stderr
        outputs[key] = (commands[key][commands[key].index("--out") + 1], proc)
    return outputs


@pytest.fixture(scope="module")
def external(merged, external_process):
    proc, mergekit_outputs = external_process
    stdout, stderr = proc.communicate(json.dumps([out for out, _ in merged.values()]) + "\n", timeout=300)
    assert proc.returncode == 0, stderr[-4000:]
    return {"mergekit": mergekit_outputs, "load": json.loads(stdout.strip().splitlines()[-1])}


def sources_of(runs, case):
    return [load_model_dir(ckpt_dir(runs, case, step)) for step in CASES[case]["steps"]]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(runs, merged, case, world_size):
    result = load_model_dir(merged[case, world_size][0])
    sources = sources_of(runs, case)
    newest = sources[-1]
    assert set(result) == set(newest)
    num_merged = 0
    for name, value in result.items():
        assert value.dtype == newest[name].dtype and value.shape == newest[name].shape, name
        if value.is_floating_point():
            assert_merged_within_one_ulp(value, [s[name] for s in sources], CASES[case]["weights"], name)
            assert not torch.equal(value, newest[name]), f"{name}: merged equals the newest checkpoint"
            num_merged += 1
        else:
            assert torch.equal(value, newest[name]), f"{name}: integer/bool tensors come from the newest checkpoint"
    assert num_merged == 21 and {n for n, v in result.items() if not v.is_floating_point()} == (
        EXTRAS if case == "sharded" else set())


def within_mergekit_rounding(ours, theirs, sources, weights, what):
    """mergekit accumulates in fp32 and writes fp32: equal to ours up to one ulp of our stored dtype
    (our one rounding, its output not rounded to that dtype) plus fp32 accumulation error."""
    magnitude = sum(abs(w) * s.to(torch.float64).abs() for s, w in zip(sources, weights))
    accumulation = 2 * (len(sources) + 1) * 2.0 ** -24 * magnitude
    diff = (ours.to(torch.float64) - theirs.to(torch.float64)).abs()
    bound = ulp(theirs.to(torch.float64), ours.dtype) + accumulation
    worst = (diff / bound).max().item()
    assert worst <= 1.0, f"{what}: {worst:.3f} of the tolerance from mergekit's result"


@pytest.mark.parametrize("case", list(CASES))
def test_matches_mergekit_linear_fp32(runs, merged, external, case):
    theirs = load_model_dir(external["mergekit"][case])
    sources = sources_of(runs, case)
    for world_size in WORLD_SIZES:
        ours = load_model_dir(merged[case, world_size][0])
        assert set(theirs) == set(ours) - EXTRAS  # mergekit keeps only its architecture's weights
        for name, value in theirs.items():
            assert value.dtype == torch.float32
            within_mergekit_rounding(ours[name], value, [s[name] for s in sources], CASES[case]["weights"], name)


def test_loads_with_transformers(runs, merged, external):
    for (case, world_size), (out, _) in merged.items():
        report = external["load"][out]
        assert report["class"] == "LlamaForCausalLM"
        assert report["missing"] == [] and report["mismatched"] == []
        assert set(report["unexpected"]) == (EXTRAS if case == "sharded" else set())
        ours = load_model_dir(out)
        for name, values in report["state"].items():
            assert torch.equal(torch.tensor(values, dtype=torch.float32), ours[name].float()), f"{out}: {name}"


def test_identical_across_world_sizes(merged):
    for case in CASES:
        reference = load_model_dir(merged[case, 1][0])
        for world_size in WORLD_SIZES[1:]:
            other = load_model_dir(merged[case, world_size][0])
            assert set(other) == set(reference)
            for name, value in reference.items():
                assert value.dtype == other[name].dtype
                assert torch.equal(value.view(torch.uint8), other[name].view(torch.uint8)), name  # bitwise


def test_output_layout_index_and_config_files(runs, merged):
    for (case, world_size), (out, _) in merged.items():
        newest_dir = ckpt_dir(runs, case, CASES[case]["steps"][-1])
        entries = sorted(os.listdir(out))
        shards = [e for e in entries if e.endswith(".safetensors")]
        # One shard per rank here (the model is far below the 5 GB shard limit); an index always.
        assert shards == [f"model-{i:05d}-of-{world_size:05d}.safetensors" for i in range(1, world_size + 1)]
        index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
        names = set()
        for shard in shards:
            with safe_open(os.path.join(out, shard), framework="pt") as f:
                assert f.metadata() == {"format": "pt"}  # the newest checkpoint's __metadata__
                for name in f.keys():
                    assert index["weight_map"][name] == shard
                    names.add(name)
        assert set(index["weight_map"]) == names
        newest_tensors = load_model_dir(newest_dir)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in newest_tensors.values())
        if case == "sharded":  # other index metadata comes from the newest checkpoint
            assert index["metadata"]["total_parameters"] == sum(t.numel() for t in newest_tensors.values())
        for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json"):
            assert open(os.path.join(out, name), "rb").read() == open(os.path.join(newest_dir, name), "rb").read()
        # --optimizer drop (default): no training state; never weights in another serialisation
        assert not {"optimizer.pt", "scheduler.pt", "trainer_state.json", "pytorch_model.bin"} & set(entries)
        assert ".pmm_staging" not in entries
        manifest = json.load(open(os.path.join(out, "pmm_manifest.json")))
        assert manifest["format"] == "hf" and manifest["output_checkpoint"] == ""
        assert manifest["tracker"] == "model.safetensors.index.json"
        assert [s["iteration"] for s in manifest["sources"]] == CASES[case]["steps"]
        assert manifest["weights"] == pytest.approx(CASES[case]["weights"])
        # Every file of the checkpoint is listed, the index (the commit marker, moved in last) too.
        assert sorted(f["path"] for f in manifest["files"]) == sorted(e for e in entries if e != "pmm_manifest.json")
        for entry in manifest["files"]:
            assert os.path.getsize(os.path.join(out, entry["path"])) == entry["bytes"]


def test_summary_names_format_and_layout(merged):
    _, proc = merged["single", 2]
    assert "3 hf checkpoints (iterations 200, 300, 400)" in proc.stdout
    assert "layout: tensors=21, files=1, dtypes=BF16:16/F32:5" in proc.stdout
    assert merged["sharded", 1][1].stdout == ""  # --quiet


@pytest.mark.unit  # in this process
def test_index_is_written_last(runs, tmp_path, monkeypatch):
    """A reader polling the output sees the index only after every shard, config file and the manifest."""
    moves = []
    real_replace = os.replace

    def recording_replace(src, dst):
        moves.append(os.path.basename(dst) if os.path.dirname(os.path.abspath(dst)) == str(tmp_path / "out") else None)
        return real_replace(src, dst)

    monkeypatch.setattr(HuggingFaceFormat, "max_shard_bytes", 40_000)
    monkeypatch.setattr(os, "replace", recording_replace)
    result = pmm_dist.merge(sources=[runs["single"]], out=str(tmp_path / "out"), method="sma", device="cpu", quiet=True)
    moved = [m for m in moves if m is not None]
    monkeypatch.undo()
    shards = [m for m in moved if m.startswith("model-")]
    assert len(shards) >= 4 and {"tokenizer.json", "config.json"} <= set(moved)
    assert moved[-2:] == ["pmm_manifest.json", "model.safetensors.index.json"]
    # Every shard within the limit (a single larger tensor would get one of its own), values unchanged by sharding.
    for shard in shards:
        with safe_open(os.path.join(result.output_path, shard), framework="pt") as f:
            num_bytes = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
            assert num_bytes <= 40_000 or len(list(f.keys())) == 1
    merged = load_model_dir(result.output_path)
    sources = [load_model_dir(os.path.join(runs["single"], f"step_{s}")) for s in SINGLE_STEPS]
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight", "model.norm.weight"):
        assert_merged_within_one_ulp(merged[name], [s[name] for s in sources], sma(4), name)


@pytest.mark.unit  # in this process
def test_optimizer_latest_copies_trainer_files(runs, tmp_path):
    out = str(tmp_path / "out")
    pmm_dist.merge(sources=[runs["single"]], out=out, method="wma", last=2, optimizer="latest", device="cpu",
                   quiet=True)
    newest = os.path.join(runs["single"], "step_400")
    for name in ("optimizer.pt", "scheduler.pt", "trainer_state.json"):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(newest, name), "rb").read()
    assert not os.path.exists(os.path.join(out, "pytorch_model.bin"))


@pytest.mark.unit  # in this process
def test_auto_detection_and_run_directory_selection(runs, tmp_path):
    result = pmm_dist.merge(sources=[runs["single"]], out=str(tmp_path / "out"), last=3, interval=100, dry_run=True,
                            quiet=True)
    assert result.plan.format_name == "hf"
    assert [c.iteration for c in result.plan.checkpoints] == [200, 300, 400]  # "final" (no step number) ignored
    assert [u.relpath for u in result.plan.units] == ["model-00001-of-00001.safetensors"]
    assert len(result.plan.units[0].items) == 21
    assert not os.path.exists(tmp_path / "out")


def test_verify_accepts_the_outputs(merged):
    from pmm_dist.cli.verify import verify_output
    for out, _ in merged.values():
        assert verify_output(out) == [], out


@pytest.mark.parametrize("point", ["unit:0@0=raise", "commit:moved@0=raise", "commit:manifest@0=raise"])
def test_resume_after_a_failure_gives_the_same_output(runs, merged, tmp_path, monkeypatch, point):
    """Interrupted anywhere (after a unit, after the staged files moved in, before the tracker),
    nothing loadable is left behind and --resume completes the same model."""
    out = str(tmp_path / "out")
    options = dict(sources=[runs["single"]], out=out, method="ema", alpha=0.2, last=3, device="cpu", quiet=True)
    monkeypatch.setattr(HuggingFaceFormat, "max_shard_bytes", 60_000)  # several units
    monkeypatch.setenv("PMM_DIST_FAULT", point)
    with pytest.raises(Exception, match="injected fault"):
        pmm_dist.merge(**options)
    assert not os.path.exists(os.path.join(out, "model.safetensors.index.json"))  # not loadable
    monkeypatch.delenv("PMM_DIST_FAULT")
    result = pmm_dist.merge(**options, resume=True)
    reference = load_model_dir(merged["single", 1][0])
    resumed = load_model_dir(result.output_path)
    assert set(resumed) == set(reference)
    assert all(torch.equal(resumed[n].view(torch.uint8), reference[n].view(torch.uint8)) for n in reference)
    from pmm_dist.cli.verify import verify_output
    assert verify_output(out) == []
