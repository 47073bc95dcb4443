"""Steps 2 and 4, on every rank: check this rank's share of the units, then merge it.

A rank works on up to ``UNITS_IN_FLIGHT`` units at once, while their outputs fit in memory
(``MEMORY_HEADROOM``): while one unit's file is being serialised, hashed and written (I/O, the
GIL released), the next one is summed.
"""
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Deque, List, Optional, Sequence

import torch

from ..formats import CheckpointFormat, MergeContext
from ..io.atomic import copy_atomically
from ..io.record_check import RecordChecker
from ..io.safe_load import loads_observed
from ..io.staging import Staging
from ..plan.types import Action, UnitResult, WorkUnit
from . import faults
from .planning import MergePlan
from .report import peak_rss_bytes, progress_bar

# Two overlap one unit's writing with the next one's arithmetic, but only while their outputs,
# which a unit holds in memory until they are written, fit in the largest output file plus
# MEMORY_HEADROOM: a rank's memory stays at one output file in flight plus that, whatever the
# number of checkpoints (the sources are mapped, not read in).
UNITS_IN_FLIGHT = 2
MEMORY_HEADROOM = 512 << 20


def choose_device(requested: Optional[str], local_rank: int) -> torch.device:
    if requested == "cpu" or (requested is None and not torch.cuda.is_available()):
        return torch.device("cpu")
    if requested and ":" in requested:
        return torch.device(requested)
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def check_share(fmt: CheckpointFormat, plan: MergePlan, share: Sequence[WorkUnit], rank: int) -> List[str]:
    """Problems (naming file and key) in the sources of this rank's MERGE units; COPY units
    are bytes the engine copies and need no check."""
    faults.inject("validate", rank)
    return [p for unit in share if unit.action == Action.MERGE for p in fmt.check_unit(unit, plan.checkpoints)]


def _held_bytes(unit: WorkUnit) -> int:
    """What a unit holds in memory until its file is written: a merged unit its output; a copied
    one streams its bytes."""
    return unit.num_bytes if unit.action == Action.MERGE else 0


@dataclass
class ShareOutcome:
    """What one rank's merge step reports to the coordinator: every unit's result (the commit
    lists them all) and the work done in this run (resumed units were done by an earlier one)."""
    results: List[UnitResult]
    resumed: List[str]          # relpaths of the units found finished in the staging area
    peak_rss: int

    def done_now(self) -> List[UnitResult]:
        resumed = set(self.resumed)
        return [r for r in self.results if r.relpath not in resumed]


class ShareMerger:
    """Merges one rank's share into the staging directory, skipping units already done (--resume)."""

    def __init__(self, fmt: CheckpointFormat, plan: MergePlan, share: Sequence[WorkUnit], staging: Staging,
                 device: torch.device, rank: int, show_progress: bool):
        self.fmt, self.plan, self.share, self.staging, self.rank = fmt, plan, share, staging, rank
        self.num_sources = len(plan.checkpoints)
        self.device = device
        # The bar's total is planned from output sizes: a merged unit reads each source, a copied one the newest.
        planned = sum(u.num_bytes * (self.num_sources if u.action == Action.MERGE else 1) for u in share)
        self.bar = progress_bar(planned, enabled=show_progress,
                                description=f"merging (rank {rank})")
        self._lock = threading.Lock()
        self.resumed: List[str] = []

    def run(self) -> ShareOutcome:
        results: List[UnitResult] = []
        try:
            held = [_held_bytes(unit) for unit in self.share]
            budget = max(held, default=0) + MEMORY_HEADROOM
            with ThreadPoolExecutor(max_workers=UNITS_IN_FLIGHT, thread_name_prefix="pmm-unit") as pool:
                pending: Deque[Future] = deque()
                in_flight: Deque[int] = deque()  # what each pending unit holds
                for unit, holds in zip(self.share, held):
                    while pending and (len(pending) >= UNITS_IN_FLIGHT or sum(in_flight) + holds > budget):
                        self._collect(pending, results)
                        in_flight.popleft()
                    pending.append(pool.submit(self._merge_one, unit))
                    in_flight.append(holds)
                while pending:
                    self._collect(pending, results)
        finally:
            if self.bar is not None:
                # The bar's total was planned from file sizes; it ends at the bytes actually
                # read, the figure the summary reports for this rank.
                self.bar.total = self.bar.n
                self.bar.refresh()
                self.bar.close()
        return ShareOutcome(results, self.resumed, peak_rss_bytes())

    def _advance(self, num_bytes: int) -> None:
        """Progress in bytes read, as the formats report them (the figure the summary counts)."""
        if self.bar is not None:
            with self._lock:
                self.bar.update(num_bytes)

    def _merge_one(self, unit: WorkUnit) -> UnitResult:
        outcome = self.completed(unit)
        if outcome is not None:
            with self._lock:
                self.resumed.append(outcome.relpath)
        else:
            context = self.context_for(unit, self._advance)
            checker = RecordChecker()  # the CRC-32 of every record the unit's sources hold
            try:
                with loads_observed(checker.submit):
                    outcome = self.fmt.merge_unit(unit, self.plan.checkpoints, self.staging.data_dir, context) \
                        if unit.action == Action.MERGE else self._copy_newest(unit, context)
                checker.result()
            except BaseException:
                checker.cancel()
                raise
            outcome = self.unit_finished(unit, context, outcome)
            self.staging.mark_done(unit, outcome)
        return outcome

    # -- hooks (the watcher's incremental merges override them) -----------------------------------
    def completed(self, unit: WorkUnit) -> Optional[UnitResult]:
        """The recorded result of a unit an interrupted run already finished, else None."""
        return self.staging.completed(unit)

    def context_for(self, unit: WorkUnit, on_progress) -> MergeContext:
        return MergeContext(weights=self.plan.weights, device=self.device, optimizer_policy=self.plan.optimizer_policy,
                            on_progress=on_progress, on_nonfinite=self.plan.on_nonfinite,
                            tensor_filter=self.plan.tensor_filter)

    def unit_finished(self, unit: WorkUnit, context: MergeContext, outcome: UnitResult) -> UnitResult:
        """After the unit's file is written, before it is marked done: the result to record."""
        return outcome

    def _copy_newest(self, unit: WorkUnit, context: MergeContext) -> UnitResult:
        """A COPY unit, in every format: the newest checkpoint's file, byte for byte (never unpickled)."""
        num_bytes, sha = copy_atomically(os.path.join(self.plan.checkpoints[-1].path, unit.relpath),
                                         os.path.join(self.staging.data_dir, unit.relpath))
        context.on_progress(num_bytes)
        return UnitResult(unit.relpath, num_bytes, num_bytes, sha, 0)

    def _collect(self, pending: Deque[Future], results: List[UnitResult]) -> None:
        try:
            results.append(pending.popleft().result())
        except BaseException:
            for future in pending:  # start no more work; running units finish, then we raise
                future.cancel()
            raise
        faults.inject(f"unit:{len(results) - 1}", self.rank)
