"""Megatron-LM legacy optimizer state under ``--optimizer latest|merge``, and the fp32 masters as
weights (megatron-core 0.16.1's optimizer/optimizer.py and distrib_optimizer.py are the ground truth).

``model_optim_rng.pt['optimizer']`` is the optimizer's ``state_dict()`` (a list of them under a
ChainedOptimizer of several):

- Float16OptimizerWithFloat16Params: ``optimizer`` (the torch optimizer's state: moments per
  parameter index, param groups), ``grad_scaler``, and ``fp32_from_fp16_params``: per param
  group the fp32 masters of its fp16/bf16 parameters, in group order, WITHOUT names. Which model
  tensor each master is follows from the values (masters.match_masters): Megatron copies the
  masters into the model after every step, so the model tensor is exactly its master rounded.
- FP32Optimizer: the torch optimizer's state itself (the model's fp32 tensors are the weights).
- DistributedOptimizer: only the param groups; the parameters' state is ``distrib_optim.pt``
  (``get_parameter_state_dp_zero``): per grad buffer ``gbuf_idx`` (one per model chunk and
  parameter dtype) and its ``(param_dtype, grad_dtype)`` key the flat fp32 ``param`` (the
  masters), ``exp_avg``, ``exp_avg_sq`` of ``numel_unpadded`` elements. The buffer layout
  (distributed/param_and_grad_buffer.py): the buffer's parameters in REVERSE order, each starting
  at a multiple of 64 elements within its bucket; the saved buffers drop the padding at bucket
  ends, so a parameter starts either 64-aligned after the previous one or (first in a new
  bucket) right after it. ``distrib_layout`` walks the model's tensors so, choosing at each
  parameter the start whose values round to the model tensor, and verifies the whole buffer
  (the end must be ``numel_unpadded``); where no such walk exists the model copies are merged
  and the reason is recorded.
"""
import functools
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..io.torch_save_stream import Placeholder
from ..io.tree import dotted
from .masters import (MASTER, MOMENT, MasterWeights, MatchError, from_masters, from_model_copies,
                      in_file_master_weights, leaf_at, rounds_to, rounded)

MASTERS_KEYS = ("fp32_from_fp16_params", "fp32_from_fp16")  # the second: old checkpoints
LOW_PRECISION = (torch.float16, torch.bfloat16)
PARAM_ALIGNMENT = 64  # param_and_grad_buffer._pad_start_of_param_if_needed


def optimizer_entries(state: dict) -> List[Tuple[tuple, dict]]:
    """(path, state dict) of each optimizer saved in ``state['optimizer']`` (one, or a chain)."""
    optimizer = state.get("optimizer")
    if isinstance(optimizer, dict):
        return [(("optimizer",), optimizer)]
    if isinstance(optimizer, (list, tuple)):
        return [(("optimizer", index), entry) for index, entry in enumerate(optimizer) if isinstance(entry, dict)]
    return []


def model_file_leaf_kind(path: tuple) -> Optional[str]:
    """MASTER or MOMENT for a leaf under ``model_optim_rng.pt['optimizer']``."""
    rest = path[2:] if len(path) > 1 and isinstance(path[1], int) else path[1:]
    if not rest:
        return None
    if rest[0] in MASTERS_KEYS:
        return MASTER
    if (rest[0] == "optimizer" and len(rest) > 1 and rest[1] == "state") or rest[0] == "state":
        return MOMENT
    return None


def distrib_leaf_kind(path: tuple) -> Optional[str]:
    """MASTER (``param``) or MOMENT (the other float buffers) for a leaf of distrib_optim.pt."""
    if not path:
        return None
    return MASTER if path[-1] == "param" else MOMENT


def masters_of(entry: dict) -> Optional[list]:
    for key in MASTERS_KEYS:
        if isinstance(entry.get(key), (list, tuple)):
            return entry[key]
    return None


def structure(state: dict) -> List[tuple]:
    """What must agree between two sources' ``optimizer`` entries of one shard file: per
    optimizer, its kind of state, the sizes of its param groups and of its master groups."""
    described = []
    for path, entry in optimizer_entries(state):
        inner = entry.get("optimizer") if isinstance(entry.get("optimizer"), dict) else entry
        groups = [len(group.get("params", ())) for group in inner.get("param_groups", ())]
        masters = masters_of(entry)
        described.append((dotted(path), sorted(k for k in entry if isinstance(k, str)), groups,
                          [len(group) for group in masters] if masters is not None else None))
    return described


def distrib_structure(state) -> List[tuple]:
    """Per optimizer and grad buffer of a distrib_optim.pt: (index, buffer, dtype key, numel_unpadded)."""
    described = []
    for index, entry in enumerate(state if isinstance(state, (list, tuple)) else [state]):
        if not isinstance(entry, dict):
            described.append((index, None, None, None))
            continue
        described.append((index, "buckets_coalesced", bool(entry.get("buckets_coalesced")), None))
        for gbuf, dtypes in sorted((k, v) for k, v in entry.items() if isinstance(k, int)):
            for dtype, buffer in dtypes.items() if isinstance(dtypes, dict) else ():
                numel = buffer.get("numel_unpadded") if isinstance(buffer, dict) else None
                described.append((index, gbuf, str(dtype), numel))
    return described


def has_optimizer_state(state: dict) -> bool:
    return bool(optimizer_entries(state))


# -- masters -> model weights -------------------------------------------------------------------------
def model_tensors(state: dict, model_keys: Sequence[str], dtypes=LOW_PRECISION) -> List[Tuple[tuple, torch.Tensor]]:
    """The model's float tensors of ``dtypes`` in state-dict order, chunk by chunk (the order of
    ``named_parameters``), without Transformer Engine extra state."""
    found = []
    for chunk in model_keys:
        for key, value in state[chunk].items():
            if isinstance(value, torch.Tensor) and value.dtype in dtypes and not key.endswith("_extra_state"):
                found.append(((chunk, key), value))
    return found


def in_file_weights(states: Sequence[Optional[dict]], names: Sequence[str], model_keys: Sequence[str],
                    context) -> MasterWeights:
    """Float16Optimizer: the model weights as the merged ``fp32_from_fp16_params``, rounded."""
    newest = states[-1]
    masters = []
    for path, entry in optimizer_entries(newest):
        groups = masters_of(entry)
        key = next(k for k in MASTERS_KEYS if entry.get(k) is groups) if groups is not None else None
        for group_index, group in enumerate(groups or ()):
            masters += [((*path, key, group_index, j), (dotted(path), group_index)) for j in range(len(group))]
    if not masters:
        return from_model_copies()  # FP32Optimizer (or none): the model's tensors are the weights
    groups = {}
    return in_file_master_weights([(p, groups.setdefault(g, len(groups))) for p, g in masters],
                                  [path for path, _ in model_tensors(newest, model_keys)], states, names, context)


def distrib_layout(newest_model: dict, model_keys: Sequence[str], distrib, where: str) -> Dict[tuple, tuple]:
    """Model leaf path -> (path of its buffer's ``param`` leaf, start, numel) for every parameter
    in the newest's distrib_optim.pt; MatchError if the buffers do not follow Megatron's layout.

    One saved state per chained optimizer: with two, the first holds the dense parameters and
    the second the experts' (``get_megatron_optimizer`` builds the expert optimizer last; its
    parameters are the MoE layers' ``.experts.``, which Megatron all-reduces over their own
    group); each state's buffers go chunk by chunk, one per parameter dtype in order of appearance."""
    entries = list(distrib) if isinstance(distrib, (list, tuple)) else [distrib]
    if len(entries) > 2:
        raise MatchError(f"{where}: {len(entries)} chained optimizers, whose buffers are not assigned to parameters here")
    layout: Dict[tuple, tuple] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("buckets_coalesced"):
            raise MatchError(f"{where}: not the coalesced format (buckets_coalesced), whose layout is not modelled")
        prefix = (index,) if isinstance(distrib, (list, tuple)) else ()

        def member(key: str, index=index) -> bool:
            return len(entries) == 1 or (".experts." in key) == (index == 1)
        expected = []
        for chunk in model_keys:
            tensors = [(p, t) for p, t in model_tensors(newest_model, [chunk], dtypes=(*LOW_PRECISION, torch.float32))
                       if member(p[1])]
            expected += [(chunk, dtype, [(p, t) for p, t in tensors if t.dtype == dtype])
                         for dtype in dict.fromkeys(t.dtype for _, t in tensors)]
        buffers = [(gbuf, dtype_key, buffer) for gbuf, dtypes in sorted((k, v) for k, v in entry.items() if isinstance(k, int))
                   for dtype_key, buffer in dtypes.items()]
        if len(buffers) != len(expected):
            raise MatchError(f"{where}: {len(buffers)} grad buffers in optimizer {index}, the model's chunks and dtypes "
                             f"give {len(expected)}")
        for (gbuf, dtype_key, buffer), (chunk, dtype, params) in zip(buffers, expected):
            param_dtype = dtype_key[0] if isinstance(dtype_key, tuple) else dtype_key
            if dtype != param_dtype:
                raise MatchError(f"{where}: buffer {gbuf} holds {param_dtype} parameters, the model's chunks and "
                                 f"dtypes give {dtype} (of {chunk})")
            for path, start, numel in _walk_buffer(params, buffer["param"], int(buffer["numel_unpadded"]),
                                                   f"{where} buffer {gbuf}"):
                layout[path] = ((*prefix, gbuf, dtype_key, "param"), start, numel)
    return layout


def _walk_buffer(params, flat: torch.Tensor, numel_unpadded: int, where: str):
    """(path, start, numel) of each parameter of one grad buffer (see the module docstring)."""
    bucket_start, used, placed = 0, 0, []
    for path, tensor in reversed(params):
        numel = tensor.numel()
        aligned = bucket_start + -(-used // PARAM_ALIGNMENT) * PARAM_ALIGNMENT
        for start, new_bucket in ((aligned, False), (bucket_start + used, True)):
            if start + numel <= flat.numel() and rounds_to(flat[start:start + numel], tensor, mapped=True):
                break
        else:
            raise MatchError(f"{where}: no place for '{dotted(path)}' ({numel} elements) after {bucket_start + used}: "
                             "the masters do not follow the model's parameters in Megatron's buffer layout")
        if new_bucket and start != aligned:
            bucket_start, used = start, numel
        else:
            used = start - bucket_start + numel
        placed.append((path, start, numel))
    if bucket_start + used != numel_unpadded:
        raise MatchError(f"{where}: the parameters end at {bucket_start + used}, numel_unpadded is {numel_unpadded}")
    return placed


def distrib_weights(newest_model: dict, model_keys: Sequence[str], distribs: Sequence[object],
                    names: Sequence[str], models: Sequence[dict], context) -> MasterWeights:
    """DistributedOptimizer: the model weights cut from every source's merged ``param`` buffers
    (``distribs``: each source's distrib_optim.pt of this shard, the newest last; ``models``: each
    source's model file, to verify the layout holds in it too, on samples: see
    masters.check_mapping), rounded."""
    try:
        layout = distrib_layout(newest_model, model_keys, distribs[-1], names[-1])
    except (MatchError, KeyError, TypeError, AttributeError) as exc:
        return from_model_copies(str(exc) if isinstance(exc, MatchError) else f"{names[-1]}: unexpected structure")
    for distrib, model, name in zip(distribs[:-1], models[:-1], names[:-1]):
        for path, (buffer_path, start, numel) in layout.items():
            if not rounds_to(leaf_at(distrib, buffer_path)[start:start + numel], leaf_at(model, path), sampled=True):
                return from_model_copies(f"in {name} the master of '{dotted(path)}' does not round to its model tensor",
                                         by_older=True)
    weights: Dict[tuple, object] = {}
    result = from_masters(weights)
    by_buffer: Dict[tuple, Dict[Placeholder, tuple]] = {}
    for path, (buffer_path, start, numel) in layout.items():
        if context.selects(dotted(path)):
            model_tensor = leaf_at(newest_model, path)
            weights[path] = Placeholder.like(model_tensor)
            by_buffer.setdefault(buffer_path, {})[weights[path]] = (start, numel, model_tensor)
    # A buffer is merged when the output file reaches the first of its parameters, and gives them
    # all (those after it wait for their turn in the file): one merged buffer in memory at a time.
    for buffer_path, leaves in by_buffer.items():
        compute = functools.partial(_merged_buffer, [leaf_at(distrib, buffer_path) for distrib in distribs],
                                    f"key '{dotted(buffer_path)}'", names, context, result, leaves)
        for placeholder in leaves:
            placeholder.compute = compute
    return result


def _merged_buffer(stack: Sequence[torch.Tensor], what: str, names: Sequence[str], context, result: MasterWeights,
                   leaves: Dict[Placeholder, tuple]) -> Dict[Placeholder, torch.Tensor]:
    """The rounded parameters (``leaves``: placeholder -> start, numel, model tensor) of one merged
    buffer. The buffer itself is not written: where its parameters share one dtype, the kernel
    rounds to it in its store (masters.merged_as_model), and each is copied out of it."""
    dtypes = {like.dtype for _, _, like in leaves.values()}
    num_read = sum(t.numel() * t.element_size() for t in stack)
    result.num_bytes_read += num_read
    context.on_progress(num_read)
    if len(dtypes) == 1:
        merged = context.merge_tensor(stack, what, names, rounded_to=dtypes.pop()).detach()
        return {placeholder: merged[start:start + numel].reshape(like.shape).clone().requires_grad_(like.requires_grad)
                for placeholder, (start, numel, like) in leaves.items()}
    merged = context.merge_tensor(stack, what, names)
    return {placeholder: rounded(merged[start:start + numel], like)
            for placeholder, (start, numel, like) in leaves.items()}
