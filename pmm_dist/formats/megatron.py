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

from ..errors import InputError
from ..io.planning_reads import subdirectories
from ..io.safe_load import safe_load
from ..plan.types import Action, CheckpointRef, OptimizerPolicy, OutputKind, OutputLayout, WorkUnit
from .common import discover_run_or_checkpoints, listdir, number_in_name
from .pickled import PickledFileFormat

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
DISTRIB_OPTIM_FILE = "distrib_optim.pt"
_ITER_DIR = re.compile(r"^iter_(\d+)$")
_SHARD_DIR = re.compile(r"^mp_rank_\d{2}(_\d{3}){0,2}$")
_MODEL_KEY = re.compile(r"^model\d*$")
# Entries that make up the training state rather than the weights: dropped by --optimizer drop.
TRAINING_STATE_KEYS = ("optimizer", "opt_param_scheduler", "rng_state")
# Saved args that identify a run: the model's architecture and the seed. Parallel sizes, data
# paths and schedules may change when a run resumes, so they are not compared.
RUN_IDENTITY_ARGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                     "kv_channels", "padded_vocab_size", "max_position_embeddings", "num_experts", "swiglu",
                     "normalization", "position_embedding_type", "untie_embeddings_and_output_weights", "seed")


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


def run_identity_from_args(args) -> Dict[str, object]:
    return {name: getattr(args, name) for name in RUN_IDENTITY_ARGS if hasattr(args, name)} if args is not None else {}


def model_keys(state: dict) -> List[str]:
    return [key for key in state if isinstance(key, str) and _MODEL_KEY.match(key)]


class IterationTracker:
    """Megatron's output convention, shared by the legacy and torch_dist formats:
    ``OUT/iter_{N:07d}/`` and ``OUT/latest_checkpointed_iteration.txt`` written last."""

    def output_layout(self, newest: CheckpointRef) -> OutputLayout:
        return OutputLayout(OutputKind.RUN_DIRECTORY, TRACKER, f"iter_{newest.iteration:07d}")

    def tracker_text(self, newest: CheckpointRef) -> str:
        return f"{newest.iteration}\n"

    def names_checkpoint(self, name: str) -> bool:
        return bool(_ITER_DIR.match(name)) or name == "release"


class MegatronLegacyFormat(IterationTracker, PickledFileFormat):
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
        for entry in listdir(run_dir):
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
        named = number_in_name(ckpt_dir, _ITER_DIR)
        if named is not None:
            return named
        first = os.path.join(ckpt_dir, _shard_dirs(ckpt_dir)[0], MODEL_FILE)
        iteration = safe_load(first).get("iteration")
        if not isinstance(iteration, int):
            raise InputError(f"{first}: key 'iteration' missing; cannot order this checkpoint")
        return iteration

    # -- layout ------------------------------------------------------------------------------
    def _args(self, ckpt: CheckpointRef):
        """The saved argparse Namespace of a checkpoint's first shard (None if it has none)."""
        shards = _shard_dirs(ckpt.path)
        if not shards:
            raise InputError(f"{ckpt.path}: no mp_rank_* shard directories")
        return safe_load(os.path.join(ckpt.path, shards[0], MODEL_FILE)).get("args")

    def _degrees(self, ckpt: CheckpointRef) -> Optional[Tuple[int, int, int]]:
        args = self._args(ckpt)
        return parallel_degrees(args) if args is not None else None

    def run_identity(self, ckpt: CheckpointRef) -> Dict[str, object]:
        return run_identity_from_args(self._args(ckpt))

    def layout(self, checkpoints: Sequence[CheckpointRef]) -> Dict[str, object]:
        degrees = self._degrees(checkpoints[-1])
        if degrees is None:
            return {"tp": None, "pp": None, "ep": None, "shards": len(_shard_dirs(checkpoints[-1].path))}
        return {"tp": degrees[0], "pp": degrees[1], "ep": degrees[2], "shards": len(_shard_dirs(checkpoints[-1].path))}

    def plan_units(self, checkpoints: Sequence[CheckpointRef], optimizer_policy: OptimizerPolicy,
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
        if optimizer_policy == OptimizerPolicy.LATEST:
            units += [WorkUnit(f"{name}/{DISTRIB_OPTIM_FILE}", os.path.getsize(path), action=Action.COPY)
                      for name in sorted(expected)
                      for path in [os.path.join(newest.path, name, DISTRIB_OPTIM_FILE)] if os.path.isfile(path)]
        return units

    @staticmethod
    def _expected_shards(newest: CheckpointRef, degrees) -> set:
        if degrees is None:  # no saved args: the newest checkpoint's directories are the reference
            return set(_shard_dirs(newest.path))
        tp, pp, ep = degrees
        return {shard_dirname(t, p, e, pp, ep) for t in range(tp) for p in range(pp) for e in range(ep)}

    # -- per-file hooks of the pickled-file skeleton ----------------------------------------------
    def merged_subtrees(self, state: dict, relpath: str) -> List[tuple]:
        return [(key,) for key in model_keys(state)]

    def file_problem(self, path: str, state, relpath: str, newest_path=None, newest=None) -> Optional[str]:
        if not isinstance(state, dict) or not model_keys(state):
            return f"{path}: no 'model' entry (is this a Megatron model_optim_rng.pt?)"
        return None

    def without_training_state(self, state: dict, relpath: str) -> dict:
        return {key: value for key, value in state.items() if key not in TRAINING_STATE_KEYS}

    def weight_files(self, checkpoint_dir: str) -> List[str]:
        return [f"{name}/{MODEL_FILE}" for name in _shard_dirs(checkpoint_dir)]


def _shard_dirs(path: str) -> List[str]:
    # one scandir (entry types without a stat each), once per planning pass: 100k shards
    return [e for e in subdirectories(path) if _SHARD_DIR.match(e)]


def _fmt(degrees) -> str:
    return "?" if degrees is None else "/".join(map(str, degrees))
