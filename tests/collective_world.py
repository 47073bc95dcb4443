"""A real gloo world for tests/test_collective.py: every scenario below runs on every rank.

    torchrun --standalone --nproc-per-node=2 tests/collective_world.py OUT

Each scenario makes one or more named steps of ``pmm_dist.dist.collective.Collective``, with
failures of every kind on one rank or both; each rank records what its call returned or raised
and writes OUT/rank<R>.json for the test to read. The process group's timeout is short (60 s): a
rank that waited for one that had already left would fail with a gloo timeout instead of a
RankFailure, and the test with it. The scenarios run in order in one world, so the last one also
shows that the group still works after every failure.
"""
import json
import os
import signal
import sys
import time
from dataclasses import asdict
from datetime import timedelta

import torch.distributed as dist

from pmm_dist.dist.collective import Collective
from pmm_dist.errors import InputError, RankFailure, UsageError

GLOO_TIMEOUT = timedelta(seconds=60)
BIG = 10_000  # payload bytes of the byte-counting scenario
SCENARIOS = {}


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


def only_on(rank, c, action, otherwise=None):
    """``action()`` on ``rank``; the other rank returns ``otherwise``."""
    return action() if c.rank == rank else otherwise


def fail(exc):
    raise exc


# -- what a step returns ------------------------------------------------------------------------------
@scenario
def step(c):
    return c.step("exchange", lambda: {"rank": c.rank, "square": c.rank * c.rank})


@scenario
def gather_step(c):
    return c.gather_step("gather", lambda: f"result of rank {c.rank}")


@scenario
def coordinator_step(c):
    calls = []
    result = c.coordinator_step("plan", lambda: calls.append(c.rank) or {"plan": "made on rank 0"})
    return {"result": result, "ran_here": len(calls)}


@scenario
def scatter_step(c):
    calls = []
    share = c.scatter_step("share", lambda: calls.append(c.rank) or [f"share of rank {i}" for i in range(c.world_size)])
    return {"share": share, "ran_here": len(calls)}


# -- failures -----------------------------------------------------------------------------------------
@scenario
def scatter_wrong_count(c):
    return c.scatter_step("share", lambda: ["one share only"])


@scenario
def input_error_on_rank_1(c):
    return c.step("check units", lambda: only_on(1, c, lambda: fail(
        InputError("/run/iter_0000020/mp_rank_01/model_optim_rng.pt: key 'w' has shape (3, 3)")), "fine"))


@scenario
def errors_on_both_ranks(c):
    return c.step("check units", lambda: fail(InputError(f"problem seen by rank {c.rank}")))


@scenario
def usage_error_in_coordinator_step(c):
    return c.coordinator_step("plan", lambda: fail(UsageError("--alpha must be in (0, 1], got 1.5")))


@scenario
def error_in_gather_step_on_rank_1(c):
    return c.gather_step("merge", lambda: only_on(1, c, lambda: fail(InputError("rank 1 cannot merge unit 3")),
                                                  "merged"))


@scenario
def keyboard_interrupt_on_rank_1(c):
    return c.step("merge", lambda: only_on(1, c, lambda: fail(KeyboardInterrupt()), "merged"))


def _signal_self(signum):
    os.kill(os.getpid(), signum)
    time.sleep(30)  # the signal's exception ends this at once
    return "the signal did not interrupt"


@scenario
def ctrl_c_signal_on_rank_1(c):
    return c.step("merge", lambda: only_on(1, c, lambda: _signal_self(signal.SIGINT), "merged"))


@scenario
def sigterm_on_rank_0_in_gather_step(c):
    return c.gather_step("merge", lambda: only_on(0, c, lambda: _signal_self(signal.SIGTERM), "merged"))


@scenario
def system_exit_in_scatter_step(c):
    return c.scatter_step("plan", lambda: fail(SystemExit()))


def divide_by_zero():
    return 1 / 0


@scenario
def bug_on_rank_1(c):
    return c.step("check units", lambda: only_on(1, c, divide_by_zero, "fine"))


@scenario
def nested_step_failure(c):
    def outer():
        c.step("inner", lambda: only_on(1, c, lambda: fail(InputError("inner problem on rank 1")), "fine"))
        return "inner step passed"
    return c.step("outer", outer)


# -- bytes ----------------------------------------------------------------------------------------------
@scenario
def bytes_exchanged(c):
    """What each rank counts sending, per kind of step, and the world's total."""
    sent = {}
    before = c.bytes_exchanged
    c.step("bytes", lambda: b"x" * BIG if c.rank == 1 else b"")
    sent["step"], before = c.bytes_exchanged - before, c.bytes_exchanged
    c.gather_step("bytes", lambda: b"y" * BIG if c.rank == 1 else b"")
    sent["gather_step"], before = c.bytes_exchanged - before, c.bytes_exchanged
    c.coordinator_step("bytes", lambda: b"z" * BIG)
    sent["coordinator_step"], before = c.bytes_exchanged - before, c.bytes_exchanged
    c.scatter_step("bytes", lambda: [b"", b"w" * BIG])
    sent["scatter_step"] = c.bytes_exchanged - before
    sent["mine"] = c.bytes_exchanged
    sent["total"] = c.total_bytes_exchanged()
    return sent


@scenario
def still_works_after_the_failures(c):
    return c.step("after", lambda: c.rank)


# -------------------------------------------------------------------------------------------------------
def outcome(run):
    try:
        return {"returned": run()}
    except RankFailure as failure:
        return {"raised": "RankFailure", "step": failure.step, "message": str(failure),
                "interrupted": failure.interrupted, "usage": failure.usage,
                "errors": {str(rank): asdict(error) for rank, error in failure.errors_by_rank.items()}}
    except BaseException as exc:  # noqa: BLE001 - anything else escaping a step is what the test reports
        return {"raised": type(exc).__name__, "message": str(exc)}


def main(out):
    dist.init_process_group("gloo", timeout=GLOO_TIMEOUT)
    c = Collective()
    results = {name: outcome(lambda: fn(c)) for name, fn in SCENARIOS.items()}
    dist.destroy_process_group()
    with open(os.path.join(out, f"rank{c.rank}.json"), "w") as f:
        json.dump({"rank": c.rank, "world_size": c.world_size, "results": results}, f, default=repr)


if __name__ == "__main__":
    main(sys.argv[1])
