"""End to end with a REAL megatron-core GPTModel saved as ``torch_dist`` (dist_checkpointing, gloo, CPU).

tests/dcp_real/gpt_dist.py trains a tiny SwiGLU GPTModel at TP=2 and saves iterations 2, 4, 6
with ``dist_checkpointing.save`` (model, megatron-core optimizer ShardedTensors, rng_state and
``_extra_state`` ShardedObjects, common state). pmm_dist merges the run (EMA) on one process and
on two torchrun processes; both results and every input are then loaded with
``dist_checkpointing.load`` into FRESH GPTModels at TP=1 and at TP=2 (Megatron reshards on load).
The merged weights must equal an independent float64 reference, sum_i w_i * (input i as loaded
by Megatron at the same TP), to within one ulp of each tensor's dtype.
"""
import json
import os
import pathlib
import pickle
import shutil

import pytest
import torch

import pmm_dist
from pmm_dist.errors import MergeError
from pmm_dist.formats import resolve_format
from pmm_dist.formats.megatron_dist import MegatronDistFormat
from pmm_dist.cli.verify import verify_output

from .conftest import REPO, run_cli, run_python
from .helpers import assert_merged_within_one_ulp, ema, wma

HELPER = pathlib.Path(REPO) / "tests" / "dcp_real" / "gpt_dist.py"
ITERATIONS = [2, 4, 6]
NEWEST = ITERATIONS[-1]
ALPHA = 0.3
WEIGHTS = ema(len(ITERATIONS), ALPHA)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*Transformer Engine and Apex are not installed:UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),  # dcp.load in this process
]


def _ckpt(root, iteration=NEWEST):
    return pathlib.Path(root) / f"iter_{iteration:07d}"


def _read_metadata(ckpt_dir):
    """Test side: the DCP metadata of our own test files, read the way torch's reader does."""
    with open(pathlib.Path(ckpt_dir) / ".metadata", "rb") as f:
        return pickle.load(f)


def _dcp_load(ckpt_dir, metadata, keys):
    """Full global tensors of ``keys`` through torch.distributed.checkpoint.load (one process)."""
    import torch.distributed.checkpoint as dcp
    state = {k: torch.empty(tuple(metadata.state_dict_metadata[k].size),
                            dtype=metadata.state_dict_metadata[k].properties.dtype) for k in keys}
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(ckpt_dir)))
    return state


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    base = tmp_path_factory.mktemp("megatron_dist")
    run = base / "run"
    run_python([HELPER, "train", run, "--iterations", ",".join(map(str, ITERATIONS))], nproc=2,
               check="training the megatron-core GPTModel at TP=2 with torch_dist checkpoints")
    # World size 1 through the Python API in this process, 2 through the CLI under torchrun.
    outs = {1: (pmm_dist.merge(sources=[str(run)], out=str(base / "out_ws1"), method="ema", alpha=ALPHA,
                               device="cpu", quiet=True), base / "out_ws1")}
    outs[2] = run_cli(["merge", run, "--out", base / "out_ws2", "--method", "ema", "--alpha", ALPHA, "--device", "cpu"],
                      world_size=2, check="pmm_dist merge at world size 2"), base / "out_ws2"
    specs = [(f"in{it}", _ckpt(run, it)) for it in ITERATIONS] + [(f"ws{w}", _ckpt(o)) for w, (_, o) in outs.items()]
    dumps = {}
    for tp in (1, 2):
        args = []
        for name, ckpt in specs:
            dumps[(name, tp)] = base / f"dump_{name}_tp{tp}"
            args += ["--checkpoint", f"{ckpt}:{dumps[(name, tp)]}"]
        run_python([HELPER, "load", *args], nproc=tp, check=f"dist_checkpointing.load into fresh GPTModels at TP={tp}")
    return {"run": run, "outs": outs, "dumps": dumps}


def _dump(workdir, name, tp, rank):
    return torch.load(f"{workdir['dumps'][(name, tp)]}.rank{rank}.pt", map_location="cpu", weights_only=False)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("world_size", [1, 2])
def test_loads_into_gptmodel_and_matches_reference(workdir, world_size, tp):
    for rank in range(tp):
        merged = _dump(workdir, f"ws{world_size}", tp, rank)
        inputs = [_dump(workdir, f"in{it}", tp, rank) for it in ITERATIONS]
        newest = inputs[-1]
        assert set(merged["tensors"]) == set(newest["tensors"])
        # A fresh model (other seed): the strict load must have replaced every tensor.
        assert merged["changed_by_load"] == sorted(merged["tensors"])
        dtypes = set()
        for key, value in merged["tensors"].items():
            assert value.dtype == newest["tensors"][key].dtype, key
            dtypes.add(value.dtype)
            assert_merged_within_one_ulp(value, [d["tensors"][key] for d in inputs], WEIGHTS,
                                         f"ws{world_size} TP={tp} rank {rank} {key}")
        assert dtypes == {torch.bfloat16, torch.float32}
        # Non-tensor state comes from the newest checkpoint.
        assert merged["extra_state"] == newest["extra_state"] == f"te-{NEWEST}".encode()
        assert merged["iteration"] == NEWEST
        assert not merged["has_optimizer_common"] and newest["has_optimizer_common"]


def test_world_sizes_agree_bitwise(workdir):
    for tp in (1, 2):
        for rank in range(tp):
            a = _dump(workdir, "ws1", tp, rank)["tensors"]
            b = _dump(workdir, "ws2", tp, rank)["tensors"]
            for key in a:
                assert torch.equal(a[key], b[key]), f"TP={tp} rank {rank} {key} differs between world sizes"


def test_setup_is_not_trivial(workdir):
    """Guard the test itself: the inputs differ, so copying one of them would fail above."""
    inputs = [_dump(workdir, f"in{it}", 1, 0)["tensors"] for it in ITERATIONS]
    for key in inputs[-1]:
        assert not torch.equal(inputs[0][key], inputs[-1][key]), f"{key} did not change during training"
    merged = _dump(workdir, "ws1", 1, 0)["tensors"]
    assert sum(not torch.equal(merged[k], inputs[-1][k]) for k in merged) == len(merged)


@pytest.mark.parametrize("world_size", [1, 2])
def test_output_layout_metadata_and_manifest(workdir, world_size):
    proc, out = workdir["outs"][world_size]
    run = workdir["run"]
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == str(NEWEST)
    assert sorted(p.name for p in out.iterdir()) == ["iter_0000006", "latest_checkpointed_iteration.txt",
                                                     "pmm_manifest.json"]
    ckpt = _ckpt(out)
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(
        [".metadata", "common.pt", "metadata.json"] + [f"__{k}_0.distcp" for k in range(world_size)])
    assert (ckpt / "metadata.json").read_bytes() == (_ckpt(run) / "metadata.json").read_bytes()
    merged_md, newest_md = _read_metadata(ckpt), _read_metadata(_ckpt(run))
    kept = {k: v for k, v in newest_md.state_dict_metadata.items()
            if not k.startswith("optimizer.") and not k.startswith("rng_state/")}
    assert len(kept) < len(newest_md.state_dict_metadata)
    assert merged_md.state_dict_metadata == kept  # same keys, shapes, dtypes and chunking; no training state
    assert not hasattr(merged_md, "all_local_plans")
    common = torch.load(ckpt / "common.pt", weights_only=False)
    newest_common = torch.load(_ckpt(run) / "common.pt", weights_only=False)
    assert set(newest_common) - set(common) == {"optimizer", "opt_param_scheduler"}
    assert common["args"] == newest_common["args"] and common["iteration"] == NEWEST
    assert verify_output(str(out)) == []  # pmm-dist verify: sizes, sha256, inventory vs the newest source
    manifest = json.loads((out / "pmm_manifest.json").read_text())
    assert manifest["format"] == "megatron-dist" and manifest["world_size"] == world_size
    assert manifest["weights"] == pytest.approx(WEIGHTS)
    assert [s["iteration"] for s in manifest["sources"]] == ITERATIONS
    # Every file written is listed, the tracker too (issue 15).
    assert {f["path"] for f in manifest["files"]} == {f"iter_0000006/{p.name}" for p in ckpt.iterdir()} | {
        "latest_checkpointed_iteration.txt"}
    for entry in manifest["files"]:
        assert os.path.getsize(out / entry["path"]) == entry["bytes"]
    if world_size == 2:  # the CLI's summary
        assert "megatron-dist checkpoints" in proc.stdout and "backend=torch_dist" in proc.stdout
    else:  # the Python API's result
        assert proc.plan.format_name == "megatron-dist" and proc.plan.layout["saved_tp"] == 2
        assert proc.output_path == str(_ckpt(out)) and proc.num_tensors_merged > 0


def test_merged_chunks_match_reference_at_dcp_level(workdir):
    """The merged file read back chunk-free with torch's own DCP reader, all model tensors."""
    run, out = workdir["run"], workdir["outs"][2][1]
    merged_md = _read_metadata(_ckpt(out))
    keys = [k for k, v in merged_md.state_dict_metadata.items() if hasattr(v, "size")]
    merged = _dcp_load(_ckpt(out), merged_md, keys)
    inputs = [_dcp_load(_ckpt(run, it), _read_metadata(_ckpt(run, it)), keys) for it in ITERATIONS]
    for key in keys:
        assert_merged_within_one_ulp(merged[key], [s[key] for s in inputs], WEIGHTS, key)


def test_optimizer_latest_keeps_newest_training_state(workdir, tmp_path):
    run = workdir["run"]
    result = pmm_dist.merge(sources=[str(run)], out=str(tmp_path / "out"), method="wma", last=2,
                            optimizer="latest", device="cpu", quiet=True)
    assert [c.iteration for c in result.plan.checkpoints] == ITERATIONS[-2:]
    ckpt = pathlib.Path(result.output_path)
    merged_md, newest_md = _read_metadata(ckpt), _read_metadata(_ckpt(run))
    assert merged_md.state_dict_metadata == newest_md.state_dict_metadata
    assert (ckpt / "common.pt").read_bytes() == (_ckpt(run) / "common.pt").read_bytes()
    optimizer_keys = [k for k in newest_md.state_dict_metadata if k.startswith("optimizer.")]
    assert len(optimizer_keys) > 20
    merged = _dcp_load(ckpt, merged_md, optimizer_keys + ["output_layer.weight"])
    newest = _dcp_load(_ckpt(run), newest_md, optimizer_keys + ["output_layer.weight"])
    previous = _dcp_load(_ckpt(run, ITERATIONS[-2]), newest_md, ["output_layer.weight"])
    for key in optimizer_keys:
        assert torch.equal(merged[key], newest[key]), f"{key}: optimizer state not the newest's"
    assert_merged_within_one_ulp(merged["output_layer.weight"],
                                 [previous["output_layer.weight"], newest["output_layer.weight"]], wma(2), "wma")
    # rng_state ShardedObjects are bytes entries: copied byte for byte
    rng_keys = [k for k in newest_md.state_dict_metadata if k.startswith("rng_state/")]
    assert rng_keys
    for key in rng_keys:
        blobs = []
        for path, md in ((ckpt, merged_md), (_ckpt(run), newest_md)):
            info = next(v for i, v in md.storage_data.items() if i.fqn == key)
            with open(path / info.relative_path, "rb") as f:
                f.seek(info.offset)
                blobs.append(f.read(info.length))
        assert blobs[0] == blobs[1], key


def test_auto_detection_prefers_megatron_dist(workdir):
    run = str(workdir["run"])
    assert resolve_format("auto", [run]).name == "megatron-dist"
    assert resolve_format("auto", [str(_ckpt(run, 2)), str(_ckpt(run, 4))]).name == "megatron-dist"
    refs = resolve_format("auto", [str(_ckpt(run, 4)), str(_ckpt(run, 2))]).discover(
        [str(_ckpt(run, 4)), str(_ckpt(run, 2))])
    assert [r.iteration for r in refs] == [2, 4]


def test_discovery_and_incomplete_checkpoints(workdir, tmp_path, fresh_copy):
    run = fresh_copy(workdir["run"])
    fmt = MegatronDistFormat()
    # Directories not named iter_*: the iteration comes from common.pt.
    for name, it in (("first", 4), ("second", 2)):
        shutil.copytree(_ckpt(run, it), tmp_path / name)
    refs = fmt.discover([str(tmp_path / "first"), str(tmp_path / "second")])
    assert [(r.iteration, os.path.basename(r.path)) for r in refs] == [(2, "second"), (4, "first")]
    # Without metadata.json (Megatron writes it last) a checkpoint is incomplete and skipped...
    os.remove(_ckpt(run, 4) / "metadata.json")
    assert [r.iteration for r in fmt.discover([str(run)])] == [2, 6]
    # ...but the tracker's must be complete, and the common state is required.
    os.remove(_ckpt(run, 6) / "common.pt")
    with pytest.raises(MergeError, match=f"{_ckpt(run, 6) / 'common.pt'}: missing file"):
        pmm_dist.merge(sources=[str(run)], out=str(tmp_path / "out"), device="cpu", quiet=True)
    os.remove(_ckpt(run, 6) / "metadata.json")
    with pytest.raises(MergeError, match="names iteration 6, but .* is not a complete torch_dist checkpoint"):
        fmt.discover([str(run)])
