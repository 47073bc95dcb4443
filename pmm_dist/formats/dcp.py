"""PyTorch Distributed Checkpoint (DCP) directories, merged chunk by chunk.

    CKPT/.metadata               # pickled torch.distributed.checkpoint Metadata; written last
    CKPT/__{rank}_{n}.distcp     # each stored item a torch.save blob (tensor chunk) or raw bytes

Planning reads only the ``.metadata`` of every source: the newest checkpoint's keys, global
shapes, dtypes and chunk lists are the reference every other source must match. The units are
the stored chunks, binned byte-balanced into one output file per rank, ``__{k}_0.distcp``
(``WorkUnit.items``). A rank reads exactly its chunks' byte ranges from the N sources (pread;
never whole files), merges float chunks (``MergeContext.merge_tensor``) and copies everything else
(integer tensors, bytes entries) byte for byte from the newest source. The coordinator then
writes the output ``.metadata``: the newest checkpoint's key metadata (same chunking) with new
storage locations. ``.metadata`` is the checkpoint's commit marker, so it is written last.

Sources: one directory holding DCP checkpoints as subdirectories whose names end in a number
(``step-100``, ``step_200``, ``global_step300``; one without a ``.metadata`` is incomplete and
skipped), or checkpoint directories given explicitly (iteration = the trailing number of each
name when every one has one, else 1..N in the order given). The output root itself is the merged
DCP checkpoint (``dcp.load(state_dict, checkpoint_id=OUT)``).

``.metadata`` is a pickle. It is read by a restricted unpickler that resolves only the DCP
metadata dataclasses, ``torch.Size``, torch dtypes/layouts and paths; anything else is refused.
"""
import dataclasses
import hashlib
import io
import math
import os
import pathlib
import pickle
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint import planner as dcp_planner
from torch.distributed.checkpoint import filesystem as dcp_filesystem

from ..io.atomic import write_atomically
from ..errors import InputError, MergeError
from ..plan.assign import balance, work_cost
from ..plan.types import (Action, CheckpointRef, ChunkItem, OptimizerPolicy, OutputKind, OutputLayout, UnitResult,
                          WorkUnit)
from .base import CheckpointFormat, MergeContext
from .common import EntrySpec, compare_entries, listdir, number_in_name, sorted_unique

DCP_METADATA = ".metadata"
_TRAILING_NUMBER = re.compile(r"(\d+)$")

ChunkKey = Tuple[str, Optional[Tuple[int, ...]]]  # (fqn, chunk offsets), offsets None for bytes


# -- reading .metadata safely ------------------------------------------------------------------
def _allowed_globals() -> Dict[Tuple[str, str], object]:
    classes = [getattr(dcp_metadata, name) for name in (
        "Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")]
    classes += [getattr(dcp_filesystem, name) for name in ("_StorageInfo", "_StoragePrefix")]
    # Megatron-core keeps the save plans in its .metadata (``all_local_plans``) to reuse them.
    classes += [getattr(dcp_planner, name) for name in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData") if hasattr(dcp_planner, name)]
    classes += [torch.Size, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath]
    allowed = {(cls.__module__, cls.__qualname__): cls for cls in classes}
    allowed.update({("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)})
    for module in (torch.serialization, torch._utils):
        if hasattr(module, "_get_layout"):  # torch.layout pickles as _get_layout(name)
            allowed[(module.__name__, "_get_layout")] = module._get_layout
    return allowed


_ALLOWED_GLOBALS = _allowed_globals()


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed classes: a crafted .metadata cannot run code."""

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None


def load_metadata(ckpt_dir: str) -> dcp_metadata.Metadata:
    """The DCP ``Metadata`` of ``ckpt_dir``; InputError naming the file if absent or unusable."""
    path = os.path.join(ckpt_dir, DCP_METADATA)
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found (an incomplete DCP checkpoint? .metadata is written last)") from None
    except _RefusedGlobal as exc:
        raise InputError(f"{path}: refuses to load: the metadata references {exc}, which is not a DCP metadata "
                         "class (unpickling it could run code)") from None
    except Exception as exc:  # UnpicklingError, EOFError, ValueError, ... on a truncated or corrupt file
        raise InputError(f"{path}: cannot read DCP metadata ({type(exc).__name__}: {str(exc)[:200]}); "
                         "is the file truncated or corrupt?") from None
    if not (isinstance(metadata, dcp_metadata.Metadata) and isinstance(metadata.state_dict_metadata, dict)
            and isinstance(metadata.storage_data, dict)):
        raise InputError(f"{path}: not a DCP metadata file (holds {type(metadata).__name__}, or no storage index)")
    return metadata


# -- what a checkpoint holds -------------------------------------------------------------------
def chunk_keys(metadata) -> List[ChunkKey]:
    """Every stored entry: one key per tensor chunk, one per bytes object."""
    keys: List[ChunkKey] = []
    for fqn, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, dcp_metadata.TensorStorageMetadata):
            keys += [(fqn, tuple(chunk.offsets)) for chunk in entry.chunks]
        else:
            keys.append((fqn, None))
    return keys


def storage_index(metadata) -> Dict[ChunkKey, object]:
    """(fqn, offsets) -> _StorageInfo(relative_path, offset, length)."""
    return {(index.fqn, None if index.offset is None else tuple(index.offset)): info
            for index, info in metadata.storage_data.items()}


def top_level_key(metadata, fqn: str) -> str:
    """The state-dict entry ``fqn`` lives under: DCP's flattening map when saved by its default
    planner, else the name up to the first '.' or '/' (Megatron's ShardedObject keys use '/')."""
    mapping = metadata.planner_data
    if isinstance(mapping, dict) and isinstance(mapping.get(fqn), (tuple, list)) and mapping[fqn]:
        return str(mapping[fqn][0])
    return re.split(r"[./]", fqn, maxsplit=1)[0]


def chunk_sizes(metadata) -> Dict[ChunkKey, Tuple[int, ...]]:
    """(fqn, offsets) -> the chunk's sizes, for every tensor chunk."""
    return {(fqn, tuple(chunk.offsets)): tuple(chunk.sizes)
            for fqn, entry in metadata.state_dict_metadata.items()
            if isinstance(entry, dcp_metadata.TensorStorageMetadata) for chunk in entry.chunks}


def _describe_chunks(chunks) -> str:
    shown = ", ".join(f"{list(o)}+{list(s)}" for o, s in chunks[:4])
    return f"{len(chunks)} chunk(s) {shown}{', ...' if len(chunks) > 4 else ''}"


def entry_specs(metadata, fqns: Optional[Iterable[str]] = None) -> Dict[str, EntrySpec]:
    """``.metadata`` entries as the common comparer sees them (all, or those named)."""
    entries = metadata.state_dict_metadata
    specs = {}
    for fqn in entries if fqns is None else fqns:
        entry = entries[fqn]
        if isinstance(entry, dcp_metadata.TensorStorageMetadata):
            chunks = tuple(sorted((tuple(c.offsets), tuple(c.sizes)) for c in entry.chunks))
            specs[fqn] = EntrySpec("a tensor", entry.properties.dtype, list(entry.size), layout=chunks)
        else:
            specs[fqn] = EntrySpec("a bytes object", checked=False)
    return specs


def compare_metadata(path: str, metadata, newest_path: str, newest, fqns: Sequence[str],
                     ignored=lambda fqn: False) -> List[str]:
    """Problems (each naming checkpoint and key) that make ``metadata`` unmergeable with ``newest``
    for the keys ``fqns`` of the newest: same keys, kinds, global shapes, dtypes and chunking.
    Keys only ``metadata`` has are unexpected unless ``ignored(fqn)``."""
    def chunked_differently(fqn, other, ref):
        return (f"{path}: key '{fqn}' is chunked differently: {_describe_chunks(other.layout)}; the newest "
                f"checkpoint has {_describe_chunks(ref.layout)} (merging needs identical chunking)")

    reference = entry_specs(newest, fqns)
    entries = entry_specs(metadata)
    unexpected = {fqn for fqn in entries if fqn not in newest.state_dict_metadata}
    entries = {fqn: spec for fqn, spec in entries.items() if fqn in reference or fqn in unexpected}
    return compare_entries(path, entries, newest_path, reference, shape_word="global shape", ignored=ignored,
                           layout_problem=chunked_differently)


def storage_problems(ckpt_dir: str, metadata, keys: Iterable[ChunkKey], check_files: bool = True) -> List[str]:
    """Every key must have a storage entry pointing inside the checkpoint, into an existing file,
    within its size, without stream transforms (compression) pmm_dist cannot undo."""
    problems = []
    index = storage_index(metadata)
    sizes: Dict[str, Optional[int]] = {}
    where = os.path.join(ckpt_dir, DCP_METADATA)
    for key in keys:
        info = index.get(key)
        name = key[0] if key[1] is None else f"{key[0]} (chunk at {list(key[1])})"
        if info is None:
            problems.append(f"{where}: key '{name}' has no storage entry")
            continue
        rel = info.relative_path
        if not isinstance(rel, str) or os.path.isabs(rel) or os.path.normpath(rel).split(os.sep)[0] == "..":
            problems.append(f"{where}: key '{name}' is stored at {rel!r}, outside the checkpoint directory")
            continue
        if getattr(info, "transform_descriptors", None):
            problems.append(f"{where}: key '{name}' is stored with stream transforms "
                            f"{list(info.transform_descriptors)} (e.g. compression), which pmm_dist does not support")
            continue
        if not check_files:
            continue
        if rel not in sizes:
            path = os.path.join(ckpt_dir, rel)
            sizes[rel] = os.path.getsize(path) if os.path.isfile(path) else None
            if sizes[rel] is None:
                problems.append(f"{path}: missing file (holds key '{name}' and possibly more)")
        if sizes[rel] is not None and (info.offset < 0 or info.length < 0 or info.offset + info.length > sizes[rel]):
            problems.append(f"{os.path.join(ckpt_dir, rel)}: key '{name}' is stored at bytes "
                            f"[{info.offset}, {info.offset + info.length}), beyond the file's {sizes[rel]} bytes "
                            "(truncated file?)")
    return problems


def trailing_number(path: str) -> Optional[int]:
    return number_in_name(path, _TRAILING_NUMBER)


class _SourceFiles:
    """Open files of the sources, read by byte range (pread: no shared seek position)."""

    def __init__(self):
        self._fds: Dict[str, int] = {}

    def read(self, ckpt_dir: str, info) -> bytes:
        path = os.path.join(ckpt_dir, info.relative_path)
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise InputError(f"{path}: file not found") from None
        data = os.pread(fd, info.length, info.offset)
        if len(data) != info.length:
            raise InputError(f"{path}: expected {info.length} bytes at offset {info.offset}, found {len(data)} "
                             "(truncated file?)")
        return data

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _load_chunk(blob: bytes, path: str, key: ChunkKey, entry, sizes) -> torch.Tensor:
    try:
        tensor = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable blob is an input problem
        raise InputError(f"{path}: key '{key[0]}': stored chunk is not a readable torch.save tensor "
                         f"({type(exc).__name__}: {str(exc)[:160]})") from None
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(sizes) \
            or tensor.dtype != entry.properties.dtype:
        found = f"{tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise InputError(f"{path}: key '{key[0]}' chunk at {list(key[1])}: stored {found}, the metadata says "
                         f"{tuple(sizes)} {entry.properties.dtype}")
    return tensor


class DcpFormat(CheckpointFormat):
    name = "dcp"
    description = "PyTorch Distributed Checkpoint: .metadata + __*_*.distcp (a checkpoint dir, or a dir of step-N dirs)"

    # Top-level state-dict entries that are training state, not weights: dropped by
    # --optimizer drop, copied from the newest checkpoint by --optimizer latest.
    training_state_keys: Tuple[str, ...] = ("optimizer", "optim", "lr_scheduler")

    def __init__(self):
        self._metadata_cache: Dict[str, object] = {}

    # -- discovery ---------------------------------------------------------------------------
    @classmethod
    def recognizes(cls, path: str) -> bool:
        return os.path.isfile(os.path.join(path, DCP_METADATA)) or bool(cls._checkpoint_subdirs(path))

    @staticmethod
    def _checkpoint_subdirs(path: str) -> List[str]:
        return [e for e in listdir(path) if trailing_number(e) is not None
                and os.path.isfile(os.path.join(path, e, DCP_METADATA))]

    def discover(self, sources: Sequence[str]) -> List[CheckpointRef]:
        if len(sources) == 1 and not os.path.isfile(os.path.join(sources[0], DCP_METADATA)):
            run = sources[0]
            subdirs = self._checkpoint_subdirs(run)
            if not subdirs:
                raise InputError(f"{run}: neither a DCP checkpoint (no {DCP_METADATA}) nor a directory of DCP "
                                 "checkpoints named with a trailing step number (e.g. step-100)")
            return sorted_unique([CheckpointRef(trailing_number(e), os.path.abspath(os.path.join(run, e)))
                                  for e in subdirs])
        for src in sources:
            if not os.path.isfile(os.path.join(src, DCP_METADATA)):
                raise InputError(f"{src}: not a DCP checkpoint directory ({DCP_METADATA} missing; it is written "
                                 "last, so the checkpoint may be incomplete)")
        numbers = [trailing_number(src) for src in sources]
        if any(n is None for n in numbers):
            numbers = list(range(1, len(sources) + 1))  # no step numbers: the order given is the order
        return sorted_unique([CheckpointRef(n, os.path.abspath(src)) for n, src in zip(numbers, sources)])

    # -- metadata ----------------------------------------------------------------------------
    def metadata(self, ckpt: CheckpointRef):
        if ckpt.path not in self._metadata_cache:
            self._metadata_cache[ckpt.path] = load_metadata(ckpt.path)
        return self._metadata_cache[ckpt.path]

    def is_training_state(self, metadata, fqn: str) -> bool:
        return top_level_key(metadata, fqn) in self.training_state_keys

    def kept_fqns(self, metadata, optimizer_policy: OptimizerPolicy) -> List[str]:
        """The newest checkpoint's entries that the output holds."""
        return [fqn for fqn in metadata.state_dict_metadata
                if optimizer_policy == OptimizerPolicy.LATEST or not self.is_training_state(metadata, fqn)]

    def _item_action(self, metadata, fqn: str) -> Action:
        """Float tensor chunks are averaged over all sources; the rest (integer tensor chunks,
        bytes objects, optimizer state under --optimizer latest) is the newest's, byte for byte."""
        entry = metadata.state_dict_metadata[fqn]
        if (isinstance(entry, dcp_metadata.TensorStorageMetadata) and entry.properties.dtype.is_floating_point
                and not self.is_training_state(metadata, fqn)):
            return Action.MERGE
        return Action.COPY

    def layout(self, checkpoints: Sequence[CheckpointRef]) -> Dict[str, object]:
        metadata = self.metadata(checkpoints[-1])
        entries = metadata.state_dict_metadata.values()
        tensors = [e for e in entries if isinstance(e, dcp_metadata.TensorStorageMetadata)]
        return {"tensors": len(tensors), "chunks": sum(len(e.chunks) for e in tensors),
                "bytes_entries": len(entries) - len(tensors),
                "files": len({info.relative_path for info in metadata.storage_data.values()})}

    def tensor_inventory(self, checkpoint_dir: str) -> Dict[str, Tuple[tuple, str]]:
        """The float tensors that take part in a merge (training state excluded: it may be
        dropped), with global shapes and dtypes, from ``.metadata`` alone."""
        metadata = load_metadata(checkpoint_dir)
        return {fqn: (tuple(entry.size), str(entry.properties.dtype))
                for fqn, entry in metadata.state_dict_metadata.items()
                if isinstance(entry, dcp_metadata.TensorStorageMetadata) and entry.properties.dtype.is_floating_point
                and not self.is_training_state(metadata, fqn)}

    # -- planning (metadata only) ------------------------------------------------------------
    def plan_units(self, checkpoints: Sequence[CheckpointRef], optimizer_policy: OptimizerPolicy,
                   world_size: int = 1) -> List[WorkUnit]:
        newest_ref = checkpoints[-1]
        newest = self.metadata(newest_ref)
        kept = self.kept_fqns(newest, optimizer_policy)
        merged = [fqn for fqn in kept if self._item_action(newest, fqn) == Action.MERGE]
        # Training state under 'latest' comes from the newest only; everything else must match.
        compared = [fqn for fqn in kept if not self.is_training_state(newest, fqn)]
        kept_set, merged_set = set(kept), set(merged)
        # Storage entries are checked here, the files they point into by each rank (check_unit).
        problems = storage_problems(newest_ref.path, newest, [k for k in chunk_keys(newest) if k[0] in kept_set],
                                    check_files=False)
        for ckpt in checkpoints[:-1]:
            try:
                metadata = self.metadata(ckpt)
            except InputError as exc:
                problems.append(str(exc))
                continue
            mismatches = compare_metadata(ckpt.path, metadata, newest_ref.path, newest, compared,
                                          ignored=lambda fqn, md=metadata: self.is_training_state(md, fqn))
            problems += mismatches
            if not mismatches:
                problems += storage_problems(ckpt.path, metadata, [k for k in chunk_keys(newest) if k[0] in merged_set],
                                             check_files=False)
        problems += self.extra_plan_problems(checkpoints, optimizer_policy)
        if problems:
            raise InputError(problems)

        location = storage_index(newest)
        sizes = chunk_sizes(newest)
        items = []
        for fqn, offsets in chunk_keys(newest):
            if fqn not in kept_set:
                continue
            if offsets is None:
                num_bytes = location[(fqn, None)].length
            else:
                num_bytes = math.prod(sizes[(fqn, offsets)]) * newest.state_dict_metadata[fqn].properties.dtype.itemsize
            items.append(ChunkItem(fqn, offsets, self._item_action(newest, fqn), num_bytes))
        num_sources = len(checkpoints)
        units = []
        for k, share in enumerate(balance(items, max(world_size, 1),
                                          lambda it: work_cost(it.num_bytes, it.action, num_sources),
                                          lambda it: (it.key, it.offsets or ()))):
            if share:
                # Stored order of the newest source: reads of each source file run forwards.
                share.sort(key=lambda it: (location[it.storage_key].relative_path, location[it.storage_key].offset))
                units.append(WorkUnit(f"__{k}_0.distcp", sum(it.num_bytes for it in share), items=tuple(share)))
        return units

    def extra_plan_problems(self, checkpoints: Sequence[CheckpointRef], optimizer_policy: OptimizerPolicy) -> List[str]:
        """Format-specific checks of files besides the DCP ones (none for plain DCP)."""
        return []

    # -- per-unit work -----------------------------------------------------------------------
    def check_unit(self, unit: WorkUnit, checkpoints: Sequence[CheckpointRef]) -> List[str]:
        """Rank-local, before anything is written: every byte range this unit reads (all its items
        from the newest source, its merged chunks from the others) lies inside an existing file."""
        problems = []
        merged = [it.storage_key for it in unit.items if it.action == Action.MERGE]
        for position, ckpt in enumerate(checkpoints):
            try:
                metadata = self.metadata(ckpt)
            except InputError as exc:
                problems.append(str(exc))
                continue
            keys = [it.storage_key for it in unit.items] if position == len(checkpoints) - 1 else merged
            problems += storage_problems(ckpt.path, metadata, keys)
        return problems

    def merge_unit(self, unit: WorkUnit, checkpoints: Sequence[CheckpointRef], destination: str,
                   context: MergeContext) -> UnitResult:
        """Items in stored order, each merged source by source into a float64 accumulator; a
        reader thread fetches the next blob while one is added. In memory at once: the
        accumulator, the blob being added and the one being read: flat in N."""
        newest = self.metadata(checkpoints[-1])
        indexes = [storage_index(self.metadata(ckpt)) for ckpt in checkpoints]
        sizes_of = chunk_sizes(newest)
        files = _SourceFiles()
        written: List[tuple] = []
        counters = {"read": 0, "merged": 0}
        last = len(checkpoints) - 1
        # Every blob to read, in order: all sources of a merged item, the newest of a copied one.
        reads = [(position, i) for position, item in enumerate(unit.items)
                 for i in (range(len(checkpoints)) if item.action == Action.MERGE else [last])]

        def read(task) -> bytes:
            position, i = task
            return files.read(checkpoints[i].path, indexes[i][unit.items[position].storage_key])

        def produce(writer):
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pmm-dcp-read") as reader:
                pending = reader.submit(read, reads[0]) if reads else None
                accumulator = None
                for step, (position, i) in enumerate(reads):
                    blob = pending.result()
                    if step + 1 < len(reads):
                        pending = reader.submit(read, reads[step + 1])
                    item = unit.items[position]
                    fqn, offsets, key = item.key, item.offsets, item.storage_key
                    counters["read"] += len(blob)
                    context.on_progress(len(blob))
                    if item.action == Action.COPY:
                        start = writer.num_bytes
                        writer.write(blob)
                        written.append((fqn, offsets, start, writer.num_bytes - start))
                        continue
                    path = os.path.join(checkpoints[i].path, indexes[i][key].relative_path)
                    chunk = _load_chunk(blob, path, key, newest.state_dict_metadata[fqn], sizes_of[key])
                    del blob
                    if i == 0:
                        accumulator = context.accumulator(chunk.shape, item.describe())
                    accumulator.add(chunk, context.weights[i], path)
                    del chunk
                    if i == last:
                        start = writer.num_bytes
                        torch.save(accumulator.result(), writer)
                        written.append((fqn, offsets, start, writer.num_bytes - start))
                        counters["merged"] += 1
                        accumulator = None

        try:
            num_bytes, sha = write_atomically(os.path.join(destination, unit.relpath), produce)
        finally:
            files.close()
        return UnitResult(unit.relpath, num_bytes, counters["read"], sha, counters["merged"],
                          details={"dcp_storage": written})

    def state_key(self, unit: WorkUnit, what: str) -> str:
        # An item is named by its key and chunk offsets across the whole checkpoint, whichever
        # output file the balancer puts it in.
        return what

    # -- output ------------------------------------------------------------------------------
    def finalize(self, staged_dir: str, checkpoints: Sequence[CheckpointRef],
                 results: Sequence[UnitResult], optimizer_policy: OptimizerPolicy) -> List[UnitResult]:
        """Coordinator: the output ``.metadata``, the newest's key metadata with new locations."""
        newest = self.metadata(checkpoints[-1])
        kept = self.kept_fqns(newest, optimizer_policy)
        kept_set = set(kept)
        chunk_position = {}
        for fqn in kept:
            entry = newest.state_dict_metadata[fqn]
            if isinstance(entry, dcp_metadata.TensorStorageMetadata):
                chunk_position.update({(fqn, tuple(c.offsets)): i for i, c in enumerate(entry.chunks)})
        # The key strings of the newest metadata, so that pickle shares them between its two
        # tables however the results reached us (gathered, or read back as JSON on --resume):
        # the same merge always writes the same bytes.
        canonical = {fqn: fqn for fqn in kept}
        storage_data = {}
        for result in results:
            for fqn, offsets, offset, length in result.details.get("dcp_storage", ()):
                fqn = canonical[fqn]
                offsets = None if offsets is None else tuple(offsets)  # a list after a JSON round trip
                index = dcp_metadata.MetadataIndex(fqn, offsets, chunk_position.get((fqn, offsets)))
                storage_data[index] = dcp_filesystem._StorageInfo(result.relpath, offset, length)
        expected = {k for k in chunk_keys(newest) if k[0] in kept_set}
        stored = {(i.fqn, None if i.offset is None else tuple(i.offset)) for i in storage_data}
        if stored != expected:
            raise MergeError(f"internal error: the merged files hold {len(stored)} entries, the plan "
                             f"{len(expected)}; missing e.g. {sorted(expected - stored, key=str)[:3]}")
        planner_data = newest.planner_data
        if isinstance(planner_data, dict):
            planner_data = {k: v for k, v in planner_data.items()
                            if k in kept_set or k not in newest.state_dict_metadata}
        storage_meta = newest.storage_meta
        if storage_meta is not None:  # provenance of the merge lives in pmm_manifest.json
            # A content-derived save id, not a random one: a resumed merge writes the same
            # bytes as an uninterrupted one.
            content = hashlib.sha256("".join(sorted(r.sha256 for r in results)).encode()).hexdigest()
            storage_meta = dataclasses.replace(storage_meta, checkpoint_id=None, save_id=f"pmm-{content[:32]}",
                                               load_id=None)
        # replace() rebuilds from the dataclass fields only: extra attributes such as
        # Megatron's cached save plans (all_local_plans) describe the sources' files, not ours.
        metadata = dataclasses.replace(newest, state_dict_metadata={k: newest.state_dict_metadata[k] for k in kept},
                                       planner_data=planner_data, storage_data=storage_data,
                                       storage_meta=storage_meta)
        blob = pickle.dumps(metadata)
        num_bytes, sha = write_atomically(os.path.join(staged_dir, DCP_METADATA), lambda f: f.write(blob))
        return [UnitResult(DCP_METADATA, num_bytes, 0, sha, 0)]

    def output_layout(self, newest: CheckpointRef) -> OutputLayout:
        # The output root is the merged DCP checkpoint; .metadata, DCP's own commit marker, is
        # staged by finalize and moved into place after every .distcp file.
        return OutputLayout(OutputKind.CHECKPOINT_ROOT, DCP_METADATA)
