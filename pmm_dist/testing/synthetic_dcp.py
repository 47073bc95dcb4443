"""Hand-made DCP checkpoints for tests and benchmarks: chosen chunkings (as if saved at any
parallel layout), real ``torch.save`` blobs, ``.metadata`` as DCP writes it.
``torch.distributed.checkpoint.load`` reads them like its own (tests/test_dcp_layouts.py checks it).
``write_torch_dist`` adds what makes one a Megatron-core torch_dist checkpoint."""
import io
import json
import os
import pickle
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, TensorProperties, TensorStorageMetadata)

Box = Tuple[Tuple[int, ...], Tuple[int, ...]]


def split(shape: Sequence[int], dim: int, num: int) -> List[Box]:
    """``num`` near-equal chunks along ``dim``, the larger ones last (like an uneven shard)."""
    boxes, start = [], 0
    for k in range(num):
        size = (shape[dim] - start) // (num - k)
        offsets = tuple(start if d == dim else 0 for d in range(len(shape)))
        boxes.append((offsets, tuple(size if d == dim else n for d, n in enumerate(shape))))
        start += size
    return boxes


def write_dcp(root: str, tensors: Dict[str, Tuple[torch.Tensor, List[Box]]], num_files: int = 2,
              bytes_entries: Dict[str, bytes] = None) -> None:
    """A DCP checkpoint at ``root`` holding each tensor as the given chunks, spread round-robin
    over ``num_files`` files ``__{k}_0.distcp`` (as if written by ``num_files`` ranks)."""
    os.makedirs(root, exist_ok=True)
    entries, storage = {}, {}
    files = [bytearray() for _ in range(num_files)]
    count = 0
    for fqn, (tensor, boxes) in tensors.items():
        entries[fqn] = TensorStorageMetadata(TensorProperties(dtype=tensor.dtype), torch.Size(tensor.shape),
                                             [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in boxes])
        for k, (offsets, sizes) in enumerate(boxes):
            chunk = tensor[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))].clone()
            blob = io.BytesIO()
            torch.save(chunk, blob)
            f = count % num_files
            count += 1
            storage[MetadataIndex(fqn, torch.Size(offsets), k)] = _StorageInfo(f"__{f}_0.distcp", len(files[f]),
                                                                                len(blob.getvalue()))
            files[f] += blob.getvalue()
    for name, data in (bytes_entries or {}).items():
        entries[name] = BytesStorageMetadata()
        storage[MetadataIndex(name)] = _StorageInfo("__0_0.distcp", len(files[0]), len(data))
        files[0] += data
    for f, data in enumerate(files):
        with open(os.path.join(root, f"__{f}_0.distcp"), "wb") as out:
            out.write(data)
    write_metadata(root, Metadata(entries, storage_data=storage))


def read_metadata(root: str) -> Metadata:
    """The ``.metadata`` of a checkpoint this module wrote (plain unpickling: our own files)."""
    with open(os.path.join(root, ".metadata"), "rb") as f:
        return pickle.load(f)


def write_metadata(root: str, metadata: Metadata) -> None:
    with open(os.path.join(root, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)


def saved_object(value: Any) -> bytes:
    """A bytes entry as DCP (and Megatron, for a ShardedObject) stores one: a torch.save blob."""
    blob = io.BytesIO()
    torch.save(value, blob)
    return blob.getvalue()


def write_torch_dist(root: str, tensors: Dict[str, Tuple[torch.Tensor, List[Box]]], common: Dict[str, Any],
                     objects: Optional[Dict[str, Any]] = None, num_files: int = 2) -> None:
    """A torch_dist checkpoint directory (``iter_*``): the DCP part (``objects``: ShardedObject
    keys such as ``rng_state/shard_0_1`` -> their values), ``common.pt`` and ``metadata.json``
    (written last, as Megatron does)."""
    write_dcp(root, tensors, num_files=num_files,
              bytes_entries={key: saved_object(value) for key, value in (objects or {}).items()})
    torch.save(common, os.path.join(root, "common.pt"))
    with open(os.path.join(root, "metadata.json"), "w") as f:
        json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                   "common_backend": "torch", "common_backend_version": 1}, f)
