"""Test-only fault injection, to prove that failures anywhere leave nothing loadable behind.

``PMM_DIST_FAULT="<point>@<rank>=<action>"``, e.g. ``unit:2@1=kill`` (rank 1 is SIGKILLed just
after finishing its unit number 2) or ``commit:manifest@0=raise``. Points: ``plan``,
``validate``, ``unit:<k>`` (after the k-th unit of that rank, counted from 0, including units
skipped on resume), ``commit:recorded`` (every result recorded, nothing moved yet),
``commit:moved`` (the staged checkpoint is in place, no manifest yet),
``commit:manifest`` (manifest written, no tracker yet). Actions: ``kill`` (SIGKILL), ``sigint``
(as Ctrl-C), anything else raises InjectedFault. Unset in normal use: a no-op.
"""
import os
import signal

ENV = "PMM_DIST_FAULT"


class InjectedFault(RuntimeError):
    pass


def inject(point: str, rank: int) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    for clause in spec.split(","):
        where, _, action = clause.partition("=")
        target, _, target_rank = where.partition("@")
        if target == point and (not target_rank or int(target_rank) == rank):
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if action == "sigint":  # as a Ctrl-C would: Python raises KeyboardInterrupt here
                os.kill(os.getpid(), signal.SIGINT)
                return
            raise InjectedFault(f"injected fault at {point} on rank {rank}")
