"""Megatron-LM legacy checkpoints (``--ckpt-format torch``), sharded by TP, PP and EP.

    RUN/latest_checkpointed_iteration.txt
    RUN/iter_0001000/mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/model_optim_rng.pt [+ distrib_optim.pt]

Every shard file is a unit: the merged file keeps the newest source's non-tensor entries
(args, checkpoint_version, iteration, ...) and replaces each float tensor under ``model`` /
``model{i}`` (one per virtual-pipeline chunk) by the weighted sum of that tensor in every
source. Integer tensors and ``_extra_state`` come from the newest source.

The output has the newest checkpoint's layout. A source saved at another PP, EP or VP layout
(same TP) is renumbered: each output key's global name (global layer, global expert; see
megatron_layout) is looked up in whichever of that source's shards holds it. A TP change is
refused in one message: the files do not record how each parameter is split over TP ranks.

Optimizer state (megatron_optim): the model tensors are the merged fp32 masters rounded wherever
every source has them (``optimizer.fp32_from_fp16_params``, or the ``param`` buffers of the
shard's ``distrib_optim.pt``), under every policy; ``--optimizer latest`` merges the masters and
keeps the newest's moments, ``merge`` merges the moments too (``distrib_optim.pt`` elementwise).
Both need every checkpoint to have the newest's optimizer structure and shard layout.
"""
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import InputError
from ..io.planning_reads import file_size, is_file, memoised, subdirectories
from ..io.safe_load import register_framework_globals, safe_load, saved_file_problem
from ..plan.types import CheckpointRef, OptimizerPolicy, OutputKind, OutputLayout, WorkUnit
from .common import discover_run_or_checkpoints, iteration_of, layout_change_refusal, listdir
from .base import MergeContext
from .masters import MasterWeights, from_model_copies
from .megatron_layout import ShardLayout, shard_layout
from .megatron_optim import (distrib_leaf_kind, distrib_structure, distrib_weights, has_optimizer_state, in_file_weights,
                             masters_of, model_file_leaf_kind, optimizer_entries, structure)
from .pickled import PickledFileFormat, SourceLeaves

TRACKER = "latest_checkpointed_iteration.txt"
# Megatron's own allow-list (enums in saved args, ...), as Megatron itself loads with it.
register_framework_globals(
    "megatron.", lambda: __import__("megatron.core.safe_globals", fromlist=["SAFE_GLOBALS"]).SAFE_GLOBALS)
MODEL_FILE = "model_optim_rng.pt"
DISTRIB_OPTIM_FILE = "distrib_optim.pt"
_ITER_DIR = re.compile(r"^iter_(\d+)$")
_SHARD_DIR = re.compile(r"^mp_rank_\d{2}(_\d{3}){0,2}$")
_MODEL_KEY = re.compile(r"^model\d*$")
# The saved args that place layers and experts on shards (see megatron_layout) ...
_PLACEMENT_ARGS = ("pipeline_model_parallel_size", "expert_model_parallel_size", "virtual_pipeline_model_parallel_size",
                   "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
                   "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
                   "account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split",
                   "pipeline_model_parallel_layout", "num_layers", "num_experts")
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
    optimizer_policies = (OptimizerPolicy.DROP, OptimizerPolicy.LATEST, OptimizerPolicy.MERGE)

    def __init__(self):
        # per checkpoint: (file, saved args) of its first shard, and its shard layout (read once)
        self._saved_args: Dict[str, Tuple[str, object]] = {}
        self._layouts: Dict[str, ShardLayout] = {}

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
        def first_shard():
            path = os.path.join(ckpt_dir, _shard_dirs(ckpt_dir)[0], MODEL_FILE)
            return path, safe_load(path)
        return iteration_of(ckpt_dir, _ITER_DIR, first_shard, "iteration")

    # -- layout ------------------------------------------------------------------------------
    def _args(self, ckpt: CheckpointRef) -> Tuple[str, object]:
        """(the file read, its saved args or None) of a checkpoint's first shard."""
        if ckpt.path not in self._saved_args:
            shards = _shard_dirs(ckpt.path)
            if not shards:
                raise InputError(f"{ckpt.path}: no mp_rank_* shard directories")
            path = os.path.join(ckpt.path, shards[0], MODEL_FILE)
            self._saved_args[ckpt.path] = (path, safe_load(path).get("args"))
        return self._saved_args[ckpt.path]

    def _degrees(self, ckpt: CheckpointRef) -> Optional[Tuple[int, int, int]]:
        args = self._args(ckpt)[1]
        return parallel_degrees(args) if args is not None else None

    def _shard_layout(self, ckpt: CheckpointRef) -> ShardLayout:
        if ckpt.path not in self._layouts:
            path, args = self._args(ckpt)
            self._layouts[ckpt.path] = shard_layout(args, path)
        return self._layouts[ckpt.path]

    def _placement(self, ckpt: CheckpointRef) -> Optional[tuple]:
        """What decides which global layer and expert each local key is (None without args):
        equal for two checkpoints, their shard files hold the same keys."""
        args = self._args(ckpt)[1]
        return None if args is None else tuple(getattr(args, name, None) for name in _PLACEMENT_ARGS)

    def checkpoint_layout(self, ckpt: CheckpointRef) -> Dict[str, object]:
        args = self._args(ckpt)[1]
        tp, pp, ep = parallel_degrees(args) if args is not None else (None, None, None)
        vp = (getattr(args, "virtual_pipeline_model_parallel_size", None) or 1) if args is not None else None
        return {"tp": tp, "pp": pp, "ep": ep, "vp": vp, "shards": len(_shard_dirs(ckpt.path))}

    def run_identity(self, ckpt: CheckpointRef) -> Dict[str, object]:
        return run_identity_from_args(self._args(ckpt)[1])

    def checkpoint_problems(self, ckpt: CheckpointRef) -> List[str]:
        """Shard directories the saved TP/PP/EP degrees call for but that are missing, and shard
        files that are missing, empty or cut short (no zip directory at their end)."""
        shards = _shard_dirs(ckpt.path)
        try:
            degrees = self._degrees(ckpt)
        except InputError as exc:
            return exc.problems
        problems = []
        if degrees is not None:
            tp, pp, ep = degrees
            expected = {shard_dirname(t, p, e, pp, ep) for t in range(tp) for p in range(pp) for e in range(ep)}
            missing = sorted(expected - set(shards))
            if missing:
                problems.append(f"{ckpt.path}: {len(missing)} of the {len(expected)} shard directories of TP={tp} "
                                f"PP={pp} EP={ep} are missing: {', '.join(missing[:4])}"
                                f"{' ...' if len(missing) > 4 else ''}")
        for shard in shards:
            for name in (MODEL_FILE, DISTRIB_OPTIM_FILE):
                path = os.path.join(ckpt.path, shard, name)
                if name == MODEL_FILE or os.path.exists(path):
                    problem = saved_file_problem(path)
                    if problem:
                        problems.append(problem)
        return problems

    def layout(self, checkpoints: Sequence[CheckpointRef]) -> Dict[str, object]:
        return self.checkpoint_layout(checkpoints[-1])

    def _layout_refusal(self, checkpoints: Sequence[CheckpointRef], layouts: List[dict]) -> Optional[str]:
        """One message if the checkpoints' layouts cannot be merged: TP must not change (the
        files do not say how each parameter is split); PP, EP and VP may (renumbering)."""
        if any(self._args(c)[1] is None for c in checkpoints):  # no saved args: nothing to renumber by
            return layout_change_refusal(checkpoints, layouts, ("tp", "pp", "ep", "vp", "shards"), show=("tp", "pp", "ep"),
                                         reason="a checkpoint without saved args (layers and experts cannot "
                                                "be renumbered) merges only with checkpoints of its own shards")
        refusal = layout_change_refusal(
            checkpoints, layouts, ("tp",), show=("tp", "pp", "ep"),
            reason="legacy Megatron files do not record how each parameter is split over tensor-parallel ranks "
                   "(SwiGLU fc1 [gate; up] halves, QKV head groups, the padded vocabulary), so a TP change "
                   "cannot be merged (PP, EP and VP changes can)",
            hint="or save with --ckpt-format torch_dist, whose checkpoints pmm_dist merges across TP")
        return refusal  # another model (layers, experts) is refused by the engine's run-identity check

    def plan_units(self, checkpoints: Sequence[CheckpointRef], optimizer_policy: OptimizerPolicy,
                   world_size: int = 1) -> List[WorkUnit]:
        optimizer_policy = OptimizerPolicy(optimizer_policy)
        newest = checkpoints[-1]
        problems: List[str] = []
        layouts = [self.checkpoint_layout(ckpt) for ckpt in checkpoints]
        refusal = self._layout_refusal(checkpoints, layouts)
        if refusal is None and optimizer_policy.keeps_training_state:
            # A shard's optimizer state is ordered by that shard's parameters: no renumbering.
            refusal = layout_change_refusal(
                checkpoints, layouts, ("tp", "pp", "ep", "vp", "shards"), show=("tp", "pp", "ep", "vp"),
                reason=f"--optimizer {optimizer_policy} merges each shard's optimizer state (kept in the order of "
                       "that shard's parameters), so every checkpoint must have the newest's shard layout",
                hint="or use --optimizer drop (the weights merge across PP, EP and VP changes)")
        if refusal:
            raise InputError(refusal)
        reference = self._degrees(newest)
        expected = self._expected_shards(newest, reference)
        for ckpt in checkpoints:
            degrees = self._degrees(ckpt)
            if self._placement(ckpt) != self._placement(newest):
                try:  # its keys are renumbered onto the newest's shards: its own layout must be known
                    self._shard_layout(ckpt), self._shard_layout(newest)
                except InputError as exc:
                    problems += exc.problems
                    continue
            own = expected if degrees == reference else self._expected_shards(ckpt, degrees)
            found = set(_shard_dirs(ckpt.path))
            problems += [f"{os.path.join(ckpt.path, name)}: missing shard (expected for TP/PP/EP={_fmt(degrees)})"
                         for name in sorted(own - found)]
            problems += [f"{os.path.join(ckpt.path, name)}: unexpected shard for TP/PP/EP={_fmt(degrees)}"
                         for name in sorted(found - own)]
            prefix = os.path.join(ckpt.path, "")  # os.path.join's strings, without a call per shard (100k)
            problems += [f"{prefix}{name}/{MODEL_FILE}: missing file" for name in sorted(own & found)
                         if not is_file(f"{prefix}{name}/{MODEL_FILE}")]
        if problems:
            raise InputError(sorted(set(problems), key=problems.index))
        prefix = os.path.join(newest.path, "")
        units = [WorkUnit(f"{name}/{MODEL_FILE}", file_size(f"{prefix}{name}/{MODEL_FILE}"), optimizer=optimizer_policy)
                 for name in sorted(expected)]
        if optimizer_policy.keeps_training_state:  # the distributed optimizer's masters and moments: merged
            distrib = [name for name in sorted(expected) if is_file(os.path.join(newest.path, name, DISTRIB_OPTIM_FILE))]
            problems = [f"{os.path.join(ckpt.path, name, DISTRIB_OPTIM_FILE)}: missing file (present in the newest "
                        f"checkpoint {newest.path}; --optimizer {optimizer_policy} merges it)"
                        for ckpt in checkpoints[:-1] for name in distrib
                        if not is_file(os.path.join(ckpt.path, name, DISTRIB_OPTIM_FILE))]
            if problems:
                raise InputError(problems)
            units += [WorkUnit(f"{name}/{DISTRIB_OPTIM_FILE}", file_size(os.path.join(newest.path, name, DISTRIB_OPTIM_FILE)),
                               optimizer=optimizer_policy) for name in distrib]
        return units

    @staticmethod
    def _expected_shards(newest: CheckpointRef, degrees) -> set:
        if degrees is None:  # no saved args: the newest checkpoint's directories are the reference
            return set(_shard_dirs(newest.path))
        tp, pp, ep = degrees
        return {shard_dirname(t, p, e, pp, ep) for t in range(tp) for p in range(pp) for e in range(ep)}

    # -- per-file hooks of the pickled-file skeleton ----------------------------------------------
    def merged_subtrees(self, state: dict, relpath: str) -> List[tuple]:
        return [] if _is_distrib(relpath) else [(key,) for key in model_keys(state)]

    def file_problem(self, path: str, state, relpath: str, newest_path=None, newest=None) -> Optional[str]:
        if _is_distrib(relpath):
            if not isinstance(state, (dict, list)):
                return f"{path}: expected a dict (or a list, chained optimizers), found {type(state).__name__}"
            if newest is not None and distrib_structure(state) != distrib_structure(newest):
                return (f"{path}: its buffers (optimizer, gbuf_idx, dtype, numel_unpadded) "
                        f"{_differing(distrib_structure(state), distrib_structure(newest))} differ from the newest "
                        f"checkpoint's ({newest_path}): another model or bucket layout")
            return None
        if not isinstance(state, dict) or not model_keys(state):
            return f"{path}: no 'model' entry (is this a Megatron model_optim_rng.pt?)"
        return None

    # -- optimizer state (see megatron_optim) ------------------------------------------------------
    def training_subtrees(self, state: dict, relpath: str) -> List[tuple]:
        if _is_distrib(relpath):
            return [()]
        return [("optimizer",)] if state.get("optimizer") is not None else []

    def training_leaf_kind(self, relpath: str, path: tuple) -> Optional[str]:
        return distrib_leaf_kind(path) if _is_distrib(relpath) else model_file_leaf_kind(path)

    def training_problems(self, relpath: str, checkpoints: Sequence[CheckpointRef], newest: dict,
                          policy: OptimizerPolicy) -> List[str]:
        """With --optimizer latest|merge: the newest has optimizer state, and every source the
        newest's optimizer structure (its masters are merged; under merge its moments too)."""
        if not policy.keeps_training_state or _is_distrib(relpath):
            return []  # distrib_optim.pt: compared by file_problem and the leaves
        newest_path = os.path.join(checkpoints[-1].path, relpath)
        if not has_optimizer_state(newest):
            return [f"{newest_path}: no optimizer state (saved with --no-save-optim?), needed by --optimizer {policy}"]
        problems = []
        for ckpt in checkpoints[:-1]:
            path = os.path.join(ckpt.path, relpath)
            try:
                state = safe_load(path)
            except InputError as exc:
                problems.append(str(exc))
                continue
            if not has_optimizer_state(state):
                problems.append(f"{path}: no optimizer state (saved with --no-save-optim?), needed by --optimizer {policy}")
            elif structure(state) != structure(newest):
                problems.append(f"{path}: optimizer structure (kind of state, param group sizes, master groups) "
                                f"{_differing(structure(state), structure(newest))} differs from the newest "
                                f"checkpoint's ({newest_path})")
        return problems

    def master_weights(self, relpath: str, checkpoints: Sequence[CheckpointRef], output: dict,
                       sources: Sequence[SourceLeaves], context: MergeContext) -> MasterWeights:
        """The shard's model tensors as the merged fp32 masters, rounded: from the file's
        ``fp32_from_fp16_params`` (Float16Optimizer) or the shard's distrib_optim.pt buffers
        (DistributedOptimizer) of every source; the model copies (with a note) where a source
        has none, or was saved at another layout."""
        if _is_distrib(relpath):
            if context.tensor_filter.include or context.tensor_filter.exclude:
                raise InputError(f"{os.path.join(checkpoints[-1].path, relpath)}: --include/--exclude select tensors by "
                                 f"name, but the fp32 masters and moments here are flat partitions of many parameters; "
                                 f"--optimizer {context.optimizer_policy} cannot honour them (use --optimizer drop)")
            return MasterWeights()
        states, names = [source.state for source in sources], [source.name for source in sources]
        if any(state is None for state in states):
            return from_model_copies("some source was saved at another PP/EP/VP layout: its optimizer state is "
                                     "not renumbered, so the model copies are merged", by_older=True)
        missing = [name for state, name in zip(states, names) if not has_optimizer_state(state)]
        if missing:
            if not has_optimizer_state(states[-1]):
                return from_model_copies()
            return from_model_copies(f"{missing[0]} has no optimizer state (--no-save-optim?): the masters of every "
                                     "source are needed", by_older=True)
        keys = model_keys(output)
        if any(masters_of(entry) is not None for _, entry in optimizer_entries(states[-1])):
            if any(structure(state) != structure(states[-1]) for state in states[:-1]):
                return from_model_copies("the sources' optimizer structures differ", by_older=True)
            return in_file_weights(states, names, keys, context)
        distrib = os.path.join(os.path.dirname(relpath), DISTRIB_OPTIM_FILE)
        paths = [os.path.join(ckpt.path, distrib) for ckpt in checkpoints]
        if not os.path.isfile(paths[-1]):
            return from_model_copies()  # fp32 training: the model's tensors are the weights
        absent = [path for path in paths if not os.path.isfile(path)]
        if absent:
            return from_model_copies(f"{absent[0]} is missing: the masters of every source are needed", by_older=True)
        distribs = [safe_load(path) for path in paths]
        if any(distrib_structure(d) != distrib_structure(distribs[-1]) for d in distribs[:-1]):
            return from_model_copies("the sources' distrib_optim.pt buffers differ", by_older=True)
        return distrib_weights(states[-1], keys, distribs, paths, states, context)

    def without_training_state(self, state: dict, relpath: str) -> dict:
        return {key: value for key, value in state.items() if key not in TRAINING_STATE_KEYS}

    def source_leaves(self, relpath: str, checkpoints: Sequence[CheckpointRef], index: int,
                      newest: dict, policy: OptimizerPolicy = OptimizerPolicy.DROP) -> SourceLeaves:
        """A source saved at another PP/EP/VP layout: each leaf of the newest's shard file
        ``relpath``, under its global name (global layer, global expert), from whichever of the
        source's shards holds it; keys outside the decoder layers (embedding, final norm, output
        layer, ...) are looked up by name, first in the source's chunk of the same role (first
        or last)."""
        ckpt, newest_ckpt = checkpoints[index], checkpoints[-1]
        if self._placement(ckpt) == self._placement(newest_ckpt):
            return super().source_leaves(relpath, checkpoints, index, newest, policy)
        out, src = self._shard_layout(newest_ckpt), self._shard_layout(ckpt)
        tp, out_pp, out_ep = out.rank_of(relpath.split("/")[0])
        ep = out_ep if out_ep < src.ep else 0  # what every EP rank holds alike: from this one
        files: Dict[Tuple[int, int], Tuple[str, dict]] = {}

        def shard(pp: int, ep_rank: int) -> Tuple[str, dict]:
            if (pp, ep_rank) not in files:
                path = os.path.join(ckpt.path, shard_dirname(tp, pp, ep_rank, src.pp, src.ep), MODEL_FILE)
                state = safe_load(path)
                problem = self.file_problem(path, state, relpath)
                if problem:
                    raise InputError(problem)
                files[(pp, ep_rank)] = (path, state)
            return files[(pp, ep_rank)]

        leaves, where, problems = {}, {}, []
        for leaf_path in self.merged_leaves(newest, relpath):
            chunk_key, key, rest = leaf_path[0], leaf_path[1], leaf_path[2:]
            chunk = int(chunk_key[len("model"):] or 0)
            name = out.global_key(key, out_pp, chunk, out_ep)
            if out.stacks_experts(key) and out.num_local_experts != src.num_local_experts:
                problems.append(f"{os.path.join(newest_ckpt.path, relpath)}: key '{chunk_key}.{key}' holds all of an "
                                f"EP rank's experts in one tensor (legacy GroupedMLP); EP changed from {src.ep} to "
                                f"{out.ep} ({ckpt.path}), which would split it: merge checkpoints of one EP size")
                continue
            located = src.local_key(name, prefer_ep=ep)
            if located is None:  # outside the decoder layers: by name, in the chunk of the same role first
                candidates = [(pp, c, ep, key) for pp, c in _chunks_by_role(out, out_pp, chunk, src)]
            elif located[0] < 0:
                problems.append(f"{ckpt.path}: has no '{name}' (the newest checkpoint's {relpath} key "
                                f"'{chunk_key}.{key}'): its saved args place no such layer or expert")
                continue
            else:
                candidates = [located]
            for pp, source_chunk, ep_rank, source_key in candidates:
                path, state = shard(pp, ep_rank)
                value = _lookup(state.get(src.model_key(source_chunk)), (source_key, *rest))
                if value is not _MISSING:
                    leaves[leaf_path], where[leaf_path] = value, path
                    break
            else:
                looked = ", ".join(dict.fromkeys(f"{shard(pp, e)[0]}:{src.model_key(c)}.{k}" for pp, c, e, k in candidates))
                problems.append(f"{ckpt.path}: key '{name}' missing (the newest checkpoint's {relpath} key "
                                f"'{chunk_key}.{key}'; looked for it in {looked})")
        if problems:
            raise InputError(problems)
        return SourceLeaves(ckpt.path, leaves, where)

    def weight_files(self, checkpoint_dir: str) -> List[str]:
        return [f"{name}/{MODEL_FILE}" for name in _shard_dirs(checkpoint_dir)]


def _is_distrib(relpath: str) -> bool:
    return os.path.basename(relpath) == DISTRIB_OPTIM_FILE


def _differing(found: list, newest: list) -> str:
    """The first entry where two structure descriptions differ, for messages."""
    for a, b in zip(found, newest):
        if a != b:
            return f"{a} (the newest: {b})"
    return f"{len(found)} entries (the newest: {len(newest)})"


def _shard_dirs(path: str) -> Tuple[str, ...]:
    # one scandir (entry types without a stat each) and one pass of the pattern, once per
    # planning pass (asked nine times there): 100k shards
    return memoised("megatron shard dirs", os.path.abspath(path),
                    lambda: tuple(e for e in subdirectories(path) if _SHARD_DIR.match(e)))


_MISSING = object()


def _lookup(obj, path: tuple):
    """The value at ``path`` inside nested dicts, or _MISSING (a stored None is a value)."""
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return _MISSING
        obj = obj[key]
    return obj


def _chunks_by_role(out: ShardLayout, pp: int, chunk: int, src: ShardLayout) -> List[Tuple[int, int]]:
    """The source's (pp rank, chunk) pairs to look for a key outside the decoder layers in: the
    first model chunk for the output's first (the embedding), the last for its last (final
    norm, output layer), then all others."""
    order = []
    if pp == 0 and chunk == 0:
        order.append((0, 0))
    if pp == out.pp - 1 and chunk == out.vp - 1:
        order.append((src.pp - 1, src.vp - 1))
    order += [(p, c) for c in range(src.vp) for p in range(src.pp)]
    return list(dict.fromkeys(order))


def _fmt(degrees) -> str:
    return "?" if degrees is None else "/".join(map(str, degrees))
