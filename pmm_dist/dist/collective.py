"""The one collective helper: metadata-only, exception-robust, with or without a process group.

Ranks exchange small picklable objects (plans, verdicts, results), never tensor data. Every
exchange is a named step: each rank runs its local part and catches whatever ends it (an
error, a bug, Ctrl-C, SystemExit), then all ranks agree on the outcome, so no rank waits in a
collective for one that has already failed, and every rank raises one ``RankFailure`` naming
the step and holding each failing rank's message (and, for bugs, its traceback).

    collective.step("check units", fn)               every rank runs fn; all results to everyone
    collective.gather_step("merge", fn)              every rank runs fn; results to the coordinator only
    collective.coordinator_step("plan", fn)          rank 0 runs fn; its result to everyone
    collective.scatter_step("plan", fn)              rank 0 computes one value per rank; each gets its own
"""
import os
import pickle
import signal
import traceback
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Any, Callable, List, Optional

import torch.distributed as dist

from ..errors import Interrupted, MergeError, RankError, RankFailure, Terminated, UsageError


def launcher_env():
    """(rank, world size, local rank) from torchrun / the deepspeed launcher, else MPI, else one process."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    for rank_var, size_var, local_var in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
                                          ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
                                          ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK")):
        if size_var in os.environ and rank_var in os.environ:
            return int(os.environ[rank_var]), int(os.environ[size_var]), int(os.environ.get(local_var, 0))
    return 0, 1, 0


def _rendezvous_through_mpi(rank: int) -> None:
    """Under mpiexec there is no MASTER_ADDR/PORT: rank 0 picks a free port on its host and MPI
    broadcasts the address, so the torch process group (gloo or NCCL) can start."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise MergeError("several processes but no MASTER_ADDR/MASTER_PORT, and mpi4py is not installed: "
                         "launch with torchrun or the deepspeed launcher, or pip install mpi4py") from None
    address = None
    if rank == 0:
        import socket
        host = socket.gethostname()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", 0))
            address = (socket.gethostbyname(host), sock.getsockname()[1])
    address = MPI.COMM_WORLD.bcast(address, root=0)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address[0], str(address[1])


@contextmanager
def sigterm_as_exception():
    """While inside: SIGTERM raises in the main thread (like Ctrl-C) instead of killing the process
    where it stands, so the staging state is reported and the other ranks are told."""
    def raise_terminated(signum, frame):
        raise Terminated("terminated (SIGTERM)")
    try:
        previous = signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _peers_reachable():
    """An exchange the process group itself fails (gloo: "Connection closed by peer", a timeout)
    means another rank is gone, killed or crashed: one message, not the backend's traceback."""
    try:
        yield
    except RuntimeError as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise MergeError(f"the exchange with the other ranks failed ({detail}): another rank was killed or "
                         "crashed (its launcher says which); nothing was committed") from None


def describe_failure(exc: BaseException) -> RankError:
    """A failure as it travels to the other ranks: user errors as their message, interrupts as
    such, anything else (a bug) with its traceback."""
    if isinstance(exc, RankFailure):  # a nested step already failed: keep its first message
        first = exc.errors_by_rank[min(exc.errors_by_rank)]
        return first
    if isinstance(exc, (KeyboardInterrupt, SystemExit, Interrupted)):
        reason = "interrupted (Ctrl-C)" if type(exc) is KeyboardInterrupt else \
            str(exc) or f"interrupted ({type(exc).__name__})"
        return RankError(reason, type(exc).__name__, interrupted=True)
    if isinstance(exc, MergeError):
        return RankError(str(exc), type(exc).__name__, usage=isinstance(exc, UsageError), resumable=exc.resumable)
    return RankError(f"{type(exc).__name__}: {exc}", type(exc).__name__,
                     traceback="".join(traceback.format_exception(exc)))


class Collective:
    """Rank identity plus the metadata exchanges the engine needs.

    Uses an existing default process group if the caller initialised one; otherwise starts
    one (gloo unless told otherwise: only small objects cross ranks, so NCCL buys nothing)
    when the launcher says there is more than one process.
    """

    def __init__(self, backend: str = "gloo", timeout_minutes: float = 180.0, sigterm_raises: bool = True):
        # sigterm_raises False: a caller with its own SIGTERM handling (the watcher, which
        # finishes the current update before it stops) keeps it during the steps as well.
        self.sigterm_raises = sigterm_raises
        self.bytes_exchanged = 0
        self._owns_group = False
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
            return
        self.rank, self.world_size, self.local_rank = launcher_env()
        if self.world_size > 1:
            if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
                _rendezvous_through_mpi(self.rank)
            if backend == "nccl":
                import torch
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend=backend, rank=self.rank, world_size=self.world_size,
                                    timeout=timedelta(minutes=timeout_minutes))
            self._owns_group = True

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    def close(self):
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False

    # -- raw exchanges (counted: what each rank sends) --------------------------------------------
    def _all_gather(self, obj: Any) -> List[Any]:
        if self.world_size == 1:
            return [obj]
        gathered: List[Any] = [None] * self.world_size
        with _peers_reachable():
            dist.all_gather_object(gathered, obj)
        self.bytes_exchanged += len(pickle.dumps(obj)) * (self.world_size - 1)
        return gathered

    def _gather(self, obj: Any) -> Optional[List[Any]]:
        if self.world_size == 1:
            return [obj]
        gathered: Optional[List[Any]] = [None] * self.world_size if self.is_coordinator else None
        with _peers_reachable():
            dist.gather_object(obj, gathered, dst=0)
        if not self.is_coordinator:
            self.bytes_exchanged += len(pickle.dumps(obj))
        return gathered

    def _broadcast(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        box = [obj]
        with _peers_reachable():
            dist.broadcast_object_list(box, src=0)
        if self.is_coordinator:
            self.bytes_exchanged += len(pickle.dumps(obj)) * (self.world_size - 1)
        return box[0]

    def _scatter(self, per_rank: Optional[List[Any]]) -> Any:
        if self.world_size == 1:
            return per_rank[0]
        box: List[Any] = [None]
        # The coordinator's own value never travels: scatter_object_list pads every rank's bytes
        # to the largest object's, and the coordinator's (a whole plan) would make every rank
        # receive the whole plan's size.
        outgoing = [None, *per_rank[1:]] if self.is_coordinator else None
        with _peers_reachable():
            dist.scatter_object_list(box, outgoing, src=0)
        if self.is_coordinator:
            # what goes out: every other rank's object, padded to the largest one
            self.bytes_exchanged += max(len(pickle.dumps(obj)) for obj in per_rank[1:]) * (self.world_size - 1)
            return per_rank[0]
        return box[0]

    # -- exception-robust steps ------------------------------------------------------------------
    def step(self, name: str, local_fn: Callable[[], Any]) -> List[Any]:
        """Every rank runs ``local_fn``; returns all ranks' results, or raises on every rank."""
        gathered = self._all_gather(self._run_local(local_fn))
        self._raise_failures(name, gathered)
        return [value for _, value in gathered]

    def gather_step(self, name: str, local_fn: Callable[[], Any]) -> Optional[List[Any]]:
        """Every rank runs ``local_fn``; the coordinator gets all results (others get None).
        Whether any rank failed still reaches every rank (one flag each), so all raise."""
        outcome = self._run_local(local_fn)
        failures = self._all_gather(outcome[0])  # small: None, or the failure record
        self._raise_failures(name, [(failure, None) for failure in failures])
        gathered = self._gather(outcome[1])
        return gathered

    def coordinator_step(self, name: str, coordinator_fn: Callable[[], Any]) -> Any:
        """Rank 0 runs ``coordinator_fn``; every rank gets its result, or raises its error."""
        outcome = self._run_local(coordinator_fn) if self.is_coordinator else None
        outcome = self._broadcast(outcome)
        self._raise_failures(name, [outcome])
        return outcome[1]

    def scatter_step(self, name: str, coordinator_fn: Callable[[], List[Any]]) -> Any:
        """Rank 0 runs ``coordinator_fn`` -> one value per rank; each rank receives only its own
        (a plan's share), or every rank raises the coordinator's error."""
        failure = None
        per_rank = None
        if self.is_coordinator:
            failure, per_rank = self._run_local(coordinator_fn)
            if failure is None and len(per_rank) != self.world_size:
                failure = RankError(f"internal error: {len(per_rank)} shares for {self.world_size} ranks", "AssertionError")
        self._raise_failures(name, [self._broadcast((failure, None))])
        return self._scatter(per_rank)

    def total_bytes_exchanged(self) -> int:
        """Sum over ranks of the metadata bytes each rank sent (a collective call itself)."""
        mine = self.bytes_exchanged
        return sum(self._all_gather(mine)) if self.world_size > 1 else mine

    def _run_local(self, fn):
        try:
            with sigterm_as_exception() if self.sigterm_raises else nullcontext():
                return (None, fn())
        except BaseException as exc:  # noqa: BLE001 - reported to every rank, then raised on each
            return (describe_failure(exc), None)

    def _raise_failures(self, name: str, outcomes) -> None:
        failed = {rank if len(outcomes) > 1 else 0: error for rank, (error, _) in enumerate(outcomes)
                  if error is not None}
        if failed:
            raise RankFailure(name, failed)
