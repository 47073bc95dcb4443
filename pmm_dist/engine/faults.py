"""Test-only fault injection, to prove that failures anywhere leave nothing loadable behind.

``PMM_DIST_FAULT="<point>[#<n>]@<rank>=<action>"``, e.g. ``unit:2@1=kill`` (rank 1 is SIGKILLed
just after finishing its unit number 2) or ``commit:manifest@0=raise``; ``#n``: only the n-th
time (from 1) this process reaches the point (a watcher reaches them once per update). Points:
``plan``, ``validate``, ``unit:<k>`` (after the k-th unit of that rank, counted from 0,
including units skipped on resume), ``commit:recorded`` (every result recorded, nothing moved
yet), ``commit:moved`` (the staged checkpoint is in place, no manifest yet),
``commit:manifest`` (manifest written, no tracker yet); the watcher's ``watch:recorded``
(published in its history, before the index and --keep) and ``watch:index`` (index written,
older merges not yet removed). Actions: ``kill`` (SIGKILL), ``sigint`` (as Ctrl-C), anything
else raises InjectedFault. Unset in normal use: a no-op.
"""
import os
import signal
from collections import Counter

ENV = "PMM_DIST_FAULT"
_reached: Counter = Counter()


class InjectedFault(RuntimeError):
    pass


def inject(point: str, rank: int) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    _reached[point] += 1
    for clause in spec.split(","):
        where, _, action = clause.partition("=")
        target, _, target_rank = where.partition("@")
        target, _, nth = target.partition("#")
        if target == point and (not target_rank or int(target_rank) == rank) and \
                (not nth or int(nth) == _reached[point]):
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if action == "sigint":  # as a Ctrl-C would: Python raises KeyboardInterrupt here
                os.kill(os.getpid(), signal.SIGINT)
                return
            raise InjectedFault(f"injected fault at {point} on rank {rank}")
