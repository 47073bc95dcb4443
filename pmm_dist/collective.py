"""The one collective helper: metadata-only, exception-robust, with or without a process group.

Ranks exchange small picklable objects (plans, verdicts, results), never tensor data. Every
exchange goes through ``step``: each rank runs its local part, catches its own exception, and
all ranks then agree on the outcome, so no rank hangs in a collective because another failed,
and every rank raises one ``RankFailure`` that holds each failing rank's message.
"""
import os
import pickle
import traceback
from datetime import timedelta
from typing import Any, Callable, List

import torch.distributed as dist

from .errors import MergeError, RankFailure


def _launcher_env():
    """Rank and world size from torchrun / the deepspeed launcher, else from MPI, else 1 process."""
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


class Collective:
    """Rank identity plus the metadata exchanges the engine needs.

    Uses an existing default process group if the caller initialised one; otherwise starts
    one (gloo unless told otherwise: only small objects cross ranks, so NCCL buys nothing)
    when the launcher says there is more than one process.
    """

    def __init__(self, backend: str = "gloo", timeout_minutes: float = 180.0):
        self.bytes_exchanged = 0
        self._owns_group = False
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
            return
        self.rank, self.world_size, self.local_rank = _launcher_env()
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

    # -- raw exchanges (counted) -------------------------------------------------------------
    def _all_gather(self, obj: Any) -> List[Any]:
        if self.world_size == 1:
            return [obj]
        gathered: List[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        # Every rank's payload goes to every other rank; each rank counts what it sent.
        self.bytes_exchanged += len(pickle.dumps(obj)) * (self.world_size - 1)
        return gathered

    def _broadcast(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        if self.is_coordinator:
            self.bytes_exchanged += len(pickle.dumps(obj)) * (self.world_size - 1)
        return box[0]

    # -- exception-robust steps ------------------------------------------------------------------
    def step(self, local_fn: Callable[[], Any]) -> List[Any]:
        """Every rank runs ``local_fn``; returns all ranks' results, or raises on every rank."""
        outcome = self._run_local(local_fn)
        gathered = self._all_gather(outcome)
        self._raise_failures(gathered)
        return [value for _, value in gathered]

    def coordinator_step(self, coordinator_fn: Callable[[], Any]) -> Any:
        """Rank 0 runs ``coordinator_fn``; every rank gets its result, or raises its error."""
        outcome = self._run_local(coordinator_fn) if self.is_coordinator else None
        outcome = self._broadcast(outcome)
        self._raise_failures([outcome])
        return outcome[1]

    def total_bytes_exchanged(self) -> int:
        """Sum over ranks of the metadata bytes each rank sent (a collective call itself)."""
        mine = self.bytes_exchanged
        return sum(self._all_gather(mine)) if self.world_size > 1 else mine

    @staticmethod
    def _run_local(fn):
        try:
            return (None, fn())
        except MergeError as exc:
            return (str(exc), None)
        except Exception as exc:  # noqa: BLE001 - reported to every rank, then re-raised
            if os.environ.get("PMM_DIST_DEBUG"):
                traceback.print_exc()
            return (f"{type(exc).__name__}: {exc}", None)

    def _raise_failures(self, outcomes):
        failed = {rank if len(outcomes) > 1 else 0: err for rank, (err, _) in enumerate(outcomes) if err is not None}
        if failed:
            raise RankFailure(failed)
