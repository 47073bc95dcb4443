"""End to end with the REAL DeepSpeed engine (CPU, gloo, 2 processes).

tests/deepspeed_real/engines.py trains twelve tiny runs in one torchrun launch and saves them with
``engine.save_checkpoint`` at global steps 2, 4, 6, 8: a dense model under ZeRO 0, 1, 2 and 3, each
in fp32 and bf16; a ``deepspeed.moe.layer.MoE`` model with expert parallelism 2 (ZeRO-2, bf16); and
a 2-stage ``PipelineModule`` (ZeRO-1); and the dense ZeRO-2 and ZeRO-3 models once more at
data-parallel size 1 (merged across DP sizes in tests/test_deepspeed_layouts_real.py). Every case here runs in the real engine on
CPU; nothing is synthesised, except the corrupted copies the bad-input tests make on purpose.

Each run is merged with pmm_dist at world size 1 (Python API, in this process) and at world size 2
(the command line's entry point inside the helper's torchrun launch), with a different method and
selection per case; the deepspeed launcher and mpiexec run the CLI too. The world-size-2
output is loaded into a FRESH engine (another seed) with
``load_checkpoint(OUT, load_module_only=True, load_optimizer_states=False,
load_lr_scheduler_states=False)``, and every parameter the engine then holds must be within one ulp
(of its own dtype) of an independent float64 reference: the weighted sum of the tensors DeepSpeed
saved (``module``, expert files, pipeline layer files) or, for ZeRO-3, of the fp32 weights that
``deepspeed.utils.zero_to_fp32`` rebuilds from each source checkpoint.
"""
import json
import math
import os
import pathlib
import re
import shutil
import socket
import sys

import pytest
import torch

import pmm_dist
from pmm_dist.errors import MergeError
from pmm_dist.cli.verify import verify_output

from .conftest import REPO, run_python
from .deepspeed_real.engines import RUNS, STEPS, SAVE_EVERY
from .helpers import assert_merged_within_one_ulp, ema, sma, trusted_load, wma, without_padding, zero3_padding

HELPER = pathlib.Path(REPO) / "tests" / "deepspeed_real" / "engines.py"
ALL_STEPS = list(range(SAVE_EVERY, STEPS + 1, SAVE_EVERY))  # 2, 4, 6, 8
NEWEST_TAG = f"global_step{STEPS}"


def _weighted(raw):
    return [w / sum(raw) for w in raw]


# case -> (run, pmm_dist.merge options, selected global steps, weights oldest first)
CASES = {
    "zero0_fp32": ("zero0_fp32", {"method": "sma"}, ALL_STEPS, sma(4)),
    "zero0_bf16": ("zero0_bf16", {"method": "ema", "alpha": 0.2, "last": 3}, [4, 6, 8], ema(3, 0.2)),
    "zero1_fp32": ("zero1_fp32", {"method": "wma", "interval": 4}, [4, 8], wma(2)),
    "zero1_bf16": ("zero1_bf16", {"method": "sma", "iterations": [2, 6, 8]}, [2, 6, 8], sma(3)),
    "zero2_fp32": ("zero2_fp32", {"method": "weighted", "weights": [1, 2, 3, 4]}, ALL_STEPS, _weighted([1, 2, 3, 4])),
    "zero2_bf16": ("zero2_bf16", {"method": "ema", "alpha": 0.1}, ALL_STEPS, ema(4, 0.1)),
    "zero3_fp32": ("zero3_fp32", {"method": "sma", "last": 3, "interval": 2}, [4, 6, 8], sma(3)),
    "zero3_bf16": ("zero3_bf16", {"method": "ema", "alpha": 0.2}, ALL_STEPS, ema(4, 0.2)),
    "moe_ep2": ("moe_ep2", {"method": "wma"}, ALL_STEPS, wma(4)),
    "pipe_2stage": ("pipe_2stage", {"method": "sma", "last": 2}, [6, 8], sma(2)),
}
# --optimizer latest: the newest optimizer state, with the merged weights
LATEST_CASES = {
    "zero0_fp32_latest": ("zero0_fp32", {"method": "sma", "optimizer": "latest"}, ALL_STEPS, sma(4)),
    "zero2_bf16_latest": ("zero2_bf16", {"method": "sma", "optimizer": "latest"}, ALL_STEPS, sma(4)),
    "zero3_fp32_latest": ("zero3_fp32", {"method": "sma", "optimizer": "latest"}, ALL_STEPS, sma(4)),
}

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


def _cli_args(run_dir, out, options):
    """pmm_dist command-line arguments for the merge options of a case."""
    args = ["merge", str(run_dir), "--out", str(out), "--device", "cpu", "--quiet"]
    for key, value in options.items():
        if key == "iterations":  # the command line takes tags as well as numbers
            value = [f"global_step{step}" for step in value]
        args += [f"--{key}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return args


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    base = tmp_path_factory.mktemp("deepspeed_real")
    runs = base / "runs"
    run_python([HELPER, "train", runs], nproc=2, check="training the DeepSpeed runs (2 processes)")
    ws1, ws2 = base / "ws1", base / "ws2"
    for case, (run, options, _, _) in {**CASES, **LATEST_CASES}.items():
        pmm_dist.merge(sources=[str(runs / run)], out=str(ws1 / case), device="cpu", quiet=True, **options)
    loads = [{"run": run, "checkpoint": str(ws2 / case), "dump": str(base / "dumps" / case)}
             for case, (run, _, _, _) in CASES.items()]
    # a full resume (optimizer state too) from the ZeRO-3 --optimizer latest output
    loads.append({"run": "zero3_fp32", "checkpoint": str(ws1 / "zero3_fp32_latest"),
                  "dump": str(base / "dumps" / "zero3_fp32_latest_full"), "full": True})
    # ZeRO-2 + --optimizer latest, full resume: which weights does the optimizer continue from?
    for name, config in (("default", {}), ("bit16", {"zero_optimization": {"load_from_fp32_weights": False}})):
        loads.append({"run": "zero2_bf16", "checkpoint": str(ws1 / "zero2_bf16_latest"), "full": True,
                      "config": config, "step_with_lr0": True, "dump": str(base / "dumps" / f"zero2_latest_{name}")})
    spec = {"merges": [_cli_args(runs / run, ws2 / case, options) for case, (run, options, _, _) in CASES.items()],
            "loads": loads}
    (base / "spec.json").write_text(json.dumps(spec))
    run_python([HELPER, "load", base / "spec.json"], nproc=2,
               check="merging at world size 2 and loading into fresh DeepSpeed engines")
    return {"base": base, "runs": runs, "ws1": ws1, "ws2": ws2, "dumps": base / "dumps"}


# -- independent references ------------------------------------------------------------------------
_ZERO3_CACHE = {}


def _zero_to_fp32(run_dir, step):
    """DeepSpeed's own reconstruction of the full fp32 weights (and buffers) of one checkpoint."""
    key = (str(run_dir), step)
    if key not in _ZERO3_CACHE:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        _ZERO3_CACHE[key] = {k: v.contiguous() for k, v in
                             get_fp32_state_dict_from_zero_checkpoint(str(run_dir), tag=f"global_step{step}").items()}
    return _ZERO3_CACHE[key]


def _saved_weights(runs, run, step):
    """name -> tensor of every weight and buffer DeepSpeed saved for ``run`` at ``step`` (global
    names): where the optimizer keeps fp32 masters, those (the merged module weights are the
    merged masters, rounded); else the module's tensors."""
    run_dir = pathlib.Path(runs) / run
    tag_dir = run_dir / f"global_step{step}"
    kind, stage, dtype = RUNS[run]
    if stage == 3 or (stage in (1, 2) and kind == "dense"):
        return _zero_to_fp32(run_dir, step)  # DeepSpeed's own reading of the fp32 masters
    if kind == "pipe":  # (an fp32 run: its masters are its weights)
        weights = {}
        for path in sorted(tag_dir.glob("layer_*-model_states.pt")):
            layer = int(path.name.split("-")[0][len("layer_"):])
            weights.update({f"{layer}.{k}": v for k, v in trusted_load(path).items()})
        return weights
    states = trusted_load(tag_dir / "mp_rank_00_model_states.pt")
    weights = dict(states["module"])
    if kind == "moe":
        weights.update(_moe_dense_masters(tag_dir, states))
    elif dtype == "bf16":  # ZeRO-0 bf16: the masters per parameter, in the model's parameter order
        names = [name for name, value in weights.items() if value.dtype == torch.bfloat16]
        weights.update(zip(names, states["optimizer"]["fp32_groups"][0]))
    for path in sorted(tag_dir.glob("layer_*_expert_*_model_states.pt")):
        weights.update(trusted_load(path))  # the experts: their own tensors
    return weights


def _moe_dense_masters(tag_dir, states):
    """The fp32 masters of the MoE run's non-expert param group (zero_to_fp32 refuses MoE
    checkpoints): its two ranks' partitions concatenated, cut in param_shapes order."""
    flat = torch.cat([trusted_load(tag_dir / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
                      ["optimizer_state_dict"]["single_partition_of_fp32_groups"][0] for r in range(2)])
    masters, offset = {}, 0
    for name, shape in states["param_shapes"][0].items():
        masters[name] = flat[offset:offset + math.prod(shape)].view(shape)
        offset += math.prod(shape)
    assert offset == flat.numel()
    return masters


def _dumps(work, case):
    return [torch.load(work["dumps"] / case / f"rank{rank}.pt", map_location="cpu", weights_only=False)
            for rank in range(2)]


# -- the proof: a fresh engine loads the merged weights ----------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_fresh_engine_loads_merged_weights(work, case):
    run, _, steps, weights = CASES[case]
    sources = [_saved_weights(work["runs"], run, step) for step in steps]
    seen = set()
    for rank, dump in enumerate(_dumps(work, case)):
        assert dump["load_path"] and NEWEST_TAG in dump["load_path"], dump["load_path"]
        assert {"step_seen", "note"} <= set(dump["client_state_keys"])  # the newest's client state came along
        # the fresh engine has another seed: the load must have replaced every parameter it holds
        assert dump["changed"] == sorted(dump["params"]), f"rank {rank}: unchanged {set(dump['params']) - set(dump['changed'])}"
        for name, value in dump["params"].items():
            assert name in sources[-1], f"rank {rank}: {name} is not in the saved checkpoints"
            assert value.dtype == (torch.bfloat16 if RUNS[run][2] == "bf16" else torch.float32)
            assert_merged_within_one_ulp(value, [s[name] for s in sources], weights, f"{case} rank {rank} {name}")
        seen |= set(dump["params"])
        if RUNS[run][0] == "dense":
            buffers = dump["buffers"]
            assert_merged_within_one_ulp(buffers["running_mean"], [s["running_mean"] for s in sources], weights,
                                         f"{case} rank {rank} buffer running_mean")
            assert torch.equal(buffers["num_batches"], sources[-1]["num_batches"])  # integer: the newest's
    expected = {name for name, value in sources[-1].items()
                if RUNS[run][0] != "dense" or name not in ("running_mean", "num_batches")}
    assert seen == expected, f"parameters loaded {sorted(seen)} != saved {sorted(expected)}"


def test_full_resume_from_zero3_optimizer_latest(work):
    """ZeRO-3 + --optimizer latest: a plain load_checkpoint(OUT) (optimizer state too) restores the
    merged fp32 partitions, so the engine holds the merged weights with the newest moments."""
    run, _, steps, weights = LATEST_CASES["zero3_fp32_latest"]
    sources = [_saved_weights(work["runs"], run, step) for step in steps]
    for rank, dump in enumerate(_dumps(work, "zero3_fp32_latest_full")):
        assert dump["changed"] == sorted(dump["params"])
        for name, value in dump["params"].items():
            assert_merged_within_one_ulp(value, [s[name] for s in sources], weights, f"full resume rank {rank} {name}")


def test_zero12_optimizer_latest_resumes_from_the_merged_weights(work):
    """ZeRO-1/2 + --optimizer latest merges the fp32 master partitions: a full resume continues from
    the merged weights after its first optimizer step (taken at learning rate 0, which copies the
    masters into the bf16 module), with DeepSpeed's default (zero_optimization.load_from_fp32_weights:
    true, the masters read from the optimizer files) and with false (the masters rebuilt from the
    merged module): the module's weights are the merged masters rounded, so both agree exactly."""
    run, _, steps, weights = LATEST_CASES["zero2_bf16_latest"]
    sources = [_saved_weights(work["runs"], run, step) for step in steps]
    default, bit16 = _dumps(work, "zero2_latest_default"), _dumps(work, "zero2_latest_bit16")
    for rank in range(2):
        for name, value in default[rank]["params"].items():
            assert_merged_within_one_ulp(value, [s[name] for s in sources], weights, f"resumed masters {name}")
            assert torch.equal(value, bit16[rank]["params"][name]), name


# -- the merged files ----------------------------------------------------------------------------------
def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if type(a).__module__.startswith("deepspeed") and hasattr(a, "__dict__"):
        return type(a) is type(b) and _same(vars(a), vars(b))  # e.g. the loss scaler: no __eq__
    return a == b


def _check_merged_floats(merged, sources, weights, what):
    """Every float tensor of ``merged`` within one ulp of the weighted sum; all else the newest's."""
    num = 0
    if isinstance(merged, dict):
        assert list(merged) == list(sources[-1]), f"{what}: keys differ from the newest's"
        for key in merged:
            num += _check_merged_floats(merged[key], [s[key] for s in sources], weights, f"{what}.{key}")
    elif isinstance(merged, (list, tuple)):
        for i, value in enumerate(merged):
            num += _check_merged_floats(value, [s[i] for s in sources], weights, f"{what}[{i}]")
    elif isinstance(merged, torch.Tensor) and merged.is_floating_point():
        assert merged.dtype == sources[-1].dtype or sources[-1].dtype == torch.float32, what  # fp32: masters
        assert_merged_within_one_ulp(merged, sources, weights, what)
        num += 1
    else:
        assert _same(merged, sources[-1]), f"{what}: {merged!r} is not the newest's {sources[-1]!r}"
    return num


def _dp_rank(name):
    return int(re.search(r"zero_pp_rank_(\d+)_", name).group(1))


def _expected_files(run_dir, drop_optimizer):
    newest = sorted(p.name for p in (pathlib.Path(run_dir) / NEWEST_TAG).iterdir())
    if not drop_optimizer:
        return newest
    zero3 = any(n.startswith("zero_pp_rank_") and n.endswith("_model_states.pt") for n in newest)
    return [n for n in newest if not n.endswith("optim_states.pt") or zero3]


@pytest.mark.parametrize("case", list(CASES) + list(LATEST_CASES))
def test_merged_files(work, case):
    run, options, steps, weights = {**CASES, **LATEST_CASES}[case]
    drop = options.get("optimizer", "drop") == "drop"
    out = work["ws1"] / case
    run_dir = work["runs"] / run
    assert (out / "latest").read_text() == NEWEST_TAG
    assert sorted(p.name for p in out.iterdir()) == [NEWEST_TAG, "latest", "pmm_manifest.json"]
    files = sorted(p.name for p in (out / NEWEST_TAG).iterdir())
    assert files == _expected_files(run_dir, drop)
    manifest = json.loads((out / "pmm_manifest.json").read_text())
    assert manifest["format"] == "deepspeed" and manifest["tracker"] == "latest"
    assert [s["iteration"] for s in manifest["sources"]] == steps
    assert manifest["weights"] == pytest.approx(weights, rel=1e-12)
    num_merged = 0
    for name in files:
        merged = trusted_load(out / NEWEST_TAG / name)
        sources = [trusted_load(run_dir / f"global_step{step}" / name) for step in steps]
        newest = sources[-1]
        if name.endswith("optim_states.pt") and "fp32_flat_groups" not in newest["optimizer_state_dict"]:
            # ZeRO 1/2 under --optimizer latest: the fp32 master partitions merged, the rest the newest's
            optim, newest_optim = merged["optimizer_state_dict"], newest["optimizer_state_dict"]
            key = "single_partition_of_fp32_groups"
            num_merged += _check_merged_floats(optim[key], [s["optimizer_state_dict"][key] for s in sources],
                                               weights, f"{case}:{name}:{key}")
            assert all(_same(optim[k], newest_optim[k]) for k in newest_optim if k != key)
            assert _same({k: v for k, v in merged.items() if k != "optimizer_state_dict"},
                         {k: v for k, v in newest.items() if k != "optimizer_state_dict"})
        elif name.endswith("optim_states.pt"):  # ZeRO-3: the weights live in the fp32 flat partitions
            optim, newest_optim = merged["optimizer_state_dict"], newest["optimizer_state_dict"]
            shapes = trusted_load(run_dir / NEWEST_TAG / "zero_pp_rank_0_mp_rank_00_model_states.pt")
            padding = zero3_padding(shapes["param_shapes"], shapes["dp_world_size"], _dp_rank(name))
            assert torch.all(torch.cat(optim["fp32_flat_groups"])[padding] == 0), f"{case}:{name}: padding"
            num_merged += _check_merged_floats(  # the sources' padding holds any bits: compared as zeros
                optim["fp32_flat_groups"],
                [without_padding(s["optimizer_state_dict"]["fp32_flat_groups"], padding) for s in sources],
                weights, f"{case}:{name}:fp32_flat_groups")
            moments = "optimizer_state_dict"
            if drop:
                assert moments not in optim, "--optimizer drop kept the Adam moments"
            else:
                assert _same(optim[moments], newest_optim[moments]), "--optimizer latest changed the moments"
            rest = [k for k in newest_optim if k not in ("fp32_flat_groups", moments)]
            assert all(_same(optim[k], newest_optim[k]) for k in rest)
            assert _same({k: v for k, v in merged.items() if k != "optimizer_state_dict"},
                         {k: v for k, v in newest.items() if k != "optimizer_state_dict"})
        elif "module" in newest:  # model states: module (and frozen fragments) merged, the rest the newest's
            assert merged["global_steps"] == STEPS and merged["step_seen"] == STEPS
            assert list(merged) == list(newest)
            masters = [_saved_weights(work["runs"], run, step) for step in steps]  # the fp32 masters, by name
            for key in newest:
                if key == "module" and RUNS[run][1] != 3 and newest[key]:  # its weights: the merged masters, rounded
                    num_merged += _check_merged_floats(merged[key], [{**s[key], **{n: m[n] for n in s[key] if n in m}}
                                                                     for s, m in zip(sources, masters)],
                                                       weights, f"{case}:{name}:{key}")
                elif key in ("module", "frozen_param_fragments"):
                    num_merged += _check_merged_floats(merged[key], [s[key] for s in sources], weights,
                                                       f"{case}:{name}:{key}")
                elif key == "optimizer" and drop:  # ZeRO-0 keeps the optimizer (fp32 masters, moments) here
                    assert merged[key] is None
                elif key == "optimizer" and newest[key] is not None:  # ZeRO-0, latest: the newest's moments
                    assert _same(merged[key]["state"], newest[key]["state"])
                else:
                    assert _same(merged[key], newest[key]), f"{case}:{name}:{key} is not the newest's"
        else:  # expert and pipeline layer files: plain state dicts
            num_merged += _check_merged_floats(merged, sources, weights, f"{case}:{name}")
    assert num_merged >= 4
    assert verify_output(str(out)) == []  # `pmm-dist verify`: sizes, checksums, tensors vs the newest source


def test_world_sizes_bitwise_identical(work):
    for case in CASES:
        one, two = work["ws1"] / case / NEWEST_TAG, work["ws2"] / case / NEWEST_TAG
        assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
        for path in one.iterdir():
            assert path.read_bytes() == (two / path.name).read_bytes(), f"{case}/{path.name}: world size 1 != 2"
        assert json.loads((work["ws2"] / case / "pmm_manifest.json").read_text())["world_size"] == 2


def test_setup_is_not_trivial(work):
    """Guard the test itself: checkpoints differ from step to step, and so merge != newest."""
    for case, (run, _, steps, weights) in CASES.items():
        sources = [_saved_weights(work["runs"], run, step) for step in steps]
        floats = [n for n, v in sources[-1].items() if v.is_floating_point() and n != "running_mean"]
        assert floats
        for name in floats:
            assert not torch.equal(sources[0][name], sources[-1][name]), f"{case}: {name} never changed"
    bf16 = trusted_load(work["runs"] / "zero2_bf16" / NEWEST_TAG / "mp_rank_00_model_states.pt")["module"]
    assert bf16["inp.weight"].dtype == torch.bfloat16


# -- launchers -------------------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tool(name):
    """A launcher installed next to this Python (the virtual environment's), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return beside if os.access(beside, os.X_OK) else (shutil.which(name) or name)


LAUNCHERS = {
    # the deepspeed launcher passes --local_rank=N, before the command name with --module
    "deepspeed": ("zero3_bf16", lambda: [_tool("deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()),
                                         "--module", "pmm_dist"]),
    # rank discovery through mpi4py (mpich wheel), collectives on gloo
    "mpiexec": ("moe_ep2", lambda: [_tool("mpiexec"), "-n", "2", sys.executable, "-m", "pmm_dist"]),
}  # torchrun: the world-size-2 merges of the fixture


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_launchers_give_the_same_bytes(work, tmp_path, launcher):
    case, prefix = LAUNCHERS[launcher]
    run, options, _, _ = CASES[case]
    out = tmp_path / "out"
    args = [a for a in _cli_args(work["runs"] / run, out, options) if a != "--quiet"]
    proc = run_python(args, launcher=prefix(), check=f"pmm_dist merge under {launcher}")
    assert "world size: 2" in proc.stdout, proc.stdout[-3000:]
    reference = work["ws1"] / case / NEWEST_TAG
    for path in reference.iterdir():
        assert (out / NEWEST_TAG / path.name).read_bytes() == path.read_bytes(), f"{launcher}: {path.name} differs"
    assert (out / "latest").read_text() == NEWEST_TAG


# -- bad input: a clear error naming the file, non-zero exit, nothing committed -------------------------
def _assert_refused(tmp_path, sources, *needles, **options):
    out = tmp_path / "refused_out"
    with pytest.raises(MergeError) as info:
        pmm_dist.merge(sources=[str(s) for s in sources], out=str(out), device="cpu", quiet=True, **options)
    for needle in needles:
        assert str(needle) in str(info.value), f"{needle!r} not in the error:\n{info.value}"
    assert not out.exists(), f"something was committed: {os.listdir(out)}"
    return str(info.value)


def test_refuses_a_mixture_of_zero_stages(work, tmp_path):
    """One message listing which checkpoint has which stage (a change of data-parallel size alone
    is merged: tests/test_deepspeed_layouts_real.py)."""
    runs = work["runs"]
    stage1, stage2 = runs / "zero1_fp32" / "global_step4", runs / "zero2_fp32" / NEWEST_TAG
    err = _assert_refused(tmp_path, [stage1, stage2], f"zero_stage=1, dp=2: {stage1}", f"zero_stage=2, dp=2: {stage2}")
    assert "problems" not in err
    stage3 = runs / "zero3_fp32" / "global_step6"
    _assert_refused(tmp_path, [stage3, stage2], f"zero_stage=3, dp=2: {stage3}")
    dp1 = runs / "zero2_fp32_dp1" / "global_step4"
    _assert_refused(tmp_path, [dp1, stage3], f"zero_stage=2, dp=1: {dp1}", f"zero_stage=3, dp=2: {stage3}")


@pytest.mark.parametrize("missing", ["global_step4/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                                     f"{NEWEST_TAG}/zero_pp_rank_1_mp_rank_00_model_states.pt",
                                     f"{NEWEST_TAG}/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_refuses_a_missing_rank_file(work, tmp_path, missing, fresh_copy):
    run = fresh_copy(work["runs"] / "zero3_bf16")
    (run / missing).unlink()
    _assert_refused(tmp_path, [run], run / missing, "missing file")


def test_pruned_optimizer_states_are_only_needed_where_read(work, tmp_path, fresh_copy):
    """ZeRO 0-2 optimizer files are needed by --optimizer drop only for the masters: pruned from
    older checkpoints, the module's own copies are merged (the manifest says so and why); with
    --optimizer latest every checkpoint's are needed (their masters are merged)."""
    run = fresh_copy(work["runs"] / "zero2_bf16")
    for step in ALL_STEPS[:-1]:
        for path in (run / f"global_step{step}").glob("*optim_states.pt"):
            path.unlink()
    out = tmp_path / "out"
    pmm_dist.merge(sources=[str(run)], out=str(out), device="cpu", quiet=True, **CASES["zero2_bf16"][1])
    assert sorted(p.name for p in (out / NEWEST_TAG).iterdir()) == ["mp_rank_00_model_states.pt"]
    manifest = json.loads((out / "pmm_manifest.json").read_text())
    assert manifest["model_weights_from"] == "model copies" and "no optimizer files" in manifest["model_weights_notes"][0]
    merged = trusted_load(out / NEWEST_TAG / "mp_rank_00_model_states.pt")["module"]
    copies = [trusted_load(run / f"global_step{step}" / "mp_rank_00_model_states.pt")["module"] for step in ALL_STEPS]
    for name, value in merged.items():
        if value.is_floating_point():
            assert_merged_within_one_ulp(value, [c[name] for c in copies], CASES["zero2_bf16"][3], name)
    missing = run / "global_step6" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    _assert_refused(tmp_path, [run], missing, "missing file", optimizer="latest")


def test_refuses_a_missing_expert_file(work, tmp_path, fresh_copy):
    run = fresh_copy(work["runs"] / "moe_ep2")
    missing = run / NEWEST_TAG / "layer_0_expert_3_mp_rank_00_model_states.pt"
    missing.unlink()
    _assert_refused(tmp_path, [run], missing, "num_experts=[4]")


def test_refuses_latest_naming_a_missing_tag(work, tmp_path, fresh_copy):
    run = fresh_copy(work["runs"] / "zero1_bf16")
    (run / "latest").write_text("global_step10")
    _assert_refused(tmp_path, [run], run / "latest", "global_step10", "does not exist")


def _corrupt_zero3_partition(work, fresh_copy):
    """A copy of the ZeRO-3 run where one older optimizer file's flat partition has another size."""
    run = fresh_copy(work["runs"] / "zero3_fp32")
    path = run / "global_step6" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    state = trusted_load(path)
    flat = state["optimizer_state_dict"]["fp32_flat_groups"]
    flat[0] = flat[0][:-2].clone()
    torch.save(state, path)
    return run, path


def test_refuses_zero3_partitions_that_do_not_line_up(work, tmp_path, fresh_copy):
    run, path = _corrupt_zero3_partition(work, fresh_copy)
    _assert_refused(tmp_path, [run], path, "fp32_flat_groups.0", "shape")


def test_bad_input_exits_non_zero_on_every_rank(work, tmp_path, fresh_copy):
    """The command line at world size 2: the rank that checks the corrupt file fails the merge for
    all; the error names the file, every rank exits non-zero and nothing is committed."""
    run, path = _corrupt_zero3_partition(work, fresh_copy)
    out = tmp_path / "out"
    proc = run_python(["merge", str(run), "--out", str(out), "--device", "cpu"], launcher=LAUNCHERS["mpiexec"][1]())
    assert proc.returncode != 0
    assert str(path) in proc.stderr and "fp32_flat_groups.0" in proc.stderr, proc.stderr[-3000:]
    assert not (out / "latest").exists() and not (out / NEWEST_TAG).exists()
    assert not out.exists() or os.listdir(out) == []
