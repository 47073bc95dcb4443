"""Plain PyTorch DCP: a real 2-rank FSDP2 run saved with ``torch.distributed.checkpoint.save``.

tests/dcp_real/dcp_train.py trains a tiny MLP sharded with ``fully_shard`` over 2 gloo ranks
and saves steps 10, 20, 30 as RUN/step-{N}/ (model, AdamW state, LR scheduler and a train_state
as bytes entries). pmm_dist merges the run at world sizes 1 (in process) and 2 (torchrun); the
results are loaded back with ``torch.distributed.checkpoint.load``, in one process and into the
FSDP2 model on 2 ranks, and compared with an independent float64 reference of the inputs as
``dcp.load`` reads them. A source re-chunked (another layout) merges to the same result. Bad
inputs (other global shape, a missing ``.distcp`` file, a corrupt or hostile ``.metadata``) must
fail with a message naming checkpoint and key.
"""
import json
import os
import pathlib
import pickle
import shutil
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

import pmm_dist
from pmm_dist.errors import MergeError
from pmm_dist.formats import resolve_format
from pmm_dist.formats.dcp import DcpFormat, chunk_keys, load_metadata
from pmm_dist.plan import assign_units
from pmm_dist.cli.verify import verify_output

from .conftest import REPO, run_cli, run_python
from .helpers import assert_merged_within_one_ulp, ema

HELPER = pathlib.Path(REPO) / "tests" / "dcp_real" / "dcp_train.py"
STEPS = [10, 20, 30]
ALPHA = 0.4
WEIGHTS = ema(len(STEPS), ALPHA)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _metadata(ckpt):
    with open(pathlib.Path(ckpt) / ".metadata", "rb") as f:  # test side: our own files
        return pickle.load(f)


def _load_tensors(ckpt, prefix="model."):
    """Global tensors under ``prefix`` via dcp.load in this (single) process."""
    entries = _metadata(ckpt).state_dict_metadata
    state = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype)
             for k, v in entries.items() if k.startswith(prefix) and hasattr(v, "size")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(ckpt)))
    return state


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("dcp") / "run"
    run_python([HELPER, "train", run, "--steps", ",".join(map(str, STEPS))], nproc=2,
               check="FSDP2 training with dcp.save")
    return run


@pytest.fixture(scope="module")
def merged(run, tmp_path_factory):
    base = tmp_path_factory.mktemp("dcp_merged")
    outs = {1: base / "ws1", 2: base / "ws2"}
    result = pmm_dist.merge(sources=[str(run)], out=str(outs[1]), method="ema", alpha=ALPHA, device="cpu", quiet=True)
    proc = run_cli(["merge", run, "--out", outs[2], "--method", "ema", "--alpha", ALPHA, "--device", "cpu"],
                   world_size=2, check="pmm_dist merge at world size 2")
    dump = base / "fsdp_load.pt"
    run_python([HELPER, "load", outs[1], dump], nproc=2, check="dcp.load of the merged checkpoint into the FSDP2 model")
    return {"outs": outs, "result": result, "proc": proc, "fsdp_dump": dump}


@pytest.fixture(scope="module")
def inputs(run):
    return [_load_tensors(run / f"step-{s}") for s in STEPS]


@pytest.mark.parametrize("world_size", [1, 2])
def test_merged_matches_float64_reference(merged, inputs, world_size):
    result = _load_tensors(merged["outs"][world_size])
    newest = inputs[-1]
    assert set(result) == set(newest)
    dtypes = set()
    for key, value in result.items():
        assert value.dtype == newest[key].dtype, key
        if value.is_floating_point():
            assert_merged_within_one_ulp(value, [s[key] for s in inputs], WEIGHTS, key)
            assert not torch.equal(value, newest[key]), f"{key}: merge result equals the newest input"
            dtypes.add(value.dtype)
        else:  # integer buffer: the newest checkpoint's, never averaged
            assert torch.equal(value, newest[key]) and value.item() == STEPS[-1], key
    assert dtypes == {torch.float32, torch.bfloat16}


def test_world_sizes_agree_bitwise(merged):
    a, b = _load_tensors(merged["outs"][1]), _load_tensors(merged["outs"][2])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loads_into_fsdp_model_on_two_ranks(merged):
    dump = torch.load(merged["fsdp_dump"], weights_only=False)
    expected = _load_tensors(merged["outs"][1])
    assert dump["train_state"] == {"step": STEPS[-1], "tag": f"step-{STEPS[-1]}"}  # bytes entries: newest
    assert set(dump["tensors"]) == {k[len("model."):] for k in expected}
    for name, value in dump["tensors"].items():
        assert torch.equal(value, expected[f"model.{name}"]), name


@pytest.mark.parametrize("world_size", [1, 2])
def test_layout_metadata_and_manifest(run, merged, world_size):
    out = merged["outs"][world_size]
    assert sorted(os.listdir(out)) == sorted([".metadata", "pmm_manifest.json"]
                                             + [f"__{k}_0.distcp" for k in range(world_size)])
    newest_md, merged_md = _metadata(run / "step-30"), _metadata(out)
    training = [k for k in newest_md.state_dict_metadata if k.split(".")[0] in ("optimizer", "lr_scheduler")]
    assert len(training) > 20
    assert merged_md.state_dict_metadata == {k: v for k, v in newest_md.state_dict_metadata.items()
                                             if k not in training}
    assert merged_md.planner_data == {k: v for k, v in newest_md.planner_data.items() if k not in training}
    assert "train_state.step" in merged_md.state_dict_metadata
    assert {info.relative_path for info in merged_md.storage_data.values()} == \
        {f"__{k}_0.distcp" for k in range(world_size)}
    assert verify_output(str(out)) == []  # pmm-dist verify: sizes, sha256, inventory vs the newest source
    manifest = json.loads((out / "pmm_manifest.json").read_text())
    assert manifest["format"] == "dcp" and manifest["output_checkpoint"] == "" and manifest["tracker"] == ".metadata"
    assert [s["iteration"] for s in manifest["sources"]] == STEPS and manifest["weights"] == pytest.approx(WEIGHTS)
    assert {f["path"] for f in manifest["files"]} == set(os.listdir(out)) - {"pmm_manifest.json"}
    if world_size == 2:
        assert "dcp checkpoints (iterations 10, 20, 30)" in merged["proc"].stdout


def test_only_the_coordinator_parses_metadata(run, tmp_path):
    """Each source's .metadata is parsed once per job, by the coordinator: the other ranks check
    and merge their share from what the plan gives them (issue 12). With --optimizer latest
    (copied training state, bytes entries) and --exclude (merged items turned into copies), the
    two ranks' output holds what one process's does."""
    counted, reference = tmp_path / "ws2", tmp_path / "ws1"
    options = ["--method", "ema", "--alpha", ALPHA, "--optimizer", "latest", "--exclude", "model.fc1.*"]
    run_python([HELPER.parent / "count_metadata_reads.py", tmp_path / "reads", "merge", "--format", "dcp", run,
                "--out", counted, "--device", "cpu", *options], nproc=2, check="a counted merge at world size 2")
    reports = [json.loads((tmp_path / f"reads.rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["exit"] for r in reports] == [0, 0]
    sources = {str(run / f"step-{s}") for s in STEPS}
    assert reports[0]["parses"] == {path: 1 for path in sources}
    assert reports[1]["parses"] == {}
    pmm_dist.merge(sources=[str(run)], out=str(reference), method="ema", alpha=ALPHA, optimizer="latest",
                   exclude=["model.fc1.*"], device="cpu", quiet=True)
    for prefix in ("model.", "optimizer."):
        expected, found = _load_tensors(reference, prefix), _load_tensors(counted, prefix)
        assert expected.keys() == found.keys() and all(torch.equal(found[k], expected[k]) for k in expected)
    merged, newest = _load_tensors(counted), _load_tensors(run / f"step-{STEPS[-1]}")
    excluded = [k for k in newest if k.startswith("model.fc1.")]
    assert excluded and all(torch.equal(merged[k], newest[k]) for k in excluded)


def test_watch_parses_each_metadata_once_per_update(run, tmp_path):
    """The watcher's coordinator plans, checks and finalizes each update with one format
    instance: every .metadata the update reads is parsed once there, never on the other rank;
    and what it publishes is `pmm-dist merge` of the same window."""
    out = tmp_path / "watched"
    run_python([HELPER.parent / "count_metadata_reads.py", tmp_path / "reads", "watch", run, "--out", out,
                "--method", "ema", "--alpha", ALPHA, "--once", "--quiet", "--device", "cpu"], nproc=2,
               check="a counted watch update at world size 2")
    reports = [json.loads((tmp_path / f"reads.rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["exit"] for r in reports] == [0, 0]
    assert reports[0]["parses"] == {str(run / f"step-{s}"): 1 for s in STEPS}
    assert reports[1]["parses"] == {}
    published = out / f"step-{STEPS[-1]}"
    reference = tmp_path / "merged"
    pmm_dist.merge(sources=[str(run)], out=str(reference), method="ema", alpha=ALPHA, device="cpu", quiet=True)
    expected, found = _load_tensors(reference, "model."), _load_tensors(published, "model.")
    assert expected.keys() == found.keys() and all(torch.equal(found[k], expected[k]) for k in expected)


def test_optimizer_latest_copies_training_state(run, tmp_path):
    out = tmp_path / "out"
    pmm_dist.merge(sources=[str(run / "step-20"), str(run / "step-30")], out=str(out), optimizer="latest",
                   device="cpu", quiet=True)
    newest_md, merged_md = _metadata(run / "step-30"), _metadata(out)
    assert merged_md.state_dict_metadata == newest_md.state_dict_metadata
    merged_opt, newest_opt = _load_tensors(out, "optimizer."), _load_tensors(run / "step-30", "optimizer.")
    assert len(newest_opt) > 10
    assert all(torch.equal(merged_opt[k], newest_opt[k]) for k in newest_opt)
    state = {"lr_scheduler": {"last_epoch": -1}, "train_state": {"step": -1}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(out))
    assert state == {"lr_scheduler": {"last_epoch": STEPS[-1]}, "train_state": {"step": STEPS[-1]}}


def test_resume_after_a_failure_gives_the_same_bytes(run, merged, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("PMM_DIST_FAULT", "unit:0=raise")  # after the unit's file and marker are staged
    with pytest.raises(MergeError, match="injected fault"):
        pmm_dist.merge(sources=[str(run)], out=str(out), method="ema", alpha=ALPHA, device="cpu", quiet=True)
    assert not (out / ".metadata").exists()
    monkeypatch.delenv("PMM_DIST_FAULT")
    # The resumed unit's result (with the chunk locations finalize needs) comes back from JSON.
    result = pmm_dist.merge(sources=[str(run)], out=str(out), method="ema", alpha=ALPHA, device="cpu", quiet=True,
                            resume=True)
    assert result.num_units_resumed == 1
    for name in (".metadata", "__0_0.distcp"):
        assert (out / name).read_bytes() == (merged["outs"][1] / name).read_bytes(), name


def test_checkpoint_dirs_given_explicitly(run, tmp_path):
    fmt = DcpFormat()
    refs = fmt.discover([str(run / "step-30"), str(run / "step-10")])
    assert [r.iteration for r in refs] == [10, 30]
    for name in ("first", "second"):  # no step numbers: the order given is the merge order
        shutil.copytree(run / ("step-10" if name == "first" else "step-20"), tmp_path / name)
    refs = fmt.discover([str(tmp_path / "first"), str(tmp_path / "second")])
    assert [(r.iteration, os.path.basename(r.path)) for r in refs] == [(1, "first"), (2, "second")]
    assert resolve_format("auto", [str(run)]).name == "dcp"
    assert resolve_format("auto", [str(tmp_path / "first")]).name == "dcp"


def test_incomplete_checkpoint_in_run_is_skipped(run, fresh_copy):
    copy = fresh_copy(run)
    shutil.copytree(run / "step-30", copy / "step-40")
    os.remove(copy / "step-40" / ".metadata")  # being written: DCP writes .metadata last
    assert [r.iteration for r in DcpFormat().discover([str(copy)])] == STEPS


def test_plan_is_metadata_only_balanced_and_small(run):
    fmt = DcpFormat()
    checkpoints = fmt.discover([str(run)])
    newest = load_metadata(checkpoints[-1].path)
    kept = {k for k in chunk_keys(newest) if k[0].split(".")[0] not in ("optimizer", "lr_scheduler")}
    for world_size in (1, 3, 4, 64):
        units = fmt.plan_units(checkpoints, "drop", world_size)
        items = [it.storage_key for unit in units for it in unit.items]
        assert sorted(items, key=str) == sorted(kept, key=str)  # every chunk exactly once
        assert len(units) == min(world_size, len(kept))
        shares = assign_units(units, world_size)
        assert all(len(share) <= 1 for share in shares)  # one output file per rank
        if world_size == 4:
            loads = [u.num_bytes for u in units]
            assert max(loads) <= 1.3 * min(loads), loads
        assert len(pickle.dumps(units)) < 20_000
    dry = pmm_dist.merge(sources=[str(run)], out=str(run.parent / "never"), dry_run=True, quiet=True)
    assert not os.path.exists(run.parent / "never") and dry.plan.format_name == "dcp"


# -- bad input ---------------------------------------------------------------------------------
def _merge_fails(sources, out, *fragments):
    with pytest.raises(MergeError) as info:
        pmm_dist.merge(sources=[str(s) for s in sources], out=str(out), device="cpu", quiet=True)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert not os.path.exists(out / ".metadata")  # nothing loadable (a staging area may stay, for --resume)
    return message


def test_other_chunking_merges_to_the_same_result(run, merged, tmp_path, fresh_copy):
    """step-20 re-saved by one process (one chunk per tensor instead of FSDP2's two): the same
    values in another layout, so the merge must give exactly the same tensors."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
    copy = fresh_copy(run)
    shutil.rmtree(copy / "step-20")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(_load_state_dict_from_keys(checkpoint_id=str(run / "step-20")), checkpoint_id=str(copy / "step-20"))
    assert len(_metadata(copy / "step-20").state_dict_metadata["model.embed.weight"].chunks) == 1
    out = tmp_path / "out"
    pmm_dist.merge(sources=[str(copy)], out=str(out), method="ema", alpha=ALPHA, device="cpu", quiet=True)
    expected, result = _load_tensors(merged["outs"][1]), _load_tensors(out)
    assert all(torch.equal(result[k], expected[k]) for k in expected)


def test_other_global_shape_is_refused(run, tmp_path, fresh_copy):
    copy = fresh_copy(run)
    metadata = _metadata(copy / "step-10")
    metadata.state_dict_metadata["model.fc1.bias"].size = torch.Size([49])
    with open(copy / "step-10" / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    _merge_fails([copy], tmp_path / "out", str(copy / "step-10"), "key 'model.fc1.bias' has global shape [49]",
                 "the newest checkpoint has [48]")


def test_other_keys_are_refused(run, tmp_path, fresh_copy):
    copy = fresh_copy(run)
    metadata = _metadata(copy / "step-20")
    metadata.state_dict_metadata["model.extra.weight"] = metadata.state_dict_metadata.pop("model.fc2.bias")
    with open(copy / "step-20" / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    _merge_fails([copy], tmp_path / "out", f"{copy / 'step-20'}: key 'model.fc2.bias' missing",
                 f"{copy / 'step-20'}: unexpected key 'model.extra.weight'")


def test_missing_distcp_file_is_refused(run, tmp_path, fresh_copy):
    copy = fresh_copy(run)
    os.remove(copy / "step-20" / "__1_0.distcp")
    _merge_fails([copy], tmp_path / "out", str(copy / "step-20" / "__1_0.distcp"), "missing file")


def test_truncated_distcp_file_is_refused(run, tmp_path, fresh_copy):
    copy = fresh_copy(run)
    path = copy / "step-30" / "__0_0.distcp"
    os.truncate(path, 100)  # its first item, a model chunk, is longer
    _merge_fails([copy], tmp_path / "out", str(path), "beyond the file's", "truncated file?")


def test_corrupt_metadata_is_refused(run, tmp_path, fresh_copy):
    copy = fresh_copy(run)
    path = copy / "step-20" / ".metadata"
    os.truncate(path, os.path.getsize(path) // 2)
    _merge_fails([copy], tmp_path / "out", str(path), "cannot read DCP metadata", "truncated or corrupt")


def test_nonfinite_chunk_is_refused(run, tmp_path, fresh_copy):
    import io
    copy = fresh_copy(run)
    metadata = _metadata(copy / "step-20")
    info = next(v for k, v in metadata.storage_data.items() if k.fqn == "model.fc1.weight")
    path = copy / "step-20" / info.relative_path
    with open(path, "r+b") as f:
        f.seek(info.offset)
        chunk = torch.load(io.BytesIO(f.read(info.length)), weights_only=True)
        chunk[1, 2] = float("nan")
        blob = io.BytesIO()
        torch.save(chunk, blob)
        assert len(blob.getvalue()) == info.length
        f.seek(info.offset)
        f.write(blob.getvalue())
    _merge_fails([copy], tmp_path / "out", "key 'model.fc1.weight'", str(path))


def test_hostile_metadata_runs_no_code(run, tmp_path, fresh_copy):
    copy = fresh_copy(run)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    with open(copy / "step-30" / ".metadata", "wb") as f:
        pickle.dump(Payload(), f)
    _merge_fails([copy], tmp_path / "out", str(copy / "step-30" / ".metadata"), "refuses to load", "system")
    assert not marker.exists()
