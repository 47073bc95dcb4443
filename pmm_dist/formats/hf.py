"""Hugging Face model directories with safetensors weights (``save_pretrained`` layout).

    CKPT/model.safetensors                                   one file, or
    CKPT/model.safetensors.index.json + the shards it names  (model-00001-of-00004.safetensors ...)
    CKPT/config.json, generation_config.json, tokenizer files, ...

Sources: several checkpoint directories, or one run directory whose subdirectories are
checkpoints (``step_1000``, ``checkpoint-2000``, ``global_step3000``, ``step4000-tokens16B``).
The iteration is read from the directory name (see ``common.number_in_name``).

Validation is per tensor, not per file: every checkpoint must hold the same tensor names with
the same dtypes and shapes as the newest, however each one is sharded. A unit is one OUTPUT
shard: the tensors are binned (in the newest checkpoint's storage order) into shards of at most
``max_shard_bytes``, and into at least ``world_size`` shards when there are enough tensors, so
every rank has work. Float tensors are averaged; integer and bool tensors and each file's
``__metadata__`` come from the newest checkpoint, as do config and tokenizer files.

The output root is the model directory: shards ``model-XXXXX-of-YYYYY.safetensors`` (also when
there is only one), config files, and ``model.safetensors.index.json``, the tracker: written
last, after the manifest, so a reader (which loads through the index) never finds a partial
model, and an interrupted merge leaves nothing loadable. A lone ``model.safetensors`` would be
loadable the moment it appeared, before the other files; hence the index with one shard too.
"""
import bisect
import functools
import heapq
import json
import os
import re
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ..io.atomic import copy_atomically, write_atomically, write_json_atomically
from ..io.write_behind import WriteBehind
from ..errors import InputError, MergeError
from ..plan.types import Action, CheckpointRef, OptimizerPolicy, OutputKind, OutputLayout, UnitResult, WorkUnit
from .base import CheckpointFormat, MergeContext
from .common import EntrySpec, compare_entries, listdir, number_in_name, sorted_unique
from ..io.safetensors import (FLOAT_DTYPES, QUANTIZED_DTYPES, Header, MappedFiles, encode_header, read_header,
                             tensor_bytes)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TRAINER_STATE = "trainer_state.json"      # the HF Trainer's commit marker: written last
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9       # save_pretrained's default "5GB"
# Training state written next to the weights by the HF Trainer: copied only with --optimizer latest.
_TRAINING_STATE = re.compile(r"^(optimizer|scheduler|scaler|rng_state).*\.(pt|pth|bin)$|"
                             r"^(trainer_state\.json|training_args\.bin)$")
# Weights in other serialisations are never copied: they would contradict the merged ones.
_OTHER_WEIGHTS = re.compile(r"\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf|onnx|npz)$|\.index\.json$")
_NOT_COPIED = ("pmm_manifest.json",)
_VOLATILE_CONFIG = ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache")
_SHARD_FILE = re.compile(r"^model-\d{5,}-of-\d{5,}\.safetensors$")


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"  # transformers' own naming


def bin_tensors(sizes: Sequence[Tuple[str, int]], max_shard_bytes: int, min_shards: int) -> List[List[str]]:
    """Contiguous groups of ``sizes`` (name, bytes), in order: about equal bytes, none above
    ``max_shard_bytes`` unless a single tensor is, and at least ``min_shards`` groups when
    there are that many tensors. O(n + k log k): fine for 10^5 tensors and 10^4 ranks."""
    num = len(sizes)
    if not num:
        return []
    prefix = [0]
    for _, size in sizes:
        prefix.append(prefix[-1] + size)
    total = prefix[-1]
    wanted = max(1, -(-total // max_shard_bytes), min(min_shards, num))
    # 1. A tensor goes to the group its byte midpoint falls in: contiguous, near-equal groups.
    slots = [min(wanted - 1, int((prefix[i] + sizes[i][1] / 2) * wanted / total) if total else i * wanted // num)
             for i in range(num)]
    ranges = [i for i in range(num) if i == 0 or slots[i] != slots[i - 1]] + [num]
    # 2. No group above the limit (a single larger tensor stands alone).
    groups: List[Tuple[int, int]] = []
    for begin, end in zip(ranges, ranges[1:]):
        start = begin
        for i in range(begin + 1, end):
            if prefix[i + 1] - prefix[start] > max_shard_bytes:
                groups.append((start, i))
                start = i
        groups.append((start, end))
    # 3. Enough groups: a huge tensor may have taken several groups' share; split the largest.
    heap = [(prefix[b] - prefix[e], b, e) for b, e in groups if e - b > 1]
    heapq.heapify(heap)
    groups_set = set(groups)
    while len(groups_set) < min(min_shards, num):
        _, begin, end = heapq.heappop(heap)
        cut = min(bisect.bisect_left(prefix, (prefix[begin] + prefix[end]) / 2, begin + 1, end), end - 1)
        groups_set.remove((begin, end))
        for part in ((begin, cut), (cut, end)):
            groups_set.add(part)
            if part[1] - part[0] > 1:
                heapq.heappush(heap, (prefix[part[0]] - prefix[part[1]], *part))
    return [[sizes[i][0] for i in range(b, e)] for b, e in sorted(groups_set)]


@dataclass
class _Inventory:
    """One checkpoint's tensors from its index and headers (no tensor data)."""
    path: str
    tensors: Dict[str, Tuple[str, object]] = field(default_factory=dict)  # name -> (file, TensorInfo)
    headers: Dict[str, Header] = field(default_factory=dict)               # file -> header, storage order
    problems: List[str] = field(default_factory=list)


class HuggingFaceFormat(CheckpointFormat):
    # --optimizer merge is refused (by planning): the Trainer's optimizer.pt is one pickled state
    # dict keyed by parameter index, not merged here, and must never be silently dropped.
    name = "hf"
    description = ("Hugging Face model directories: model.safetensors or model.safetensors.index.json + shards "
                   "(several checkpoint dirs, or one run dir of step_*/checkpoint-* dirs)")

    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    """Largest output shard (a single larger tensor gets a shard of its own)."""

    def __init__(self, max_shard_bytes: Optional[int] = None):
        if max_shard_bytes is not None:
            if max_shard_bytes < 1:
                raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
            self.max_shard_bytes = max_shard_bytes

    # -- discovery ---------------------------------------------------------------------------
    @classmethod
    def recognizes(cls, path: str) -> bool:
        return _is_model_dir(path) or bool(_numbered_model_dirs(path))

    def discover(self, sources: Sequence[str]) -> List[CheckpointRef]:
        """The Trainer writes trainer_state.json last: in a run directory, checkpoints newer than
        the newest one that has it are still being saved and are skipped. Given checkpoints are
        all used (their files are checked when planning)."""
        if len(sources) == 1:
            numbered = _numbered_model_dirs(sources[0])
            if numbered:  # a run directory; weights in the run root itself (a final save) are not part of it
                refs = sorted_unique([CheckpointRef(it, os.path.abspath(p)) for it, p in numbered])
                # A save in progress is the newest: drop those after the last one the Trainer finished.
                finished = [i for i, ref in enumerate(refs) if _has_trainer_state(ref.path)]
                return refs[:finished[-1] + 1] if finished else refs
        refs = []
        for src in sources:
            if not _is_model_dir(src):
                if _numbered_model_dirs(src):
                    raise InputError(f"{src} is a run directory; give either one run directory or several "
                                     "checkpoint directories, not a mixture")
                hint = " (only safetensors weights are supported: found pytorch_model.bin)" if any(
                    e.startswith("pytorch_model") for e in listdir(src)) else ""
                raise InputError(f"{src}: not a Hugging Face model directory: no {SINGLE_FILE} or "
                                 f"{INDEX_FILE}{hint}, and no subdirectories holding one with a step number in "
                                 "their name")
            refs.append(CheckpointRef(self._iteration_of(src), os.path.abspath(src)))
        return sorted_unique(refs)

    def checkpoint_problems(self, ckpt: CheckpointRef) -> List[str]:
        return list(self._inventory(ckpt).problems)

    @staticmethod
    def _iteration_of(ckpt_dir: str) -> int:
        name = os.path.basename(os.path.normpath(os.path.abspath(ckpt_dir)))
        iteration = number_in_name(name)
        if iteration is None:
            state = os.path.join(ckpt_dir, TRAINER_STATE)
            try:
                with open(state) as f:
                    iteration = int(json.load(f)["global_step"])
            except (OSError, ValueError, KeyError, TypeError):
                raise InputError(f"{ckpt_dir}: cannot tell its iteration: the directory name has no step number "
                                 "(step_1000, checkpoint-1000, iter_0001000 ...) and there is no trainer_state.json "
                                 "with global_step; rename the directory") from None
        return iteration

    # -- inventory and layout ----------------------------------------------------------------
    def _inventory(self, ckpt: CheckpointRef) -> _Inventory:
        return self.memo("inventory", ckpt.path, lambda: _read_inventory(ckpt.path))

    def layout(self, checkpoints: Sequence[CheckpointRef]) -> Dict[str, object]:
        newest = self._inventory(checkpoints[-1])
        dtypes: Dict[str, int] = {}
        for _, info in newest.tensors.values():
            dtypes[info.dtype] = dtypes.get(info.dtype, 0) + 1
        return {"tensors": len(newest.tensors), "files": len(newest.headers),
                "dtypes": "/".join(f"{d}:{n}" for d, n in sorted(dtypes.items()))}

    def plan_units(self, checkpoints: Sequence[CheckpointRef], optimizer_policy: OptimizerPolicy,
                   world_size: int = 1) -> List[WorkUnit]:
        inventories = [self._inventory(c) for c in checkpoints]
        newest = inventories[-1]
        problems = [p for inv in inventories for p in inv.problems]
        if not newest.problems:
            if not newest.tensors:
                problems.append(f"{newest.path}: holds no tensors")
            problems += [f"{os.path.join(newest.path, file)}: tensor '{name}' has dtype {info.dtype}: quantized "
                         "weights cannot be averaged without their scales (dequantize first)"
                         for name, (file, info) in newest.tensors.items() if info.dtype in QUANTIZED_DTYPES]
            for other in inventories[:-1]:
                if not other.problems:
                    problems += compare_entries(other.path, _entry_specs(other), newest.path, _entry_specs(newest),
                                                noun="tensor")
        if problems:
            raise InputError(problems)
        groups = bin_tensors([(name, info.num_bytes) for name, (_, info) in newest.tensors.items()],
                             self.max_shard_bytes, world_size)
        units = [WorkUnit(shard_name(i, len(groups)), sum(newest.tensors[n][1].num_bytes for n in group),
                          items=tuple(group)) for i, group in enumerate(groups)]
        if optimizer_policy == OptimizerPolicy.LATEST:
            units += [WorkUnit(entry, os.path.getsize(os.path.join(newest.path, entry)), action=Action.COPY)
                      for entry in listdir(newest.path) if _TRAINING_STATE.match(entry)
                      and os.path.isfile(os.path.join(newest.path, entry))]
        return units

    # -- per-unit work -----------------------------------------------------------------------
    def check_unit(self, unit: WorkUnit, checkpoints: Sequence[CheckpointRef]) -> List[str]:
        """The safetensors library's own view of every file this unit reads must agree with the plan."""
        from safetensors import safe_open
        newest = self._inventory(checkpoints[-1])
        problems: List[str] = []
        for ckpt in checkpoints:
            inventory = self._inventory(ckpt)
            if inventory.problems:
                return inventory.problems
            for file, names in _by_file(inventory, unit.items).items():
                path = os.path.join(ckpt.path, file)
                try:
                    with safe_open(path, framework="pt") as handle:
                        for name in names:
                            piece, expected = handle.get_slice(name), newest.tensors[name][1]
                            dtype, shape = piece.get_dtype(), list(piece.get_shape())
                            if (dtype, shape) != (expected.dtype, list(expected.shape)):
                                problems.append(f"{path}: tensor '{name}' reads as {dtype} {shape}, "
                                                f"expected {expected.dtype} {list(expected.shape)}")
                except Exception as exc:  # SafetensorError, OSError: the library refuses the file
                    problems.append(f"{path}: safetensors cannot read it: {exc}")
        return problems

    def merge_unit(self, unit: WorkUnit, checkpoints: Sequence[CheckpointRef], destination: str,
                   context: MergeContext) -> UnitResult:
        target = os.path.join(destination, unit.relpath)
        from safetensors import safe_open
        inventories = [self._inventory(c) for c in checkpoints]
        newest = inventories[-1]
        entries = [(name, newest.tensors[name][1].dtype, newest.tensors[name][1].shape) for name in unit.items]
        metadata = newest.headers[newest.tensors[unit.items[0]][0]].metadata
        header, order = encode_header(entries, metadata)
        mapped = MappedFiles()
        counters = {"read": 0, "merged": 0}

        def produce(writer):
            # Each tensor is written behind the next one's merge (io/write_behind): the write
            # into the page cache, which the disk's writeback can hold up, and the merge each
            # keep a core busy. The handles close after the last write (the newest's integer
            # tensors are views of their files).
            with ExitStack() as stack, WriteBehind() as behind:
                handles: Dict[str, object] = {}

                def tensor(inventory: _Inventory, name: str):
                    path = os.path.join(inventory.path, inventory.tensors[name][0])
                    if path not in handles:
                        handles[path] = stack.enter_context(safe_open(path, framework="pt"))
                    value = handles[path].get_tensor(name)
                    return value, mapped.is_mapped(path, value)

                writer.write(header)
                for name, num_bytes in order:
                    if newest.tensors[name][1].dtype in FLOAT_DTYPES and context.selects(name):
                        sources, flags = zip(*(tensor(inv, name) for inv in inventories))
                        paths = [os.path.join(inv.path, inv.tensors[name][0]) for inv in inventories]
                        result = context.merge_tensor(sources, f"tensor '{name}'", paths,
                                                      sources_are_mapped=all(flags))
                        counters["merged"] += 1
                        num_read = num_bytes * len(sources)
                    else:  # integer and bool tensors: the newest checkpoint's, byte for byte
                        result, _ = tensor(newest, name)
                        num_read = num_bytes
                    data = tensor_bytes(result.contiguous())
                    assert data.nbytes == num_bytes, f"{name}: {data.nbytes} bytes, header says {num_bytes}"
                    behind.submit(functools.partial(writer.write, data))
                    del result, data  # the write holds them until it is done
                    counters["read"] += num_read
                    context.on_progress(num_read)

        num_bytes, sha = write_atomically(target, produce)
        return UnitResult(unit.relpath, num_bytes, counters["read"], sha, counters["merged"])

    def state_key(self, unit: WorkUnit, what: str) -> str:
        # Tensor names are unique across the model, whichever shard the binning puts them in.
        return what

    # -- output ------------------------------------------------------------------------------
    def finalize(self, staged_dir: str, checkpoints: Sequence[CheckpointRef], results: Sequence[UnitResult],
                 optimizer_policy: OptimizerPolicy) -> List[UnitResult]:
        """Copy the newest checkpoint's config and tokenizer files, then stage the index (the
        commit marker, moved into place last), built from the headers of the staged shards:
        what was written, not what was planned."""
        newest = checkpoints[-1]
        written: List[UnitResult] = []
        for entry in _config_files(newest.path):
            num_bytes, sha = copy_atomically(os.path.join(newest.path, entry), os.path.join(staged_dir, entry))
            written.append(UnitResult(entry, num_bytes, num_bytes, sha, 0))
        shards = sorted(e for e in listdir(staged_dir) if _SHARD_FILE.match(e))
        count = len(shards)
        if not shards or shards != [shard_name(i, count) for i in range(count)]:
            raise MergeError(f"{staged_dir}: expected shards model-00001-of-{count:05d}.safetensors ... "
                             f"model-{count:05d}-of-{count:05d}.safetensors, found {', '.join(shards[:4]) or 'none'}; "
                             "not writing the index")
        weight_map: Dict[str, str] = {}
        total_size = 0
        for shard in shards:
            for name, info in read_header(os.path.join(staged_dir, shard)).tensors.items():
                weight_map[name] = shard
                total_size += info.num_bytes
        metadata = dict(_index_metadata(newest.path), total_size=total_size)
        index = {"metadata": dict(sorted(metadata.items())), "weight_map": dict(sorted(weight_map.items()))}
        num_bytes, sha = write_json_atomically(os.path.join(staged_dir, INDEX_FILE), index)
        written.append(UnitResult(INDEX_FILE, num_bytes, 0, sha, 0))
        return written

    def names_checkpoint(self, name: str) -> bool:
        return number_in_name(name) is not None

    def run_identity(self, ckpt: CheckpointRef) -> Dict[str, object]:
        """config.json, less what changes without changing the model (library version, origin)."""
        try:
            with open(os.path.join(ckpt.path, "config.json")) as f:
                config = json.load(f)
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG} if isinstance(config, dict) else {}

    def output_layout(self, newest: CheckpointRef) -> OutputLayout:
        # The output root is the model directory; loaders go through the index, so it is the
        # commit marker (a lone model.safetensors would be loadable before the config files).
        return OutputLayout(OutputKind.CHECKPOINT_ROOT, INDEX_FILE)

    def tensor_inventory(self, checkpoint_dir: str) -> Dict[str, Tuple[tuple, str]]:
        """Float tensors of a model directory (source or output) from its index and headers."""
        inventory = _read_inventory(checkpoint_dir)
        if inventory.problems:
            raise InputError(inventory.problems)
        return {name: (info.shape, info.dtype) for name, (_, info) in inventory.tensors.items()
                if info.dtype in FLOAT_DTYPES}


# -- helpers ---------------------------------------------------------------------------------
def _has_trainer_state(ckpt_dir: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, TRAINER_STATE))


def _is_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, SINGLE_FILE)) or os.path.isfile(os.path.join(path, INDEX_FILE))


def _numbered_model_dirs(path: str) -> List[Tuple[int, str]]:
    found = []
    for entry in listdir(path):
        full = os.path.join(path, entry)
        iteration = number_in_name(entry)
        if not entry.startswith(".") and iteration is not None and os.path.isdir(full) and _is_model_dir(full):
            found.append((iteration, full))
    return found


def _config_files(ckpt_dir: str) -> List[str]:
    """Top-level files other than weights and training state: config, generation config,
    tokenizer files, chat template, custom modeling code, model card."""
    return [e for e in listdir(ckpt_dir) if os.path.isfile(os.path.join(ckpt_dir, e)) and not e.startswith(".")
            and not _OTHER_WEIGHTS.search(e) and not _TRAINING_STATE.match(e) and e not in _NOT_COPIED]


def _read_inventory(ckpt_dir: str) -> _Inventory:
    inventory = _Inventory(ckpt_dir)
    if os.path.isfile(os.path.join(ckpt_dir, SINGLE_FILE)):  # as transformers: the single file wins
        weight_map = None
        files = [SINGLE_FILE]
    else:
        index_path = os.path.join(ckpt_dir, INDEX_FILE)
        try:
            with open(index_path) as f:
                index = json.load(f)
            weight_map = index["weight_map"]
            if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
                raise TypeError("weight_map is not an object of strings")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            inventory.problems.append(f"{index_path}: not a valid index (expected a JSON object with a "
                                      f"'weight_map' of tensor name -> file): {exc!r}")
            return inventory
        files = sorted(set(weight_map.values()))
    for file in files:
        path = os.path.join(ckpt_dir, file)
        if os.path.basename(file) != file or file in (".", ".."):
            inventory.problems.append(f"{os.path.join(ckpt_dir, INDEX_FILE)}: shard name {file!r} is not a file "
                                      "name in the checkpoint directory")
            continue
        if not os.path.isfile(path):
            named = sorted(n for n, f in weight_map.items() if f == file) if weight_map else []
            inventory.problems.append(f"{path}: missing shard (named in {INDEX_FILE} for {len(named)} tensors, "
                                      f"e.g. '{named[0]}')" if named else f"{path}: missing")
            continue
        try:
            header = read_header(path)
        except InputError as exc:
            inventory.problems += exc.problems
            continue
        inventory.headers[file] = header
        for name, info in header.tensors.items():
            if name in inventory.tensors:
                inventory.problems.append(f"{path}: tensor '{name}' also in "
                                          f"{os.path.join(ckpt_dir, inventory.tensors[name][0])}")
            elif weight_map is not None and weight_map.get(name) != file:
                inventory.problems.append(f"{path}: tensor '{name}' is not mapped to this file by {INDEX_FILE}")
            else:
                inventory.tensors[name] = (file, info)
    if weight_map is not None:
        inventory.problems += [f"{os.path.join(ckpt_dir, file)}: tensor '{name}' missing (named in {INDEX_FILE})"
                               for name, file in weight_map.items()
                               if file in inventory.headers and name not in inventory.tensors]
    return inventory


def _metadata_of(index: dict) -> Dict[str, object]:
    """An index's metadata other than total_size (e.g. total_parameters), which is recomputed."""
    metadata = index.get("metadata") if isinstance(index, dict) else None
    return {k: v for k, v in metadata.items() if k != "total_size"} if isinstance(metadata, dict) else {}


def _index_metadata(ckpt_dir: str) -> Dict[str, object]:
    if os.path.isfile(os.path.join(ckpt_dir, SINGLE_FILE)):
        return {}
    try:
        with open(os.path.join(ckpt_dir, INDEX_FILE)) as f:
            return _metadata_of(json.load(f))
    except (OSError, ValueError):
        return {}


def _entry_specs(inventory: _Inventory) -> Dict[str, EntrySpec]:
    return {name: EntrySpec("a tensor", info.dtype, list(info.shape), where=os.path.join(inventory.path, file))
            for name, (file, info) in inventory.tensors.items()}


def _by_file(inventory: _Inventory, names: Sequence[str]) -> Dict[str, List[str]]:
    grouped: Dict[str, List[str]] = {}
    for name in names:
        grouped.setdefault(inventory.tensors[name][0], []).append(name)
    return grouped
