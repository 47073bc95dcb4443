"""DeepSpeed checkpoints (``engine.save_checkpoint``): ZeRO stages 0-3, MoE experts, PipelineModule.

    RUN/latest                                                   # the newest tag; DeepSpeed writes it last
    RUN/global_step{N}/
        mp_rank_{mp:02d}_model_states.pt                         # ZeRO 0-2 and pipeline stages: `module`
        zero_pp_rank_{dp}_mp_rank_{mp:02d}_model_states.pt       # ZeRO-3: `module` holds placeholders
        [bf16_]zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt   # ZeRO 1-3 fp32 flat partitions + moments
        layer_{moe_layer}_expert_{global_id}_mp_rank_{mp:02d}_model_states.pt   # MoE experts
        expp_rank_{ep}_mp_rank_{mp:02d}_optim_states.pt          # MoE optimizer state without ZeRO
        layer_{idx:02d}[-model_{tp:02d}]-model_states.pt         # PipelineModule layers

Every weight-bearing file is a unit, merged tensor by tensor; the merged file keeps the newest
source's non-tensor state (ds_config, param_shapes, global_steps, client state, ...). The output
has the newest checkpoint's layout: its data-parallel size and its file set.

- model states: the float tensors of ``module`` (ZeRO 0-2 weights and buffers; ZeRO-3 buffers and
  empty placeholders) and ``frozen_param_fragments``. ``--optimizer drop`` sets the non-ZeRO
  ``optimizer`` entry to None, as DeepSpeed itself saves it under ZeRO.
- expert and pipeline layer files: every float tensor.
- ZeRO-3 optimizer files: the weights live only here, in the fp32 flat partitions
  (``fp32_flat_groups``). Sources of the newest's partitioning are merged elementwise, over the
  parameters' elements only: DeepSpeed leaves the partitions' padding uninitialized (any bits,
  NaN at times), so it is written as zeros, never merged or checked (moments and
  ``frozen_param_fragments`` likewise). If some source was saved at another data-parallel
  size, each output rank's partitions are rebuilt from every source's, parameter by parameter
  (the geometry is in zero3_partitions: it follows from param_shapes, the partition count and
  DeepSpeed's padding), one source at a time, with zeros in the padding;
  ``frozen_param_fragments`` of the model states likewise. The Adam moments
  (``optimizer_state_dict.optimizer_state_dict``) are removed under ``--optimizer drop``, kept
  from the newest checkpoint under ``--optimizer latest`` (partitioned like the newest, and so is
  the output) and under ``merge`` merged, remapped like the partitions where a source's DP size
  differs.
- ZeRO 1/2 optimizer files hold the fp32 masters (see deepspeed_optim): dropped under ``drop``;
  under ``latest``/``merge`` merged (masters; moments under merge), as slices of every source's
  DP-independent flat groups where a source's DP size differs. The model states' ``module`` is
  cut from every source's merged masters (the model-states unit reads the optimizer files
  itself) and rounded, where every source has them; else its own tensors are merged, with a note.
- MoE ``expp_rank_*`` files (optimizer state without ZeRO): dropped; ``latest``/``merge`` refused.

Validation, before anything is written: the selected checkpoints must share one ZeRO stage,
model-parallel size, optimizer-file dtype (bf16_), MoE expert set, pipeline layer set and
param_shapes (a change of any is refused in one message listing which checkpoint has which);
only the data-parallel size may differ (ZeRO-3: where every group has one partition count). The
newest must hold every rank file its own metadata implies (dp_world_size, num_experts,
model-parallel ranks 0..N-1); every other checkpoint of the newest's partitioning must hold the
same files the merge reads, one of another (ZeRO-3) those its own metadata implies (the optimizer
files of older ZeRO 0-2 checkpoints are never read, so pruning them is fine); a file that is no
DeepSpeed checkpoint file is refused. Tensor names, shapes and dtypes, and the flat partitions'
sizes against param_shapes, are checked per file by the rank that merges it.
"""
import math
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import InputError
from ..io.atomic import write_atomically
from ..io.planning_reads import file_size
from ..io.safe_load import register_framework_globals, safe_load, saved_file_problem
from ..io.torch_save_stream import save_streamed
from ..io.tree import remove_subtree, replace_subtree
from ..plan.types import (MODEL_WEIGHTS_FROM, WEIGHTS_FROM_MASTERS, Action, CheckpointRef, OptimizerPolicy, OutputKind,
                          OutputLayout, UnitResult, WorkUnit)
from .base import MergeContext
from .deepspeed_classes import deepspeed_safe_globals, with_deepspeed_objects
from .deepspeed_optim import (FP32_FLAT_GROUPS, OPTIMIZER_STATE, SINGLE_PARTITION, MergeTally, has_moments,
                              moments_by_group, zero0_leaf_kind, zero0_master_weights, zero12_master_weights,
                              zero12_remap_merge, zero12_remap_sources, zero12_structure_problem, zero_optim_leaf_kind)
from .masters import MasterWeights, from_model_copies
from .common import discover_run_or_checkpoints, iteration_of, layout_change_refusal, listdir
from .pickled import PickledFileFormat, SourceLeaves
from .zero3_partitions import copy_pieces, gather_pieces, stream_numel, value_runs

TRACKER = "latest"


register_framework_globals("deepspeed.", deepspeed_safe_globals)
_TAG_DIR = re.compile(r"^global_step(\d+)$")

# File kinds of a tag directory, by name (DeepSpeed's own naming, see the module docstring).
MODEL, EXPERT, LAYER, ZERO_OPTIM, EXPERT_OPTIM = "model", "expert", "layer", "zero_optim", "expert_optim"
_FILE_PATTERNS = (
    (re.compile(r"^mp_rank_(?P<mp>\d+)_model_states\.pt$"), MODEL),
    (re.compile(r"^zero_pp_rank_(?P<dp>\d+)_mp_rank_(?P<mp>\d+)_model_states\.pt$"), MODEL),
    (re.compile(r"^(?:layer_(?P<layer>\d+)_)?expert_(?P<expert>\d+)_mp_rank_(?P<mp>\d+)_model_states\.pt$"), EXPERT),
    (re.compile(r"^layer_(?P<layer>\d+)(?:-[A-Za-z]+_\d+)*-model_states\.pt$"), LAYER),
    # "..._mp_rank_00optim_states.pt" (no underscore) is DeepSpeed's old name, which it still loads.
    (re.compile(r"^(?P<bf16>bf16_)?zero_pp_rank_(?P<dp>\d+)_mp_rank_(?P<mp>\d+)_?optim_states\.pt$"), ZERO_OPTIM),
    (re.compile(r"^expp_rank_(?P<ep>\d+)_mp_rank_(?P<mp>\d+)_optim_states\.pt$"), EXPERT_OPTIM),
)
_ZERO3_MODEL = re.compile(r"^zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt$")
# The subtrees whose float tensors are merged, per kind; () is the whole file.
_MERGED_SUBTREES = {
    MODEL: (("module",), ("frozen_param_fragments",)),
    EXPERT: ((),),
    LAYER: ((),),
    ZERO_OPTIM: (("optimizer_state_dict", "fp32_flat_groups"),),  # ZeRO-3 only (see plan_units)
}
# Layout entries that must agree across the merged checkpoints (dp and the file count may change).
# (Expert, pipeline-layer and bf16_ optimizer files are compared by name, file by file.)
FIXED_LAYOUT = ("zero_stage", "mp")
ZERO3_MOMENTS = (OPTIMIZER_STATE, "optimizer_state_dict")  # the base optimizer's state inside a ZeRO-3 file


def classify(filename: str) -> Optional[str]:
    """The kind of a file in a tag directory, or None if it is not a DeepSpeed checkpoint file."""
    for pattern, kind in _FILE_PATTERNS:
        if pattern.match(filename):
            return kind
    return None


@dataclass(frozen=True)
class _Inventory:
    """What planning needs to know about one checkpoint (a tag directory)."""
    files: Dict[str, str]            # file name -> kind
    unknown: Tuple[str, ...]          # entries that are no DeepSpeed checkpoint file
    reference: str                    # the model-states file read for the metadata below
    zero_stage: int
    stage_source: str                 # the file the ZeRO stage was read from
    dp_world_size: Optional[int]
    partition_count: object           # from the optimizer file (int, or a list per param group)
    param_shapes: object
    num_experts: object
    bf16: bool


class DeepSpeedFormat(PickledFileFormat):
    name = "deepspeed"
    description = "DeepSpeed engine.save_checkpoint: latest + global_step*/(mp_rank|zero_pp_rank)_*_states.pt"
    optimizer_policies = (OptimizerPolicy.DROP, OptimizerPolicy.LATEST, OptimizerPolicy.MERGE)

    # -- discovery ---------------------------------------------------------------------------
    @classmethod
    def recognizes(cls, path: str) -> bool:
        """A tag directory, or a run directory: ``latest`` next to at least one tag directory."""
        if _is_tag_dir(path):
            return True
        if not os.path.isfile(os.path.join(path, TRACKER)):
            return False
        with open(os.path.join(path, TRACKER)) as f:
            named = f.read(256).strip()
        if _TAG_DIR.match(named):  # DeepSpeed's default tag, even if its directory is missing (discover says so)
            return True
        return bool(named) and _is_tag_dir(os.path.join(path, named))

    def discover(self, sources: Sequence[str]) -> List[CheckpointRef]:
        return discover_run_or_checkpoints(sources, TRACKER, self._discover_run, _is_tag_dir, self._iteration_of,
                                           "DeepSpeed checkpoint directory (no *_model_states.pt files)")

    def _discover_run(self, run_dir: str) -> List[CheckpointRef]:
        tracker_path = os.path.join(run_dir, TRACKER)
        tag = open(tracker_path).read().strip()
        tag_dir = os.path.join(run_dir, tag)
        if not tag or not os.path.isdir(tag_dir):
            raise InputError(f"{tracker_path} names tag {tag!r}, but {tag_dir} does not exist "
                             "(an interrupted save, or a pruned checkpoint?)")
        match = _TAG_DIR.match(tag)
        if not match:
            raise InputError(f"{tracker_path} names tag {tag!r}, which is not of the form global_step<N>: the "
                             "merge order is unknown; pass the tag directories to merge explicitly")
        newest = int(match.group(1))
        refs = []
        for entry in listdir(run_dir):
            found = _TAG_DIR.match(entry)
            # Tags after the one in `latest` may still be being written by the trainer.
            if found and int(found.group(1)) <= newest and os.path.isdir(os.path.join(run_dir, entry)):
                refs.append(CheckpointRef(int(found.group(1)), os.path.abspath(os.path.join(run_dir, entry))))
        return refs

    @staticmethod
    def _iteration_of(tag_dir: str) -> int:
        def model_states():
            files, _ = _list_files(tag_dir)
            path = os.path.join(tag_dir, _reference_file(files) or "mp_rank_00_model_states.pt")
            return path, safe_load(path)
        return iteration_of(tag_dir, _TAG_DIR, model_states, "global_steps")

    # -- layout ------------------------------------------------------------------------------
    def _inventory(self, ckpt: CheckpointRef) -> _Inventory:
        return self.memo("inventory", ckpt.path, lambda: _read_inventory(ckpt.path))

    def layout(self, checkpoints: Sequence[CheckpointRef]) -> Dict[str, object]:
        return self.checkpoint_layout(checkpoints[-1])

    def checkpoint_layout(self, ckpt: CheckpointRef) -> Dict[str, object]:
        inv = self._inventory(ckpt)
        kinds = list(inv.files.values())
        return {"zero_stage": inv.zero_stage, "dp": inv.dp_world_size, "bf16": inv.bf16,
                "mp": len({_mp_rank(name) for name, kind in inv.files.items() if kind == MODEL}),
                "experts": kinds.count(EXPERT), "pipeline_layers": kinds.count(LAYER)}

    def checkpoint_problems(self, ckpt: CheckpointRef) -> List[str]:
        """Files of the tag directory that are empty or cut short (no zip directory at their end)."""
        return [p for name in sorted(self._inventory(ckpt).files)
                for p in [saved_file_problem(os.path.join(ckpt.path, name))] if p]

    def _masters_make_the_weights(self, checkpoints: Sequence[CheckpointRef]) -> bool:
        """ZeRO-1/2 with every checkpoint's optimizer files there: the module's weights are cut
        from the merged fp32 masters (master_weights), which are what the merge reads."""
        inventories = [self._inventory(c) for c in checkpoints]
        return all(inv.zero_stage in (1, 2) and ZERO_OPTIM in inv.files.values() for inv in inventories)

    def model_weights_source(self, checkpoints: Sequence[CheckpointRef], optimizer_policy: OptimizerPolicy) -> str:
        return "fp32 masters" if self._masters_make_the_weights(checkpoints) else "model copies"

    def bytes_read_by_source(self, units: Sequence[WorkUnit], checkpoints: Sequence[CheckpointRef]) -> List[int]:
        """As the default, except that a ZeRO-1/2 model-states file made from the masters reads
        each source's fp32 masters of its parameters (4 bytes each), not the module's copies."""
        totals = super().bytes_read_by_source(units, checkpoints)
        if not self._masters_make_the_weights(checkpoints):
            return totals
        shapes = self._inventory(checkpoints[-1]).param_shapes  # as _shapes gives them
        if not isinstance(shapes, list):
            return totals
        masters_bytes = 4 * sum(_param_numels(shapes))
        for unit in units:
            if unit.action == Action.MERGE and classify(unit.relpath) == MODEL:
                totals = [total - unit.num_bytes + masters_bytes for total in totals]
        return totals

    def plan_units(self, checkpoints: Sequence[CheckpointRef], optimizer_policy: OptimizerPolicy,
                   world_size: int = 1) -> List[WorkUnit]:
        newest = checkpoints[-1]
        reference = self._inventory(newest)

        optimizer_policy = OptimizerPolicy(optimizer_policy)
        keeps = optimizer_policy.keeps_training_state

        def needed(name: str, of_newest: bool) -> bool:
            """Files the merge must read: weights everywhere; with --optimizer latest|merge every
            checkpoint's ZeRO optimizer files (their fp32 masters are merged). Under drop, the
            ZeRO 0-2 optimizer files of older checkpoints are read where present (their masters
            make the module weights) and may be pruned (the module's copies are merged then)."""
            kind = classify(name)
            if kind in (MODEL, EXPERT, LAYER) or (kind == ZERO_OPTIM and reference.zero_stage == 3):
                return True
            return keeps and (kind == ZERO_OPTIM or of_newest)

        # The newest checkpoint is the reference: first its own completeness (from its metadata) ...
        missing = [(name, why) for name, why in _missing_rank_files(reference) if needed(name, True)]
        problems = _unknown_entries(newest, reference)
        problems += [f"{os.path.join(newest.path, name)}: missing file ({why})" for name, why in missing]
        expected = {name for name in set(reference.files) | {name for name, _ in missing} if needed(name, False)}
        # ... then every other checkpoint: one layout the merge can combine, then its files.
        inventories, unreadable = {}, []
        for ckpt in checkpoints[:-1]:
            try:
                inventories[ckpt.path] = self._inventory(ckpt)
                problems += _unknown_entries(ckpt, inventories[ckpt.path])
            except InputError as exc:  # e.g. a tag directory without its model states: report them all
                unreadable += exc.problems
        refusal = None if unreadable else self._layout_refusal(checkpoints, optimizer_policy)
        if unreadable or refusal:  # the file sets of other layouts are not compared: one message says why
            raise InputError(([refusal] if refusal else []) + unreadable + problems)
        for ckpt in checkpoints[:-1]:
            inv = inventories[ckpt.path]
            found = {name for name in inv.files if needed(name, False)}
            if (reference.zero_stage == 3 or keeps) and not _same_partitioning(inv, reference):
                # Its own partition count implies its own rank files (they are remapped onto the newest's).
                own = {name for name in _implied_files(inv) if needed(name, False)}
                problems += [f"{os.path.join(ckpt.path, name)}: missing file ({why})"
                             for name, why in _missing_rank_files(inv) if needed(name, False)]
                problems += [f"{os.path.join(ckpt.path, name)}: unexpected file (its dp_world_size is "
                             f"{inv.dp_world_size})" for name in sorted(found - own)]
                continue
            problems += [f"{os.path.join(ckpt.path, name)}: missing file (present in the newest checkpoint {newest.path})"
                         for name in sorted(expected - found)]
            problems += [f"{os.path.join(ckpt.path, name)}: unexpected file (absent from the newest checkpoint "
                         f"{newest.path})" for name in sorted(found - expected)]
        if not keeps and reference.zero_stage in (1, 2):
            # Under drop a checkpoint's ZeRO-1/2 optimizer files may all be pruned (the module's copies
            # are merged then), but some of them missing is a broken checkpoint, not a pruned one.
            for ckpt in checkpoints:
                inv = reference if ckpt is newest else inventories[ckpt.path]
                if any(classify(name) == ZERO_OPTIM for name in inv.files):
                    problems += [f"{os.path.join(ckpt.path, name)}: missing file ({why}; the other ranks' "
                                 "optimizer files are there)" for name, why in _missing_rank_files(inv)
                                 if classify(name) == ZERO_OPTIM]
        if keeps and any(classify(name) == EXPERT_OPTIM for name in reference.files):
            problems.append(f"{newest.path}: MoE optimizer state saved without ZeRO (expp_rank_*_optim_states.pt), "
                            f"whose fp32 masters pmm_dist does not merge: --optimizer {optimizer_policy} is not "
                            "possible; use --optimizer drop")
        if problems:
            raise InputError(problems)
        units = []
        for name in sorted(reference.files):
            if not needed(name, True):
                continue
            kind = classify(name)
            merged = kind in (MODEL, EXPERT, LAYER) or kind == ZERO_OPTIM and (keeps or reference.zero_stage == 3)
            units.append(WorkUnit(name, file_size(os.path.join(newest.path, name)),
                                  action=Action.MERGE if merged else Action.COPY, optimizer=optimizer_policy))
        return units

    def _layout_refusal(self, checkpoints: Sequence[CheckpointRef], optimizer_policy: OptimizerPolicy) -> Optional[str]:
        """One message if the checkpoints' layouts cannot be merged: only the data-parallel
        size may change (ZeRO 0-2: the weights are whole in the model states, and the ZeRO-1/2
        optimizer partitions are slices of DP-independent flat vectors; ZeRO-3: the partitions
        are remapped, see zero3_partitions)."""
        layouts = [self.checkpoint_layout(ckpt) for ckpt in checkpoints]
        refusal = layout_change_refusal(
            checkpoints, layouts, FIXED_LAYOUT,
            reason="DeepSpeed checkpoints merge across data-parallel sizes only (the ZeRO stage and the "
                   "model-parallel size must not change)", show=("dp",))
        if refusal:
            return refusal
        ref = self._inventory(checkpoints[-1])
        other = [ckpt for ckpt in checkpoints[:-1] if self._inventory(ckpt).param_shapes != ref.param_shapes]
        if other:
            return (f"param_shapes of {', '.join(c.path for c in other)} differ from the newest checkpoint's "
                    f"({ref.reference}): another model or another parameter order, whose ZeRO partitions do not "
                    "line up; merge checkpoints of one model")
        if ref.zero_stage == 3 and any(not _same_partitioning(self._inventory(c), ref) for c in checkpoints[:-1]):
            odd = [ckpt for ckpt in checkpoints if zero3_partition_count(self._inventory(ckpt)) is None]
            if odd:
                return ("ZeRO-3 partitions are remapped across data-parallel sizes only when every parameter group "
                        "has one partition count, equal to dp_world_size; not so in " +
                        ", ".join(f"{c.path} (partition_count {self._inventory(c).partition_count}, dp_world_size "
                                  f"{self._inventory(c).dp_world_size})" for c in odd) +
                        "; merge the checkpoints of one data-parallel size (--iterations ...)")
        return None

    # -- per-file hooks of the pickled-file skeleton ----------------------------------------------
    def merged_subtrees(self, state: dict, relpath: str) -> List[tuple]:
        return list(_MERGED_SUBTREES[classify(relpath)])

    def file_problem(self, path: str, state, relpath: str, newest_path=None, newest=None) -> Optional[str]:
        problem = super().file_problem(path, state, relpath)
        if problem is None and classify(relpath) == ZERO_OPTIM:
            optim = state.get(OPTIMIZER_STATE)
            if isinstance(optim, dict) and SINGLE_PARTITION in optim:  # ZeRO-1/2, merged with --optimizer latest|merge
                problem = None if newest is None else \
                    zero12_structure_problem(path, optim, newest_path, newest.get(OPTIMIZER_STATE) or {})
            else:
                problem = _zero3_partitioning_problem(path, state, newest_path, newest)
        return problem

    # -- optimizer state (see deepspeed_optim) -----------------------------------------------------
    def training_subtrees(self, state: dict, relpath: str) -> List[tuple]:
        kind = classify(relpath)
        if kind == MODEL and isinstance(state.get("optimizer"), dict):  # ZeRO-0: the whole optimizer is here
            return [("optimizer",)]
        if kind == ZERO_OPTIM:
            zero3 = FP32_FLAT_GROUPS in (state.get(OPTIMIZER_STATE) or {})
            # ZeRO-3's flat groups are merged as the weights under every policy: only its moments here
            return [ZERO3_MOMENTS] if zero3 else [(OPTIMIZER_STATE,)]
        return []

    def training_leaf_kind(self, relpath: str, path: tuple) -> Optional[str]:
        kind = classify(relpath)
        return zero0_leaf_kind(path) if kind == MODEL else zero_optim_leaf_kind(path) if kind == ZERO_OPTIM else None

    def training_problems(self, relpath: str, checkpoints: Sequence[CheckpointRef], newest: dict,
                          policy: OptimizerPolicy) -> List[str]:
        """With --optimizer latest|merge: every checkpoint has optimizer state where the newest
        keeps it (ZeRO-0: the model states' ``optimizer``; ZeRO 1-3: moments in the optimizer
        files, for the newest's and, under merge, every source's), partitioned like the
        newest's (compared by file_problem and the leaves)."""
        kind = classify(relpath)
        if not policy.keeps_training_state or kind not in (MODEL, ZERO_OPTIM):
            return []
        zero3 = kind == ZERO_OPTIM and FP32_FLAT_GROUPS in (newest.get(OPTIMIZER_STATE) or {})
        if kind == MODEL and self._inventory(checkpoints[-1]).zero_stage != 0:
            return []
        problems = []
        for index, ckpt in enumerate(checkpoints):
            if index < len(checkpoints) - 1 and policy != OptimizerPolicy.MERGE and kind == ZERO_OPTIM:
                continue  # under latest only the newest's moments are kept (its masters are compared as leaves)
            path = os.path.join(ckpt.path, relpath)
            if zero3 and self._remaps_partitions(relpath, checkpoints) and ckpt is not checkpoints[-1]:
                continue  # a source of another partitioning: checked by _partition_sources
            try:
                state = newest if ckpt is checkpoints[-1] else safe_load(path)
            except InputError as exc:
                problems.append(str(exc))
                continue
            if kind == MODEL and not isinstance(state.get("optimizer"), dict):
                problems.append(f"{path}: no optimizer state (key 'optimizer' is {state.get('optimizer')!r}), needed "
                                f"by --optimizer {policy}")
            elif kind == ZERO_OPTIM and not has_moments(state.get(OPTIMIZER_STATE) or {}, zero3):
                problems.append(f"{path}: no optimizer moments (the base optimizer's state is empty or was removed), "
                                f"needed by --optimizer {policy}")
        return problems

    def master_weights(self, relpath: str, checkpoints: Sequence[CheckpointRef], output: dict,
                       sources: Sequence[SourceLeaves], context: MergeContext) -> MasterWeights:
        """ZeRO-1/2 model states: the module's parameters cut from every source's merged fp32
        masters (deepspeed_optim), rounded; ZeRO-3 optimizer files: their fp32 partitions are
        the weights. Expert and pipeline-layer files: their own tensors (the masters of those
        live in flat groups pmm_dist does not cut into them)."""
        kind, inv = classify(relpath), self._inventory(checkpoints[-1])
        if kind == ZERO_OPTIM:
            zero3 = FP32_FLAT_GROUPS in (output.get(OPTIMIZER_STATE) or {})
            return MasterWeights(details={MODEL_WEIGHTS_FROM: WEIGHTS_FROM_MASTERS}) if zero3 else MasterWeights()
        if kind in (EXPERT, LAYER):
            return from_model_copies("the fp32 masters of expert and pipeline-layer files are not cut from the "
                                     "optimizer's flat groups")
        if kind != MODEL or inv.zero_stage == 3:
            return MasterWeights()
        if inv.zero_stage == 0:
            return zero0_master_weights(output, sources, context)
        mp = _mp_rank(relpath)
        files = []
        for ckpt in checkpoints:
            optim = sorted((_dp_mp(name)[0], os.path.join(ckpt.path, name))
                           for name, k in self._inventory(ckpt).files.items() if k == ZERO_OPTIM and _dp_mp(name)[1] == mp)
            files.append((ckpt.path, [path for _, path in optim]))
        return zero12_master_weights(output, files, context, _shapes(output.get("param_shapes")))

    def real_runs(self, relpath: str, checkpoints: Sequence[CheckpointRef], newest: dict) -> \
            Dict[tuple, List[Tuple[int, int]]]:
        """ZeRO-3 (sources partitioned like the newest): the padding of the fp32 flat groups, of
        their moments and of frozen_param_fragments (see zero3_partitions.value_runs), from
        param_shapes and the partition count. Where the groups do not add up to param_shapes
        (no file DeepSpeed wrote), none: the whole tensors are merged."""
        inv, kind = self._inventory(checkpoints[-1]), classify(relpath)
        count = zero3_partition_count(inv)
        if inv.zero_stage != 3 or count is None or kind not in (MODEL, ZERO_OPTIM):
            return {}
        dp, mp = _dp_mp(relpath)
        runs: Dict[tuple, List[Tuple[int, int]]] = {}
        if kind == MODEL:
            shapes = newest.get("frozen_param_shapes") or {}
            for name, fragment in (newest.get("frozen_param_fragments") or {}).items():
                if name in shapes and isinstance(fragment, torch.Tensor) and \
                        fragment.numel() == stream_numel([math.prod(shapes[name])], count):
                    runs[("frozen_param_fragments", name)] = \
                        value_runs([math.prod(shapes[name])], count, dp, [fragment.numel()])[0]
            return runs
        optim = newest.get(OPTIMIZER_STATE) or {}
        groups = optim.get(FP32_FLAT_GROUPS)
        param_shapes = _shapes(safe_load(os.path.join(checkpoints[-1].path, _zero3_model_name(0, mp))).get("param_shapes"))
        if not isinstance(groups, (list, tuple)) or not isinstance(param_shapes, list):
            return {}
        numels = _param_numels(param_shapes)
        sizes = [group.numel() for group in groups]
        if sum(sizes) != stream_numel(numels, count):
            return {}
        moments = moments_by_group(optim) or []
        state_indices = sorted((optim.get(OPTIMIZER_STATE) or {}).get("state") or {})
        for index, group_runs in enumerate(value_runs(numels, count, dp, sizes)):
            runs[(OPTIMIZER_STATE, FP32_FLAT_GROUPS, index)] = group_runs
            if index < len(moments) and index < len(state_indices):
                for key, moment in moments[index].items():
                    if moment.shape == groups[index].shape:
                        runs[ZERO3_MOMENTS + ("state", state_indices[index], key)] = group_runs
        return runs

    def as_saved(self, skeleton):
        return with_deepspeed_objects(skeleton)  # DeepSpeed's classes in place of the stand-ins read

    def without_training_state(self, state: dict, relpath: str) -> dict:
        kind = classify(relpath)
        if kind == MODEL and state.get("optimizer") is not None:
            return replace_subtree(state, ("optimizer",), lambda value: None)
        if kind == ZERO_OPTIM:
            return remove_subtree(state, ZERO3_MOMENTS)
        return state

    def source_leaves(self, relpath: str, checkpoints: Sequence[CheckpointRef], index: int,
                      newest: dict, policy: OptimizerPolicy = OptimizerPolicy.DROP) -> SourceLeaves:
        """A ZeRO-3 model-states file of a source saved at another data-parallel size: its
        ``module`` (buffers, which every rank saves whole, and empty parameter placeholders)
        from the source's file of the same rank, or of rank 0 where it has fewer ranks; the
        frozen parameters' partitions (``frozen_param_fragments``) remapped from all of its
        ranks' files onto this rank's (gathered in memory: frozen parameters are few)."""
        ckpt, ref = checkpoints[index], self._inventory(checkpoints[-1])
        inv = self._inventory(ckpt)
        if classify(relpath) != MODEL or ref.zero_stage != 3 or _same_partitioning(inv, ref):
            return super().source_leaves(relpath, checkpoints, index, newest, policy)
        dp, mp = _dp_mp(relpath)
        count, out_count = zero3_partition_count(inv), zero3_partition_count(ref)
        files = {rank: os.path.join(ckpt.path, _zero3_model_name(rank, mp)) for rank in range(count)}
        path = files[dp if dp < count else 0]
        state = safe_load(path)
        problem = self.file_problem(path, state, relpath)
        if problem:
            raise InputError(problem)
        leaves = {p: v for p, v in self.merged_leaves(state, relpath).items() if p[0] != "frozen_param_fragments"}
        where: Dict[tuple, str] = {}
        frozen = newest.get("frozen_param_fragments") or {}
        if frozen:
            shapes = newest.get("frozen_param_shapes") or {}
            fragments = {rank: (safe_load(p).get("frozen_param_fragments") or {}) for rank, p in files.items()}
            for name, fragment in frozen.items():
                if name not in shapes or any(name not in f for f in fragments.values()):
                    continue  # reported as missing by the comparison
                gathered = torch.zeros_like(fragment)
                pieces = gather_pieces([math.prod(shapes[name])], out_count, dp, count)
                copy_pieces(pieces, lambda rank: [fragments[rank][name].reshape(-1)], [gathered.view(-1)])
                leaves[("frozen_param_fragments", name)] = gathered
                where[("frozen_param_fragments", name)] = f"{ckpt.path} (frozen_param_fragments of its {count} ranks)"
        return SourceLeaves(path, leaves, where)

    # -- ZeRO partitions across data-parallel sizes -------------------------------------------------
    def _remaps_partitions(self, relpath: str, checkpoints: Sequence[CheckpointRef]) -> bool:
        """A ZeRO optimizer file, and some source is partitioned otherwise than the newest (ZeRO
        1/2 files reach this only under --optimizer latest|merge, where they are merged)."""
        ref = self._inventory(checkpoints[-1])
        return classify(relpath) == ZERO_OPTIM and \
            any(not _same_partitioning(self._inventory(c), ref) for c in checkpoints[:-1])

    def check_unit(self, unit: WorkUnit, checkpoints: Sequence[CheckpointRef]) -> List[str]:
        if not self._remaps_partitions(unit.relpath, checkpoints):
            return super().check_unit(unit, checkpoints)
        try:
            if self._inventory(checkpoints[-1]).zero_stage == 3:
                self._partition_sources(unit.relpath, checkpoints, unit.optimizer)
            else:
                self._zero12_sources(unit.relpath, checkpoints, unit.optimizer)
        except InputError as exc:
            return exc.problems
        return []

    def merge_unit(self, unit: WorkUnit, checkpoints: Sequence[CheckpointRef], destination: str,
                   context: MergeContext) -> UnitResult:
        filtered = context.tensor_filter.include or context.tensor_filter.exclude
        if filtered and classify(unit.relpath) == ZERO_OPTIM and context.optimizer_policy.keeps_training_state:
            raise InputError(f"{os.path.join(checkpoints[-1].path, unit.relpath)}: --include/--exclude select tensors "
                             f"by name, but the fp32 masters and moments here are flat partitions of many parameters; "
                             f"--optimizer {context.optimizer_policy} cannot honour them (use --optimizer drop)")
        if not self._remaps_partitions(unit.relpath, checkpoints):
            return super().merge_unit(unit, checkpoints, destination, context)
        if self._inventory(checkpoints[-1]).zero_stage != 3:
            # placeholders, each partition merged as the file is written (see pickled.merge_unit)
            output, tally = zero12_remap_merge(*self._zero12_sources(unit.relpath, checkpoints,
                                                                     context.optimizer_policy), context)
            details = {}
        else:
            output, num_read, num_merged = self._zero3_remap_merge(unit.relpath, checkpoints, context)
            tally = MergeTally(num_read, num_merged)
            details = {MODEL_WEIGHTS_FROM: WEIGHTS_FROM_MASTERS}
        if context.optimizer_policy == OptimizerPolicy.DROP:
            output = self.without_training_state(output, unit.relpath)
        output = self.as_saved(output)
        num_bytes, sha = write_atomically(os.path.join(destination, unit.relpath), lambda f: save_streamed(f, output))
        return UnitResult(unit.relpath, num_bytes, tally.num_bytes_read, sha, tally.num_tensors, details=details)

    def _zero3_remap_merge(self, relpath: str, checkpoints: Sequence[CheckpointRef], context: MergeContext):
        """This rank's fp32 partitions (and, under --optimizer merge, each moment alike) rebuilt
        from every source's, one source at a time: memory is the output partition (float64) plus
        one gathered copy. Under latest the moments are the newest's (partitioned like it)."""
        policy = context.optimizer_policy
        output, numels, sources = self._partition_sources(relpath, checkpoints, policy)
        out_optim = output[OPTIMIZER_STATE]
        dp, _ = _dp_mp(relpath)
        count = zero3_partition_count(self._inventory(checkpoints[-1]))
        # (what, the output's tensors, how a source file gives its tensors of the same kind)
        streams = [(f"{OPTIMIZER_STATE}.{FP32_FLAT_GROUPS}", out_optim[FP32_FLAT_GROUPS],
                    lambda state: state[OPTIMIZER_STATE][FP32_FLAT_GROUPS])]
        if policy == OptimizerPolicy.MERGE:
            for key in moments_by_group(out_optim)[0]:
                streams.append((f"moment '{key}'", [group[key] for group in moments_by_group(out_optim)],
                                lambda state, key=key: [g[key] for g in moments_by_group(state[OPTIMIZER_STATE])]))
        merged_streams, num_read = [], 0
        for what, out_groups, of_file in streams:
            accumulators = [context.accumulator(group.shape, f"{what} group {i}") for i, group in enumerate(out_groups)]
            for (ckpt, source_count, files), weight in zip(sources, context.weights):
                loaded: Dict[int, list] = {}

                def groups_of(rank: int, files=files, loaded=loaded, of_file=of_file):
                    if rank not in loaded:
                        loaded[rank] = of_file(safe_load(files[rank]))
                    return loaded[rank]

                gathered = [torch.zeros(group.shape, dtype=group.dtype) for group in out_groups]  # padding: zeros
                copied = copy_pieces(gather_pieces(numels, count, dp, source_count), groups_of, gathered)
                for accumulator, group in zip(accumulators, gathered):
                    accumulator.add(group, weight, ckpt.path)
                num_read += copied * out_groups[0].element_size()
                context.on_progress(copied * out_groups[0].element_size())
            merged_streams.append([accumulator.result() for accumulator in accumulators])
        output = replace_subtree(output, (OPTIMIZER_STATE, FP32_FLAT_GROUPS),
                                 lambda groups: type(groups)(merged_streams[0]))
        if policy == OptimizerPolicy.MERGE:
            keys = list(moments_by_group(out_optim)[0])

            def moments(base):
                state = {index: dict(values, **{key: merged_streams[1 + k][position] for k, key in enumerate(keys)})
                         for position, (index, values) in enumerate(sorted(base["state"].items()))}
                return dict(base, state=state)
            output = replace_subtree(output, ZERO3_MOMENTS, moments)
        return output, num_read, sum(len(groups) for groups in merged_streams)

    def _zero12_sources(self, relpath: str, checkpoints: Sequence[CheckpointRef], policy: OptimizerPolicy):
        """For one output ZeRO-1/2 optimizer file when some source has another DP size: what
        zero12_remap_merge needs (see deepspeed_optim.zero12_remap_sources)."""
        dp, mp = _dp_mp(relpath)
        files = []
        for ckpt in checkpoints:
            ranks = sorted((_dp_mp(name)[0], os.path.join(ckpt.path, name))
                           for name, k in self._inventory(ckpt).files.items() if k == ZERO_OPTIM and _dp_mp(name)[1] == mp)
            files.append((ckpt.path, [path for _, path in ranks]))
        return zero12_remap_sources(files, dp, policy)

    def _partition_sources(self, relpath: str, checkpoints: Sequence[CheckpointRef],
                           policy: OptimizerPolicy = OptimizerPolicy.DROP):
        """For one output ZeRO-3 optimizer file: the newest's file (loaded), the parameters'
        element counts (param_shapes order) and per source (checkpoint, partition count, its
        optimizer files by dp rank), each file this output reads checked to hold exactly the
        stream that param_shapes and its partition count imply (and, under --optimizer merge,
        moments of the flat groups' sizes). InputError lists every problem."""
        dp, mp = _dp_mp(relpath)
        newest = checkpoints[-1]
        newest_path = os.path.join(newest.path, relpath)
        shapes_path = os.path.join(newest.path, _zero3_model_name(0, mp))
        shapes = _shapes(safe_load(shapes_path).get("param_shapes"))
        if not isinstance(shapes, list):
            raise InputError(f"{shapes_path}: no 'param_shapes' (is this a ZeRO-3 model-states file?)")
        numels = _param_numels(shapes)
        count = zero3_partition_count(self._inventory(newest))
        output, problem = _flat_partition_problem(newest_path, count, numels, None, newest_path, policy)
        if problem:
            raise InputError(problem)
        dtype = output[OPTIMIZER_STATE][FP32_FLAT_GROUPS][0].dtype
        problems, sources = [], []
        for ckpt in checkpoints:
            inv = self._inventory(ckpt)
            source_count = zero3_partition_count(inv)
            files = {rank: os.path.join(ckpt.path, name) for name, kind in inv.files.items() if kind == ZERO_OPTIM
                     for rank, file_mp in [_dp_mp(name)] if file_mp == mp}
            sources.append((ckpt, source_count, files))
            if ckpt is newest:
                continue
            path = os.path.join(ckpt.path, _zero3_model_name(0, mp))
            if _shapes(safe_load(path).get("param_shapes")) != shapes:
                problems.append(f"{path}: param_shapes differ from the newest checkpoint's ({shapes_path})")
                continue
            for rank in sorted({piece.source_rank for piece in gather_pieces(numels, count, dp, source_count)}):
                if rank not in files:
                    name = _optim_name("bf16_" if inv.bf16 else "", rank, mp, {})
                    problems.append(f"{os.path.join(ckpt.path, name)}: missing file")
                    continue
                _, problem = _flat_partition_problem(files[rank], source_count, numels, dtype, newest_path, policy)
                if problem:
                    problems.append(problem)
        if problems:
            raise InputError(problems)
        return output, numels, sources

    def weight_files(self, checkpoint_dir: str) -> List[str]:
        """The files whose merged tensors carry weights (ZeRO 1/2 optimizer files excluded)."""
        files, _ = _list_files(checkpoint_dir)
        return [name for name, kind in sorted(files.items()) if kind in _MERGED_SUBTREES and
                (kind != ZERO_OPTIM or not _zero3_partitioning_problem(name, safe_load(os.path.join(checkpoint_dir, name))))]

    # -- output ------------------------------------------------------------------------------
    def output_layout(self, newest: CheckpointRef) -> OutputLayout:
        return OutputLayout(OutputKind.RUN_DIRECTORY, TRACKER, _tag(newest))  # the newest source's tag

    def names_checkpoint(self, name: str) -> bool:
        return bool(_TAG_DIR.match(name))

    def tracker_text(self, newest: CheckpointRef) -> str:
        return _tag(newest)  # DeepSpeed writes the bare tag (no newline) and strips what it reads


def _tag(ckpt: CheckpointRef) -> str:
    return os.path.basename(os.path.normpath(ckpt.path))


# -- inventory and layout checks -----------------------------------------------------------------
def _list_files(tag_dir: str) -> Tuple[Dict[str, str], Tuple[str, ...]]:
    files, unknown = {}, []
    for entry in listdir(tag_dir):
        kind = classify(entry) if os.path.isfile(os.path.join(tag_dir, entry)) else None
        if kind:
            files[entry] = kind
        else:
            unknown.append(entry)
    return files, tuple(unknown)


def _is_tag_dir(path: str) -> bool:
    files, _ = _list_files(path)
    return any(kind == MODEL for kind in files.values())


def _reference_file(files: Dict[str, str]) -> Optional[str]:
    """The model-states file DeepSpeed itself reads first: mp rank 0 (ZeRO-3: of dp rank 0)."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if name in files:
            return name
    return None


def _mp_rank(name: str) -> int:
    for pattern, _ in _FILE_PATTERNS:
        match = pattern.match(name)
        if match and match.groupdict().get("mp") is not None:
            return int(match.group("mp"))
    return 0


def _read_inventory(tag_dir: str) -> _Inventory:
    files, unknown = _list_files(tag_dir)
    reference = _reference_file(files)
    if reference is None:
        raise InputError(f"{os.path.join(tag_dir, 'mp_rank_00_model_states.pt')}: missing file (neither it nor "
                         "zero_pp_rank_0_mp_rank_00_model_states.pt exists; is this a DeepSpeed tag directory?)")
    reference_path = os.path.join(tag_dir, reference)
    state = safe_load(reference_path)
    if not isinstance(state, dict) or "module" not in state:
        raise InputError(f"{reference_path}: no 'module' entry (is this a DeepSpeed model-states file?)")
    optim = sorted(name for name, kind in files.items() if kind == ZERO_OPTIM)
    zero3 = any(_ZERO3_MODEL.match(name) for name in files)
    # The optimizer files record the stage; without them (all missing: reported as missing files),
    # the saved ds_config, else the file names.
    stage, stage_source, partition_count = _config_stage(state.get("ds_config")), reference_path, None
    if stage is None:
        stage = 3 if zero3 else 0
    if optim:
        stage_source = os.path.join(tag_dir, optim[0])
        optim_state = safe_load(stage_source).get(OPTIMIZER_STATE)
        if not isinstance(optim_state, dict):
            raise InputError(f"{stage_source}: no '{OPTIMIZER_STATE}' entry (is this a DeepSpeed ZeRO file?)")
        stage = int(optim_state.get("zero_stage", 0))  # the bf16 optimizer without ZeRO records none
        partition_count = optim_state.get("partition_count")
    return _Inventory(files=files, unknown=unknown, reference=reference_path, zero_stage=stage,
                      stage_source=stage_source, dp_world_size=state.get("dp_world_size"),
                      partition_count=partition_count, param_shapes=_shapes(state.get("param_shapes")),
                      num_experts=state.get("num_experts"),
                      # the optimizer files' names; where they were pruned, the saved config
                      bf16=any(n.startswith("bf16_") for n in optim) if optim else _config_bf16(state.get("ds_config")))


def _config_stage(ds_config) -> Optional[int]:
    """The ZeRO stage of a saved ds_config (a dict; a config given as a path is not saved)."""
    if not isinstance(ds_config, dict):
        return None
    zero = ds_config.get("zero_optimization", {})
    try:
        return int(zero.get("stage", 0)) if isinstance(zero, dict) else None
    except (TypeError, ValueError):
        return None


def _config_bf16(ds_config) -> bool:
    section = ds_config.get("bf16") if isinstance(ds_config, dict) else None
    return bool(section.get("enabled")) if isinstance(section, dict) else False


def _shapes(param_shapes):
    """param_shapes as plain tuples (DeepSpeed saves torch.Size or tuples), for comparison."""
    if isinstance(param_shapes, list):
        return [[(name, tuple(shape)) for name, shape in group.items()] for group in param_shapes]
    return param_shapes


def _param_numels(param_shapes) -> List[int]:
    """Each parameter's element count, in param_shapes order (as ``_shapes`` gives them)."""
    return [math.prod(shape) for group in param_shapes for _, shape in group]


def _implied_files(inv: _Inventory) -> Dict[str, str]:
    """The rank files a checkpoint's own metadata says it has (name -> why)."""
    expected: Dict[str, str] = {}
    mp_ranks = sorted({_mp_rank(name) for name, kind in inv.files.items() if kind == MODEL})
    mp_ranks = list(range(max(mp_ranks) + 1)) if mp_ranks else [0]
    dp = inv.dp_world_size if isinstance(inv.dp_world_size, int) else 1
    optim_prefix = "bf16_" if inv.bf16 else ""
    for mp in mp_ranks:
        if inv.zero_stage == 3:
            for dp_rank in range(dp):
                expected[f"zero_pp_rank_{dp_rank}_mp_rank_{mp:02d}_model_states.pt"] = \
                    f"ZeRO-3 with dp_world_size={dp} in {inv.reference}"
        else:
            expected[f"mp_rank_{mp:02d}_model_states.pt"] = f"model-parallel ranks 0..{mp_ranks[-1]}"
        if inv.zero_stage >= 1 or any(kind == ZERO_OPTIM for kind in inv.files.values()):
            for dp_rank in range(dp):
                expected[_optim_name(optim_prefix, dp_rank, mp, inv.files)] = \
                    f"one ZeRO partition per data-parallel rank, dp_world_size={dp} in {inv.reference}"
        if isinstance(inv.num_experts, list):
            for layer, num_experts in enumerate(inv.num_experts):
                for expert in range(int(num_experts)):
                    expected[f"layer_{layer}_expert_{expert}_mp_rank_{mp:02d}_model_states.pt"] = \
                        f"num_experts={inv.num_experts} in {inv.reference}"
    return expected


def _optim_name(prefix: str, dp_rank: int, mp: int, files) -> str:
    """A ZeRO optimizer file's name; DeepSpeed still loads its old name "..._mp_rank_00optim_states.pt"."""
    name = f"{prefix}zero_pp_rank_{dp_rank}_mp_rank_{mp:02d}_optim_states.pt"
    old = name.replace("_optim_states.pt", "optim_states.pt")
    return old if old in files and name not in files else name


def _missing_rank_files(inv: _Inventory) -> List[Tuple[str, str]]:
    """Rank files a checkpoint's own metadata says must exist but do not."""
    return [(name, why) for name, why in sorted(_implied_files(inv).items()) if name not in inv.files]


def _unknown_entries(ckpt: CheckpointRef, inv: _Inventory) -> List[str]:
    return [f"{os.path.join(ckpt.path, name)}: not a DeepSpeed checkpoint file pmm_dist can merge (move it out "
            "of the tag directory)" for name in inv.unknown]


def _same_partitioning(inv: _Inventory, ref: _Inventory) -> bool:
    """Both checkpoints' ZeRO partitions line up element for element."""
    counts_differ = None not in (inv.partition_count, ref.partition_count) and inv.partition_count != ref.partition_count
    return inv.dp_world_size == ref.dp_world_size and not counts_differ


def zero3_partition_count(inv: _Inventory) -> Optional[int]:
    """The one partition count of a ZeRO-3 checkpoint's parameters (None if its groups differ,
    or it disagrees with dp_world_size: then its partitions cannot be remapped)."""
    count = inv.partition_count if inv.partition_count is not None else inv.dp_world_size
    if isinstance(count, (list, tuple)):
        count = count[0] if count and all(c == count[0] for c in count) else None
    return count if isinstance(count, int) and count == inv.dp_world_size else None


def _dp_mp(name: str) -> Tuple[int, int]:
    """(dp rank, mp rank) of a ZeRO rank file's name."""
    for pattern, _ in _FILE_PATTERNS:
        match = pattern.match(name)
        if match and match.groupdict().get("dp") is not None:
            return int(match.group("dp")), int(match.group("mp"))
    raise AssertionError(f"{name} is no ZeRO rank file")


def _zero3_model_name(dp_rank: int, mp: int) -> str:
    return f"zero_pp_rank_{dp_rank}_mp_rank_{mp:02d}_model_states.pt"


def _flat_partition_problem(path: str, count: int, numels: Sequence[int], dtype, newest_path: str,
                            policy: OptimizerPolicy = OptimizerPolicy.DROP):
    """(state, None) if the ZeRO-3 optimizer file at ``path`` holds one rank's stream at
    partition count ``count`` (stage 3, that partition count, 1-D float groups of ``dtype``
    whose sizes add up to what param_shapes imply; with --optimizer latest|merge moments of the
    groups' sizes), else (None, the problem naming file and key)."""
    try:
        state = safe_load(path)
    except InputError as exc:
        return None, str(exc)
    optim = state.get(OPTIMIZER_STATE) if isinstance(state, dict) else None
    groups = optim.get(FP32_FLAT_GROUPS) if isinstance(optim, dict) else None
    if not isinstance(groups, (list, tuple)) or not groups or \
            not all(isinstance(g, torch.Tensor) and g.is_floating_point() and g.dim() == 1 for g in groups):
        return None, f"{path}: no '{OPTIMIZER_STATE}.{FP32_FLAT_GROUPS}' of 1-D float tensors (is this a ZeRO-3 optimizer file?)"
    if int(optim.get("zero_stage", 0)) != 3:
        return None, f"{path}: ZeRO stage {int(optim.get('zero_stage', 0))} in a ZeRO-3 checkpoint"
    recorded = optim.get("partition_count")
    if recorded != count and not (isinstance(recorded, (list, tuple)) and set(recorded) == {count}):
        return None, f"{path}: partition_count {recorded}, but its model states say dp_world_size {count}"
    if dtype is not None and groups[0].dtype != dtype:
        return None, (f"{path}: key '{OPTIMIZER_STATE}.{FP32_FLAT_GROUPS}' has dtype {groups[0].dtype}, the newest "
                      f"checkpoint has {dtype} ({newest_path})")
    held, need = sum(g.numel() for g in groups), stream_numel(numels, count)
    if held != need:
        return None, (f"{path}: key '{OPTIMIZER_STATE}.{FP32_FLAT_GROUPS}' holds {held} elements, but param_shapes "
                      f"({len(numels)} parameters) at partition count {count} need {need} per rank; the "
                      "partitions cannot be mapped")
    if policy.keeps_training_state and (dtype is None or policy == OptimizerPolicy.MERGE):
        moments = moments_by_group(optim)
        if not moments or len(moments) != len(groups) or \
                any(v.shape != g.shape for m, g in zip(moments, groups) for v in m.values()):
            return None, (f"{path}: no optimizer moments of the flat groups' sizes (key '{OPTIMIZER_STATE}."
                          f"{OPTIMIZER_STATE}.state'), needed by --optimizer {policy}")
    return state, None


def _zero3_partitioning_problem(path: str, state: dict, newest_path: Optional[str] = None,
                                newest: Optional[dict] = None) -> Optional[str]:
    """The ZeRO-3 flat partitions of ``state`` can be merged elementwise with the newest's."""
    optim = state.get(OPTIMIZER_STATE) if isinstance(state, dict) else None
    if not isinstance(optim, dict) or not isinstance(optim.get("fp32_flat_groups"), (list, tuple)):
        return f"{path}: no '{OPTIMIZER_STATE}.fp32_flat_groups' (is this a ZeRO-3 optimizer file?)"
    stage = int(optim.get("zero_stage", 0))
    if newest is None:
        return None if stage == 3 else f"{path}: ZeRO stage {stage} in a ZeRO-3 checkpoint"
    ref = newest[OPTIMIZER_STATE]
    if stage != int(ref.get("zero_stage", 0)):
        return f"{path}: ZeRO stage {stage}, but the newest checkpoint has {int(ref['zero_stage'])} ({newest_path})"
    if optim.get("partition_count") != ref.get("partition_count"):
        return (f"{path}: partition_count {optim.get('partition_count')}, but the newest checkpoint has "
                f"{ref.get('partition_count')} ({newest_path}); the flat partitions do not line up")
    return None
