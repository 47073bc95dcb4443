"""The planner: a pure function from work units and a world size to per-rank work.

No I/O and no collectives here, so it is unit-tested at world sizes in the thousands.
"""
import heapq
from dataclasses import dataclass
from typing import List, Sequence, Tuple


@dataclass(frozen=True)
class WorkUnit:
    """One output file, produced by exactly one rank from the same path in every source.

    ``relpath`` is relative to a checkpoint directory and identical in every source and in the
    output; ``action`` is ``merge`` (weighted sum of all sources) or ``copy`` (newest source,
    byte for byte); ``num_bytes`` is the newest source's size, the balance weight.
    ``items`` optionally names what the unit holds when that is not simply the same-named file
    of every source (e.g. the tensor names of one output shard); it travels with the plan.
    """
    relpath: str
    num_bytes: int
    action: str = "merge"
    items: tuple = ()


def assign_units(units: Sequence[WorkUnit], world_size: int) -> List[List[WorkUnit]]:
    """Byte-balanced assignment: largest unit first to the least-loaded rank (LPT).

    Deterministic: ties broken by path and rank, so every rank computes the same plan.
    Merging work per unit is proportional to its bytes times N for every unit alike, so
    balancing output bytes balances reading too.
    """
    if world_size < 1:
        raise ValueError(f"world size must be at least 1, got {world_size}")
    order = sorted(units, key=lambda u: (-_cost(u), u.relpath))
    loads: List[Tuple[float, int]] = [(0.0, rank) for rank in range(world_size)]
    heapq.heapify(loads)
    shares: List[List[WorkUnit]] = [[] for _ in range(world_size)]
    for unit in order:
        load, rank = heapq.heappop(loads)
        shares[rank].append(unit)
        heapq.heappush(loads, (load + _cost(unit), rank))
    for share in shares:
        share.sort(key=lambda u: u.relpath)
    return shares


def _cost(unit: WorkUnit) -> float:
    # A copy reads one source and writes once; a merge reads every source and does arithmetic.
    return max(unit.num_bytes, 1) * (1.0 if unit.action == "merge" else 0.25)
