"""What ``--optimizer`` makes of each key of a chunked checkpoint (DCP, torch_dist).

Every key of the newest checkpoint's ``.metadata`` has a role, which the format names (its
keys follow its framework's conventions):

    WEIGHTS  the model (not training state): float tensors merged, the rest the newest's
    MASTER   fp32 master weights in the optimizer state (Megatron's ``optimizer.state.param.*``,
             ``fp32_param.*`` and the distributed optimizer's bucket ``...param``)
    MOMENT   any other floating-point optimizer state (Adam's exp_avg, exp_avg_sq, momentum...)
    STATE    everything else of the training state: step counters (float or not), param
             groups, scheduler, RNG, bytes entries

and the policy decides, per role, what the output holds:

                drop        latest            merge
    WEIGHTS     merged      merged            merged
    MASTER      (left out)  merged            merged
    MOMENT      (left out)  newest's          merged
    STATE       (left out)  newest's          newest's

Where a model tensor has a model-space master (same global shape), its merged value is the
merged master rounded to the model dtype, under every policy: the masters are the weights the
trainer updates, the model copy is their rounding.
"""
import re
from typing import Optional, Tuple

from ..plan.types import Action, OptimizerPolicy
from .common import LazyModule

dcp_metadata = LazyModule("torch.distributed.checkpoint.metadata")  # imported by a DCP merge only

WEIGHTS, MASTER, MOMENT, STATE = "weights", "master", "moment", "state"

# Optimizer state entries that count steps: taken from the newest even when stored as floats
# (torch's Adam keeps ``step`` as a float32 scalar tensor).
COUNTER_NAMES = frozenset({"step", "common_step"})

MODEL_COPIES, FP32_MASTERS = "model copies", "fp32 masters"


def is_float_tensor(entry) -> bool:
    return isinstance(entry, dcp_metadata.TensorStorageMetadata) and entry.properties.dtype.is_floating_point


def state_path(metadata, fqn: str) -> Tuple[str, ...]:
    """The key's path in the saved state dict, each name split at '.': DCP's flattening map when
    its default planner saved it (an entry may itself be a dotted name: torchtitan saves the
    optimizer state flattened, ``("optimizer", "state.<param fqn>.exp_avg")``), else the name
    split at '.' and '/' (Megatron's keys)."""
    mapping = metadata.planner_data
    if isinstance(mapping, dict) and isinstance(mapping.get(fqn), (tuple, list)) and mapping[fqn]:
        return tuple(part for name in mapping[fqn] for part in str(name).split("."))
    return tuple(re.split(r"[./]", fqn))


def dcp_role(metadata, fqn: str, training_state_keys, optimizer_keys) -> str:
    """A plain DCP (``get_state_dict``: FSDP2, torchtitan) key's role: the optimizer's per-
    parameter state is ``<optimizer>.state.<param fqn>.<name>``; there are no separate masters
    (the parameters themselves are usually fp32)."""
    path = state_path(metadata, fqn)
    if path[0] not in training_state_keys:
        return WEIGHTS
    if (path[0] in optimizer_keys and len(path) >= 3 and path[1] == "state" and path[-1] not in COUNTER_NAMES
            and is_float_tensor(metadata.state_dict_metadata[fqn])):
        return MOMENT
    return STATE


def action_for(role: str, entry, policy: OptimizerPolicy) -> Optional[Action]:
    """What becomes of a key of ``role`` under ``policy`` (the table above); None: left out."""
    if role == WEIGHTS:
        return Action.MERGE if is_float_tensor(entry) else Action.COPY
    if policy == OptimizerPolicy.DROP:
        return None
    if role == MASTER or (role == MOMENT and policy == OptimizerPolicy.MERGE):
        return Action.MERGE
    return Action.COPY
