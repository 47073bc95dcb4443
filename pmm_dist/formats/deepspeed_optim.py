"""DeepSpeed optimizer state under ``--optimizer latest|merge``, and the fp32 masters as weights.

Where DeepSpeed keeps what (the installed 0.19.8 is the ground truth):

- ZeRO-1/2 (``runtime/zero/stage_1_and_2.py``, ``state_dict``): each data-parallel rank's
  ``[bf16_]zero_pp_rank_{dp}_mp_rank_{mp}_optim_states.pt`` holds, per param group, its partition
  of the group's flat fp32 masters (``single_partition_of_fp32_groups``, the group's padding
  stripped from the last partition) and the base optimizer's state of that partition
  (``base_optimizer_state``: a torch ``state_dict`` whose moments are the padded partition, or
  per group a dict without padding under ``elastic_checkpoint``). A group's flat vector is its
  parameters in ``param_shapes`` order (the round-robin order DeepSpeed flattened), each followed
  by its ``param_alignment_paddings`` entry; its partitions are consecutive slices of it, so the
  ranks' partitions concatenated give the whole vector (``utils/zero_to_fp32.py`` reads them
  back the same way). A group whose ``partition_count`` is not the number of rank files (MoE
  expert groups, partitioned over the expert data-parallel group) cannot be rebuilt so.
- ZeRO-3 (``stage3.py``): ``fp32_flat_groups`` are the weights themselves (see
  zero3_partitions); the moments (``optimizer_state_dict.optimizer_state_dict.state[i]``) have
  the sizes of those sub-groups, rank by rank.
- ZeRO-0: the whole optimizer is the model states' ``optimizer`` entry: a torch ``state_dict``
  (fp32), or a wrapper's with the masters per parameter (``fp32_groups``) or flat per group
  (``fp32_groups_flat``).

The model-states unit of ZeRO-1/2 reads the fp32 partitions of every source's optimizer files
of its model-parallel rank itself (no tensor crosses ranks), merges each group's whole flat
vector, and writes the parameters cut from it, rounded to the module's dtype. The optimizer-file
units merge the same partitions elementwise, rank by rank, with the same arithmetic: both sides
hold the same masters.
"""
import functools
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import InputError
from ..io.safe_load import safe_load
from ..io.torch_save_stream import Placeholder
from ..io.tree import dotted
from ..plan.types import MODEL_WEIGHTS_BY_OLDER, MODEL_WEIGHTS_NOTE, OptimizerPolicy
from .base import MergeContext
from .masters import (MASTER, MOMENT, MasterWeights, from_masters, from_model_copies, in_file_master_weights, is_counter,
                      merged_as_model)

OPTIMIZER_STATE = "optimizer_state_dict"
SINGLE_PARTITION = "single_partition_of_fp32_groups"
BASE_STATE = "base_optimizer_state"
FP32_FLAT_GROUPS = "fp32_flat_groups"
# Entries of a ZeRO-1/2 optimizer file that fix how its partitions line up with the newest's.
ZERO12_STRUCTURE = ("partition_count", "group_paddings", "param_alignment_paddings")


def zero_optim_leaf_kind(path: tuple) -> Optional[str]:
    """MASTER or MOMENT for a leaf of a ZeRO optimizer file (under ``optimizer_state_dict``)."""
    if len(path) < 3 or path[0] != OPTIMIZER_STATE:
        return None
    if path[1] == SINGLE_PARTITION:
        return MASTER
    if path[1] == BASE_STATE and ("state" in path[2:] or isinstance(path[2], int)):  # rigid, or elastic per group
        return MOMENT
    if path[1] == OPTIMIZER_STATE and "state" in path[2:]:  # ZeRO-3's base optimizer
        return MOMENT
    return None


def zero0_leaf_kind(path: tuple) -> Optional[str]:
    """MASTER or MOMENT for a leaf of a ZeRO-0 model-states file's ``optimizer`` entry."""
    if len(path) < 3 or path[0] != "optimizer":
        return None
    if path[1] in ("fp32_groups", "fp32_groups_flat"):
        return MASTER
    if "state" in path[1:3]:  # a torch optimizer's, or the wrapper's optimizer_state_dict's
        return MOMENT
    return None


def zero0_master_weights(output: dict, sources, context: MergeContext) -> MasterWeights:
    """ZeRO-0: the model states' ``optimizer`` entry keeps the masters per parameter
    (``fp32_groups``, in the optimizer's order) next to the module: matched by value (see
    masters.match_masters). A plain torch optimizer (fp32 training) has none: the module's
    tensors are the weights. Flat masters (``fp32_groups_flat``) are not cut into parameters."""
    optimizer = output.get("optimizer")
    groups = optimizer.get("fp32_groups") if isinstance(optimizer, dict) else None
    module = output.get("module")
    if not isinstance(groups, (list, tuple)) or not isinstance(module, dict):
        flat = isinstance(optimizer, dict) and "fp32_groups_flat" in optimizer
        return from_model_copies("the fp32 masters are flat per group (fp32_groups_flat), not cut into "
                                 "parameters" if flat else "")
    masters = [(("optimizer", "fp32_groups", g, j), g) for g, group in enumerate(groups) for j in range(len(group))]
    model = [("module", name) for name, value in module.items()
             if isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16)]
    return in_file_master_weights(masters, model, [source.state for source in sources],
                                  [source.name for source in sources], context)


def has_moments(optim_state: dict, zero3: bool) -> bool:
    base = optim_state.get(OPTIMIZER_STATE if zero3 else BASE_STATE)
    if isinstance(base, dict):
        return bool(base.get("state"))
    return isinstance(base, list) and bool(base)


# -- ZeRO-1/2: the flat groups of one source -------------------------------------------------------
@dataclass
class Zero12Masters:
    """One source's ZeRO-1/2 optimizer files of one model-parallel rank, as far as the masters go."""
    paths: List[str]                      # by data-parallel rank
    lengths: List[List[int]]              # [group][rank]: elements of each rank's partition
    partition_counts: List[int]
    alignment_paddings: Optional[list]    # [group][param], None where DeepSpeed saved none


def read_zero12_masters(paths: Sequence[str]) -> Tuple[Optional[Zero12Masters], Optional[List[dict]], Optional[str]]:
    """(masters, the loaded files, None) for a complete set of ZeRO-1/2 optimizer files (one per
    data-parallel rank, in rank order), else (None, None, why not) naming the file."""
    states, lengths, counts = [], None, None
    for path in paths:
        try:
            state = safe_load(path)
        except InputError as exc:
            return None, None, str(exc)
        optim = state.get(OPTIMIZER_STATE) if isinstance(state, dict) else None
        groups = optim.get(SINGLE_PARTITION) if isinstance(optim, dict) else None
        if not isinstance(groups, (list, tuple)) or not all(isinstance(g, torch.Tensor) and g.is_floating_point()
                                                            for g in groups):
            return None, None, f"{path}: no '{OPTIMIZER_STATE}.{SINGLE_PARTITION}' of float tensors"
        if "zero_stage" not in optim:
            return None, None, (f"{path}: a bf16 optimizer file without ZeRO (its partitions keep DeepSpeed's "
                                "alignment padding, which is not recorded per parameter)")
        count = optim.get("partition_count")
        count = list(count) if isinstance(count, (list, tuple)) else [count] * len(groups)
        if lengths is None:
            lengths, counts = [[] for _ in groups], count
        if len(groups) != len(lengths) or count != counts:
            return None, None, (f"{path}: {len(groups)} param groups with partition_count {count}, but "
                                f"{paths[0]} has {len(lengths)} with {counts}")
        for group, tensor in enumerate(groups):
            lengths[group].append(tensor.numel())
        states.append(state)
    if not states:
        return None, None, "no optimizer files"
    first = states[0][OPTIMIZER_STATE]
    return Zero12Masters(list(paths), lengths, counts, first.get("param_alignment_paddings")), states, None


def group_offsets(shapes: Sequence[Tuple[str, tuple]], alignment_paddings: Optional[Sequence[int]]) -> \
        Tuple[List[Tuple[str, int, int]], int]:
    """Each parameter's (name, start, numel) in its group's flat vector, and the vector's length
    (DeepSpeed's round-robin order, alignment padding after each parameter)."""
    offsets, start = [], 0
    for index, (name, shape) in enumerate(shapes):
        numel = math.prod(shape)
        offsets.append((name, start, numel))
        start += numel + (int(alignment_paddings[index]) if alignment_paddings else 0)
    return offsets, start


def zero12_master_weights(output: dict, sources: Sequence[Tuple[str, List[str]]], context: MergeContext,
                          param_shapes) -> MasterWeights:
    """The model states' ``module`` weights as the merged fp32 masters of ``sources`` (per
    checkpoint: its path and its optimizer files of this model-parallel rank, by dp rank),
    rounded to the module's dtypes; the model copies, with a note, where a source's masters
    cannot be read or cut into parameters."""
    module = output.get("module")
    if not isinstance(module, dict) or not isinstance(param_shapes, list):
        return from_model_copies("no module or param_shapes in the model states")
    read = []  # the files' metadata only: their tensors are read one source at a time below
    # The newest first: what it lacks, no choice of older checkpoints would give (see by_older).
    for index, (ckpt_path, paths) in reversed(list(enumerate(sources))):
        by_older = index < len(sources) - 1
        if not paths:
            return from_model_copies(f"{ckpt_path} has no optimizer files (pruned?): the fp32 masters of every "
                                     "source are needed", by_older=by_older)
        masters, _, problem = read_zero12_masters(paths)
        if problem:
            return from_model_copies(problem, by_older=by_older)
        read.insert(0, (ckpt_path, masters, None))
    reference = read[-1][1]
    paddings = reference.alignment_paddings or [None] * len(param_shapes)
    groups, skipped, skipped_by_older = {}, [], False
    for group, shapes in enumerate(param_shapes):
        offsets, length = group_offsets(shapes, paddings[group] if group < len(paddings) else None)
        why = _group_problem(group, shapes, offsets, length, read[-1:], module)
        if not why:
            why = _group_problem(group, shapes, offsets, length, read, module)
            skipped_by_older = skipped_by_older or bool(why)
        if why:
            skipped.append(why)
        else:
            groups[group] = offsets
    # Parameter by parameter, every source's masters viewed in its mapped optimizer files, each
    # merged as the output file is written: memory is one parameter in fp32 and its rounding,
    # whatever N and the size of a group (a group's float64 sum, 8 bytes per parameter of the
    # whole model at ZeRO-1/2 with one rank, was not; nor is the whole module any more).
    partitions, names, num_read = [], [], 0
    for ckpt_path, masters, _ in read:
        states = [safe_load(path) for path in masters.paths]
        flat = {group: [state[OPTIMIZER_STATE][SINGLE_PARTITION][group].reshape(-1) for state in states]
                for group in groups}
        partitions.append(flat)
        names.append(ckpt_path)
        num_bytes = sum(part.numel() * part.element_size() for parts in flat.values() for part in parts)
        num_read += num_bytes
        context.on_progress(num_bytes)
    weights: Dict[tuple, object] = {}
    for group, offsets in groups.items():
        for name, start, numel in offsets:
            path = ("module", name)
            if context.selects(dotted(path)):
                # merged, rounded and written when the output file reaches it (pickled.merge_unit)
                weights[path] = Placeholder.like(module[name], functools.partial(
                    _rounded_master, [flat[group] for flat in partitions], start, numel, module[name],
                    f"the fp32 master of module.{name}", names, context))
    for alias, primary in (output.get("shared_params") or {}).items():  # tied weights stay tied
        if ("module", primary) in weights and alias in module:
            weights[("module", alias)] = weights[("module", primary)]
    if not weights:
        return from_model_copies("; ".join(skipped) or "no parameter has fp32 masters", by_older=skipped_by_older)
    result = from_masters(weights, num_read)
    if skipped:
        result.details[MODEL_WEIGHTS_NOTE] = "model copies for " + "; ".join(skipped)
    if skipped_by_older:
        result.details[MODEL_WEIGHTS_BY_OLDER] = True
    return result


def _rounded_master(partitions_by_source: Sequence[Sequence[torch.Tensor]], start: int, numel: int,
                    like: torch.Tensor, what: str, names: Sequence[str], context: MergeContext) -> torch.Tensor:
    """One parameter's merged fp32 master, rounded as the module holds it (``like``)."""
    sources = [_flat_range(partitions, start, numel) for partitions in partitions_by_source]
    return merged_as_model(context, sources, what, names, like)


def _flat_range(partitions: Sequence[torch.Tensor], start: int, numel: int) -> torch.Tensor:
    """Elements [start, start + numel) of the group's flat vector, the data-parallel ranks'
    partitions laid end to end: a view where they lie in one partition, else the pieces joined."""
    pieces, offset = [], 0
    for part in partitions:
        begin, end = max(start, offset), min(start + numel, offset + part.numel())
        if begin < end:
            pieces.append(part[begin - offset:end - offset])
        offset += part.numel()
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _group_problem(group: int, shapes, offsets, length: int, read, module) -> Optional[str]:
    """Why param group ``group``'s masters cannot be cut into the module's parameters."""
    for ckpt_path, masters, _ in read:
        if group >= len(masters.lengths):
            return f"param group {group}: {masters.paths[0]} has {len(masters.lengths)} groups"
        if masters.partition_counts[group] != len(masters.paths):
            return (f"param group {group} (partitioned over {masters.partition_counts[group]} ranks, not the "
                    f"{len(masters.paths)} optimizer files: an expert group)")
        if sum(masters.lengths[group]) != length:
            return (f"param group {group}: {ckpt_path}'s partitions hold {sum(masters.lengths[group])} elements, "
                    f"param_shapes and the alignment padding {length}")
    missing = [name for name, _, _ in offsets if name not in module]
    if missing:
        return f"param group {group} (its parameters {missing[:3]} are not in 'module')"
    return None


def zero12_structure_problem(path: str, optim: dict, newest_path: str, newest: dict) -> Optional[str]:
    """Why a source's ZeRO-1/2 optimizer file does not line up with the newest's of its rank."""
    for key in ZERO12_STRUCTURE:
        if optim.get(key) != newest.get(key):
            return (f"{path}: {key} {optim.get(key)} differs from the newest checkpoint's {newest.get(key)} "
                    f"({newest_path}): another partitioning of the optimizer state")
    groups = [len(state.get("params", ())) for state in _param_groups(optim)]
    newest_groups = [len(state.get("params", ())) for state in _param_groups(newest)]
    if groups != newest_groups:
        return (f"{path}: base optimizer param groups {groups} differ from the newest checkpoint's "
                f"{newest_groups} ({newest_path})")
    return None


def _param_groups(optim: dict) -> list:
    base = optim.get(BASE_STATE, optim.get(OPTIMIZER_STATE))
    return list(base.get("param_groups", ())) if isinstance(base, dict) else []


def moments_by_group(optim_state: dict) -> Optional[List[Dict[str, torch.Tensor]]]:
    """ZeRO-3: the base optimizer's float moments per sub-group (counters left out), in the
    order of ``fp32_flat_groups``; None without moments."""
    base = optim_state.get(OPTIMIZER_STATE)
    state = base.get("state") if isinstance(base, dict) else None
    if not state:
        return None
    return [{key: value for key, value in state[index].items()
             if isinstance(value, torch.Tensor) and value.is_floating_point() and not is_counter((key,))}
            for index in sorted(state)]


# -- ZeRO-1/2 partitions across data-parallel sizes -------------------------------------------------
def _moment(state: dict, group: int, key) -> torch.Tensor:
    """A ZeRO-1/2 file's moment ``key`` of param group ``group`` (rigid: a torch state_dict whose
    one parameter per group is its flat partition; elastic: a dict per group)."""
    base = state[OPTIMIZER_STATE][BASE_STATE]
    return base["state"][group][key] if isinstance(base, dict) else base[group][key]


def _moment_keys(state: dict, group: int) -> List:
    base = state[OPTIMIZER_STATE][BASE_STATE]
    values = base["state"].get(group, {}) if isinstance(base, dict) else base[group]
    return [key for key, value in values.items()
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() and not is_counter((key,))]


def zero12_remap_sources(files: Sequence[Tuple[str, List[str]]], dp_rank: int, policy) -> tuple:
    """For the output rank ``dp_rank`` when the sources have other DP sizes: (the newest's file of
    that rank, loaded; where its partition starts in each group's flat vector; per source its
    path, masters and loaded files). A group's flat vector does not depend on the DP size (the
    group padding is stripped), so every output partition is a slice of every source's vector.
    InputError names every source that does not line up."""
    read, problems = [], []
    for ckpt_path, paths in files:
        masters, states, problem = read_zero12_masters(paths)
        if problem:
            problems.append(problem)
            continue
        read.append((ckpt_path, masters, states))
    if problems:
        raise InputError(problems)
    _, reference, newest_states = read[-1]
    output = newest_states[dp_rank]
    keys = [_moment_keys(output, group) for group in range(len(reference.lengths))]
    for ckpt_path, masters, states in read[:-1]:
        where = masters.paths[0]
        if [sum(lengths) for lengths in masters.lengths] != [sum(lengths) for lengths in reference.lengths] or \
                masters.alignment_paddings != reference.alignment_paddings:
            problems.append(f"{where}: its param groups hold {[sum(x) for x in masters.lengths]} fp32 elements (with "
                            f"alignment padding {masters.alignment_paddings}), the newest's "
                            f"{[sum(x) for x in reference.lengths]} ({reference.alignment_paddings}): the partitions "
                            "do not line up")
        elif any(c != len(masters.paths) for c in masters.partition_counts):
            problems.append(f"{where}: partition_count {masters.partition_counts} is not its {len(masters.paths)} "
                            "optimizer files (expert groups): the partitions cannot be remapped")
        elif policy == OptimizerPolicy.MERGE:
            for rank, state in enumerate(states):
                for group, group_keys in enumerate(keys):
                    try:
                        short = [k for k in group_keys if _moment(state, group, k).numel() < masters.lengths[group][rank]]
                    except (KeyError, IndexError, TypeError):
                        short = group_keys
                    if short:
                        problems.append(f"{masters.paths[rank]}: no moments {short} of param group {group}'s "
                                        f"partition, needed by --optimizer merge")
    if problems:
        raise InputError(problems)
    starts = [sum(lengths[:dp_rank]) for lengths in reference.lengths]
    return output, starts, keys, read, policy


def _covering(lengths: Sequence[int], start: int, numel: int):
    """(rank, lo, hi, rank's offset) of each piece of the flat vector whose consecutive pieces
    are ``lengths`` long that ``[start, start + numel)`` overlaps (cut at the vector's end)."""
    offset, want = 0, min(numel, sum(lengths) - start)
    for rank, length in enumerate(lengths):
        lo, hi = max(start, offset), min(start + want, offset + length)
        if lo < hi:
            yield rank, lo, hi, offset
        offset += length


def _slice(get, lengths: Sequence[int], start: int, out: torch.Tensor) -> int:
    """Fill ``out`` (its first elements) with ``[start, start + len)`` of the flat vector whose
    consecutive pieces ``get(rank)[:lengths[rank]]`` are; returns the elements copied."""
    copied = 0
    for rank, lo, hi, offset in _covering(lengths, start, out.numel()):
        out[lo - start:hi - start].copy_(get(rank).reshape(-1)[lo - offset:hi - offset])
        copied += hi - lo
    return copied


@dataclass
class MergeTally:
    """What merging a unit's placeholders read and merged, complete once its file is written."""
    num_bytes_read: int = 0
    num_tensors: int = 0


def zero12_remap_merge(output: dict, starts: Sequence[int], keys, read, policy,
                       context: MergeContext) -> Tuple[dict, MergeTally]:
    """(the output file's skeleton, its tally): this rank's fp32 partition of each group (and
    under --optimizer merge each moment, zero where the newest pads it) cut from every source's
    flat vectors, one source at a time, as placeholders merged when the file is written; the
    rest is the newest's (its moments under latest: partitioned like the output)."""
    optim = output[OPTIMIZER_STATE]
    masters = optim[SINGLE_PARTITION]
    targets = [((SINGLE_PARTITION, group), masters[group], lambda state, g=group: state[OPTIMIZER_STATE][SINGLE_PARTITION][g])
               for group in range(len(masters))]
    if policy == OptimizerPolicy.MERGE:
        targets += [(("moment", group, key), _moment(output, group, key), lambda state, g=group, k=key: _moment(state, g, k))
                    for group, group_keys in enumerate(keys) for key in group_keys]
    tally = MergeTally()
    merged = {}
    for name, out_tensor, get in targets:
        numel, group = masters[name[1]].numel(), name[1]
        # The accumulator's result: the newest's dtype, and requires_grad where a piece copied in
        # was (copy_ makes the piece require grad: DeepSpeed saves its masters so).
        requires_grad = any(get(states[rank]).requires_grad for _, masters_of, states in read
                            for rank, *_ in _covering(masters_of.lengths[group], starts[group], numel))
        merged[name] = Placeholder(out_tensor.shape, out_tensor.dtype, requires_grad, functools.partial(
            _remapped_partition, name, out_tensor, numel, get, starts, read, context, tally))
    groups = [merged[(SINGLE_PARTITION, group)] for group in range(len(masters))]
    optim = dict(optim, **{SINGLE_PARTITION: type(masters)(groups)})
    if policy == OptimizerPolicy.MERGE:
        base = optim[BASE_STATE]
        if isinstance(base, dict):
            state = {group: dict(values, **{k: merged[("moment", group, k)] for k in keys[group]})
                     for group, values in base["state"].items()}
            base = dict(base, state=state)
        else:
            base = [dict(values, **{k: merged[("moment", group, k)] for k in keys[group]}) for group, values in enumerate(base)]
        optim[BASE_STATE] = base
    return dict(output, **{OPTIMIZER_STATE: optim}), tally


def _remapped_partition(name: tuple, out_tensor: torch.Tensor, numel: int, get, starts: Sequence[int], read,
                        context: MergeContext, tally: MergeTally) -> torch.Tensor:
    """One output partition (``name``: of the masters or a moment, of a param group) summed
    from the slice of every source's flat vector that it covers."""
    group = name[1]
    accumulator = context.accumulator(out_tensor.shape, f"{OPTIMIZER_STATE} {name[0]} of param group {group}")
    for (ckpt_path, masters_of, states), weight in zip(read, context.weights):
        piece = torch.zeros(out_tensor.numel(), dtype=out_tensor.dtype)  # the newest's padding: zeros
        copied = _slice(lambda rank: get(states[rank]), masters_of.lengths[group], starts[group], piece[:numel])
        accumulator.add(piece.reshape(out_tensor.shape), weight, ckpt_path)
        tally.num_bytes_read += copied * out_tensor.element_size()
        context.on_progress(copied * out_tensor.element_size())
    tally.num_tensors += 1
    return accumulator.result()
