"""Assignment: one cost model and one balancer, pure functions of the plan's sizes.

No I/O and no collectives here, so it is unit-tested at world sizes in the thousands. Both the
assignment of output files to ranks and the binning of a chunked checkpoint's items into output
files use ``balance`` with ``work_cost``.
"""
import heapq
from typing import Callable, List, Sequence, Tuple, TypeVar

from .types import Action, WorkUnit

T = TypeVar("T")


def work_cost(num_bytes: int, action: Action, num_sources: int) -> int:
    """Bytes read to produce ``num_bytes`` of output: a merge reads every source, a copy the
    newest only. The arithmetic is proportional to the bytes read, so this is the one measure."""
    return max(num_bytes, 1) * (num_sources if action == Action.MERGE else 1)


def balance(things: Sequence[T], num_bins: int, cost: Callable[[T], int],
            order_key: Callable[[T], tuple]) -> List[List[T]]:
    """Longest-processing-time-first binning: the costliest thing to the least-loaded bin.

    Deterministic (ties broken by ``order_key``, then by bin number), so every rank that
    computed it would get the same answer; each bin keeps the order it was filled in."""
    if num_bins < 1:
        raise ValueError(f"need at least one bin (world size), got {num_bins}")
    bins: List[List[T]] = [[] for _ in range(num_bins)]
    loads: List[Tuple[int, int]] = [(0, k) for k in range(num_bins)]
    # Each cost computed once, and one heap operation per thing: a million chunks in seconds.
    # (The position breaks ties as sorting ``things`` stably would.)
    for negative_cost, _, position in sorted((-cost(t), order_key(t), i) for i, t in enumerate(things)):
        load, k = loads[0]
        bins[k].append(things[position])
        heapq.heapreplace(loads, (load - negative_cost, k))
    return bins


def assign_units(units: Sequence[WorkUnit], world_size: int, num_sources: int = 1) -> List[List[WorkUnit]]:
    """Output files to ranks, balanced by ``work_cost``; each rank's share sorted by path."""
    shares = balance(units, world_size, lambda u: work_cost(u.num_bytes, u.action, num_sources),
                     lambda u: (u.relpath,))
    for share in shares:
        share.sort(key=lambda u: u.relpath)
    return shares
