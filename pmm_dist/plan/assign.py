"""Assignment: one cost model and one balancer, pure functions of the plan's sizes.

No I/O and no collectives here, so it is unit-tested at world sizes in the thousands. Both the
assignment of output files to ranks and the binning of a chunked checkpoint's items into output
files use ``balance`` with ``work_cost``.
"""
import heapq
from typing import List, Sequence, Tuple, TypeVar

from .types import Action, WorkUnit

T = TypeVar("T")


def work_cost(num_bytes: int, action: Action, num_sources: int) -> int:
    """Bytes read to produce ``num_bytes`` of output: a merge reads every source, a copy the
    newest only. The arithmetic is proportional to the bytes read, so this is the one measure."""
    return max(num_bytes, 1) * (num_sources if action == Action.MERGE else 1)


def balance(things: Sequence[T], num_bins: int, costs: Sequence[int]) -> List[List[T]]:
    """Longest-processing-time-first binning: the costliest thing to the least-loaded bin.

    ``costs[i]`` is the cost of ``things[i]``. Deterministic: ties between equal costs go in the
    order of ``things`` (the caller orders them), then to the lower bin number; each bin keeps
    the order it was filled in."""
    if num_bins < 1:
        raise ValueError(f"need at least one bin (world size), got {num_bins}")
    if len(costs) != len(things):
        raise ValueError(f"{len(costs)} costs for {len(things)} things")
    bins: List[List[T]] = [[] for _ in range(num_bins)]
    loads: List[Tuple[int, int]] = [(0, k) for k in range(num_bins)]
    # One stable sort of positions by cost and one heap operation per thing: a million chunks
    # in about a second.
    for position in sorted(range(len(things)), key=costs.__getitem__, reverse=True):
        load, k = loads[0]
        bins[k].append(things[position])
        heapq.heapreplace(loads, (load + costs[position], k))
    return bins


def assign_units(units: Sequence[WorkUnit], world_size: int, num_sources: int = 1) -> List[List[WorkUnit]]:
    """Output files to ranks, balanced by ``work_cost`` (ties by path); each rank's share sorted by path."""
    ordered = sorted(units, key=lambda u: u.relpath)
    shares = balance(ordered, world_size, [work_cost(u.num_bytes, u.action, num_sources) for u in ordered])
    for share in shares:
        share.sort(key=lambda u: u.relpath)
    return shares
