"""DCP planning without processes or tensor data: synthetic ``.metadata`` files only."""
import os
import pickle

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, TensorProperties, TensorStorageMetadata)

from pmm_dist.errors import InputError
from pmm_dist.formats.dcp import DcpFormat, top_level_key
from pmm_dist.plan.types import Action

COPY, MERGE = Action.COPY, Action.MERGE
from pmm_dist.plan import assign_units

NUM_LAYERS, NUM_CHUNKS = 150, 4  # 600 float keys of 4 chunks each: 2400 merged chunks


def _metadata(bf16_rows=64):
    entries, storage = {}, {}
    offset = 0

    def add(fqn, size, dtype, chunks):
        nonlocal offset
        entries[fqn] = TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size(size),
                                             [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in chunks])
        for i, (o, s) in enumerate(chunks):
            length = 1000 + torch.Size(s).numel() * dtype.itemsize
            storage[MetadataIndex(fqn, o, i)] = _StorageInfo(f"__{i % 2}_0.distcp", offset, length)
            offset += length

    for layer in range(NUM_LAYERS):
        for name, dtype in (("weight", torch.bfloat16), ("norm", torch.float32), ("proj", torch.bfloat16),
                            ("bias", torch.float32)):
            rows = bf16_rows if dtype == torch.bfloat16 else 8
            add(f"model.layers.{layer}.{name}", (NUM_CHUNKS * rows, 16), dtype,
                [((k * rows, 0), (rows, 16)) for k in range(NUM_CHUNKS)])
    add("model.step_count", (), torch.int64, [((), ())])
    add("optimizer.state.exp_avg", (128,), torch.float32, [((0,), (64,)), ((64,), (64,))])
    entries["train_state"] = BytesStorageMetadata()
    storage[MetadataIndex("train_state")] = _StorageInfo("__0_0.distcp", offset, 77)
    return Metadata(entries, planner_data={"train_state": ("train_state",)}, storage_data=storage)


def _write_run(root, metadatas):
    for step, metadata in metadatas.items():
        os.makedirs(root / f"step-{step}")
        with open(root / f"step-{step}" / ".metadata", "wb") as f:
            pickle.dump(metadata, f)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_dcp")
    _write_run(root, {100: _metadata(), 200: _metadata(), 300: _metadata()})
    return root


@pytest.mark.parametrize("world_size", [1000, 4096])
def test_plan_at_large_world_sizes(run, world_size):
    fmt = DcpFormat()
    checkpoints = fmt.discover([str(run)])
    assert [c.iteration for c in checkpoints] == [100, 200, 300]
    # its time is measured by benchmarks/timings.py, not asserted (a bound fails on a busy machine)
    units = fmt.plan_units(checkpoints, "drop", world_size)
    shares = assign_units(units, world_size)
    items = [it for unit in units for it in unit.items]
    num_items = NUM_LAYERS * 4 * NUM_CHUNKS + 2  # + int scalar + bytes entry; optimizer dropped
    assert len(items) == len({it.storage_key for it in items}) == num_items
    assert {it.key for it in items if it.action == COPY} == {"model.step_count", "train_state"}
    # one output file per rank; with more ranks than chunks the rest idle
    assert len(units) == min(world_size, num_items) and max(len(s) for s in shares) == 1


def test_plan_balances_bytes_and_keeps_latest_optimizer(run):
    fmt = DcpFormat()
    checkpoints = fmt.discover([str(run)])
    units = fmt.plan_units(checkpoints, "latest", 8)
    loads = [sum(it.num_bytes * (3 if it.action == MERGE else 1) for it in u.items) for u in units]
    assert max(loads) <= 1.01 * min(loads), loads
    optimizer = [it for u in units for it in u.items if it.key.startswith("optimizer.")]
    assert len(optimizer) == 2 and all(it.action == COPY for it in optimizer)  # copied, never averaged


def test_chunking_mismatch_names_checkpoint_and_key(tmp_path):
    _write_run(tmp_path, {1: _metadata(bf16_rows=32), 2: _metadata()})
    fmt = DcpFormat()
    with pytest.raises(InputError) as info:
        fmt.plan_units(fmt.discover([str(tmp_path)]), "drop", 2)
    message = str(info.value)
    assert f"{tmp_path / 'step-1'}: key 'model.layers.0.weight' has global shape [128, 16]" in message
    assert "the newest checkpoint has [256, 16]" in message and f"{NUM_LAYERS * 2} problems" in message


def test_top_level_key():
    metadata = _metadata()
    assert top_level_key(metadata, "train_state") == "train_state"  # from DCP's flattening map
    assert top_level_key(metadata, "optimizer.state.exp_avg") == "optimizer"
    assert top_level_key(metadata, "rng_state/shard_0.1_1.2") == "rng_state"  # Megatron ShardedObject key
