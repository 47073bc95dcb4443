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
import threading
import time
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
                in_main = threading.current_thread() is threading.main_thread()
                if in_main and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
                    # started in the background (a shell's `&`): SIGINT is ignored, as it should be
                    # for a real Ctrl-C; the fault stands for one typed at a terminal
                    signal.signal(signal.SIGINT, signal.default_int_handler)
                os.kill(os.getpid(), signal.SIGINT)
                # Another thread may take the signal, and the main thread raises at its next
                # check: wait for it here, so that it arrives at this point of the merge.
                for _ in range(500 if in_main else 0):
                    time.sleep(0.01)
                return
            raise InjectedFault(f"injected fault at {point} on rank {rank}")
