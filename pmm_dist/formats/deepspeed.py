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
source's non-tensor state (ds_config, param_shapes, global_steps, client state, ...):

- model states: the float tensors of ``module`` (ZeRO 0-2 weights and buffers; ZeRO-3 buffers and
  empty placeholders) and ``frozen_param_fragments``. ``--optimizer drop`` sets the non-ZeRO
  ``optimizer`` entry to None, as DeepSpeed itself saves it under ZeRO.
- expert and pipeline layer files: every float tensor.
- ZeRO-3 optimizer files: the weights live only here, so the fp32 flat partitions
  (``fp32_flat_groups``) are merged elementwise, which is exact because every source must have the
  same partitioning (same ZeRO stage, partition count, param_shapes and flat sizes; anything else is
  refused). The Adam moments (``optimizer_state_dict.optimizer_state_dict``) are removed under
  ``--optimizer drop`` and kept from the newest checkpoint under ``--optimizer latest``.
- ZeRO 1/2 (and bf16-optimizer) optimizer files and MoE ``expp_rank_*`` files hold no weights that
  ``load_checkpoint(load_module_only=True)`` reads: dropped, or copied unchanged with
  ``--optimizer latest``.

Validation, before anything is written: the selected checkpoints must share one ZeRO stage, one
partition count (dp_world_size, partition_count) and param_shapes; the newest must hold every rank
file its own metadata implies (dp_world_size, num_experts, model-parallel ranks 0..N-1); every other
checkpoint must hold the same files the merge reads (the optimizer files of older ZeRO 0-2
checkpoints are never read, so pruning them is fine); a file that is no DeepSpeed checkpoint file
is refused. Tensor names, shapes and dtypes are compared per file by the rank that merges it.
"""
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import InputError
from ..io.safe_load import register_framework_globals, safe_load
from ..io.tree import remove_subtree, replace_subtree
from ..plan.types import Action, CheckpointRef, OptimizerPolicy, OutputKind, OutputLayout, WorkUnit
from .common import discover_run_or_checkpoints, listdir, number_in_name
from .pickled import PickledFileFormat

TRACKER = "latest"


def _deepspeed_safe_globals() -> list:
    """DeepSpeed's classes that its checkpoints pickle (loss scaler, ZeRO stage, fragment addresses)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


register_framework_globals("deepspeed.", _deepspeed_safe_globals)
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
OPTIMIZER_STATE = "optimizer_state_dict"
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

    def __init__(self):
        self._inventories: Dict[str, _Inventory] = {}

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
        named = number_in_name(tag_dir, _TAG_DIR)
        if named is not None:
            return named
        files, _ = _list_files(tag_dir)
        path = os.path.join(tag_dir, _reference_file(files) or "mp_rank_00_model_states.pt")
        steps = safe_load(path).get("global_steps")
        if not isinstance(steps, int):
            raise InputError(f"{path}: key 'global_steps' missing; cannot order this checkpoint")
        return steps

    # -- layout ------------------------------------------------------------------------------
    def _inventory(self, ckpt: CheckpointRef) -> _Inventory:
        if ckpt.path not in self._inventories:
            self._inventories[ckpt.path] = _read_inventory(ckpt.path)
        return self._inventories[ckpt.path]

    def layout(self, checkpoints: Sequence[CheckpointRef]) -> Dict[str, object]:
        inv = self._inventory(checkpoints[-1])
        kinds = list(inv.files.values())
        return {"zero_stage": inv.zero_stage, "dp": inv.dp_world_size, "bf16": inv.bf16,
                "mp": len({_mp_rank(name) for name, kind in inv.files.items() if kind == MODEL}),
                "experts": kinds.count(EXPERT), "pipeline_layers": kinds.count(LAYER), "files": len(kinds)}

    def plan_units(self, checkpoints: Sequence[CheckpointRef], optimizer_policy: OptimizerPolicy,
                   world_size: int = 1) -> List[WorkUnit]:
        newest = checkpoints[-1]
        reference = self._inventory(newest)

        def needed(name: str, of_newest: bool) -> bool:
            """Files the merge reads: weights everywhere; the newest's optimizer files to copy them.
            (Pruned optimizer states of older ZeRO 0-2 checkpoints are fine: never read.)"""
            kind = classify(name)
            if kind in (MODEL, EXPERT, LAYER) or (kind == ZERO_OPTIM and reference.zero_stage == 3):
                return True
            return of_newest and optimizer_policy == OptimizerPolicy.LATEST

        # The newest checkpoint is the reference: first its own completeness (from its metadata) ...
        missing = [(name, why) for name, why in _missing_rank_files(reference) if needed(name, True)]
        problems = _unknown_entries(newest, reference)
        problems += [f"{os.path.join(newest.path, name)}: missing file ({why})" for name, why in missing]
        expected = {name for name in set(reference.files) | {name for name, _ in missing} if needed(name, False)}
        # ... then every other checkpoint against it.
        for ckpt in checkpoints[:-1]:
            try:
                inv = self._inventory(ckpt)
            except InputError as exc:  # e.g. a tag directory without its model states: report them all
                problems += exc.problems
                continue
            problems += _unknown_entries(ckpt, inv)
            mismatch = _layout_mismatch(inv, reference)
            if mismatch:
                problems.append(mismatch)
                continue
            found = {name for name in inv.files if needed(name, False)}
            problems += [f"{os.path.join(ckpt.path, name)}: missing file (present in the newest checkpoint {newest.path})"
                         for name in sorted(expected - found)]
            problems += [f"{os.path.join(ckpt.path, name)}: unexpected file (absent from the newest checkpoint "
                         f"{newest.path})" for name in sorted(found - expected)]
        if problems:
            raise InputError(problems)
        units = []
        for name in sorted(reference.files):
            if not needed(name, True):
                continue
            kind = classify(name)
            merged = kind in (MODEL, EXPERT, LAYER) or kind == ZERO_OPTIM and reference.zero_stage == 3
            units.append(WorkUnit(name, os.path.getsize(os.path.join(newest.path, name)),
                                  action=Action.MERGE if merged else Action.COPY))
        return units

    # -- per-file hooks of the pickled-file skeleton ----------------------------------------------
    def merged_subtrees(self, state: dict, relpath: str) -> List[tuple]:
        return list(_MERGED_SUBTREES[classify(relpath)])

    def file_problem(self, path: str, state, relpath: str, newest_path=None, newest=None) -> Optional[str]:
        problem = super().file_problem(path, state, relpath)
        if problem is None and classify(relpath) == ZERO_OPTIM:
            problem = _zero3_partitioning_problem(path, state, newest_path, newest)
        return problem

    def without_training_state(self, state: dict, relpath: str) -> dict:
        kind = classify(relpath)
        if kind == MODEL and state.get("optimizer") is not None:
            return replace_subtree(state, ("optimizer",), lambda value: None)
        if kind == ZERO_OPTIM:
            return remove_subtree(state, ZERO3_MOMENTS)
        return state

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
                      num_experts=state.get("num_experts"), bf16=any(n.startswith("bf16_") for n in optim))


def _config_stage(ds_config) -> Optional[int]:
    """The ZeRO stage of a saved ds_config (a dict; a config given as a path is not saved)."""
    if not isinstance(ds_config, dict):
        return None
    zero = ds_config.get("zero_optimization", {})
    try:
        return int(zero.get("stage", 0)) if isinstance(zero, dict) else None
    except (TypeError, ValueError):
        return None


def _shapes(param_shapes):
    """param_shapes as plain tuples (DeepSpeed saves torch.Size or tuples), for comparison."""
    if isinstance(param_shapes, list):
        return [[(name, tuple(shape)) for name, shape in group.items()] for group in param_shapes]
    return param_shapes


def _missing_rank_files(inv: _Inventory) -> List[Tuple[str, str]]:
    """Rank files the newest checkpoint's own metadata says must exist but do not."""
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
                expected[f"{optim_prefix}zero_pp_rank_{dp_rank}_mp_rank_{mp:02d}_optim_states.pt"] = \
                    f"one ZeRO partition per data-parallel rank, dp_world_size={dp} in {inv.reference}"
        if isinstance(inv.num_experts, list):
            for layer, num_experts in enumerate(inv.num_experts):
                for expert in range(int(num_experts)):
                    expected[f"layer_{layer}_expert_{expert}_mp_rank_{mp:02d}_model_states.pt"] = \
                        f"num_experts={inv.num_experts} in {inv.reference}"
    # DeepSpeed still loads optimizer files under their old name "..._mp_rank_00optim_states.pt".
    return [(name, why) for name, why in sorted(expected.items())
            if name not in inv.files and name.replace("_optim_states.pt", "optim_states.pt") not in inv.files]


def _unknown_entries(ckpt: CheckpointRef, inv: _Inventory) -> List[str]:
    return [f"{os.path.join(ckpt.path, name)}: not a DeepSpeed checkpoint file pmm_dist can merge (move it out "
            "of the tag directory)" for name in inv.unknown]


def _layout_mismatch(inv: _Inventory, ref: _Inventory) -> Optional[str]:
    if inv.zero_stage != ref.zero_stage:
        return (f"{inv.stage_source}: ZeRO stage {inv.zero_stage}, but the newest checkpoint has stage "
                f"{ref.zero_stage} ({ref.stage_source}); checkpoints of different ZeRO stages are not merged")
    partitioned = ref.zero_stage >= 1 or ref.partition_count is not None
    counts_differ = None not in (inv.partition_count, ref.partition_count) and inv.partition_count != ref.partition_count
    if partitioned and (inv.dp_world_size != ref.dp_world_size or counts_differ):
        source, ref_source = (inv.stage_source, ref.stage_source) if counts_differ else (inv.reference, ref.reference)
        return (f"{source}: dp_world_size {inv.dp_world_size}, partition_count {inv.partition_count}, but the "
                f"newest checkpoint has dp_world_size {ref.dp_world_size}, partition_count {ref.partition_count} "
                f"({ref_source}); ZeRO partitions of different partition counts do not line up and are not merged")
    if inv.param_shapes != ref.param_shapes:
        return (f"{inv.reference}: param_shapes differ from the newest checkpoint's ({ref.reference}): another "
                "model or parameter order, so the ZeRO flat partitions do not line up")
    return None


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
