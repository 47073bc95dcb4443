"""pmm_dist.dist.collective: named, exception-robust steps.

In this process (unit): a world of one, the failure records, the launcher's variables. In a
real gloo world of two ranks (multiprocess): tests/collective_world.py runs every scenario on
both ranks under torchrun and each rank reports what it got; a failure of any kind on one rank
must make every rank raise the same RankFailure in that step, not leave the other waiting.
"""
import json
import os
import pickle
import signal
import sys
import threading

import pytest

from pmm_dist.dist.collective import Collective, describe_failure, launcher_env, sigterm_as_exception
from pmm_dist.errors import InputError, Interrupted, MergeError, RankError, RankFailure, UsageError

from .conftest import REPO, run_python

_LAUNCHER_VARIABLES = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                       "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "PMIX_RANK",
                       "PMIX_SIZE", "PMIX_LOCAL_RANK"]


@pytest.fixture
def no_launcher(monkeypatch):
    for var in _LAUNCHER_VARIABLES:
        monkeypatch.delenv(var, raising=False)


def _raise(exc):
    raise exc


def _failure_of(call) -> RankFailure:
    """The RankFailure ``call()`` raises; anything else escaping it (a KeyboardInterrupt would end
    pytest itself) fails the test."""
    try:
        call()
    except RankFailure as failure:
        return failure
    except BaseException as escaped:  # noqa: BLE001
        pytest.fail(f"{type(escaped).__name__}({escaped}) escaped the step instead of a RankFailure")
    pytest.fail("the step did not fail")


@pytest.fixture
def single(no_launcher):
    c = Collective()
    assert (c.rank, c.world_size, c.is_coordinator) == (0, 1, True)
    return c


# -- a world of one, in this process ---------------------------------------------------------------
def test_single_process_steps_return_their_values(single):
    assert single.step("exchange", lambda: {"a": 1}) == [{"a": 1}]
    assert single.gather_step("gather", lambda: "result") == ["result"]
    assert single.coordinator_step("plan", lambda: ("plan", 3)) == ("plan", 3)
    assert single.scatter_step("share", lambda: ["the only share"]) == "the only share"
    assert single.bytes_exchanged == 0 and single.total_bytes_exchanged() == 0  # nothing crossed a process


def test_single_process_failure_is_a_rank_failure_naming_the_step(single):
    with pytest.raises(RankFailure) as info:
        single.step("check units", lambda: _raise(InputError("/a/b.pt: key 'w' missing")))
    failure = info.value
    assert failure.step == "check units" and isinstance(failure, MergeError)
    assert str(failure) == "/a/b.pt: key 'w' missing"  # one rank: no "[rank 0]" prefix
    assert list(failure.errors_by_rank) == [0] and failure.errors_by_rank[0].kind == "InputError"
    assert not failure.interrupted and not failure.usage and failure.tracebacks == {}


def test_single_process_scatter_needs_one_share_per_rank(single):
    with pytest.raises(RankFailure, match="internal error: 2 shares for 1 ranks") as info:
        single.scatter_step("share", lambda: ["a", "b"])
    assert info.value.step == "share"


@pytest.mark.parametrize("stop, message", [(KeyboardInterrupt(), "interrupted (Ctrl-C)"),
                                           (SystemExit(), "interrupted (SystemExit)"),
                                           (Interrupted("interrupted by the user"), "interrupted by the user")])
def test_single_process_interrupt_is_caught_and_reported(single, stop, message):
    failure = _failure_of(lambda: single.gather_step("merge", lambda: _raise(stop)))
    assert failure.step == "merge" and failure.interrupted and str(failure) == message


def test_sigterm_becomes_an_interrupt_and_the_handler_is_restored(single):
    before = signal.getsignal(signal.SIGTERM)

    def local():
        if signal.getsignal(signal.SIGTERM) in (before, signal.SIG_DFL):  # else SIGTERM would end pytest
            raise AssertionError("no SIGTERM handler inside a step")
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt the step")
    failure = _failure_of(lambda: single.step("merge", local))
    assert failure.interrupted and str(failure) == "terminated (SIGTERM)"
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_handler_is_left_alone_outside_the_main_thread():
    seen = []

    def in_thread():
        with sigterm_as_exception():  # signal.signal would raise ValueError here
            seen.append(signal.getsignal(signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert seen == [before]


def test_describe_failure_keeps_messages_flags_and_bug_tracebacks():
    error = describe_failure(InputError("/x.pt: truncated"))
    assert error == RankError("/x.pt: truncated", "InputError", resumable=False)
    assert describe_failure(UsageError("--last must be positive")).usage
    try:
        {}["missing"]
    except KeyError as exc:
        bug = describe_failure(exc)
    assert bug.kind == "KeyError" and bug.message == "KeyError: 'missing'" and not bug.interrupted
    assert "Traceback" in bug.traceback and '{}["missing"]' in bug.traceback
    nested = RankFailure("inner", {1: RankError("first", "InputError"), 0: RankError("second", "InputError")})
    assert describe_failure(nested) == RankError("second", "InputError")  # the lowest rank's, as it was


def test_rank_failure_message_usage_and_tracebacks():
    failure = RankFailure("plan", {1: RankError("b", "UsageError", usage=True),
                                   0: RankError("a", "ZeroDivisionError", traceback="tb")})
    assert str(failure) == "[rank 0] a\n[rank 1] b"
    assert not failure.usage  # exit 2 only when every failing rank had a usage error
    assert failure.tracebacks == {0: "tb"}
    assert RankFailure("plan", {0: RankError("a", "UsageError", usage=True)}).usage


@pytest.mark.parametrize("env, expected", [
    ({}, (0, 1, 0)),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, (3, 8, 1)),          # torchrun, deepspeed launcher
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}, (2, 4, 0)),
    ({"PMI_RANK": "1", "PMI_SIZE": "2"}, (1, 2, 0)),                             # MPICH without a local rank
    ({"PMIX_RANK": "5", "PMIX_SIZE": "6", "PMIX_LOCAL_RANK": "1"}, (5, 6, 1)),
    ({"RANK": "1", "PMI_RANK": "0", "PMI_SIZE": "2"}, (0, 2, 0)),                # RANK without WORLD_SIZE: not torchrun
])
def test_launcher_env(no_launcher, monkeypatch, env, expected):
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert launcher_env() == expected


def test_several_processes_without_rendezvous_or_mpi4py_is_a_clear_error(no_launcher, monkeypatch):
    monkeypatch.setenv("PMI_RANK", "0")  # mpiexec says two processes, but gives no MASTER_ADDR/PORT
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py raises ImportError
    with pytest.raises(MergeError, match="no MASTER_ADDR/MASTER_PORT, and mpi4py is not installed"):
        Collective()


# -- a real gloo world of two ranks -------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("collective_world")
    run_python([os.path.join(REPO, "tests", "collective_world.py"), out], nproc=2, check="the gloo world of 2 ranks")
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    return lambda name: [r["results"][name] for r in ranks]


def _failures(world, name, step):
    """Both ranks' outcomes of scenario ``name``: each must be a RankFailure at ``step``, the same on both."""
    outcomes = world(name)
    for rank, outcome in enumerate(outcomes):
        assert outcome.get("raised") == "RankFailure", f"rank {rank}: {outcome}"
        assert outcome["step"] == step, f"rank {rank}: {outcome}"
    assert outcomes[0] == outcomes[1], "the ranks disagree about the failure"
    return outcomes[0]


@pytest.mark.multiprocess
def test_step_gives_every_rank_every_result(world):
    expected = [{"rank": 0, "square": 0}, {"rank": 1, "square": 1}]
    assert world("step") == [{"returned": expected}, {"returned": expected}]


@pytest.mark.multiprocess
def test_gather_step_gives_the_results_to_the_coordinator_only(world):
    assert world("gather_step") == [{"returned": ["result of rank 0", "result of rank 1"]}, {"returned": None}]


@pytest.mark.multiprocess
def test_coordinator_step_runs_on_rank_0_and_gives_everyone_its_result(world):
    assert world("coordinator_step") == [{"returned": {"result": {"plan": "made on rank 0"}, "ran_here": 1}},
                                         {"returned": {"result": {"plan": "made on rank 0"}, "ran_here": 0}}]


@pytest.mark.multiprocess
def test_scatter_step_gives_each_rank_its_own_share(world):
    assert world("scatter_step") == [{"returned": {"share": "share of rank 0", "ran_here": 1}},
                                     {"returned": {"share": "share of rank 1", "ran_here": 0}}]


@pytest.mark.multiprocess
def test_scatter_with_the_wrong_number_of_shares_fails_every_rank(world):
    failure = _failures(world, "scatter_wrong_count", "share")
    assert failure["message"] == "internal error: 1 shares for 2 ranks"


@pytest.mark.multiprocess
def test_an_error_on_one_rank_fails_every_rank_with_its_message(world):
    failure = _failures(world, "input_error_on_rank_1", "check units")
    message = "/run/iter_0000020/mp_rank_01/model_optim_rng.pt: key 'w' has shape (3, 3)"
    assert list(failure["errors"]) == ["1"]
    assert failure["errors"]["1"]["message"] == message and failure["errors"]["1"]["kind"] == "InputError"
    assert failure["errors"]["1"]["traceback"] is None  # a user's error: its message is enough
    assert failure["message"] == f"[rank 1] {message}"
    assert not failure["interrupted"] and not failure["usage"]


@pytest.mark.multiprocess
def test_errors_on_both_ranks_are_all_reported(world):
    failure = _failures(world, "errors_on_both_ranks", "check units")
    assert failure["message"] == "[rank 0] problem seen by rank 0\n[rank 1] problem seen by rank 1"


@pytest.mark.multiprocess
def test_a_coordinator_usage_error_reaches_every_rank(world):
    failure = _failures(world, "usage_error_in_coordinator_step", "plan")
    assert failure["usage"] and failure["errors"]["0"]["kind"] == "UsageError"
    assert failure["message"] == "--alpha must be in (0, 1], got 1.5"


@pytest.mark.multiprocess
def test_an_error_in_a_gather_step_reaches_the_coordinator_and_the_others(world):
    failure = _failures(world, "error_in_gather_step_on_rank_1", "merge")
    assert failure["errors"]["1"]["message"] == "rank 1 cannot merge unit 3"


@pytest.mark.multiprocess
@pytest.mark.parametrize("name, step, rank, message", [
    ("keyboard_interrupt_on_rank_1", "merge", "1", "interrupted (Ctrl-C)"),
    ("ctrl_c_signal_on_rank_1", "merge", "1", "interrupted (Ctrl-C)"),            # a real SIGINT
    ("sigterm_on_rank_0_in_gather_step", "merge", "0", "terminated (SIGTERM)"),  # a real SIGTERM
    ("system_exit_in_scatter_step", "plan", "0", "interrupted (SystemExit)"),
])
def test_an_interrupt_on_one_rank_ends_every_rank(world, name, step, rank, message):
    """The other rank is not left in the collective until its timeout (60 s in the harness: it
    would have raised a gloo error instead): both raise the interrupted RankFailure in that step."""
    failure = _failures(world, name, step)
    assert failure["interrupted"]
    assert list(failure["errors"]) == [rank] and failure["errors"][rank]["message"] == message
    assert failure["errors"][rank]["interrupted"]


@pytest.mark.multiprocess
def test_a_bug_carries_its_traceback(world):
    failure = _failures(world, "bug_on_rank_1", "check units")
    error = failure["errors"]["1"]
    assert error["kind"] == "ZeroDivisionError" and error["message"] == "ZeroDivisionError: division by zero"
    assert "Traceback (most recent call last)" in error["traceback"]
    assert "collective_world.py" in error["traceback"] and "in divide_by_zero" in error["traceback"]
    assert "return 1 / 0" in error["traceback"]


@pytest.mark.multiprocess
def test_a_failed_inner_step_fails_the_outer_step_with_the_first_message(world):
    failure = _failures(world, "nested_step_failure", "outer")
    assert {rank: e["message"] for rank, e in failure["errors"].items()} == \
        {"0": "inner problem on rank 1", "1": "inner problem on rank 1"}


@pytest.mark.multiprocess
def test_bytes_exchanged_are_counted_per_sender(world):
    from .collective_world import BIG
    rank0, rank1 = (outcome["returned"] for outcome in world("bytes_exchanged"))
    payload = len(pickle.dumps(b"x" * BIG))
    # step: every result to everyone; gather: to the coordinator only
    assert rank1["step"] >= payload and rank0["step"] < payload
    assert rank1["gather_step"] >= payload and rank0["gather_step"] < payload
    # coordinator and scatter steps: rank 0 sends, rank 1 only receives (and reports no failure)
    assert rank0["coordinator_step"] >= payload and rank1["coordinator_step"] < payload
    assert rank0["scatter_step"] >= payload and rank1["scatter_step"] < payload
    assert rank0["total"] == rank1["total"] == rank0["mine"] + rank1["mine"]


@pytest.mark.multiprocess
def test_the_group_still_works_after_every_failure(world):
    assert world("still_works_after_the_failures") == [{"returned": [0, 1]}, {"returned": [0, 1]}]


def test_an_exchange_the_process_group_fails_is_one_resumable_message():
    """gloo raises RuntimeError when a peer died (killed rank): the survivors say so in one line."""
    from pmm_dist.dist.collective import _peers_reachable
    with pytest.raises(MergeError, match="another rank was killed or crashed") as info:
        with _peers_reachable():
            raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242\ndetails")
    assert info.value.resumable and "Connection closed by peer" in str(info.value) and "details" not in str(info.value)
