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

from ..atomic import write_atomically, write_text_atomically
from ..errors import InputError
from ..kernel import is_mergeable
from ..planner import WorkUnit
from ..safe_load import safe_load
from ..tree import dotted, flatten, map_leaves
from .base import CheckpointFormat, CheckpointRef, MergeContext, UnitResult
from .common import LeafMerger, compare_leaves, discover_run_or_checkpoints, iteration_from_name

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


def read_tracker(tracker_path: str) -> int:
    """The iteration a Megatron tracker names ('release' has no history to merge)."""
    text = open(tracker_path).read().strip()
    if text == "release":
        raise InputError(f"{tracker_path} says 'release': a release checkpoint has no history to merge; "
                         "pass the checkpoint directories to merge explicitly")
    try:
        return int(text)
    except ValueError:
        raise InputError(f"{tracker_path}: expected an iteration number or 'release', found {text[:40]!r}") from None


def model_keys(state: dict) -> List[str]:
    return [key for key in state if isinstance(key, str) and _MODEL_KEY.match(key)]


class IterationTracker:
    """Megatron's output convention, shared by the legacy and torch_dist formats:
    ``OUT/iter_{N:07d}/`` and ``OUT/latest_checkpointed_iteration.txt`` written last."""

    def output_dirname(self, newest: CheckpointRef) -> str:
        return f"iter_{newest.iteration:07d}"

    def tracker_relpath(self) -> str:
        return TRACKER

    def write_tracker(self, out_root: str, newest: CheckpointRef) -> str:
        write_text_atomically(os.path.join(out_root, TRACKER), f"{newest.iteration}\n")
        return TRACKER


class MegatronLegacyFormat(IterationTracker, CheckpointFormat):
    name = "megatron"
    description = "Megatron-LM legacy torch format: latest_checkpointed_iteration.txt + iter_*/mp_rank_*/model_optim_rng.pt"

    # -- discovery ---------------------------------------------------------------------------
    @classmethod
    def recognizes(cls, path: str) -> bool:
        return os.path.isfile(os.path.join(path, TRACKER)) or bool(_shard_dirs(path))

    def discover(self, sources: Sequence[str]) -> List[CheckpointRef]:
        return discover_run_or_checkpoints(sources, TRACKER, self._discover_run, lambda p: bool(_shard_dirs(p)),
                                           self._iteration_of, "Megatron checkpoint directory (no mp_rank_* "
                                           "directories)")

    def _discover_run(self, run_dir: str) -> List[CheckpointRef]:
        tracker_path = os.path.join(run_dir, TRACKER)
        newest = read_tracker(tracker_path)
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
        def from_file():
            first = os.path.join(ckpt_dir, _shard_dirs(ckpt_dir)[0], MODEL_FILE)
            iteration = safe_load(first).get("iteration")
            if not isinstance(iteration, int):
                raise InputError(f"{first}: key 'iteration' missing; cannot order this checkpoint")
            return iteration
        return iteration_from_name(ckpt_dir, _ITER_DIR, from_file)

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
            problems += compare_leaves(path, leaves, newest_path, reference)
        return problems

    def merge_unit(self, unit: WorkUnit, checkpoints: Sequence[CheckpointRef], destination: str,
                   context: MergeContext) -> UnitResult:
        target = os.path.join(destination, unit.relpath)
        paths = [os.path.join(ckpt.path, unit.relpath) for ckpt in checkpoints]
        sources = [safe_load(path) for path in paths]
        newest = sources[-1]
        merge = LeafMerger([_model_leaves(src) for src in sources], paths, context)
        output = {}
        for key, value in newest.items():
            if key in TRAINING_STATE_KEYS and context.optimizer_policy == "drop":
                continue
            output[key] = map_leaves(value, merge, (key,)) if key in model_keys(newest) else value
        num_bytes, sha = write_atomically(target, lambda f: torch.save(output, f))
        return UnitResult(unit.relpath, num_bytes, merge.num_bytes_read, sha, merge.num_tensors)

    def tensor_inventory(self, checkpoint_dir: str) -> Dict[str, Tuple[tuple, str]]:
        inventory = {}
        for name in _shard_dirs(checkpoint_dir):
            for path_key, leaf in _model_leaves(safe_load(os.path.join(checkpoint_dir, name, MODEL_FILE))).items():
                if is_mergeable(leaf):
                    inventory[f"{name}/{dotted(path_key)}"] = (tuple(leaf.shape), str(leaf.dtype))
        return inventory

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


def _fmt(degrees) -> str:
    return "?" if degrees is None else "/".join(map(str, degrees))
