"""DCP checkpoints saved at different layouts, in one process: hand-made chunkings (testing/synthetic_dcp.py).

Three checkpoints of one model, chunked as if saved at world sizes 3, 1 and 2 (rows, columns,
whole, 3-D), are merged; ``dcp.load`` of the result must match the float64 reference of the
sources as ``dcp.load`` reads them, and the merge must read each stored chunk only in the
parts an output chunk needs. Bad layouts (a gap, an overlap, another global shape or dtype)
are refused at plan time, from ``.metadata`` alone, before anything is written.
"""
import dataclasses
import io
import json
import math
import os
import pickle
import time
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex

import pmm_dist
from pmm_dist.errors import MergeError
from pmm_dist.formats import dcp_reads
from pmm_dist.formats.dcp import DcpFormat
from pmm_dist.io.torch_blob import locate_tensor
from pmm_dist.plan import assign_units
from pmm_dist.testing.synthetic_dcp import read_metadata, split, write_dcp, write_metadata

from .helpers import assert_merged_within_one_ulp, wma

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SHAPES = {  # fqn -> (global shape, dtype)
    "model.embed.weight": ((67, 48), torch.float32),
    "model.proj.weight": ((8, 1 << 15), torch.float32),     # 128 KiB rows: column pieces read run by run
    "model.qkv.weight": ((4, 24, 16), torch.bfloat16),
    "model.norm.weight": ((48,), torch.bfloat16),
    "model.scale": ((), torch.float32),
    "model.steps": ((3,), torch.int64),                      # integer: the newest's, never averaged
}


def _chunks(shape, layout, num):
    if not shape or layout == "whole":
        return [(tuple(0 for _ in shape), tuple(shape))]
    return split(shape, {"rows": 0, "columns": 1, "last": len(shape) - 1}[layout], num)


# Three layouts: world size 3 (rows / columns / last dim), 1 (whole), 2 (columns / rows).
LAYOUTS = [
    (3, {"model.embed.weight": "rows", "model.proj.weight": "columns", "model.qkv.weight": "last"}),
    (1, {}),
    (2, {"model.embed.weight": "columns", "model.proj.weight": "rows", "model.qkv.weight": "columns",
         "model.norm.weight": "rows"}),
]


def _write_run(root, order, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for step, (num, layout) in enumerate((LAYOUTS[k] for k in order), start=1):
        tensors = {}
        for fqn, (shape, dtype) in SHAPES.items():
            value = (torch.randn(shape, generator=generator) if dtype.is_floating_point
                     else torch.randint(0, 100, shape, generator=generator)).to(dtype)
            tensors[fqn] = (value, _chunks(shape, layout.get(fqn, "whole"), num))
        state = io.BytesIO()
        torch.save({"step": step}, state)  # a bytes entry as DCP stores one
        write_dcp(str(root / f"step-{step}"), tensors, num_files=num, bytes_entries={"train_state": state.getvalue()})
    return [root / f"step-{k}" for k in range(1, len(order) + 1)]


def _load(ckpt):
    entries = read_metadata(str(ckpt)).state_dict_metadata
    state = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in entries.items() if hasattr(v, "size")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(ckpt)))
    return state


class _ReadLog:
    """Every byte range the merge reads, by file: with pread, or viewed in place in the mapped
    file (a stored chunk every source stores whole: its blob's range)."""

    def __init__(self, monkeypatch):
        self.reads = []
        pread, read_into = dcp_reads.SourceFiles.pread, dcp_reads.SourceFiles.read_into
        view = dcp_reads.MappedChunks.view
        log = self.reads

        def logged_view(chunks, ckpt_dir, info, dtype, sizes):
            tensor = view(chunks, ckpt_dir, info, dtype, sizes)
            if tensor is not None:
                log.append((os.path.join(ckpt_dir, info.relative_path), info.offset, info.length))
            return tensor

        def logged_pread(files, path, length, offset):
            log.append((path, offset, length))
            return pread(files, path, length, offset)

        def logged_read_into(files, path, buffer, offset):
            log.append((path, offset, len(buffer)))
            return read_into(files, path, buffer, offset)

        monkeypatch.setattr(dcp_reads.SourceFiles, "pread", logged_pread)
        monkeypatch.setattr(dcp_reads.SourceFiles, "read_into", logged_read_into)
        monkeypatch.setattr(dcp_reads.MappedChunks, "view", logged_view)


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0)], ids=["ws3-ws1-ws2", "ws2-ws1-ws3"])
def test_mixed_layouts_merge_to_the_reference(tmp_path, order, monkeypatch):
    ckpts = _write_run(tmp_path / "run", order)
    log = _ReadLog(monkeypatch)
    out = tmp_path / "out"
    result = pmm_dist.merge(sources=[str(tmp_path / "run")], out=str(out), method="wma", device="cpu", quiet=True)
    inputs = [_load(c) for c in ckpts]
    merged = _load(out)
    assert set(merged) == set(inputs[-1])
    for key, value in merged.items():
        assert value.dtype == inputs[-1][key].dtype, key
        if value.is_floating_point():
            assert_merged_within_one_ulp(value, [s[key] for s in inputs], wma(3), key)
        else:
            assert torch.equal(value, inputs[-1][key]), key
    # The output keeps the newest's chunking.
    newest_md, merged_md = read_metadata(str(ckpts[-1])), read_metadata(str(out))
    assert merged_md.state_dict_metadata == newest_md.state_dict_metadata
    state = {"train_state": {}}
    dcp.load(state, checkpoint_id=str(out))
    assert state["train_state"] == {"step": 3}

    # Reads: the large ranges (model.proj.weight's pieces) never overlap: each byte of a stored
    # chunk is read once, though the chunk spans several output chunks; small boxes of columns
    # are read as the slab of rows holding them (model.embed.weight: a few KiB read twice).
    # The plan's per-source count is what was read, zip headers aside.
    by_file = {}
    for path, offset, length in log.reads:
        by_file.setdefault(path, []).append((offset, length))
    for path, ranges in by_file.items():
        ranges.sort()
        big = [r for r in ranges if r[1] > 64 << 10]
        assert all(a[0] + a[1] <= b[0] for a, b in zip(big, big[1:])), f"{path}: a byte range read twice"
    data_bytes = [sum(os.path.getsize(c / f) for f in os.listdir(c) if f.endswith(".distcp")) for c in ckpts]
    manifest = json.loads((out / "pmm_manifest.json").read_text())
    planned = manifest["bytes_read_by_source"]
    assert len(planned) == 3 and planned == list(result.plan.bytes_read_by_source)
    for i, ckpt in enumerate(ckpts):
        actual = sum(length for path, ranges in by_file.items() if path.startswith(str(ckpt) + os.sep)
                     for _, length in ranges)
        assert planned[i] <= actual <= planned[i] + 64 * 4096, (i, planned[i], actual)  # + zip headers
        assert actual <= 1.1 * data_bytes[i], (i, actual, data_bytes[i])  # no source read twice over


def test_stored_chunk_spanning_output_chunks_is_read_in_parts(tmp_path, monkeypatch):
    """The world-size-1 source stores model.proj.weight (1 MiB) whole; the newest (world size 2)
    splits it in two rows: the two output chunks each read their half, nobody reads it whole."""
    ckpts = _write_run(tmp_path / "run", (1, 2))
    md = read_metadata(str(ckpts[0]))
    info = next(v for k, v in md.storage_data.items() if k.fqn == "model.proj.weight")
    log = _ReadLog(monkeypatch)
    pmm_dist.merge(sources=[str(tmp_path / "run")], out=str(tmp_path / "out"), device="cpu", quiet=True)
    path = str(ckpts[0] / info.relative_path)
    inside = [(o, n) for p, o, n in log.reads if p == path and info.offset <= o < info.offset + info.length]
    assert max(n for _, n in inside) < info.length // 2 + 4096
    assert sum(n for _, n in inside if n > 4096) == (8 << 15) * 4  # the raw elements exactly once


def test_world_sizes_give_identical_plans_per_item(tmp_path):
    ckpts = _write_run(tmp_path / "run", (0, 1, 2))
    fmt = DcpFormat()
    refs = fmt.discover([str(tmp_path / "run")])
    plans = [{it.storage_key: it for u in fmt.plan_units(refs, "drop", ws) for it in u.items} for ws in (1, 2, 3, 64)]
    assert all(p == plans[0] for p in plans)  # the same pieces whatever the merging world size
    assert fmt.checkpoint_layout(refs[0]) == {"world_size": 3} and fmt.checkpoint_layout(refs[-1]) == {"world_size": 2}
    assert fmt.describe_layout(fmt.checkpoint_layout(refs[0])) == "world size 3"
    item = plans[0][("model.proj.weight", (4, 0))]  # newest: rows 4..8; oldest: 3 column chunks
    assert [len(p) for p in item.sources[:2]] == [3, 1] and item.sources[2] is None
    assert {p.sizes for p in item.sources[0]} == {(4, 10922), (4, 10923)}
    assert len(ckpts) == 3


def test_locate_tensor_in_blobs():
    for value in (torch.randn(5, 7), torch.randn(3, 4, 5).to(torch.bfloat16), torch.tensor(2.5),
                  torch.arange(100, dtype=torch.int64)[10:30], torch.randn(6, 4).t()):
        buffer = io.BytesIO()
        torch.save(value, buffer)
        blob = buffer.getvalue()
        location = locate_tensor(lambda offset, length: blob[offset:offset + length], len(blob))
        assert location.dtype == value.dtype and location.shape == tuple(value.shape)
        assert location.stride == tuple(value.stride())
        if location.is_row_major():
            raw = bytearray(blob[location.data_offset:location.data_offset + value.numel() * value.element_size()])
            assert torch.equal(torch.frombuffer(raw, dtype=value.dtype).view(value.shape), value)
        else:
            assert value.dim() == 2 and not value.is_contiguous()


# -- refused at plan time, nothing written -------------------------------------------------------
def _refused(run, out, *fragments):
    with pytest.raises(MergeError) as info:
        pmm_dist.merge(sources=[str(run)], out=str(out), device="cpu", quiet=True)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert not os.path.exists(out), "something was written"
    return message


def _edit_metadata(ckpt, edit):
    metadata = read_metadata(str(ckpt))
    edit(metadata)
    write_metadata(str(ckpt), metadata)


def test_gap_is_refused_naming_key_source_and_region(tmp_path):
    ckpts = _write_run(tmp_path / "run", (0, 1, 2))

    def drop_middle_rows(md):  # embed rows 22..44 of 67 (world size 3): chunk and storage entry gone
        entry = md.state_dict_metadata["model.embed.weight"]
        entry.chunks = [entry.chunks[0], entry.chunks[2]]
        del md.storage_data[next(k for k in md.storage_data if k.fqn == "model.embed.weight" and k.offset[0] == 22)]
    _edit_metadata(ckpts[0], drop_middle_rows)
    _refused(tmp_path / "run", tmp_path / "out", f"{ckpts[0]}: key 'model.embed.weight'",
             "elements [22:44, 0:48] are in no chunk (a gap)")


def test_overlap_is_refused_naming_key_source_and_region(tmp_path):
    ckpts = _write_run(tmp_path / "run", (0, 1, 2))

    def grow_first_chunk(md):
        entry = md.state_dict_metadata["model.qkv.weight"]
        first = entry.chunks[0]
        entry.chunks[0] = ChunkStorageMetadata(first.offsets, torch.Size([4, 24, first.sizes[2] + 2]))
    _edit_metadata(ckpts[0], grow_first_chunk)
    _refused(tmp_path / "run", tmp_path / "out", f"{ckpts[0]}: key 'model.qkv.weight'",
             "elements [0:4, 0:24, 5:7] are stored twice")


def _storage_entry(md, fqn, row):
    return next(k for k in md.storage_data if k.fqn == fqn and k.offset[0] == row)


@pytest.mark.parametrize("which", [0, 2])  # an older source, the newest
def test_bad_storage_entries_are_refused_naming_file_and_key(tmp_path, which):
    """Each storage problem is named with the checkpoint's .metadata and the key (the checks
    decide in bulk first; a checkpoint with a problem is walked key by key to name them)."""
    ckpts = _write_run(tmp_path / "run", (0, 1, 0))
    where = f"{ckpts[which]}/.metadata: key 'model.embed.weight (chunk at [22, 0])'"

    def no_entry(md):
        del md.storage_data[_storage_entry(md, "model.embed.weight", 22)]
    _edit_metadata(ckpts[which], no_entry)
    _refused(tmp_path / "run", tmp_path / "out", where, "has no storage entry")

    def outside(md):
        index = _storage_entry(md, "model.embed.weight", 22)
        md.storage_data[index] = dataclasses.replace(md.storage_data[index], relative_path="../elsewhere.distcp")
    ckpts = _write_run(tmp_path / "run2", (0, 1, 0))
    _edit_metadata(ckpts[which], outside)
    _refused(tmp_path / "run2", tmp_path / "out", where.replace("/run/", "/run2/"),
             "is stored at '../elsewhere.distcp', outside the checkpoint directory")

    def compressed(md):
        index = _storage_entry(md, "model.embed.weight", 22)
        md.storage_data[index] = dataclasses.replace(md.storage_data[index], transform_descriptors=["zstd"])
    ckpts = _write_run(tmp_path / "run3", (0, 1, 0))
    _edit_metadata(ckpts[which], compressed)
    _refused(tmp_path / "run3", tmp_path / "out", where.replace("/run/", "/run3/"),
             "is stored with stream transforms ['zstd']")


def test_newest_with_overlapping_chunks_is_refused(tmp_path):
    ckpts = _write_run(tmp_path / "run", (0, 1, 2))

    def duplicate(md):
        entry = md.state_dict_metadata["model.embed.weight"]
        entry.chunks = entry.chunks + [entry.chunks[0]]
    _edit_metadata(ckpts[-1], duplicate)
    _refused(tmp_path / "run", tmp_path / "out", f"{ckpts[-1]}: key 'model.embed.weight'", "stored twice")


def test_global_shape_change_is_refused(tmp_path):
    ckpts = _write_run(tmp_path / "run", (2, 1, 2))  # steps 1 and 3 share a layout
    _edit_metadata(ckpts[0], lambda md: setattr(md.state_dict_metadata["model.norm.weight"], "size", torch.Size([50])))
    _refused(tmp_path / "run", tmp_path / "out",
             f"{ckpts[0]}: key 'model.norm.weight' has global shape [50], the newest checkpoint has [48]")


def test_global_shape_change_with_the_layout_is_one_message(tmp_path):
    """Saved at another world size AND with other global shapes (as a vocabulary padded to a
    multiple of TP): one short message naming the checkpoints of each layout, not one per key."""
    ckpts = _write_run(tmp_path / "run", (0, 1, 2))

    def pad(md):
        for fqn in ("model.norm.weight", "model.embed.weight"):
            entry = md.state_dict_metadata[fqn]
            entry.size = torch.Size([entry.size[0] + 1] + list(entry.size[1:]))
    _edit_metadata(ckpts[0], pad)
    _edit_metadata(ckpts[1], pad)
    message = _refused(tmp_path / "run", tmp_path / "out",
                       "saved at different layouts (world size 3: iteration 1; world size 1: iteration 2; "
                       "world size 2: iteration 3)", "2 tensor(s) have other global shapes",
                       "'model.embed.weight' [68, 48] vs [67, 48]", f"in {ckpts[0]})", "--iterations 3")
    assert "\n" not in message


def test_dtype_change_is_refused(tmp_path):
    ckpts = _write_run(tmp_path / "run", (0, 1, 2))
    _edit_metadata(ckpts[1], lambda md: setattr(md.state_dict_metadata["model.embed.weight"].properties, "dtype",
                                                torch.bfloat16))
    _refused(tmp_path / "run", tmp_path / "out",
             f"{ckpts[1]}: key 'model.embed.weight' has dtype torch.bfloat16, the newest checkpoint has torch.float32")


# -- planning from metadata alone, at scale ------------------------------------------------------
def _metadata_only(root, num_chunks, num_keys, rows=1 << 14, cols=4096):
    """A .metadata without data files: ``num_keys`` fp32 tensors of rows x cols in ``num_chunks`` rows."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import TensorProperties, TensorStorageMetadata
    entries, storage, offset = {}, {}, 0
    for k in range(num_keys):
        fqn = f"model.layers.{k}.weight"
        boxes = split((rows, cols), 0, num_chunks)
        entries[fqn] = TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size([rows, cols]),
                                             [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in boxes])
        for i, (o, s) in enumerate(boxes):
            length = 1024 + s[0] * s[1] * 4
            storage[MetadataIndex(fqn, torch.Size(o), i)] = _StorageInfo(f"__{i}_0.distcp", offset, length)
            offset += length
    os.makedirs(root)
    write_metadata(str(root), Metadata(entries, storage_data=storage))


def test_mixed_layout_plan_at_scale_is_metadata_only(tmp_path):
    """Saved at 3000 and 1024 ranks, newest at 4096 ranks; planned for 4096 merging ranks. The
    stored chunks (80 KiB and more) are read by byte range: the plan reads each byte once."""
    for step, num in ((1, 3000), (2, 1024), (3, 4096)):
        _metadata_only(tmp_path / f"step-{step}", num, num_keys=6)
    fmt = DcpFormat()
    refs = fmt.discover([str(tmp_path)])
    started = time.perf_counter()
    units = fmt.plan_units(refs, "drop", 4096)
    shares = assign_units(units, 4096, 3)
    elapsed = time.perf_counter() - started
    items = [it for u in units for it in u.items]
    assert len(items) == 6 * 4096 and max(len(s) for s in shares) == 1
    for item in items:  # the pieces of each source tile the output chunk
        offsets, sizes = item.offsets, (4, 4096)
        for pieces in item.sources[:2]:
            assert sum(p.sizes[0] for p in pieces) == sizes[0]
            assert pieces[0].offsets[0] == offsets[0]
    planned = fmt.bytes_read_by_source(units, refs)
    assert planned[2] == sum(it.num_bytes + 1024 for it in items)  # newest: its own chunks, whole
    data = 6 * (1 << 14) * 4096 * 4
    assert data <= planned[0] <= 1.001 * data and data <= planned[1] <= 1.001 * data  # each byte once
    assert elapsed < 30, f"planning took {elapsed:.1f} s"
    assert len(pickle.dumps(units)) / len(items) < 400  # bytes per output chunk of a mixed-layout plan
    # The data files are checked by each rank (check_unit), and are absent here.
    assert any("missing file" in p for p in fmt.check_unit(units[0], refs))


def test_bytes_entries_named_by_shard_may_differ_across_layouts(tmp_path):
    """A ShardedObject's key names its shard (e.g. 'rng_state/shard_0.1_1.2' at TP=2): at another
    layout the bytes entries may have other keys. They come from the newest alone, so only a
    same-layout checkpoint must have the same ones."""
    ckpts = _write_run(tmp_path / "run", (0, 1, 2))

    def rename(md):
        md.state_dict_metadata["extra/shard_0_3"] = md.state_dict_metadata.pop("train_state")
        index = next(k for k in md.storage_data if k.fqn == "train_state")
        md.storage_data[MetadataIndex("extra/shard_0_3")] = md.storage_data.pop(index)
    _edit_metadata(ckpts[0], rename)  # world size 3, the newest 2: merges
    pmm_dist.merge(sources=[str(tmp_path / "run")], out=str(tmp_path / "out"), device="cpu", quiet=True)
    state = {"train_state": {}}
    dcp.load(state, checkpoint_id=str(tmp_path / "out"))
    assert state["train_state"] == {"step": 3}
    same = _write_run(tmp_path / "same", (2, 1, 2))
    _edit_metadata(same[0], rename)  # world size 2 like the newest: the keys must agree
    _refused(tmp_path / "same", tmp_path / "out2", f"{same[0]}: key 'train_state' missing",
             f"{same[0]}: unexpected key 'extra/shard_0_3'")


def test_same_layout_chunks_are_viewed_in_place_not_read(tmp_path, monkeypatch):
    """Every source storing a chunk whole (the same layout): its elements are viewed in the mapped
    .distcp file and summed there: pread reads only the small integer and bytes entries, and the
    manifest counts the viewed blobs as read."""
    ckpts = _write_run(tmp_path / "run", (0, 0, 0))
    viewed = []
    view = dcp_reads.MappedChunks.view

    def counted_view(chunks, ckpt_dir, info, dtype, sizes):
        tensor = view(chunks, ckpt_dir, info, dtype, sizes)
        viewed.append(tensor is not None)
        return tensor
    monkeypatch.setattr(dcp_reads.MappedChunks, "view", counted_view)
    log = _ReadLog(monkeypatch)  # over the counting view: logs its ranges too
    out = tmp_path / "out"
    pmm_dist.merge(sources=[str(tmp_path / "run")], out=str(out), method="wma", device="cpu", quiet=True)
    inputs, merged = [_load(c) for c in ckpts], _load(out)
    for key, value in merged.items():
        if value.is_floating_point():
            assert_merged_within_one_ulp(value, [s[key] for s in inputs], wma(3), key)
    num, layout = LAYOUTS[0]
    float_chunks = sum(len(_chunks(shape, layout.get(fqn, "whole"), num))
                       for fqn, (shape, dtype) in SHAPES.items() if dtype.is_floating_point)
    assert viewed.count(True) == 3 * float_chunks and all(viewed)
    preads = log.reads[:]  # the views' ranges are logged too: the large ones are all theirs
    assert sum(1 for _, _, length in preads if length > 4096) == 3 * sum(
        1 for fqn, (shape, dtype) in SHAPES.items() if dtype.is_floating_point
        for _, sizes in _chunks(shape, layout.get(fqn, "whole"), num) if math.prod(sizes) * dtype.itemsize > 4096)
    manifest = json.loads((out / "pmm_manifest.json").read_text())
    assert manifest["bytes_read"] == sum(length for _, _, length in log.reads)
