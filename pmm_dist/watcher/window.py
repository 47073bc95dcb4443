"""Which checkpoints a published merge covers, and which merges are due: pure functions.

    window_for(target, known, last=N, interval=V)
        --last N: the newest N of the known checkpoints up to ``target`` (all of them while
        there are fewer); --interval V: target, target-V, ... (N of them with --last, else back
        to the oldest known); neither: every checkpoint so far. ``known`` is every checkpoint the
        watcher has seen, including those the trainer's retention has deleted since: a deletion
        never shrinks a window.
    due(available, last_published, backfill)
        the complete checkpoints newer than the last published merge: all of them, oldest first
        (--backfill), or the newest only.
"""
from typing import List, Optional, Sequence

from ..errors import InputError


def window_for(target: int, known: Sequence[int], *, last: Optional[int] = None,
               interval: Optional[int] = None) -> List[int]:
    found = sorted(set(known))
    assert target in found, (target, found)
    if interval is None:
        upto = [it for it in found if it <= target]
        return upto[-last:] if last else upto
    wanted = []
    iteration = target
    while iteration >= found[0] and (last is None or len(wanted) < last):
        wanted.append(iteration)
        iteration -= interval
    missing = [it for it in wanted if it not in set(found)]
    if missing:
        raise InputError(f"the merge at iteration {target} with --interval {interval} needs iteration(s) "
                         f"{', '.join(map(str, sorted(missing)))}, which the run never had")
    return sorted(wanted)


def due(available: Sequence[int], last_published: Optional[int], backfill: bool) -> List[int]:
    newer = sorted(it for it in set(available) if last_published is None or it > last_published)
    return newer if backfill else newer[-1:]
