"""Megatron-LM legacy checkpoints (``--ckpt-format torch``), sharded by TP, PP and EP.

    RUN/latest_checkpointed_iteration.txt
    RUN/iter_0001000/mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/model_optim_rng.pt [+ distrib_optim.pt]

Every shard file is a unit: the merged file keeps the newest source's non-tensor entries
(args, checkpoint_version, iteration, ...) and replaces each float tensor under ``model`` /
``model{i}`` (one per virtual-pipeline chunk) by the weighted sum of that tensor in every
source. Integer tensors and ``_extra_state`` come from the newest source.
"""
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..atomic import write_atomically, write_text_atomically, copy_atomically
from ..errors import InputError
from ..kernel import is_mergeable
from ..planner import WorkUnit
from ..safe_load import safe_load
from ..tree import dotted, flatten, map_leaves
from .base import CheckpointFormat, CheckpointRef, MergeContext, UnitResult

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
DISTRIB_OPTIM_FILE = "distrib_optim.pt"
_ITER_DIR = re.compile(r"^iter_(\d+)$")
_SHARD_DIR = re.compile(r"^mp_rank_\d{2}(_\d{3}){0,2}$")
_MODEL_KEY = re.compile(r"^model\d*$")
# Entries that make up the training state rather than the weights: dropped by --optimizer drop.
TRAINING_STATE_KEYS = ("optimizer", "opt_param_scheduler", "rng_state")


def shard_dirname(tp_rank: int, pp_rank: int, ep_rank: int, pp_size: int, ep_size: int) -> str:
    """Megatron's own naming: the PP part only when PP > 1, the EP part only when EP > 1."""
    name = f"mp_rank_{tp_rank:02d}"
    if pp_size > 1:
        name += f"_{pp_rank:03d}"
    if ep_size > 1:
        name += f"_{ep_rank:03d}"
    return name


def parallel_degrees(args) -> Tuple[int, int, int]:
    """(TP, PP, EP) from a checkpoint's saved argparse Namespace (missing ones are 1)."""
    return tuple(int(getattr(args, attr, None) or 1) for attr in
                 ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"))


def model_keys(state: dict) -> List[str]:
    return [key for key in state if isinstance(key, str) and _MODEL_KEY.match(key)]


class MegatronLegacyFormat(CheckpointFormat):
    name = "megatron"
    description = "Megatron-LM legacy torch format: latest_checkpointed_iteration.txt + iter_*/mp_rank_*/model_optim_rng.pt"

    # -- discovery ---------------------------------------------------------------------------
    @classmethod
    def recognizes(cls, path: str) -> bool:
        return os.path.isfile(os.path.join(path, TRACKER)) or bool(_shard_dirs(path))

    def discover(self, sources: Sequence[str]) -> List[CheckpointRef]:
        if len(sources) == 1 and os.path.isfile(os.path.join(sources[0], TRACKER)):
            return self._discover_run(sources[0])
        refs = []
        for src in sources:
            if os.path.isfile(os.path.join(src, TRACKER)):
                raise InputError(f"{src} is a run directory; give either one run directory or several "
                                 "checkpoint directories (iter_*), not a mixture")
            if not _shard_dirs(src):
                raise InputError(f"{src}: not a Megatron checkpoint directory (no mp_rank_* directories)")
            refs.append(CheckpointRef(self._iteration_of(src), os.path.abspath(src)))
        return _sorted_unique(refs)

    def _discover_run(self, run_dir: str) -> List[CheckpointRef]:
        tracker_path = os.path.join(run_dir, TRACKER)
        text = open(tracker_path).read().strip()
        if text == "release":
            raise InputError(f"{tracker_path} says 'release': a release checkpoint has no history to "
                             "merge; pass the checkpoint directories to merge explicitly")
        try:
            newest = int(text)
        except ValueError:
            raise InputError(f"{tracker_path}: expected an iteration number or 'release', found {text[:40]!r}") from None
        refs = []
        for entry in sorted(os.listdir(run_dir)):
            match = _ITER_DIR.match(entry)
            # Iterations after the tracker's may still be being written by the trainer.
            if match and int(match.group(1)) <= newest and os.path.isdir(os.path.join(run_dir, entry)):
                refs.append(CheckpointRef(int(match.group(1)), os.path.abspath(os.path.join(run_dir, entry))))
        if not any(ref.iteration == newest for ref in refs):
            raise InputError(f"{tracker_path} names iteration {newest}, but {os.path.join(run_dir, f'iter_{newest:07d}')} "
                             "does not exist")
        return refs

    @staticmethod
    def _iteration_of(ckpt_dir: str) -> int:
        match = _ITER_DIR.match(os.path.basename(os.path.normpath(ckpt_dir)))
        if match:
            return int(match.group(1))
        first = os.path.join(ckpt_dir, _shard_dirs(ckpt_dir)[0], MODEL_FILE)
        iteration = safe_load(first).get("iteration")
        if not isinstance(iteration, int):
            raise InputError(f"{first}: key 'iteration' missing; cannot order this checkpoint")
        return iteration

    # -- layout ------------------------------------------------------------------------------
    def _degrees(self, ckpt: CheckpointRef) -> Optional[Tuple[int, int, int]]:
        shards = _shard_dirs(ckpt.path)
        if not shards:
            raise InputError(f"{ckpt.path}: no mp_rank_* shard directories")
        path = os.path.join(ckpt.path, shards[0], MODEL_FILE)
        args = safe_load(path).get("args")
        return parallel_degrees(args) if args is not None else None

    def layout(self, checkpoints: Sequence[CheckpointRef]) -> Dict[str, object]:
        degrees = self._degrees(checkpoints[-1])
        if degrees is None:
            return {"tp": None, "pp": None, "ep": None, "shards": len(_shard_dirs(checkpoints[-1].path))}
        return {"tp": degrees[0], "pp": degrees[1], "ep": degrees[2], "shards": len(_shard_dirs(checkpoints[-1].path))}

    def plan_units(self, checkpoints: Sequence[CheckpointRef], optimizer_policy: str,
                   world_size: int = 1) -> List[WorkUnit]:
        newest = checkpoints[-1]
        problems: List[str] = []
        reference = self._degrees(newest)
        expected = self._expected_shards(newest, reference)
        for ckpt in checkpoints:
            degrees = reference if ckpt is newest else self._degrees(ckpt)
            if degrees != reference:
                problems.append(f"{ckpt.path}: parallel layout TP/PP/EP={_fmt(degrees)} (from its saved args) "
                                f"differs from the newest checkpoint's {_fmt(reference)} ({newest.path})")
                continue
            found = set(_shard_dirs(ckpt.path))
            problems += [f"{os.path.join(ckpt.path, name)}: missing shard (expected for TP/PP/EP={_fmt(reference)})"
                         for name in sorted(expected - found)]
            problems += [f"{os.path.join(ckpt.path, name)}: unexpected shard for TP/PP/EP={_fmt(reference)}"
                         for name in sorted(found - expected)]
            for name in sorted(expected & found):
                path = os.path.join(ckpt.path, name, MODEL_FILE)
                if not os.path.isfile(path):
                    problems.append(f"{path}: missing file")
        if problems:
            raise InputError(problems)
        units = [WorkUnit(f"{name}/{MODEL_FILE}", os.path.getsize(os.path.join(newest.path, name, MODEL_FILE)))
                 for name in sorted(expected)]
        if optimizer_policy == "latest":
            units += [WorkUnit(f"{name}/{DISTRIB_OPTIM_FILE}", os.path.getsize(path), action="copy")
                      for name in sorted(expected)
                      for path in [os.path.join(newest.path, name, DISTRIB_OPTIM_FILE)] if os.path.isfile(path)]
        return units

    @staticmethod
    def _expected_shards(newest: CheckpointRef, degrees) -> set:
        if degrees is None:  # no saved args: the newest checkpoint's directories are the reference
            return set(_shard_dirs(newest.path))
        tp, pp, ep = degrees
        return {shard_dirname(t, p, e, pp, ep) for t in range(tp) for p in range(pp) for e in range(ep)}

    # -- per-unit work -----------------------------------------------------------------------
    def check_unit(self, unit: WorkUnit, checkpoints: Sequence[CheckpointRef]) -> List[str]:
        if unit.action == "copy":
            return []
        problems: List[str] = []
        newest_path = os.path.join(checkpoints[-1].path, unit.relpath)
        try:
            newest = safe_load(newest_path)
        except InputError as exc:
            return [str(exc)]
        reference = _model_leaves(newest)
        if not reference:
            return [f"{newest_path}: no 'model' entry (is this a Megatron model_optim_rng.pt?)"]
        for ckpt in checkpoints[:-1]:
            path = os.path.join(ckpt.path, unit.relpath)
            try:
                leaves = _model_leaves(safe_load(path))
            except InputError as exc:
                problems.append(str(exc))
                continue
            problems += _compare_leaves(path, leaves, newest_path, reference)
        return problems

    def merge_unit(self, unit: WorkUnit, checkpoints: Sequence[CheckpointRef], destination: str,
                   context: MergeContext) -> UnitResult:
        target = os.path.join(destination, unit.relpath)
        if unit.action == "copy":
            num_bytes, sha = copy_atomically(os.path.join(checkpoints[-1].path, unit.relpath), target)
            context.on_progress(num_bytes)
            return UnitResult(unit.relpath, num_bytes, num_bytes, sha, 0)
        paths = [os.path.join(ckpt.path, unit.relpath) for ckpt in checkpoints]
        sources = [safe_load(path) for path in paths]
        newest = sources[-1]
        flat_sources = [_model_leaves(src) for src in sources]
        counters = {"read": 0, "tensors": 0}

        def merge(path, leaf):
            if not is_mergeable(leaf):
                return leaf
            stack = [flat[path] for flat in flat_sources]
            merged = context.merge_tensor(stack, f"key '{dotted(path)}'", paths)
            num_read = sum(t.numel() * t.element_size() for t in stack)
            counters["read"] += num_read
            counters["tensors"] += 1
            context.on_progress(num_read)
            return merged

        output = {}
        for key, value in newest.items():
            if key in TRAINING_STATE_KEYS and context.optimizer_policy == "drop":
                continue
            output[key] = map_leaves(value, merge, (key,)) if key in model_keys(newest) else value
        num_bytes, sha = write_atomically(target, lambda f: torch.save(output, f))
        return UnitResult(unit.relpath, num_bytes, counters["read"], sha, counters["tensors"])

    def tensor_inventory(self, checkpoint_dir: str) -> Dict[str, Tuple[tuple, str]]:
        inventory = {}
        for name in _shard_dirs(checkpoint_dir):
            for path_key, leaf in _model_leaves(safe_load(os.path.join(checkpoint_dir, name, MODEL_FILE))).items():
                if is_mergeable(leaf):
                    inventory[f"{name}/{dotted(path_key)}"] = (tuple(leaf.shape), str(leaf.dtype))
        return inventory

    # -- output ------------------------------------------------------------------------------
    def output_dirname(self, newest: CheckpointRef) -> str:
        return f"iter_{newest.iteration:07d}"

    def tracker_relpath(self) -> str:
        return TRACKER

    def write_tracker(self, out_root: str, newest: CheckpointRef) -> str:
        write_text_atomically(os.path.join(out_root, TRACKER), f"{newest.iteration}\n")
        return TRACKER


def _shard_dirs(path: str) -> List[str]:
    try:
        return sorted(e for e in os.listdir(path) if _SHARD_DIR.match(e) and os.path.isdir(os.path.join(path, e)))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _model_leaves(state) -> Dict[tuple, object]:
    """Every leaf under the model entries, keyed by path (whose first element is the entry)."""
    if not isinstance(state, dict):
        return {}
    leaves: Dict[tuple, object] = {}
    for key in model_keys(state):
        leaves.update(flatten(state[key], (key,)))
    return leaves


def _compare_leaves(path: str, leaves: Dict[tuple, object], newest_path: str,
                    reference: Dict[tuple, object]) -> List[str]:
    problems = []
    for key in sorted(map(dotted, reference.keys() - leaves.keys())):
        problems.append(f"{path}: key '{key}' missing (present in the newest checkpoint {newest_path})")
    for key in sorted(map(dotted, leaves.keys() - reference.keys())):
        problems.append(f"{path}: unexpected key '{key}' (absent from the newest checkpoint {newest_path})")
    for path_key in sorted(reference.keys() & leaves.keys(), key=dotted):
        ref, other, key = reference[path_key], leaves[path_key], dotted(path_key)
        if not is_mergeable(ref):
            continue  # taken from the newest checkpoint, never averaged
        if not isinstance(other, torch.Tensor):
            problems.append(f"{path}: key '{key}' is {type(other).__name__}, the newest checkpoint has a tensor")
        elif other.dtype != ref.dtype:
            problems.append(f"{path}: key '{key}' has dtype {other.dtype}, the newest checkpoint has {ref.dtype}")
        elif other.shape != ref.shape:
            problems.append(f"{path}: key '{key}' has shape {tuple(other.shape)}, "
                            f"the newest checkpoint has {tuple(ref.shape)}")
    return problems


def _sorted_unique(refs: List[CheckpointRef]) -> List[CheckpointRef]:
    refs = sorted(refs, key=lambda r: r.iteration)
    for a, b in zip(refs, refs[1:]):
        if a.iteration == b.iteration:
            raise InputError(f"{a.path} and {b.path} are both iteration {a.iteration}")
    return refs


def _fmt(degrees) -> str:
    return "?" if degrees is None else "/".join(map(str, degrees))
