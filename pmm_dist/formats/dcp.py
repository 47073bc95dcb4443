"""PyTorch Distributed Checkpoint (DCP) directories, merged chunk by chunk.

    CKPT/.metadata               # pickled torch.distributed.checkpoint Metadata; written last
    CKPT/__{rank}_{n}.distcp     # each stored item a torch.save blob (tensor chunk) or raw bytes

Planning reads only the ``.metadata`` of every source: the newest checkpoint's keys, global
shapes and dtypes are the reference every other source must match, and its chunks are the
output's. The units are the stored chunks, binned byte-balanced into one output file per rank,
``__{k}_0.distcp`` (``WorkUnit.items``). A rank reads exactly its chunks' byte ranges from the N
sources (pread; never whole files), merges float chunks into a float64 accumulator and copies
everything else (integer tensors, bytes entries) byte for byte from the newest source. Training
state (optimizer, scheduler) is left out, taken from the newest or merged as ``--optimizer``
says (``dcp_state``); a model tensor with model-space fp32 master weights in the optimizer
state (torch_dist) is merged from the masters (``ChunkItem.source_key``). The
coordinator then writes the output ``.metadata``: the newest checkpoint's key metadata (same
chunking) with new storage locations. ``.metadata`` is the checkpoint's commit marker, so it is
written last. The plan tells each rank where every source stores what it reads (``ChunkItem.stored``,
``copied``: file, offset, length) and the chunks' sizes and dtypes: no rank but the coordinator
parses a ``.metadata`` (at a million chunks, seconds and a gigabyte of objects per source).

Sources saved at another parallel layout (another world size, TP, PP) chunk a tensor
differently. Planning then intersects the chunk boxes (``plan.regions``): for each output chunk
each such source contributes the pieces of its stored chunks that overlap it (``ChunkItem.sources``),
after verifying that its chunks cover every element exactly once (a gap, an overlap, a chunk
outside the tensor is an error naming checkpoint, key and region). A rank reads only each
piece's bytes (``dcp_reads``) and adds it into its region of the accumulator. A layout change
that changed global shapes is refused in one message naming the checkpoints of each layout.

Sources: one directory holding DCP checkpoints as subdirectories whose names end in a number
(``step-100``, ``step_200``, ``global_step300``; one without a ``.metadata`` is incomplete and
skipped), or checkpoint directories given explicitly (iteration = the trailing number of each
name when every one has one, else 1..N in the order given). The output root itself is the merged
DCP checkpoint (``dcp.load(state_dict, checkpoint_id=OUT)``).

``.metadata`` is a pickle. It is read by a restricted unpickler that resolves only the DCP
metadata dataclasses, ``torch.Size``, torch dtypes/layouts and paths; anything else is refused.
"""
import dataclasses
import functools
import hashlib
import io
import itertools
import math
import operator
import os
import pathlib
import pickle
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Container, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ..io.atomic import write_atomically
from ..io.planning_reads import gc_paused
from ..io.write_behind import WriteBehind
from ..errors import InputError, MergeError
from ..plan.assign import balance, work_cost
from ..plan.regions import Box, coverage_problems, map_chunks, read_span
from ..plan.types import (Action, CheckpointRef, ChunkedKey, ChunkItem, OptimizerPolicy, OutputKind, OutputLayout,
                          Location, Piece, StoredChunk, UnitResult, WorkUnit)
from .base import CheckpointFormat, MergeContext
from .common import EntrySpec, LazyModule, compare_entries, listdir, number_in_name, sorted_unique
from .dcp_reads import (SMALL_BLOB_BYTES, MappedChunks, PieceReader, SourceFiles, load_chunk, piece_is_whole,
                        piece_region)
from .dcp_state import FP32_MASTERS, MODEL_COPIES, action_for, dcp_role, state_path

dcp_metadata = LazyModule("torch.distributed.checkpoint.metadata")
dcp_planner = LazyModule("torch.distributed.checkpoint.planner")
dcp_filesystem = LazyModule("torch.distributed.checkpoint.filesystem")

DCP_METADATA = ".metadata"
_TRAILING_NUMBER = re.compile(r"(\d+)$")

ChunkKey = Tuple[str, Optional[Tuple[int, ...]]]  # (fqn, chunk offsets), offsets None for bytes
LENGTH = StoredChunk._fields.index("length")  # of a location as the plan holds it (a plain tuple)
_LENGTH, _FIRST = operator.itemgetter(LENGTH), operator.itemgetter(0)
_COPIED = operator.attrgetter("copied")


# -- reading .metadata safely ------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
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


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed classes: a crafted .metadata cannot run code."""

    def find_class(self, module, name):
        try:
            return _allowed_globals()[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None


def load_metadata(ckpt_dir: str) -> "dcp_metadata.Metadata":
    """The DCP ``Metadata`` of ``ckpt_dir``; InputError naming the file if absent or unusable."""
    path = os.path.join(ckpt_dir, DCP_METADATA)
    try:
        with open(path, "rb") as f:
            data = f.read()  # whole, then parsed from memory: the unpickler's reads from a file cost more
        with gc_paused():
            metadata = _MetadataUnpickler(io.BytesIO(data)).load()
        del data
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
def chunk_keys(metadata, fqns: Optional[Container[str]] = None) -> List[ChunkKey]:
    """Every stored entry (of the keys ``fqns``, where given): one key per tensor chunk, one per
    bytes object."""
    keys: List[ChunkKey] = []
    for fqn, entry in metadata.state_dict_metadata.items():
        if fqns is not None and fqn not in fqns:
            continue
        if isinstance(entry, dcp_metadata.TensorStorageMetadata):  # a torch.Size keys as its tuple
            keys += zip(itertools.repeat(fqn), map(_OFFSETS, entry.chunks))
        else:
            keys.append((fqn, None))
    return keys


# A million storage entries: their keys and locations taken in C-speed passes (attrgetter of
# several names makes the tuple), not a Python-level loop over the entries.
_INDEX_KEY = operator.attrgetter("fqn", "offset")
_STORED_AT = operator.attrgetter("relative_path", "offset", "length")
_CHUNK_BOX = operator.attrgetter("offsets", "sizes")  # a ChunkStorageMetadata's fields, as a tuple
_OFFSETS = operator.attrgetter("offsets")


def storage_index(metadata) -> Dict[ChunkKey, object]:
    """(fqn, offsets) -> _StorageInfo(relative_path, offset, length). The offsets are kept as
    stored (a torch.Size, which hashes and compares as the tuple it holds): looked up with tuples,
    and no tuple made per chunk."""
    storage = metadata.storage_data
    return dict(zip(map(_INDEX_KEY, storage.keys()), storage.values()))


def storage_locations(metadata) -> Dict[ChunkKey, Location]:
    """(fqn, offsets) -> where it is stored as the plan holds it, (relative_path, offset, length):
    ``storage_index`` with each entry already the plain tuple a ChunkItem carries."""
    storage = metadata.storage_data
    return dict(zip(map(_INDEX_KEY, storage.keys()), map(_STORED_AT, storage.values())))


def top_level_key(metadata, fqn: str) -> str:
    """The state-dict entry ``fqn`` lives under: DCP's flattening map when saved by its default
    planner, else the name up to the first '.' or '/' (Megatron's ShardedObject keys use '/')."""
    return state_path(metadata, fqn)[0]


def entry_specs(metadata, fqns: Optional[Iterable[str]] = None) -> Dict[str, EntrySpec]:
    """``.metadata`` entries as the common comparer sees them (all, or those named)."""
    entries = metadata.state_dict_metadata
    specs = {}
    for fqn in entries if fqns is None else fqns:
        entry = entries[fqn]
        if isinstance(entry, dcp_metadata.TensorStorageMetadata):
            specs[fqn] = EntrySpec("a tensor", entry.properties.dtype, list(entry.size))
        else:
            specs[fqn] = EntrySpec("a bytes object", checked=False)
    return specs


def compare_metadata(path: str, metadata, newest_path: str, newest, fqns: Sequence[str],
                     ignored=lambda fqn: False) -> List[str]:
    """Problems (each naming checkpoint and key) that make ``metadata`` unmergeable with ``newest``
    for the keys ``fqns`` of the newest: same keys, kinds, global shapes and dtypes (the chunking
    may differ: see ``plan_pieces``). Keys only ``metadata`` has are unexpected unless ``ignored(fqn)``."""
    reference = entry_specs(newest, fqns)
    entries = entry_specs(metadata)
    unexpected = {fqn for fqn in entries if fqn not in newest.state_dict_metadata}
    entries = {fqn: spec for fqn, spec in entries.items() if fqn in reference or fqn in unexpected}
    return compare_entries(path, entries, newest_path, reference, shape_word="global shape", ignored=ignored)


def chunk_boxes(entry) -> List[Box]:
    """A tensor entry's stored chunks as boxes of its global index space, in stored order."""
    return [(tuple(c.offsets), tuple(c.sizes)) for c in entry.chunks]


def plan_pieces(path: str, fqn: str, entry, newest_entry) -> Tuple[Optional[Dict[tuple, Tuple[Piece, ...]]], List[str]]:
    """How a source's chunks of ``fqn`` fill the newest's: ``(None, [])`` when it stores the
    same chunks; else, per newest chunk (by offsets), the pieces of the source's chunks that
    cover it exactly once; or the problems (naming checkpoint, key and region) why they cannot
    (chunks outside the tensor, overlapping, or leaving a gap)."""
    if list(map(_CHUNK_BOX, entry.chunks)) == list(map(_CHUNK_BOX, newest_entry.chunks)):
        return None, []  # the same chunks in the same order (compared as tuples, in C): nothing to map
    boxes, outputs = chunk_boxes(entry), chunk_boxes(newest_entry)
    if sorted(boxes) == sorted(outputs):
        return None, []
    problems = coverage_problems(tuple(entry.size), boxes)
    if problems:
        return None, [f"{path}: key '{fqn}' (global shape {list(entry.size)}): {p.describe(boxes)}" for p in problems]
    mapping = map_chunks(outputs, boxes)
    return {out[0]: tuple(Piece(boxes[j][0], *overlap, boxes[j][1]) for j, overlap in found)
            for out, found in zip(outputs, mapping)}, []


def saved_world_size(metadata) -> Optional[int]:
    """How many ranks wrote the checkpoint, from its file names (``__{rank}_{n}.distcp``)."""
    names = {str(info.relative_path) for info in metadata.storage_data.values()}  # a few per rank, not per chunk
    ranks = {m.group(1) for m in (re.match(r"__(\d+)_", name) for name in names) if m}
    return len(ranks) or None


@functools.lru_cache(maxsize=1 << 16)  # per file name: a checkpoint has a few files, a million keys
def _escapes(relative_path: str) -> bool:
    return os.path.isabs(relative_path) or os.path.normpath(relative_path).split(os.sep)[0] == ".."


def _named(key: ChunkKey) -> str:
    return key[0] if key[1] is None else f"{key[0]} (chunk at {list(key[1])})"


def storage_problems(ckpt_dir: str, metadata, keys: Iterable[ChunkKey], check_files: bool = True,
                     locations: Optional[Dict[ChunkKey, Location]] = None) -> List[str]:
    """Every key must have a storage entry pointing inside the checkpoint, into an existing file,
    within its size, without stream transforms (compression) pmm_dist cannot undo. ``locations``:
    the metadata's ``storage_locations``, where the caller has them."""
    locations = storage_locations(metadata) if locations is None else locations
    keys = list(keys)
    found = list(map(locations.get, keys))
    # A million keys: decided in C-speed passes (a checkpoint has a few files, so the paths are
    # judged once each); only a checkpoint with a problem is walked key by key to name them.
    clean = None not in found and not any(not isinstance(rel, str) or _escapes(rel)
                                          for rel in set(map(operator.itemgetter(0), found))) and \
        not _any_transforms(metadata.storage_data.values())
    if clean:
        return file_problems(ckpt_dir, ((key, StoredChunk(*where)) for key, where in zip(keys, found))) \
            if check_files else []
    problems = []
    where = os.path.join(ckpt_dir, DCP_METADATA)
    index = storage_index(metadata)
    stored = []
    for key in keys:
        info = index.get(key)
        if info is None:
            problems.append(f"{where}: key '{_named(key)}' has no storage entry")
            continue
        rel = info.relative_path
        if not isinstance(rel, str) or _escapes(rel):
            problems.append(f"{where}: key '{_named(key)}' is stored at {rel!r}, outside the checkpoint directory")
            continue
        if _transforms(info):
            problems.append(f"{where}: key '{_named(key)}' is stored with stream transforms "
                            f"{list(info.transform_descriptors)} (e.g. compression), which pmm_dist does not support")
            continue
        stored.append((key, info))
    return problems + (file_problems(ckpt_dir, stored) if check_files else [])


def _any_transforms(infos) -> bool:
    try:  # the class declares the field (a default for entries saved without it): one C-speed pass
        return any(map(operator.attrgetter("transform_descriptors"), infos))
    except AttributeError:  # torch before stream transforms
        return any(map(_transforms, infos))


def _transforms(info) -> object:
    """A storage entry's stream transforms (recent torch records them; older entries have none)."""
    return getattr(info, "transform_descriptors", None)


def file_problems(ckpt_dir: str, stored: Iterable[Tuple[ChunkKey, object]]) -> List[str]:
    """Every stored item (key, where it lies: a _StorageInfo or the plan's StoredChunk) must lie
    inside an existing file of the checkpoint."""
    problems = []
    sizes: Dict[str, Optional[int]] = {}
    for key, info in stored:
        rel = info.relative_path
        if rel not in sizes:
            path = os.path.join(ckpt_dir, rel)
            sizes[rel] = os.path.getsize(path) if os.path.isfile(path) else None
            if sizes[rel] is None:
                problems.append(f"{path}: missing file (holds key '{_named(key)}' and possibly more)")
        if sizes[rel] is not None and (info.offset < 0 or info.length < 0 or info.offset + info.length > sizes[rel]):
            problems.append(f"{os.path.join(ckpt_dir, rel)}: key '{_named(key)}' is stored at bytes "
                            f"[{info.offset}, {info.offset + info.length}), beyond the file's {sizes[rel]} bytes "
                            "(truncated file?)")
    return problems


def _read_whole_items(fqn: str, entry, read: str, source_key: Optional[str], spec: ChunkedKey, itemsize: int,
                      newest_locations: Dict[ChunkKey, Location], older_locations: Sequence[Dict[ChunkKey, Location]]
                      ) -> List[ChunkItem]:
    """The items of a merged key every source stores in the newest's chunks (the common case):
    each source's chunk read whole. Built a key at a time in comprehensions (a million chunks).
    A source that stores a chunk where the newest does (the same layout saved alike) shares
    the newest's location tuple, which pickle then writes once."""
    offsets = [tuple(chunk.offsets) for chunk in entry.chunks]
    sizes = [tuple(chunk.sizes) for chunk in entry.chunks]
    copied = [newest_locations[(fqn, o)] for o in offsets]
    keys = [(read, o) for o in offsets]
    newest_reads = copied if source_key is None else [newest_locations[k] for k in keys]
    per_source = [[(mine if mine == theirs else theirs,) for mine, theirs in
                   zip(newest_reads, [found[k] for k in keys])] for found in older_locations]
    stored = list(zip(*per_source, [(where,) for where in newest_reads]))
    return [ChunkItem(fqn, o, Action.MERGE, math.prod(size) * itemsize, (), source_key, size, where, reads, spec)
            for o, size, where, reads in zip(offsets, sizes, copied, stored)]


class _SharedLocations:
    """The plan's locations of pieces: one tuple per stored chunk, however many pieces (of one
    or several output chunks) read it, so that pickle writes it once in a rank's share."""

    def __init__(self):
        self.made: Dict[tuple, tuple] = {}

    def of(self, where: Location) -> Location:
        return self.made.setdefault(where, where)


def trailing_number(path: str) -> Optional[int]:
    return number_in_name(path, _TRAILING_NUMBER)


class DcpFormat(CheckpointFormat):
    optimizer_policies = (OptimizerPolicy.DROP, OptimizerPolicy.LATEST, OptimizerPolicy.MERGE)
    name = "dcp"
    description = "PyTorch Distributed Checkpoint: .metadata + __*_*.distcp (a checkpoint dir, or a dir of step-N dirs)"

    # Top-level state-dict entries that are training state, not weights (see dcp_state for
    # what each --optimizer policy makes of them), and those of them that are the optimizer's.
    training_state_keys: Tuple[str, ...] = ("optimizer", "optim", "lr_scheduler")
    optimizer_keys: Tuple[str, ...] = ("optimizer", "optim")

    def __init__(self):
        self._model_keys_by_parameter: Dict[int, Dict[str, str]] = {}

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
        return self.memo("metadata", ckpt.path, lambda: load_metadata(ckpt.path))

    def locations(self, ckpt: CheckpointRef) -> Dict[ChunkKey, Location]:
        """The checkpoint's ``storage_locations``, made once per job like its metadata (1M chunks: a second)."""
        return self.memo("storage locations", ckpt.path, lambda: storage_locations(self.metadata(ckpt)))

    def is_training_state(self, metadata, fqn: str) -> bool:
        return top_level_key(metadata, fqn) in self.training_state_keys

    def is_optimizer_state(self, metadata, fqn: str) -> bool:
        return top_level_key(metadata, fqn) in self.optimizer_keys

    def has_optimizer_state(self, metadata) -> bool:
        return any(self.is_optimizer_state(metadata, fqn) for fqn in metadata.state_dict_metadata)

    def state_role(self, metadata, fqn: str) -> str:
        """The key's role for --optimizer (dcp_state): FSDP2 / torchtitan naming."""
        return dcp_role(metadata, fqn, self.training_state_keys, self.optimizer_keys)

    def item_action(self, metadata, fqn: str, optimizer_policy: OptimizerPolicy) -> Optional[Action]:
        """MERGE (weighted sum over the sources), COPY (the newest's bytes) or None (left out)."""
        return action_for(self.state_role(metadata, fqn), metadata.state_dict_metadata[fqn], optimizer_policy)

    def kept_fqns(self, metadata, optimizer_policy: OptimizerPolicy) -> List[str]:
        """The newest checkpoint's entries that the output holds."""
        return [fqn for fqn in metadata.state_dict_metadata
                if self.item_action(metadata, fqn, optimizer_policy) is not None]

    def model_masters(self, metadata) -> Dict[str, str]:
        """Model tensor -> the key of its model-space fp32 master weights, for every model tensor
        the checkpoint holds one for (plain DCP: none; the parameters themselves are the fp32
        weights the optimizer updates)."""
        return {}

    def model_weights_source(self, checkpoints: Sequence[CheckpointRef], optimizer_policy: OptimizerPolicy) -> str:
        return FP32_MASTERS if self.model_masters(self.metadata(checkpoints[-1])) else MODEL_COPIES

    def parameter_of(self, metadata, fqn: str) -> Optional[str]:
        """The model tensor a per-parameter optimizer state key belongs to, if any: --include /
        --exclude select optimizer state by its parameter (an excluded tensor keeps the newest's
        masters and moments too). DCP: ``<optimizer>.state.<param fqn>.<name>`` belongs to the
        model key saved at ``(<param fqn>)`` (torchtitan: the model's keys at the top level) or
        ``(model, <param fqn>)``."""
        path = state_path(metadata, fqn)
        if len(path) < 4 or path[0] not in self.optimizer_keys or path[1] != "state":
            return None
        by_parameter = self._model_keys_by_parameter.get(id(metadata))
        if by_parameter is None:
            by_parameter = self._model_keys_by_parameter[id(metadata)] = {}
            for key in metadata.state_dict_metadata:
                if not self.is_training_state(metadata, key):
                    saved = state_path(metadata, key)
                    by_parameter.setdefault(".".join(saved[1:]), key)
                    by_parameter[".".join(saved)] = key
        return by_parameter.get(".".join(path[2:-1]))

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
    def checkpoint_layout(self, ckpt: CheckpointRef) -> Dict[str, object]:
        """The parallel layout a checkpoint was saved at, as far as the files tell."""
        return self.memo("layout", ckpt.path, lambda: {"world_size": saved_world_size(self.metadata(ckpt)) or None})

    def describe_layout(self, layout: Dict[str, object]) -> str:
        return f"world size {layout['world_size']}" if layout.get("world_size") else "unknown layout"

    def plan_units(self, checkpoints: Sequence[CheckpointRef], optimizer_policy: OptimizerPolicy,
                   world_size: int = 1) -> List[WorkUnit]:
        newest_ref = checkpoints[-1]
        newest = self.metadata(newest_ref)
        entries = newest.state_dict_metadata
        kept = self.kept_fqns(newest, optimizer_policy)
        actions = {fqn: self.item_action(newest, fqn, optimizer_policy) for fqn in kept}
        merged = [fqn for fqn in kept if actions[fqn] == Action.MERGE]
        if optimizer_policy != OptimizerPolicy.DROP and not self.has_optimizer_state(newest):
            raise InputError(self._no_optimizer_state(newest_ref, optimizer_policy))
        structure = self.optimizer_structure_problems(checkpoints, optimizer_policy)
        if structure:  # another optimizer structure: said once, before any per-key comparison
            raise InputError(structure)
        problems = []
        # Each merged key is read from every source under one key: its own, or (model weights
        # with a model-space master) the master's, whatever the policy keeps of the masters.
        masters = {fqn: master for fqn, master in self.model_masters(newest).items() if actions.get(fqn) == Action.MERGE}
        for fqn, master in masters.items():
            if tuple(entries[master].size) != tuple(entries[fqn].size):
                problems.append(f"{newest_ref.path}: key '{master}' (the fp32 master weights of '{fqn}') has global "
                                f"shape {list(entries[master].size)}, the model tensor {list(entries[fqn].size)}")
        reads = {fqn: masters.get(fqn, fqn) for fqn in merged}
        # What every source must have as the newest has it: the weights, every key read, and under
        # 'merge' the whole optimizer state (the same optimizer structure). The rest of the
        # training state comes from the newest alone.
        compared = list(dict.fromkeys(
            [fqn for fqn in kept if not self.is_training_state(newest, fqn)] + list(reads.values()) +
            [fqn for fqn in kept if optimizer_policy == OptimizerPolicy.MERGE and self.is_optimizer_state(newest, fqn)]))
        kept_set, read_set = set(kept), set(reads.values())
        # Storage entries are checked here, the files they point into by each rank (check_unit).
        problems += storage_problems(newest_ref.path, newest,
                                     chunk_keys(newest, kept_set | read_set),
                                     check_files=False, locations=self.locations(newest_ref))
        # The newest's chunks are the output's: they too must cover each merged tensor exactly once.
        for fqn in merged:
            entry = entries[fqn]
            problems += [f"{newest_ref.path}: key '{fqn}' (global shape {list(entry.size)}): {p.describe(boxes)}"
                         for boxes in [chunk_boxes(entry)] for p in coverage_problems(tuple(entry.size), boxes)]
        pieces_by_source: List[Dict[str, Dict[tuple, Tuple[Piece, ...]]]] = []
        reshaped: Dict[str, List[str]] = {}  # checkpoint -> keys whose global shape changed with the layout
        for ckpt in checkpoints[:-1]:
            found, trouble, moved = self._plan_source(ckpt, newest_ref, newest, compared, reads, optimizer_policy)
            pieces_by_source.append(found)
            problems += trouble
            if moved:
                reshaped[ckpt.path] = moved
        # The newest's masters may be chunked otherwise than its model tensors (the output's chunks).
        own = {}
        for fqn, master in masters.items():
            found, trouble = plan_pieces(newest_ref.path, master, entries[master], entries[fqn])
            problems += trouble
            if found is not None:
                own[fqn] = found
        pieces_by_source.append(own)
        if reshaped:
            problems.append(self._layout_change_problem(checkpoints, reshaped))
        problems += self.extra_plan_problems(checkpoints, optimizer_policy)
        if problems:
            raise InputError(problems)

        # Where each source stores what the merge reads from it, for the ranks (ChunkItem.stored).
        locations = [self.locations(ckpt) for ckpt in checkpoints]
        newest_locations, older_locations, shared = locations[-1], locations[:-1], _SharedLocations().of
        items = []
        # In the newest's stored order (chunk_keys), what is per key worked out once per key; per
        # chunk (a million of them) only lookups and tuples.
        for fqn, entry in entries.items():
            if fqn not in kept_set:
                continue
            action = actions[fqn]
            if not isinstance(entry, dcp_metadata.TensorStorageMetadata):  # bytes: copied (dcp_state)
                copied = newest_locations[(fqn, None)]
                items.append(ChunkItem(fqn, None, action, copied[LENGTH], copied=copied))
                continue
            read = reads.get(fqn, fqn)
            source_key = read if action == Action.MERGE and read != fqn else None
            spec = None if action != Action.MERGE else ChunkedKey(
                entry.properties.dtype, entries[read].properties.dtype, self.parameter_of(newest, fqn) or fqn)
            relaid = action == Action.MERGE and any(fqn in found for found in pieces_by_source)
            itemsize = entry.properties.dtype.itemsize
            if action == Action.MERGE and not relaid:
                items += _read_whole_items(fqn, entry, read, source_key, spec, itemsize, newest_locations,
                                           older_locations)
                continue
            for chunk in entry.chunks:
                offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
                copied = newest_locations[(fqn, offsets)]
                sources: Tuple[Optional[Tuple[Piece, ...]], ...] = ()
                if action != Action.MERGE:
                    stored = ()
                else:
                    sources = tuple(found[fqn][offsets] if fqn in found else None for found in pieces_by_source)
                    stored = tuple((shared(found[(read, offsets)]),) if pieces is None else
                                   tuple(shared(found[(read, p.stored)]) for p in pieces)
                                   for found, pieces in zip(locations, sources))
                items.append(ChunkItem(fqn, offsets, action, math.prod(sizes) * itemsize, sources, source_key,
                                       sizes, copied, stored, spec))
        num_sources = len(checkpoints)
        units = []
        # Ties between equal costs go to the stored order (the items' order), deterministic.
        for k, share in enumerate(balance(items, max(world_size, 1),
                                          [work_cost(it.num_bytes, it.action, num_sources) for it in items])):
            if share:
                # Stored order of the newest source: reads of each source file run forwards.
                share.sort(key=_COPIED)  # (relative_path, offset, length)
                units.append(WorkUnit(f"__{k}_0.distcp", sum(it.num_bytes for it in share), items=tuple(share)))
        return units

    def _no_optimizer_state(self, ckpt: CheckpointRef, optimizer_policy: OptimizerPolicy) -> str:
        names = " / ".join(f"'{key}'" for key in self.optimizer_keys)
        return (f"{ckpt.path}: holds no optimizer state (no {names} entries in its {DCP_METADATA}), which "
                f"--optimizer {optimizer_policy} needs; merge the weights alone with --optimizer drop")

    def _plan_source(self, ckpt: CheckpointRef, newest_ref: CheckpointRef, newest, compared: Sequence[str],
                     reads: Dict[str, str], optimizer_policy: OptimizerPolicy
                     ) -> Tuple[Dict[str, Dict[tuple, Tuple[Piece, ...]]], List[str], List[str]]:
        """One older checkpoint against the newest, from metadata: the pieces of its chunks for
        each merged key (``reads``: output key -> the key read) it chunks differently, the
        problems, and the keys whose global shape changed together with the layout (reported
        once for all checkpoints)."""
        try:
            metadata = self.metadata(ckpt)
        except InputError as exc:
            return {}, [str(exc)], []
        if optimizer_policy != OptimizerPolicy.DROP and not self.has_optimizer_state(metadata):
            return {}, [self._no_optimizer_state(ckpt, optimizer_policy)], []
        moved = self._reshaped_by_layout(ckpt, metadata, newest_ref, newest, compared)
        moved_set = set(moved)
        # Bytes entries come from the newest alone. Saved at another layout, their keys may name
        # other shards (a ShardedObject's key holds its offsets and global shape): then only the
        # tensors must match.
        relayout = self.checkpoint_layout(ckpt) != self.checkpoint_layout(newest_ref)
        entries = metadata.state_dict_metadata
        strict_optimizer = optimizer_policy == OptimizerPolicy.MERGE

        def ignored(fqn: str) -> bool:
            if relayout and not isinstance(entries[fqn], dcp_metadata.TensorStorageMetadata):
                return True
            return self.is_training_state(metadata, fqn) and not (strict_optimizer and
                                                                  self.is_optimizer_state(metadata, fqn))
        checked = [fqn for fqn in compared if fqn not in moved_set and not (
            relayout and not isinstance(newest.state_dict_metadata[fqn], dcp_metadata.TensorStorageMetadata))]
        training = [fqn for fqn in checked if self.is_training_state(newest, fqn)]
        problems = compare_metadata(ckpt.path, metadata, newest_ref.path, newest,
                                    [fqn for fqn in checked if not self.is_training_state(newest, fqn)],
                                    ignored=lambda fqn: ignored(fqn) or self.is_training_state(metadata, fqn))
        differences = compare_metadata(ckpt.path, metadata, newest_ref.path, newest, training,
                                       ignored=lambda fqn: ignored(fqn) or not self.is_training_state(metadata, fqn))
        if differences:  # another optimizer: one line, not one per parameter
            examples = "; ".join(d[len(ckpt.path) + 2:] if d.startswith(f"{ckpt.path}: ") else d
                                 for d in differences[:2])
            problems.append(f"{ckpt.path}: its optimizer state differs from the newest checkpoint's "
                            f"({newest_ref.path}) in {len(differences)} key(s), e.g. {examples}. --optimizer "
                            f"{optimizer_policy} needs the same optimizer state (parameters, param groups, state "
                            "entries) in every checkpoint; --optimizer drop merges the weights alone")
        if problems or moved:
            return {}, problems, moved
        pieces = {}
        for fqn, read in reads.items():
            found, trouble = plan_pieces(ckpt.path, read, entries[read], newest.state_dict_metadata[fqn])
            problems += trouble
            if found is not None:
                pieces[fqn] = found
        # This source's own chunks are what it reads, whatever its layout.
        read_set = set(reads.values())
        problems += storage_problems(ckpt.path, metadata, chunk_keys(metadata, read_set),
                                     check_files=False, locations=self.locations(ckpt))
        return pieces, problems, []

    def _reshaped_by_layout(self, ckpt: CheckpointRef, metadata, newest_ref: CheckpointRef, newest,
                            fqns: Sequence[str]) -> List[str]:
        """Tensors whose global shape differs in ``ckpt`` while its layout differs from the newest's
        (e.g. a vocabulary padded to a multiple of TP): one layout-change refusal, not one per key."""
        if self.checkpoint_layout(ckpt) == self.checkpoint_layout(newest_ref):
            return []
        entries, reference = metadata.state_dict_metadata, newest.state_dict_metadata
        return [fqn for fqn in fqns if isinstance(reference[fqn], dcp_metadata.TensorStorageMetadata)
                and isinstance(entries.get(fqn), dcp_metadata.TensorStorageMetadata)
                and tuple(entries[fqn].size) != tuple(reference[fqn].size)]

    def _layout_change_problem(self, checkpoints: Sequence[CheckpointRef], reshaped: Dict[str, List[str]]) -> str:
        newest = self.metadata(checkpoints[-1]).state_dict_metadata
        by_layout: Dict[str, List[int]] = {}
        for ckpt in checkpoints:
            by_layout.setdefault(self.describe_layout(self.checkpoint_layout(ckpt)), []).append(ckpt.iteration)
        path, keys = next(iter(reshaped.items()))
        other = self.metadata(next(c for c in checkpoints if c.path == path)).state_dict_metadata
        examples = ", ".join(f"'{k}' {list(other[k].size)} vs {list(newest[k].size)}" for k in keys[:2])
        num_keys = len({k for ks in reshaped.values() for k in ks})
        layouts = "; ".join(f"{layout}: iteration{'s' if len(its) > 1 else ''} {', '.join(map(str, its))}"
                            for layout, its in by_layout.items())
        same = ",".join(map(str, by_layout[self.describe_layout(self.checkpoint_layout(checkpoints[-1]))]))
        return (f"the checkpoints were saved at different layouts ({layouts}) and {num_keys} tensor(s) have other "
                f"global shapes across them (e.g. {examples} in {path}), which no merge can reconcile; merge "
                f"the checkpoints of one layout, e.g. --iterations {same}")

    def optimizer_structure_problems(self, checkpoints: Sequence[CheckpointRef],
                                     optimizer_policy: OptimizerPolicy) -> List[str]:
        """Under latest/merge: how an older checkpoint's optimizer structure (beyond its keys,
        which plan_units compares) differs from the newest's; none known for plain DCP."""
        return []

    def extra_plan_problems(self, checkpoints: Sequence[CheckpointRef], optimizer_policy: OptimizerPolicy) -> List[str]:
        """Format-specific checks of files besides the DCP ones (none for plain DCP)."""
        return []

    # -- per-unit work -----------------------------------------------------------------------
    def check_unit(self, unit: WorkUnit, checkpoints: Sequence[CheckpointRef]) -> List[str]:
        """Rank-local, before anything is written: every byte range this unit reads (all its items
        from the newest source, its merged chunks, or the pieces covering them, from the others)
        lies inside an existing file. From the plan alone (the coordinator checked the storage
        entries themselves while planning)."""
        problems = []
        last = len(checkpoints) - 1
        for position, ckpt in enumerate(checkpoints):
            stored = dict(read for item in unit.items for read in item.reads(position, position == last))
            problems += file_problems(ckpt.path, stored.items())
        return problems

    def bytes_read_by_source(self, units: Sequence[WorkUnit], checkpoints: Sequence[CheckpointRef]) -> List[int]:
        """What the merge will read from each source, from the plan alone: whole stored items, or
        the byte ranges of the pieces (the blobs' small zip headers aside)."""
        last = len(checkpoints) - 1
        totals = []
        # The common case apart, in one pass: merged items every source stores as the output
        # does (no pieces), read whole from each.
        whole_reads, others = [], []
        for unit in units:
            rest = []
            for item in unit.items:
                if item.action == Action.MERGE and not item.sources:
                    whole_reads.append(item.stored)
                else:
                    rest.append(item)
            others.append(rest)
        for position in range(len(checkpoints)):
            # each item's read from this source: its first (only) location's length, in C-speed passes
            total = sum(map(_LENGTH, map(_FIRST, map(operator.itemgetter(position), whole_reads))))
            for unit_items in others:
                small_read = set()  # small stored chunks are read whole once per unit (dcp_reads)
                for item in unit_items:
                    if item.action != Action.MERGE:
                        total += item.copied[LENGTH] if position == last else 0
                        continue
                    pieces, stored = item.pieces(position), item.stored[position]
                    if pieces is None:
                        total += stored[0][LENGTH]
                        continue
                    itemsize = item.spec.read_dtype.itemsize
                    for piece, (_, _, length) in zip(pieces, stored):
                        key = (item.read_key, piece.stored)
                        if piece_is_whole(piece, piece.stored_sizes):
                            total += length
                        elif length <= SMALL_BLOB_BYTES:
                            total += 0 if key in small_read else length
                            small_read.add(key)
                        else:
                            relative = [o - b for o, b in zip(piece.offsets, piece.stored)]
                            total += read_span(piece.stored_sizes, relative, piece.sizes).num_bytes_read(itemsize)
            totals.append(total)
        return totals

    def merge_unit(self, unit: WorkUnit, checkpoints: Sequence[CheckpointRef], destination: str,
                   context: MergeContext) -> UnitResult:
        """Items in stored order. A chunk every source stores whole is viewed in the mapped files
        and its N sources summed in one pass (``merge_tensor``); the others are merged source by
        source into a float64 accumulator, a reader thread fetching the next blob (or piece)
        while one is added. Each result is written behind the merge. A source saved at
        another layout contributes the pieces of its stored chunks that cover the item, each
        read on its own (only its bytes) and added into its region. In memory at once: the
        accumulator, the chunk or piece being added and the one being read: flat in N. Where
        each source stores what is read, and the chunks' sizes and dtypes, come with the unit's
        items: no source's ``.metadata`` is read here."""
        files = SourceFiles()
        pieces = PieceReader(files)
        mapped = MappedChunks()
        written: List[tuple] = []
        counters = {"merged": 0}
        last = len(checkpoints) - 1
        # --include/--exclude turn a merged item into a copied one (judged by its parameter's name).
        actions = [Action.MERGE if item.action == Action.MERGE and context.selects(item.spec.selected_as)
                   else Action.COPY for item in unit.items]
        # Merged items every source stores whole, viewed in the mapped files: summed in one pass.
        # (Model weights from masters keep the accumulator: it rounds to the model's dtype once.)
        views: Dict[int, List[torch.Tensor]] = {}
        for position, (item, action) in enumerate(zip(unit.items, actions)):
            if action == Action.MERGE and not item.sources and item.source_key is None:
                found = [mapped.view(ckpt.path, item.location(i), item.spec.read_dtype, item.sizes)
                         for i, ckpt in enumerate(checkpoints)]
                if all(v is not None for v in found):
                    views[position] = found
        # Every other read, in order: all sources of a merged item (each whole, or piece by
        # piece), the newest of a copied one. (position, source, piece index or None)
        reads = []
        for position, (item, action) in enumerate(zip(unit.items, actions)):
            if position in views:
                continue
            if action == Action.COPY:
                reads.append((position, last, None))
                continue
            for i in range(len(checkpoints)):
                found = item.pieces(i)
                reads += [(position, i, None)] if found is None else [(position, i, k) for k in range(len(found))]

        def read(task):
            position, i, k = task
            item = unit.items[position]
            if actions[position] == Action.COPY:
                return files.read(checkpoints[i].path, item.location())
            if k is None:
                return files.read(checkpoints[i].path, item.location(i))
            piece = item.pieces(i)[k]
            return pieces.read(checkpoints[i].path, item.location(i, k), item.read_key, item.spec.read_dtype,
                               piece.stored_sizes, piece)

        def merge_mapped(behind, writer, position):
            item, sources = unit.items[position], views.pop(position)
            stored = [item.location(i) for i in range(len(checkpoints))]
            context.on_progress(sum(info.length for info in stored))
            names = [os.path.join(ckpt.path, info.relative_path) for ckpt, info in zip(checkpoints, stored)]
            merged = context.merge_tensor(sources, item.describe(), names)
            del sources
            emit(behind, writer, item.key, item.offsets, merged)
            counters["merged"] += not any(item.offsets)

        def emit(behind, writer, fqn, offsets, value):
            """Appends a merged tensor (torch.save) or a copied blob to the file, behind the merge."""
            def write():
                start = writer.num_bytes
                if isinstance(value, torch.Tensor):
                    torch.save(value, writer)
                else:
                    writer.write(value)
                written.append((fqn, offsets, start, writer.num_bytes - start))
            behind.submit(write)

        def produce(writer):
            in_place = sorted(views)
            with WriteBehind() as behind, \
                    ThreadPoolExecutor(max_workers=1, thread_name_prefix="pmm-dcp-read") as reader:
                pending = reader.submit(read, reads[0]) if reads else None
                accumulator = None
                for step, (position, i, k) in enumerate(reads):
                    while in_place and in_place[0] < position:  # items stay in stored order
                        merge_mapped(behind, writer, in_place.pop(0))
                    fetched = pending.result()
                    if step + 1 < len(reads):
                        pending = reader.submit(read, reads[step + 1])
                    item = unit.items[position]
                    fqn, offsets, read_key = item.key, item.offsets, item.read_key
                    if actions[position] == Action.COPY:
                        context.on_progress(len(fetched))
                        emit(behind, writer, fqn, offsets, fetched)
                        continue
                    # The output chunk's sizes; a source read whole stores a chunk of the same box.
                    sizes = item.sizes
                    path = os.path.join(checkpoints[i].path, item.location(i, k or 0).relative_path)
                    if k is None:
                        context.on_progress(len(fetched))
                        chunk = load_chunk(fetched, path, read_key, offsets, item.spec.read_dtype, sizes)
                        region = None
                    else:
                        piece = item.pieces(i)[k]
                        context.on_progress(fetched.numel() * fetched.element_size())
                        chunk, region = fetched, piece_region(piece, offsets)
                    del fetched
                    if accumulator is None:
                        what = item.describe() + (f" (from its fp32 master weights '{read_key}')"
                                                  if item.source_key else "")
                        accumulator = context.accumulator(sizes, what)
                    # A piece goes into its region; the first source's pieces start it.
                    accumulator.add(chunk, context.weights[i], path, region=region,
                                    first=None if region is None else i == 0)
                    del chunk
                    if i == last and (k is None or k == len(item.pieces(i)) - 1):  # the newest's last read
                        # Model weights from masters: rounded to the model's dtype.
                        emit(behind, writer, fqn, offsets, accumulator.result(item.spec.dtype))
                        # Tensors, not chunks: each is counted by the unit holding its first chunk.
                        counters["merged"] += not any(offsets)
                        accumulator = None
                for position in in_place:
                    merge_mapped(behind, writer, position)

        try:
            num_bytes, sha = write_atomically(os.path.join(destination, unit.relpath), produce)
        finally:
            files.close()
            mapped.close()
        return UnitResult(unit.relpath, num_bytes, files.num_bytes_read + mapped.num_bytes_read, sha, counters["merged"],
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
        expected = set(chunk_keys(newest, kept_set))
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

    def checkpoint_problems(self, ckpt: CheckpointRef) -> List[str]:
        try:
            metadata = self.metadata(ckpt)
        except InputError as exc:
            return exc.problems
        return storage_problems(ckpt.path, metadata, chunk_keys(metadata))

    def names_checkpoint(self, name: str) -> bool:
        return trailing_number(name) is not None

    def output_layout(self, newest: CheckpointRef) -> OutputLayout:
        # The output root is the merged DCP checkpoint; .metadata, DCP's own commit marker, is
        # staged by finalize and moved into place after every .distcp file.
        return OutputLayout(OutputKind.CHECKPOINT_ROOT, DCP_METADATA)
