"""Hand-made DCP checkpoints for tests and benchmarks: chosen chunkings (as if saved at any
parallel layout), real ``torch.save`` blobs, ``.metadata`` as DCP writes it.
``torch.distributed.checkpoint.load`` reads them like its own (tests/test_dcp_layouts.py checks it).
``write_torch_dist`` adds what makes one a Megatron-core torch_dist checkpoint."""
import io
import itertools
import json
import math
import os
import pickle
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

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


# A torch.save blob's zip framing around the tensor's bytes (about this much for one chunk).
_BLOB_OVERHEAD_BYTES = 1152


def fsdp_shapes(hidden: int = 8192, ffn: int = 28672) -> Iterator[Tuple[str, Tuple[int, ...]]]:
    """(name, global shape) of the tensors of a Llama-like decoder stack, layer after layer
    (attention, MLP, norms), as FSDP2's ``get_state_dict`` names them; without end."""
    layer = [("attention.wq.weight", (hidden, hidden)), ("attention.wk.weight", (hidden // 8, hidden)),
             ("attention.wv.weight", (hidden // 8, hidden)), ("attention.wo.weight", (hidden, hidden)),
             ("feed_forward.w1.weight", (ffn, hidden)), ("feed_forward.w2.weight", (hidden, ffn)),
             ("feed_forward.w3.weight", (ffn, hidden)), ("attention_norm.weight", (hidden,)),
             ("ffn_norm.weight", (hidden,))]
    for number in itertools.count():
        for name, shape in layer:
            yield f"layers.{number}.{name}", shape


def fsdp_metadata(num_chunks: int, world_size: int, dtype: torch.dtype = torch.float32
                  ) -> Tuple[Metadata, Dict[str, int]]:
    """The ``.metadata`` of an FSDP2 checkpoint saved by ``world_size`` ranks with about
    ``num_chunks`` chunks: each tensor's rows split evenly over the ranks (``split``), rank r's
    chunks stored one after another in ``__{r}_0.distcp``. Also each file's size. No tensor data:
    for planning at scale (benchmarks/scale.py), where only the metadata and file sizes are read."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    entries, storage, planner_data = {}, {}, {}
    file_sizes = [0] * world_size
    for fqn, shape in fsdp_shapes():
        if len(storage) >= num_chunks:
            break
        boxes = [box for box in split(shape, 0, world_size) if box[1][0]]  # ranks past the rows hold none
        entries[fqn] = TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size(shape),
                                             [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in boxes])
        planner_data[fqn] = (fqn,)
        for rank, (offsets, sizes) in enumerate(boxes):
            length = math.prod(sizes) * itemsize + _BLOB_OVERHEAD_BYTES
            storage[MetadataIndex(fqn, torch.Size(offsets), rank)] = _StorageInfo(
                f"__{rank}_0.distcp", file_sizes[rank], length)
            file_sizes[rank] += length
    return (Metadata(entries, planner_data=planner_data, storage_data=storage),
            {f"__{rank}_0.distcp": size for rank, size in enumerate(file_sizes)})


def make_fsdp_run(run_dir: str, num_checkpoints: int, num_chunks: int, world_size: int) -> Metadata:
    """``run_dir/step-{k}`` for k = 1..``num_checkpoints``, each with the same ``fsdp_metadata``
    (pickled as DCP pickles it) and its data files as sparse files of the right sizes (no bytes
    written: planning stats them, never reads them). Returns the metadata."""
    metadata, file_sizes = fsdp_metadata(num_chunks, world_size)
    blob = pickle.dumps(metadata)
    for k in range(1, num_checkpoints + 1):
        root = os.path.join(run_dir, f"step-{k}")
        os.makedirs(root, exist_ok=True)
        for name, size in file_sizes.items():
            with open(os.path.join(root, name), "wb") as f:
                f.truncate(size)
        with open(os.path.join(root, ".metadata"), "wb") as f:  # last, as DCP writes it
            f.write(blob)
    return metadata
