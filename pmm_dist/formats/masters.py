"""fp32 master weights and optimizer state in pickled shard files: what merges under each
``--optimizer`` policy, and which model tensor each master is.

Under mixed precision the trainer's weights are the fp32 masters the optimizer keeps; the
model's bf16/fp16 tensors are their rounding (Megatron copies masters to the model after every
step; so does DeepSpeed). The formats therefore write merged model weights as the merged masters
rounded to the model's dtype wherever every source has masters, and say so in the unit's details.

Leaves of an optimizer state are of three kinds: MASTER (fp32 master weights: merged under every
policy that keeps training state, and used for the model weights under all), MOMENT (every other
floating-point state: merged under ``merge`` only) and the rest (step counters, hyperparameters,
loss scale: the newest's). ``step`` (and NAdam's ``mu_product``) are counters even where a torch
optimizer keeps them as float tensors.
"""
import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from ..io.torch_save_stream import Placeholder
from ..merge.kernel import merged_requires_grad, release_pages
from ..plan.types import (MODEL_WEIGHTS_BY_OLDER, MODEL_WEIGHTS_FROM, MODEL_WEIGHTS_NOTE, WEIGHTS_FROM_MASTERS,
                          WEIGHTS_FROM_MODEL, OptimizerPolicy)

MASTER, MOMENT = "master", "moment"
COUNTER_KEYS = ("step", "mu_product")


def is_counter(path: tuple) -> bool:
    return bool(path) and path[-1] in COUNTER_KEYS


def merges(kind: Optional[str], policy: OptimizerPolicy) -> bool:
    """Whether a training-state leaf of ``kind`` is merged under ``policy``."""
    return (kind == MASTER and policy.keeps_training_state) or (kind == MOMENT and policy == OptimizerPolicy.MERGE)


@dataclass
class MasterWeights:
    """What a unit's masters give its model file: model leaf path -> the merged master rounded
    to the model tensor's dtype, and the unit's details (where its weights came from). A leaf is
    a tensor, or a Placeholder merged when the output file is written (io/torch_save_stream)."""
    weights: Dict[tuple, object] = field(default_factory=dict)
    details: Dict[str, object] = field(default_factory=dict)
    # what reading the masters cost beyond the unit's own leaves (complete once the file is written)
    num_bytes_read: int = 0


def from_masters(weights: Dict[tuple, object], num_bytes_read: int = 0) -> MasterWeights:
    return MasterWeights(weights, {MODEL_WEIGHTS_FROM: WEIGHTS_FROM_MASTERS}, num_bytes_read)


def from_model_copies(note: str = "", *, by_older: bool = False) -> MasterWeights:
    """The model files' own tensors are merged; ``note`` says why not the masters (if it matters).

    ``by_older``: an older source decided it (it has no masters, or another layout or optimizer
    structure than the newest), so a merge of other checkpoints with the same newest may take
    the masters. The watcher, which reads only some checkpoints of its window, then merges the
    unit from the whole window (watcher.update). Otherwise the newest alone decides (it has no
    masters; its file kind has none pmm_dist can cut)."""
    details = {MODEL_WEIGHTS_FROM: WEIGHTS_FROM_MODEL}
    if note:
        details[MODEL_WEIGHTS_NOTE] = note
    if by_older:
        details[MODEL_WEIGHTS_BY_OLDER] = True
    return MasterWeights({}, details)


def rounded(master: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A merged fp32 master as the model tensor ``like`` holds it (its dtype and shape): the
    rounding the trainer itself does when it copies masters into the model. Detached, flagged as
    ``like`` is: masters saved as parameters (requires_grad, as DeepSpeed saves them) would
    otherwise make this an autograd graph that keeps the whole fp32 master alive."""
    rounded_master = master.detach().to(torch.float32).reshape(like.shape).to(like.dtype, copy=True)  # one pass
    return rounded_master.requires_grad_(like.requires_grad) if rounded_master.is_floating_point() else rounded_master


def merged_as_model(context, stack: Sequence[torch.Tensor], what: str, names: Sequence[str],
                    like: torch.Tensor) -> torch.Tensor:
    """``rounded`` of the merged master ``stack``, for a master that is not written itself: the
    kernel rounds the sum to ``like``'s dtype in its store (kernel.weighted_sum ``rounded_to``:
    the same bits), so no merged fp32 master is made, faulted in and read again."""
    merged = context.merge_tensor(stack, what, names, rounded_to=like.dtype)
    return merged.detach().reshape(like.shape).requires_grad_(like.requires_grad)


# Elements per block of a full comparison (a cache-sized temporary, and an early exit at the first
# block that differs), and per run of a sampled one.
_COMPARED_ELEMENTS = 1 << 20
_SAMPLED_ELEMENTS = 1 << 11


def rounds_to(master: torch.Tensor, model: torch.Tensor, *, sampled: bool = False,
              mapped: bool = False) -> bool:
    """Whether ``model`` is exactly ``master`` rounded to the model's dtype. ``sampled``: on
    three runs of elements (the first, the middle and the last), for a checkpoint that must have
    the structure another one showed by full comparison (see check_mapping). ``mapped``:
    both are memory-mapped from their files (``safe_load``), and the pages compared are dropped
    from this process as it goes (kernel.release_pages): a full comparison of the newest's masters
    left them all resident until the merge reached each (0.6 GiB of a 1.5 GB Megatron shard)."""
    if master.numel() != model.numel():
        return False
    flat_master, flat_model, numel = master.detach().reshape(-1), model.detach().reshape(-1), model.numel()
    if sampled and numel > 3 * _SAMPLED_ELEMENTS:
        middle = (numel - _SAMPLED_ELEMENTS) // 2
        runs = [(0, _SAMPLED_ELEMENTS), (middle, middle + _SAMPLED_ELEMENTS), (numel - _SAMPLED_ELEMENTS, numel)]
    else:
        runs = [(begin, min(begin + _COMPARED_ELEMENTS, numel)) for begin in range(0, numel, _COMPARED_ELEMENTS)]
    for begin, end in runs:
        equal = torch.equal(flat_master[begin:end].to(model.dtype), flat_model[begin:end])
        if mapped:
            release_pages(flat_master[begin:end])
            release_pages(flat_model[begin:end])
        if not equal:
            return False
    return True


class MatchError(ValueError):
    """No consistent master -> model tensor mapping (the message says which master and why)."""


def match_masters(masters: Sequence[Tuple[tuple, torch.Tensor]], groups: Sequence[int],
                  model: Sequence[Tuple[tuple, torch.Tensor]], *, mapped: bool = False) -> Dict[tuple, tuple]:
    """Master leaf path -> model leaf path, from the values of ONE checkpoint.

    ``masters`` are in the optimizer's order, without names; ``groups`` gives each master's param
    group (within a group the optimizer keeps the model's parameter order, across groups it does
    not); ``model`` is the model's low-precision float tensors in state-dict order. A master's
    model tensor has its shape and is exactly its rounding. Each master takes the first such
    tensor after the previous one of its group (the usual case: one comparison each), else the
    first unused one anywhere. Tensors that both match a master hold the same values, so the
    choice between them cannot change a merged weight beyond the masters' sub-bf16 bits; a
    master that matches none raises MatchError (the caller falls back to the model copies).
    """
    used: set = set()
    position: Dict[int, int] = {}
    mapping: Dict[tuple, tuple] = {}
    for (master_path, master), group in zip(masters, groups):
        start = position.get(group, 0)
        order = list(range(start, len(model))) + list(range(start))
        for index in order:
            model_path, tensor = model[index]
            if index in used or tensor.numel() != master.numel():
                continue
            if rounds_to(master, tensor, mapped=mapped):
                used.add(index)
                position[group] = index + 1
                mapping[master_path] = model_path
                break
        else:
            raise MatchError(f"the master at {'.'.join(map(str, master_path))} (shape {tuple(master.shape)}) rounds to "
                             "no model tensor of its size")
    return mapping


def check_mapping(mapping: Dict[tuple, tuple], masters: Callable[[tuple], torch.Tensor],
                  model: Callable[[tuple], torch.Tensor], where: str) -> Optional[str]:
    """Why ``mapping`` does not hold in another checkpoint (its master of a model tensor does not
    round to it), or None. Compared on samples (``rounds_to``): the mapping was found in the
    newest by full comparison, and another order of the masters, or masters of another model,
    shows in any run of their elements. A full comparison read every source's masters once more
    before their merge did (in a profile of a 4-checkpoint Megatron merge, more time than the
    merge), with all of their pages resident at once: memory that grew with N."""
    for master_path, model_path in mapping.items():
        if not rounds_to(masters(master_path), model(model_path), sampled=True):
            return (f"in {where} the master at {'.'.join(map(str, master_path))} does not round to "
                    f"'{'.'.join(map(str, model_path))}'")
    return None


def leaf_at(state, path: tuple):
    """The value at ``path`` through dicts and lists; KeyError/IndexError/TypeError if absent."""
    for key in path:
        state = state[key]
    return state


def in_file_master_weights(masters: Sequence[Tuple[tuple, int]], model: Sequence[tuple],
                           states: Sequence[Optional[dict]], names: Sequence[str], context) -> MasterWeights:
    """Model weights from masters kept per parameter, without names, in the same file
    (Megatron's ``fp32_from_fp16_params``, DeepSpeed ZeRO-0's ``fp32_groups``).

    ``masters``: (leaf path, param group) in the optimizer's order; ``model``: the paths of the
    model's low-precision float tensors in state-dict order; ``states``: each source's file
    (None where its leaves come from other files: another layout), ``names`` naming them, the
    newest last. The mapping is found in the newest by value (``match_masters``) and must hold
    in every source. Returns the rounded merged masters for the model leaves (and the merged
    masters for their own leaves), as placeholders that one merge of the master fills both,
    honouring the tensor filter by model name: an unselected tensor keeps the newest's weight
    and master. Where no mapping holds, the model copies, with a note that says why.
    """
    if any(state is None for state in states):
        return from_model_copies("some source was saved at another layout: its masters are not renumbered",
                                 by_older=True)
    newest = states[-1]
    try:
        newest_masters = [(path, leaf_at(newest, path)) for path, _ in masters]
        mapping = match_masters(newest_masters, [group for _, group in masters],
                                [(path, leaf_at(newest, path)) for path in model],
                                mapped=True)  # the states are safe_load's: memory-mapped
    except MatchError as exc:
        return from_model_copies(f"{names[-1]}: {exc}")
    for state, name in zip(states[:-1], names[:-1]):
        try:
            problem = check_mapping(mapping, lambda p: leaf_at(state, p), lambda p: leaf_at(state, p), name)
        except (KeyError, IndexError, TypeError):
            problem = f"{name} has another optimizer structure than the newest"
        if problem:
            return from_model_copies(problem, by_older=True)
    weights: Dict[tuple, object] = {}
    result = from_masters(weights)
    for master_path, model_path in mapping.items():
        if not context.selects(".".join(map(str, model_path))):
            weights[master_path] = leaf_at(newest, master_path)
            continue
        stack = [leaf_at(state, master_path) for state in states]
        model_tensor = leaf_at(newest, model_path)
        master = Placeholder(stack[-1].shape, stack[-1].dtype, merged_requires_grad(stack))
        model = Placeholder.like(model_tensor)
        merge = functools.partial(_merge_master, stack, f"master of '{'.'.join(map(str, model_path))}'", names,
                                  context, result)
        # One merge gives both leaves, whichever the file reaches first (the other waits for its turn);
        # where the master is not written (--optimizer drop), the model's leaf alone.
        master.compute = functools.partial(merge, {master: None, model: model_tensor})
        model.compute = master.compute if context.optimizer_policy.keeps_training_state else \
            functools.partial(merge, {model: model_tensor})
        weights[master_path], weights[model_path] = master, model
    return result


def _merge_master(stack: Sequence[torch.Tensor], what: str, names: Sequence[str], context, result: MasterWeights,
                  leaves: Dict[Placeholder, Optional[torch.Tensor]]) -> Dict[Placeholder, torch.Tensor]:
    """The merged master, for its own placeholder (``leaves``' None) and rounded for the model's
    (``leaves``' model tensor); the model's alone where that is all ``leaves`` asks for."""
    num_read = sum(t.numel() * t.element_size() for t in stack)
    result.num_bytes_read += num_read
    context.on_progress(num_read)
    if None not in leaves.values():
        [(leaf, like)] = leaves.items()
        return {leaf: merged_as_model(context, stack, what, names, like)}
    merged = context.merge_tensor(stack, what, names)
    return {leaf: merged if like is None else rounded(merged, like) for leaf, like in leaves.items()}
