"""Multi-process merges of synthetic Megatron-LM runs against an independent float64 reference."""
import io
import json
import os

import pytest
import torch

import pmm_dist
from pmm_dist.engine.report import human_bytes
from pmm_dist.testing.synthetic import generate_run

from .conftest import run_cli
from .helpers import assert_merged_within_one_ulp, ema, shard_files, trusted_load

ITERATIONS = [100, 200, 300, 400, 500]
MERGED = [200, 300, 400, 500]  # --last 4 --interval 100
WORLD_SIZES = [1, 2, 4]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("run") / "run")
    generate_run(run, iterations=ITERATIONS, tp=2, pp=2, ep=2, vp=2, num_layers=4, hidden_size=32,
                 ffn_hidden_size=64, num_experts=4, vocab_size=64, distrib_optim=True)
    return run


@pytest.fixture(scope="module")
def merged(run_dir, tmp_path_factory):
    outputs = {}
    for world_size in WORLD_SIZES:
        out = str(tmp_path_factory.mktemp(f"ws{world_size}") / "out")
        proc = run_cli(["merge", run_dir, "--out", out, "--method", "ema", "--alpha", "0.2", "--last", "4",
                        "--interval", "100", "--device", "cpu"], world_size=world_size)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        outputs[world_size] = (out, proc)
    return outputs


def test_output_matches_float64_reference(run_dir, merged):
    out, _ = merged[1]
    weights = ema(len(MERGED), 0.2)
    ckpt = os.path.join(out, "iter_0000500")
    files = shard_files(ckpt)
    assert len(files) == 8 and all(f.endswith("model_optim_rng.pt") for f in files)
    num_checked = 0
    for rel in files:
        result = trusted_load(os.path.join(ckpt, rel))
        sources = [trusted_load(os.path.join(run_dir, f"iter_{it:07d}", rel)) for it in MERGED]
        newest = sources[-1]
        assert set(result) == set(newest) - {"optimizer", "opt_param_scheduler", "rng_state"}
        assert set(result) >= {"model0", "model1", "args", "iteration", "checkpoint_version"}
        assert result["args"] == newest["args"] and result["iteration"] == 500
        for chunk in ("model0", "model1"):
            assert list(result[chunk]) == list(newest[chunk])
            for key, value in result[chunk].items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    assert value.dtype == newest[chunk][key].dtype
                    assert_merged_within_one_ulp(value, [s[chunk][key] for s in sources], weights,
                                                 f"{rel}:{chunk}.{key}")
                    num_checked += 1
                elif isinstance(value, io.BytesIO):
                    assert value.getvalue() == newest[chunk][key].getvalue() == b"te-500"
                elif isinstance(value, torch.Tensor):
                    assert torch.equal(value, newest[chunk][key])  # integer: newest, never averaged
                else:
                    assert value == newest[chunk][key]
    assert num_checked > 100


def test_router_in_fp32_is_merged_too(run_dir, merged):
    out, _ = merged[1]
    rel = "mp_rank_00_000_000/model_optim_rng.pt"
    result = trusted_load(os.path.join(out, "iter_0000500", rel))
    router = result["model0"]["decoder.layers.0.mlp.router.weight"]
    assert router.dtype == torch.float32
    sources = [trusted_load(os.path.join(run_dir, f"iter_{it:07d}", rel))["model0"]["decoder.layers.0.mlp.router.weight"]
               for it in MERGED]
    assert_merged_within_one_ulp(router, sources, ema(4, 0.2), "router")


def test_bitwise_identical_across_world_sizes(merged):
    reference_out = merged[1][0]
    for world_size in WORLD_SIZES[1:]:
        out = merged[world_size][0]
        for rel in shard_files(os.path.join(reference_out, "iter_0000500")):
            with open(os.path.join(reference_out, "iter_0000500", rel), "rb") as a, \
                    open(os.path.join(out, "iter_0000500", rel), "rb") as b:
                assert a.read() == b.read(), f"{rel} differs between world size 1 and {world_size}"


def test_tracker_manifest_and_summary(merged):
    for world_size, (out, proc) in merged.items():
        assert open(os.path.join(out, "latest_checkpointed_iteration.txt")).read().strip() == "500"
        manifest = json.load(open(os.path.join(out, "pmm_manifest.json")))
        assert manifest["format_version"] == 1 and manifest["pmm_dist_version"] == pmm_dist.__version__
        assert manifest["method"] == "ema" and manifest["method_options"] == {"alpha": 0.2}
        assert manifest["weights"] == pytest.approx(ema(4, 0.2))
        assert [s["iteration"] for s in manifest["sources"]] == MERGED
        assert manifest["world_size"] == world_size and len(manifest["peak_rss_bytes_by_rank"]) == world_size
        assert len(manifest["files"]) == 8 + 1  # the shard files and the tracker (issue 15: every file written)
        for entry in manifest["files"]:
            assert os.path.getsize(os.path.join(out, entry["path"])) == entry["bytes"]
            assert len(entry["sha256"]) == 64
        assert set(manifest["timings_s"]) >= {"plan", "validate", "merge", "commit", "total"}
        assert (manifest["metadata_bytes_exchanged"] > 0) == (world_size > 1)
        assert "GB/s" in proc.stdout and "peak RSS per rank" in proc.stdout
        assert "metadata exchanged between ranks" in proc.stdout
        assert f"  bytes read: {human_bytes(manifest['bytes_read'])}, written: " in proc.stdout  # any world size
        assert not os.path.exists(os.path.join(out, ".pmm_staging"))


def test_optimizer_latest_keeps_the_newest_training_state_with_merged_masters(run_dir, tmp_path):
    out = str(tmp_path / "out")
    proc = run_cli(["merge", run_dir, "--out", out, "--method", "sma", "--last", "2", "--optimizer", "latest",
                    "--quiet"], world_size=2)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # --quiet
    for shard in ("mp_rank_00_000_000", "mp_rank_01_001_001"):
        result = trusted_load(os.path.join(out, "iter_0000500", shard, "model_optim_rng.pt"))
        newest = trusted_load(os.path.join(run_dir, "iter_0000500", shard, "model_optim_rng.pt"))
        assert result["opt_param_scheduler"] == newest["opt_param_scheduler"]
        assert torch.equal(result["rng_state"][0]["torch_rng_state"], newest["rng_state"][0]["torch_rng_state"])
        assert (result["rng_state"][0]["np_rng_state"][1] == newest["rng_state"][0]["np_rng_state"][1]).all()
        assert result["optimizer"] == newest["optimizer"]  # the distributed optimizer's param groups
        # distrib_optim.pt: the masters (param) merged, the rest the newest's
        merged, *sources = (trusted_load(os.path.join(d, shard, "distrib_optim.pt"))
                            for d in (os.path.join(out, "iter_0000500"), os.path.join(run_dir, "iter_0000400"),
                                      os.path.join(run_dir, "iter_0000500")))
        buffer, buffers = merged[0][(torch.bfloat16, torch.float32)], [s[0][(torch.bfloat16, torch.float32)] for s in sources]
        assert merged["buckets_coalesced"] and buffer["numel_unpadded"] == buffers[-1]["numel_unpadded"]
        assert_merged_within_one_ulp(buffer["param"], [b["param"] for b in buffers], [0.5, 0.5], f"{shard} param")


@pytest.mark.unit  # in this process
def test_python_api_with_explicit_checkpoints_and_weights(run_dir, tmp_path):
    sources = [os.path.join(run_dir, f"iter_{it:07d}") for it in (500, 100, 300)]
    result = pmm_dist.merge(sources=sources, out=str(tmp_path / "out"), method="weighted", weights=[1, 2, 3],
                            device="cpu", quiet=True)
    assert [c.iteration for c in result.plan.checkpoints] == [100, 300, 500]
    assert result.plan.weights == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert result.num_bytes_written == sum(f["bytes"] for f in result.files) > 0
    rel = "mp_rank_01_001_000/model_optim_rng.pt"
    merged = trusted_load(os.path.join(result.output_path, rel))["model1"]["output_layer.weight"]
    stack = [trusted_load(os.path.join(run_dir, f"iter_{it:07d}", rel))["model1"]["output_layer.weight"]
             for it in (100, 300, 500)]
    assert_merged_within_one_ulp(merged, stack, [1 / 6, 2 / 6, 3 / 6], "output_layer")


def test_explicit_weights_without_normalisation(run_dir, tmp_path):
    out = str(tmp_path / "out")
    proc = run_cli(["merge", run_dir, "--out", out, "--method", "weighted", "--weights", "1,1", "--no-normalize",
                    "--iterations", "400,500", "--quiet"])
    assert proc.returncode == 0, proc.stderr
    rel = "mp_rank_00_000_000/model_optim_rng.pt"
    merged = trusted_load(os.path.join(out, "iter_0000500", rel))["model0"]["embedding.word_embeddings.weight"]
    stack = [trusted_load(os.path.join(run_dir, f"iter_{it:07d}", rel))["model0"]["embedding.word_embeddings.weight"]
             for it in (400, 500)]
    assert_merged_within_one_ulp(merged, stack, [1.0, 1.0], "sum")


def test_dry_run_prints_plan_and_writes_nothing(run_dir, tmp_path):
    out = str(tmp_path / "out")
    proc = run_cli(["merge", run_dir, "--out", out, "--method", "wma", "--dry-run"], world_size=2)
    assert proc.returncode == 0, proc.stderr
    assert "rank 0:" in proc.stdout and "rank 1:" in proc.stdout and "w=" in proc.stdout
    assert "tp=2, pp=2, ep=2" in proc.stdout
    assert not os.path.exists(out)
