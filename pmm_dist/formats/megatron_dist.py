"""Megatron-core ``torch_dist`` checkpoints (``--ckpt-format torch_dist``): DCP plus Megatron files.

    RUN/latest_checkpointed_iteration.txt
    RUN/iter_0001000/metadata.json      # {"sharded_backend": "torch_dist", ...}; Megatron writes it last
    RUN/iter_0001000/.metadata          # DCP metadata: ShardedTensor keys, global shapes, chunks
    RUN/iter_0001000/__{rank}_{i}.distcp
    RUN/iter_0001000/common.pt          # non-sharded state: args, iteration, optimizer param_groups, ...

The sharded part is merged exactly like plain DCP (see ``dcp.py``): chunk by chunk, into one
``__{k}_0.distcp`` per merging rank, keeping every tensor's global shape and the newest's
chunking (Megatron reshards on load, so the merged checkpoint loads at any TP/PP). Checkpoints
saved at other TP/PP (a run resumed on another layout) chunk tensors differently and are mapped
onto the newest's chunks from the chunk boxes; their layout, for messages, is read from the
``args`` in ``common.pt``. ShardedObjects (``_extra_state``,
``rng_state``) are bytes entries and come from the newest checkpoint. Training state: the
``optimizer.*`` keys (``chained_{i}.optimizer.*`` for a chained optimizer), the ``rng_state``
objects and the ``optimizer`` / ``opt_param_scheduler`` / ``rng_state`` entries of ``common.pt``;
what ``--optimizer`` makes of it is in ``dcp_state``. megatron-core's optimizer state keys:

    optimizer.state.fp32_param.<model key>   fp32 master, model space (non-distributed
                                              mixed-precision optimizer; the deprecated
                                              fully_sharded_model_space distributed format)
    optimizer.state.param.<model key>        fp32 master, model space (fully_reshardable)
    optimizer.state.<exp_avg|exp_avg_sq|...>.<model key>                moments, model space
    optimizer.distributed.dp_group_idx_<i>.gbuf_idx_<g>.dtype_<dt>.bucket_idx_<b>.<param|exp_avg|...>
                                              flat bucket state (dp_reshardable, the default);
                                              the ShardedObjects ...per_bucket_numel(_unpadded)
                                              describe the buckets, ...optimizer the param groups

A model tensor with a model-space master gets the merged master rounded to its dtype. The bucket
state maps to parameters only through the optimizer's internal layout, which the checkpoint does
not store: it merges elementwise, only between checkpoints whose buckets (``per_bucket_numel``)
are the same, and the model weights then come from the merged model tensors. Under latest/merge
the checkpoints must also agree on the distributed-optimizer sharding type (``content_metadata``
in ``common.pt``) and the number of param groups. The step counters, param groups and scheduler
(``common.pt``, ShardedObjects) are the newest's. The output is a run directory: ``iter_{N:07d}/``
(staged, then renamed into place in one step) and the tracker, written last.
"""
import json
import os
import re
from typing import Dict, List, Optional, Sequence

import torch

from ..errors import InputError
from ..io.atomic import copy_atomically, write_atomically
from ..io.safe_load import safe_load
from ..plan.types import CheckpointRef, OptimizerPolicy, UnitResult
from .common import iteration_of, listdir, sorted_unique
from .dcp import DcpFormat, storage_index
from .dcp_reads import read_object
from .dcp_state import COUNTER_NAMES, MASTER, MOMENT, STATE, WEIGHTS, is_float_tensor
from .megatron import (TRACKER, TRAINING_STATE_KEYS, _ITER_DIR, IterationTracker, parallel_degrees, read_tracker,
                       run_identity_from_args)

CONFIG_FILE = "metadata.json"          # megatron.core.dist_checkpointing.core.CONFIG_FNAME
COMMON_FILE = "common.pt"              # megatron.core.dist_checkpointing.strategies.common.COMMON_STATE_FNAME
SHARDED_BACKEND = "torch_dist"

_CHAINED = re.compile(r"chained_\d+\.")     # ChainedOptimizer's prefix when it holds several
MASTER_PREFIXES = ("optimizer.state.fp32_param.", "optimizer.state.param.")
MASTER_NAMES = frozenset({"param", "fp32_param"})
# ShardedObjects that describe the distributed optimizer's buckets and its param groups.
_BUCKET_SIZES = re.compile(r"optimizer\.distributed\.dp_group_idx_\d+\.per_bucket_numel(_unpadded)?/")
_DISTRIBUTED_COMMON = re.compile(r"optimizer\.distributed\.dp_group_idx_\d+\.optimizer/")
SHARDING_TYPE = "distrib_optim_sharding_type"  # megatron-core's content_metadata entry


def unchained(fqn: str) -> str:
    """The key without a ChainedOptimizer's ``chained_{i}.`` prefix."""
    match = _CHAINED.match(fqn)
    return fqn[match.end():] if match else fqn


def optimizer_state_name(fqn: str) -> Optional[str]:
    """The state entry an optimizer key holds (``param``, ``exp_avg``, ...), None if not one."""
    fqn = unchained(fqn)
    if fqn.startswith("optimizer.state."):
        parts = fqn.split(".", 3)
        return parts[2] if len(parts) == 4 else None
    if fqn.startswith("optimizer.distributed.") and "/" not in fqn:
        return fqn.rsplit(".", 1)[1]
    return None


def sharded_backend(ckpt_dir: str) -> Optional[str]:
    """The ``sharded_backend`` named by ``metadata.json``, or None if there is no readable one."""
    try:
        with open(os.path.join(ckpt_dir, CONFIG_FILE)) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config.get("sharded_backend") if isinstance(config, dict) else None


def is_torch_dist_checkpoint(ckpt_dir: str) -> bool:
    return sharded_backend(ckpt_dir) == SHARDED_BACKEND


class MegatronDistFormat(IterationTracker, DcpFormat):
    name = "megatron-dist"
    description = ("Megatron-core torch_dist: latest_checkpointed_iteration.txt + iter_*/ with metadata.json, "
                   ".metadata, __*_*.distcp, common.pt")
    training_state_keys = tuple(TRAINING_STATE_KEYS)
    optimizer_keys = ("optimizer",)

    def __init__(self):
        super().__init__()
        self._layout_cache: Dict[str, Dict[str, object]] = {}

    # -- optimizer state (see the module docstring) ----------------------------------------
    def is_training_state(self, metadata, fqn: str) -> bool:
        return super().is_training_state(metadata, unchained(fqn))

    def is_optimizer_state(self, metadata, fqn: str) -> bool:
        return super().is_optimizer_state(metadata, unchained(fqn))

    def state_role(self, metadata, fqn: str) -> str:
        if not self.is_training_state(metadata, fqn):
            return WEIGHTS
        name = optimizer_state_name(fqn)
        if name is None or name in COUNTER_NAMES or not is_float_tensor(metadata.state_dict_metadata[fqn]):
            return STATE
        return MASTER if name in MASTER_NAMES else MOMENT

    def model_masters(self, metadata) -> Dict[str, str]:
        entries = metadata.state_dict_metadata
        masters = {}
        for fqn, entry in entries.items():
            name = unchained(fqn)
            for prefix in MASTER_PREFIXES:
                model = name[len(prefix):] if name.startswith(prefix) else None
                if model and is_float_tensor(entry) and is_float_tensor(entries.get(model)) \
                        and self.state_role(metadata, model) == WEIGHTS:
                    masters[model] = fqn
        return masters

    def parameter_of(self, metadata, fqn: str) -> Optional[str]:
        name = unchained(fqn)
        if not name.startswith("optimizer.state."):
            return None
        parts = name.split(".", 3)
        return parts[3] if len(parts) == 4 and parts[3] in metadata.state_dict_metadata else None

    def optimizer_structure_problems(self, checkpoints: Sequence[CheckpointRef],
                                     optimizer_policy: OptimizerPolicy) -> List[str]:
        """Under latest/merge, every checkpoint's distributed-optimizer sharding type, number of
        param groups and (where bucket state is merged) bucket sizes must be the newest's."""
        if optimizer_policy == OptimizerPolicy.DROP:
            return []
        newest_ref = checkpoints[-1]
        reference = self._optimizer_structure(newest_ref)
        problems, buckets_differ = [], False
        for ckpt in checkpoints[:-1]:
            other = self._optimizer_structure(ckpt)
            differing = [what for what in reference if what in other and other[what] != reference[what]]
            if differing:
                buckets_differ |= any(_BUCKET_SIZES.search(what) for what in differing)
                problems.append(f"{ckpt.path}: another optimizer structure than the newest checkpoint "
                                f"{newest_ref.path}: " + "; ".join(
                                    f"{what} is {other[what]!r}, the newest's {reference[what]!r}" for what in differing))
        if problems:
            problems.append(
                f"--optimizer {optimizer_policy} merges optimizer state only between checkpoints of one optimizer "
                "structure" + (" (the distributed optimizer's dp_reshardable bucket state merges elementwise, so "
                               "every checkpoint needs the newest's buckets: same DP size and bucket size)"
                               if buckets_differ else "") + "; merge such checkpoints, or use --optimizer drop")
        return problems

    def _optimizer_structure(self, ckpt: CheckpointRef) -> Dict[str, object]:
        """What of the optimizer's structure the checkpoint records, by name: the sharding type
        and param groups (common.pt), the buckets and their param groups (ShardedObjects)."""
        structure: Dict[str, object] = {}
        if os.path.isfile(os.path.join(ckpt.path, COMMON_FILE)):
            common = _common_state(ckpt.path)
            content = common.get("content_metadata")
            if isinstance(content, dict) and content.get(SHARDING_TYPE) is not None:
                structure["the distributed optimizer's sharding type (content_metadata in common.pt)"] = \
                    content[SHARDING_TYPE]
            groups = _param_group_counts(common.get("optimizer"))
            if groups:
                structure["the number of param groups (common.pt)"] = groups
        metadata = self.metadata(ckpt)
        index = storage_index(metadata)
        for fqn in metadata.state_dict_metadata:
            name, info = unchained(fqn), index.get((fqn, None))
            if info is None:  # reported by the storage checks
                continue
            if _BUCKET_SIZES.match(name):
                structure[f"'{fqn}'"] = read_object(ckpt.path, info, fqn)
            elif _DISTRIBUTED_COMMON.match(name):
                groups = _param_group_counts(read_object(ckpt.path, info, fqn))
                if groups:
                    structure[f"the number of param groups ('{fqn}')"] = groups
        return structure

    # -- discovery ---------------------------------------------------------------------------
    @classmethod
    def recognizes(cls, path: str) -> bool:
        # A torch_dist save still in progress has its DCP files and common.pt but no metadata.json
        # yet: it is ours (so detection does not call it plain DCP), and discover refuses it.
        if is_torch_dist_checkpoint(path) or all(os.path.isfile(os.path.join(path, f)) for f in (COMMON_FILE, ".metadata")):
            return True
        return any(_ITER_DIR.match(e) and is_torch_dist_checkpoint(os.path.join(path, e)) for e in listdir(path))

    @classmethod
    def being_written(cls, run_dir: str) -> bool:
        # Megatron writes common.pt and the DCP files first and metadata.json last.
        return any(_ITER_DIR.match(e) and not is_torch_dist_checkpoint(os.path.join(run_dir, e)) and
                   any(os.path.isfile(os.path.join(run_dir, e, name)) for name in (COMMON_FILE, ".metadata"))
                   for e in listdir(run_dir))

    def discover(self, sources: Sequence[str]) -> List[CheckpointRef]:
        if len(sources) == 1 and not is_torch_dist_checkpoint(sources[0]):
            return self._discover_run(sources[0])
        refs = []
        for src in sources:
            if not is_torch_dist_checkpoint(src):
                found = sharded_backend(src)
                raise InputError(f"{src}: not a Megatron torch_dist checkpoint directory ("
                                 + (f"{CONFIG_FILE} names sharded_backend {found!r})" if found else
                                    f"no readable {CONFIG_FILE}; Megatron writes it last, so the checkpoint "
                                    "may be incomplete)"))
            refs.append(CheckpointRef(self._iteration_of(src), os.path.abspath(src)))
        return sorted_unique(refs)

    def _discover_run(self, run_dir: str) -> List[CheckpointRef]:
        tracker_path = os.path.join(run_dir, TRACKER)
        newest = read_tracker(tracker_path) if os.path.isfile(tracker_path) else None
        refs = []
        for entry in listdir(run_dir):
            match = _ITER_DIR.match(entry)
            path = os.path.join(run_dir, entry)
            # Past the tracker, or without metadata.json: still being written by the trainer.
            if match and (newest is None or int(match.group(1)) <= newest) and is_torch_dist_checkpoint(path):
                refs.append(CheckpointRef(int(match.group(1)), os.path.abspath(path)))
        if newest is not None and not any(ref.iteration == newest for ref in refs):
            raise InputError(f"{tracker_path} names iteration {newest}, but "
                             f"{os.path.join(run_dir, f'iter_{newest:07d}')} is not a complete torch_dist checkpoint "
                             f"(missing, or no {CONFIG_FILE})")
        if not refs:
            raise InputError(f"{run_dir}: no torch_dist checkpoints (iter_*/ with {CONFIG_FILE}) found")
        return refs

    @staticmethod
    def _iteration_of(ckpt_dir: str) -> int:
        return iteration_of(ckpt_dir, _ITER_DIR, lambda: (os.path.join(ckpt_dir, COMMON_FILE), _common_state(ckpt_dir)),
                            "iteration", hint=" (name its directory iter_NNNNNNN)")

    # -- layout ------------------------------------------------------------------------------
    def layout(self, checkpoints: Sequence[CheckpointRef]) -> Dict[str, object]:
        layout = {"backend": SHARDED_BACKEND}
        path = os.path.join(checkpoints[-1].path, COMMON_FILE)
        args = _common_state(checkpoints[-1].path).get("args") if os.path.isfile(path) else None
        if args is not None:  # the run's layout when saved; the merged checkpoint loads at any
            layout.update(zip(("saved_tp", "saved_pp", "saved_ep"), parallel_degrees(args)))
        layout.update(super().layout(checkpoints))
        return layout

    def run_identity(self, ckpt: CheckpointRef) -> Dict[str, object]:
        path = os.path.join(ckpt.path, COMMON_FILE)
        return run_identity_from_args(_common_state(ckpt.path).get("args")) if os.path.isfile(path) else {}

    def describe_layout(self, layout: Dict[str, object]) -> str:
        if "tp" not in layout:
            return super().describe_layout(layout)
        return f"TP={layout['tp']}, PP={layout['pp']}, EP={layout['ep']}"

    def checkpoint_layout(self, ckpt: CheckpointRef) -> Dict[str, object]:
        """TP/PP/EP as saved in the checkpoint's args (common.pt), else what the DCP files tell."""
        path = os.path.join(ckpt.path, COMMON_FILE)
        if ckpt.path not in self._layout_cache:
            args = None
            if os.path.isfile(path):
                try:
                    args = _common_state(ckpt.path).get("args")
                except InputError:
                    args = None  # reported where common.pt is needed (the newest's)
            self._layout_cache[ckpt.path] = (dict(zip(("tp", "pp", "ep"), parallel_degrees(args))) if args is not None
                                             else super().checkpoint_layout(ckpt))
        return self._layout_cache[ckpt.path]

    def extra_plan_problems(self, checkpoints: Sequence[CheckpointRef], optimizer_policy: OptimizerPolicy) -> List[str]:
        path = os.path.join(checkpoints[-1].path, COMMON_FILE)
        if not os.path.isfile(path):
            return [f"{path}: missing file (the common, non-sharded state is taken from the newest checkpoint)"]
        return []

    # -- output ------------------------------------------------------------------------------
    def finalize(self, staged_dir: str, checkpoints: Sequence[CheckpointRef],
                 results: Sequence[UnitResult], optimizer_policy: OptimizerPolicy) -> List[UnitResult]:
        written = super().finalize(staged_dir, checkpoints, results, optimizer_policy)  # .metadata
        newest = checkpoints[-1].path
        source, target = os.path.join(newest, COMMON_FILE), os.path.join(staged_dir, COMMON_FILE)
        common = safe_load(source, mmap=False) if optimizer_policy == OptimizerPolicy.DROP else None
        if isinstance(common, dict) and any(key in self.training_state_keys for key in common):
            kept = {key: value for key, value in common.items() if key not in self.training_state_keys}
            num_bytes, sha = write_atomically(target, lambda f: torch.save(kept, f))
        else:
            num_bytes, sha = copy_atomically(source, target)
        written.append(UnitResult(COMMON_FILE, num_bytes, num_bytes, sha, 0))
        # metadata.json last, as Megatron does: it marks the directory as a complete checkpoint.
        num_bytes, sha = copy_atomically(os.path.join(newest, CONFIG_FILE), os.path.join(staged_dir, CONFIG_FILE))
        written.append(UnitResult(CONFIG_FILE, num_bytes, num_bytes, sha, 0))
        return written


def _param_group_counts(state) -> List[int]:
    """The length of every ``param_groups`` list in a (nested) optimizer state dict."""
    found: List[int] = []
    if isinstance(state, dict):
        for key, value in state.items():
            if key == "param_groups" and isinstance(value, (list, tuple)):
                found.append(len(value))
            else:
                found += _param_group_counts(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            found += _param_group_counts(value)
    return found


def _common_state(ckpt_dir: str) -> dict:
    state = safe_load(os.path.join(ckpt_dir, COMMON_FILE), mmap=False)
    if not isinstance(state, dict):
        raise InputError(f"{os.path.join(ckpt_dir, COMMON_FILE)}: expected a dict, found {type(state).__name__}")
    return state
