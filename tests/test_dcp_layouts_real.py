"""Plain DCP across a world-size change, with the real FSDP2 stack (gloo, CPU).

tests/dcp_real/dcp_train.py trains a tiny MLP whose vocabulary (67) and FFN width (45) give
uneven FSDP2 shards. Run "ws2-ws1": steps 10 and 20 saved by a 2-rank job, then a 1-rank job
resumes from step 20 (``dcp.load`` reshards) and saves step 30. Run "ws1-ws2": the other order.
Each run is merged (SMA, --optimizer drop) at merge world sizes 1, 2 and 3. The merged
checkpoint, loaded with ``dcp.load`` in one process and into the FSDP2 model on 1 and 2 ranks,
must match an independent float64 reference (each source loaded with ``dcp.load``, averaged)
within one ulp of the stored dtype, keep the newest's chunking, and be bitwise identical
across merge world sizes.
"""
import json
import pathlib
import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

import pmm_dist

from .conftest import run_python
from .helpers import assert_merged_within_one_ulp, sma

ROOT = pathlib.Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "dcp_real" / "dcp_train.py"
SHAPE_ARGS = ["--vocab", "67", "--ffn", "45"]
STEPS = [10, 20, 30]
WEIGHTS = sma(len(STEPS))
ORDERS = {"ws2-ws1": (2, 1), "ws1-ws2": (1, 2)}  # world size of the job saving steps 10, 20; of step 30
MERGE_WORLD_SIZES = (1, 2, 3)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")






def _metadata(ckpt):
    with open(pathlib.Path(ckpt) / ".metadata", "rb") as f:  # test side: our own files
        return pickle.load(f)


def _load_model(ckpt):
    """The global model tensors via dcp.load in this (single) process."""
    entries = _metadata(ckpt).state_dict_metadata
    state = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype)
             for k, v in entries.items() if k.startswith("model.") and hasattr(v, "size")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(ckpt)))
    return state


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("dcp_layouts")
    found = {}
    for name, (first, second) in ORDERS.items():
        run = base / name
        run_python([HELPER, "train", run, "--steps", "10,20"] + SHAPE_ARGS, nproc=first, check=f"{name}: steps 10, 20 at world size {first}")
        run_python([HELPER, "train", run, "--steps", "30", "--resume", run / "step-20"] + SHAPE_ARGS, nproc=second, check=f"{name}: resumed at world size {second}, step 30")
        outs = {1: base / f"{name}_merged_ws1"}
        pmm_dist.merge(sources=[str(run)], out=str(outs[1]), method="sma", device="cpu", quiet=True)
        for world_size in MERGE_WORLD_SIZES[1:]:
            outs[world_size] = base / f"{name}_merged_ws{world_size}"
            run_python(["-m", "pmm_dist", "merge", run, "--out", outs[world_size], "--method", "sma",
                                          "--device", "cpu"], nproc=world_size, check=f"{name}: pmm_dist merge at world size {world_size}")
        found[name] = {"run": run, "outs": outs}
    # The merged checkpoints (merge world size 3) loaded into the FSDP2 model on 1 and 2 ranks.
    for nproc in (1, 2):
        pairs = []
        for name, entry in found.items():
            entry[f"fsdp{nproc}"] = base / f"{name}_fsdp{nproc}.pt"
            pairs += [entry["outs"][3], entry[f"fsdp{nproc}"]]
        run_python([HELPER, "load", *pairs] + SHAPE_ARGS, nproc=nproc, check=f"dcp.load into the FSDP2 model on {nproc} ranks")
    return found


@pytest.mark.parametrize("name", ORDERS)
def test_sources_really_have_two_layouts(runs, name):
    run = runs[name]["run"]
    first, second = ORDERS[name]
    for step, world_size in ((10, first), (20, first), (30, second)):
        chunks = _metadata(run / f"step-{step}").state_dict_metadata["model.embed.weight"].chunks
        assert len(chunks) == world_size
        if world_size == 2:
            assert sorted(tuple(c.sizes)[0] for c in chunks) == [33, 34]  # uneven shards


@pytest.mark.parametrize("world_size", MERGE_WORLD_SIZES)
@pytest.mark.parametrize("name", ORDERS)
def test_merged_matches_float64_reference(runs, name, world_size):
    run, out = runs[name]["run"], runs[name]["outs"][world_size]
    inputs = [_load_model(run / f"step-{s}") for s in STEPS]
    merged = _load_model(out)
    assert set(merged) == set(inputs[-1])
    dtypes = set()
    for key, value in merged.items():
        assert value.dtype == inputs[-1][key].dtype, key
        if value.is_floating_point():
            assert_merged_within_one_ulp(value, [s[key] for s in inputs], WEIGHTS, f"{name} ws{world_size} {key}")
            assert not torch.equal(value, inputs[-1][key]), key
            dtypes.add(value.dtype)
        else:
            assert torch.equal(value, inputs[-1][key]), key
    assert dtypes == {torch.float32, torch.bfloat16}
    # The newest's chunking, keys, shapes and dtypes.
    newest_md, merged_md = _metadata(run / "step-30"), _metadata(out)
    assert {k: v for k, v in merged_md.state_dict_metadata.items() if k.startswith("model.")} == \
        {k: v for k, v in newest_md.state_dict_metadata.items() if k.startswith("model.")}


@pytest.mark.parametrize("name", ORDERS)
def test_merge_world_sizes_agree_bitwise(runs, name):
    results = [_load_model(runs[name]["outs"][w]) for w in MERGE_WORLD_SIZES]
    for other in results[1:]:
        assert all(torch.equal(results[0][k], other[k]) for k in results[0])


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("name", ORDERS)
def test_loads_into_fsdp_model(runs, name, nproc):
    dump = torch.load(runs[name][f"fsdp{nproc}"], weights_only=False)
    expected = _load_model(runs[name]["outs"][1])
    assert dump["train_state"] == {"step": 30, "tag": "step-30"}  # bytes entries: the newest's
    assert set(dump["tensors"]) == {k[len("model."):] for k in expected}
    for key, value in dump["tensors"].items():
        assert torch.equal(value, expected[f"model.{key}"]), key


@pytest.mark.parametrize("name", ORDERS)
def test_manifest_counts_bytes_per_source(runs, name):
    manifest = json.loads((runs[name]["outs"][2] / "pmm_manifest.json").read_text())
    per_source = manifest["bytes_read_by_source"]
    assert len(per_source) == 3 and all(n > 0 for n in per_source)
    model_bytes = sum(v.numel() * v.element_size() for k, v in _load_model(runs[name]["run"] / "step-30").items()
                      if v.is_floating_point())
    # Each source's model weights once, however it is chunked (plus the blobs' zip headers:
    # about 1.5 KiB per stored chunk read, whole or located).
    assert all(model_bytes <= n <= model_bytes + 32 * 1536 for n in per_source), per_source
    assert manifest["bytes_read"] >= sum(per_source)


def test_optimizer_latest_takes_the_newest_training_state(runs, tmp_path):
    """--optimizer latest across the layout change: the newest's optimizer state (its own
    chunking), never the older ones' (chunked otherwise, and training state is not averaged)."""
    run = runs["ws2-ws1"]["run"]
    out = tmp_path / "out"
    pmm_dist.merge(sources=[str(run)], out=str(out), method="sma", optimizer="latest", device="cpu", quiet=True)
    merged_md, newest_md = _metadata(out), _metadata(run / "step-30")
    assert merged_md.state_dict_metadata == newest_md.state_dict_metadata
    keys = [k for k, v in newest_md.state_dict_metadata.items()
            if k.startswith("optimizer.state.") and hasattr(v, "size")]
    assert len(keys) >= 10

    def load(ckpt):
        state = {k: torch.empty(tuple(newest_md.state_dict_metadata[k].size),
                                dtype=newest_md.state_dict_metadata[k].properties.dtype) for k in keys}
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(ckpt)))
        return state
    merged, newest = load(out), load(run / "step-30")
    assert all(torch.equal(merged[k], newest[k]) for k in keys)
