"""The incremental arithmetic inside a format's own merge: a MergeContext that, instead of a
weighted sum of the window, updates the running state and reads the merge off it.

A format's ``merge_unit`` is called as for a merge, with the checkpoints the update reads
(newest last) in place of the window; for each float tensor it hands the context that tensor
from each of them (``merge_tensor``, or an accumulator fed one source at a time for chunked
formats). The context then, block by block (``BLOCK_ELEMENTS``):

    new accumulator a = sum_b A[a][b] * previous accumulator b + sum_k B[a][k] * source k
    merge             = sum_a C[a] * new accumulator a      + sum_k D[k] * source k

in compensated arithmetic (merge.compensated), streams the new accumulators into this unit's
state file and rounds the merge once to the stored dtype. Memory: one block of each source,
accumulator and term, whatever the window's length. Each tensor's state is found by the
format's ``state_key(unit, what)``, so chunked formats may bin their items into other files
from one update to the next.
"""
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import InputError
from ..formats import CheckpointFormat, MergeContext
from ..merge import compensated
from ..merge.kernel import BLOCK_ELEMENTS, divisor_of, release_pages, rounded_through_float32
from ..plan.types import UnitResult, WorkUnit
from .state import StateReader, StateWriter, block_ranges

# Operands of the rule's terms, as the plan carries them.
SOURCE, STATE, NEW = "source", "state", "new"
ARITHMETIC_ELEMENTS = 1 << 14


class RunningStateMismatch(InputError):
    """The running state cannot give this update what a merge of its whole window gives: it
    lacks a tensor the checkpoints read have (or has it in another shape), or it follows other
    tensors (the model copies, where the merge now takes the fp32 masters; see
    ``formats.masters.from_model_copies``). The watcher then merges the window from scratch
    (watcher.loop), and whatever is wrong with the checkpoints themselves, that merge names."""


@dataclass(frozen=True)
class UpdateRule:
    """One update's coefficients over the checkpoints it reads (``source``, by their index in
    the plan's checkpoints), the previous state's accumulators (``state``) and the new ones
    (``new``): ``state_terms[a]`` builds new accumulator a, ``output_terms`` the merge."""
    accumulators: Tuple[str, ...]
    state_terms: Dict[str, Tuple[Tuple[float, Tuple[str, object]], ...]]
    output_terms: Tuple[Tuple[float, Tuple[str, object]], ...]

    @property
    def uses_state(self) -> bool:
        return any(operand[0] == STATE for terms in self.state_terms.values() for _, operand in terms)


@dataclass
class _UnitCounters:
    state_bytes_read: int = 0
    keys: List[str] = field(default_factory=list)
    nonfinite_state: bool = False


@dataclass(frozen=True)
class IncrementalContext(MergeContext):
    rule: Optional[UpdateRule] = None
    fmt: Optional[CheckpointFormat] = None
    unit: Optional[WorkUnit] = None
    previous: Optional[StateReader] = None
    writer: Optional[StateWriter] = None
    counters: _UnitCounters = field(default_factory=_UnitCounters)

    def merge_tensor(self, sources: Sequence[torch.Tensor], what: str, source_names: Sequence[str],
                     *, sources_are_mapped: bool = True, rounded_to: Optional[torch.dtype] = None) -> torch.Tensor:
        rule, counters = self.rule, self.counters
        assert len(sources) == len(source_names)
        key = self.fmt.state_key(self.unit, what)
        newest = sources[-1]
        shape, stored, numel = tuple(newest.shape), newest.dtype, newest.numel()
        previous = None
        if rule.uses_state:
            previous = self.previous.entries.get(key)
            if previous is None:
                raise RunningStateMismatch(f"{source_names[-1]}: {what} is not in the running state "
                                           f"({self.previous.directory})")
            if previous.shape != shape or previous.dtype != stored:
                raise RunningStateMismatch(f"{source_names[-1]}: {what} is {stored} {list(shape)}, but the running "
                                           f"state ({self.previous.directory}) holds it as "
                                           f"{previous.meta['dtype']} {list(previous.shape)}")
        entry = self.writer.begin(key, shape, stored, rule.accumulators)
        counters.keys.append(key)
        flat = [s.reshape(-1) for s in sources]
        result = torch.empty(numel, dtype=stored)
        policy = self.on_nonfinite
        # The compensated arithmetic makes some 40 passes over its operands: on the CPU it runs on
        # slices small enough for their temporaries to stay in cache (4x faster than 1M-element ones).
        step = BLOCK_ELEMENTS if self.device.type != "cpu" else ARITHMETIC_ELEMENTS
        for block, (begin, end) in enumerate(block_ranges(numel, BLOCK_ELEMENTS)):
            size = end - begin
            old_block: Dict[str, compensated.Pair] = {}
            if previous is not None:
                for name in rule.accumulators:
                    old_block[name], num_bytes = self.previous.read(previous, name, block, size)
                    counters.state_bytes_read += num_bytes
            new_hi = {name: torch.empty(size, dtype=torch.float64, device=self.device) for name in rule.accumulators}
            new_lo: Dict[str, Optional[torch.Tensor]] = {name: None for name in rule.accumulators}
            merged = torch.empty(size, dtype=torch.float64, device=self.device)
            for first in range(0, size, step):
                last = min(first + step, size)
                pieces = [f[begin + first:begin + last].to(self.device) for f in flat]
                old = {name: (hi[first:last].to(self.device), None if lo is None else lo[first:last].to(self.device))
                       for name, (hi, lo) in old_block.items()}
                new = {name: compensated.combine([(coef, self._operand(operand, pieces, old, None))
                                                  for coef, operand in rule.state_terms[name]], pieces[-1])
                       for name in rule.accumulators}
                for name, (hi, lo) in new.items():
                    new_hi[name][first:last] = hi
                    if lo is not None:
                        if new_lo[name] is None:
                            new_lo[name] = torch.zeros(size, dtype=torch.float64, device=self.device)
                        new_lo[name][first:last] = lo
                merged[first:last] = self._output(rule.output_terms, pieces, old, new)
            self.writer.block(entry, {name: (new_hi[name], new_lo[name]) for name in rule.accumulators})
            if not counters.nonfinite_state and not all(math.isfinite(v.sum().item()) for v in new_hi.values()):
                counters.nonfinite_state = True  # never used again: the next update starts afresh
            if policy != "ignore" and not math.isfinite(merged.sum().item()):
                self._report_nonfinite([f[begin:end] for f in flat], what, source_names, policy)
                policy = "ignore"
            result[begin:end].copy_(merged)
            if sources_are_mapped:
                for f in flat:
                    release_pages(f[begin:end])
        if rounded_to is not None:  # the format asked for the model's dtype
            result = rounded_through_float32(result, rounded_to)
        return result.view(shape)  # the format reports progress and bytes read itself

    def _output(self, terms, pieces, old, new) -> torch.Tensor:
        """The merge, in float64. A running sum that the merge divides by an integer (SMA's sum,
        WMA's ramp) is divided, as ``kernel.integer_weights`` makes ``merge`` do: the same bits."""
        if len(terms) == 1 and divisor_of(terms[0][0]) is not None:
            value = self._operand(terms[0][1], pieces, old, new)
            pair = value if isinstance(value, tuple) else (value.to(torch.float64), None)
            return compensated.rounded(pair) / divisor_of(terms[0][0])
        return compensated.rounded(compensated.combine(
            [(coef, self._operand(operand, pieces, old, new)) for coef, operand in terms], pieces[-1]))

    @staticmethod
    def _operand(operand, pieces, old, new):
        kind, which = operand
        if kind == SOURCE:
            return pieces[which]
        if kind == STATE:
            return old[which]
        return new[which]

    @staticmethod
    def _report_nonfinite(pieces, what, names, policy) -> None:
        culprits = [names[i] for i, p in enumerate(pieces) if not bool(torch.isfinite(p).all())]
        message = (f"non-finite values (NaN/Inf) in {what} of {', '.join(culprits) or 'the merge (overflow)'} "
                   "(--on-nonfinite error|warn|ignore)")
        if policy == "error":
            raise InputError(message)
        print(f"pmm-dist: warning: {message}", file=sys.stderr, flush=True)

    def accumulator(self, shape, what: str) -> "_CollectingAccumulator":
        return _CollectingAccumulator(self, what, shape)

    def unit_details(self) -> Dict[str, object]:
        counters = self.counters
        return {"state_keys": list(counters.keys), "state_bytes_read": counters.state_bytes_read,
                "nonfinite_state": counters.nonfinite_state}


class _CollectingAccumulator:
    """For chunked formats, which add one whole chunk of each source in turn: collects the
    update's few sources (not the window's) and merges them at ``result``."""

    def __init__(self, context: IncrementalContext, what: str, shape):
        self.context, self.what, self.shape = context, what, tuple(shape)
        self.sources: List[torch.Tensor] = []
        self.names: List[str] = []
        self._unfilled = 0  # elements of the last source still to come, when it arrives in pieces

    def add(self, source: torch.Tensor, weight: float, name: str, *, region: Optional[tuple] = None,
            first: Optional[bool] = None) -> None:
        if region is None:
            self.sources.append(source)
            self.names.append(name)
            return
        # A source saved at another layout arrives as pieces that cover the tensor exactly once
        # (the planner checked it): assemble it, then it counts as one source.
        if self._unfilled == 0:
            self.sources.append(torch.empty(self.shape, dtype=source.dtype))
            self.names.append(name)
            self._unfilled = self.sources[-1].numel()
        self.sources[-1][region] = source
        self._unfilled -= source.numel()

    def result(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """As ``Accumulator.result``: the merge in the sources' dtype, then ``dtype`` if given."""
        assert self.sources, "no source was added"
        merged = self.context.merge_tensor(self.sources, self.what, self.names, sources_are_mapped=False)
        self.sources, self.names = [], []
        return merged if dtype is None else merged.to(dtype)


def with_state_details(outcome: UnitResult, context: IncrementalContext, state_bytes_written: int) -> UnitResult:
    """The unit's result with the state's bytes read counted (the manifest's bytes_read
    counts every byte read) and what the coordinator checks before committing."""
    details = dict(outcome.details, watch=dict(context.unit_details(), state_bytes_written=state_bytes_written))
    return dataclasses.replace(outcome, num_bytes_read=outcome.num_bytes_read + context.counters.state_bytes_read,
                               details=details)
