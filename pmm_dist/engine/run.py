"""The merge engine: plan on the coordinator, check and merge rank-locally, commit last.

    merge(MergeOptions(...)) -> MergeResult

Each step is one exception-robust collective (pmm_dist.dist.collective), named in errors:
  1. plan     (coordinator) discover, select, weigh, validate, assign -> each rank gets its share
  2. check    (every rank)  its units in every source (keys, shapes, dtypes) -> verdicts to all
  3. stage    (coordinator) prepare the staging directory (fresh, or continued with --resume)
  4. merge    (every rank)  its units into the staging directory -> results to the coordinator
  5. commit   (coordinator) see engine.commit: the output becomes loadable last
Only plans, verdicts and results cross ranks; tensor data never does.
"""
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .. import __version__
from ..dist.collective import Collective
from ..errors import InputError, MergeError
from ..formats import resolve_format
from ..io.staging import Staging
from ..merge.kernel import fused_kernels
from . import faults
from .commit import commit
from .execution import ShareMerger, ShareOutcome, check_share, choose_device
from .manifest import MANIFEST, Manifest, model_weights_summary
from .options import MergeOptions
from .planning import MergePlan, plan_merge_with_format
from .report import format_plan


@dataclass
class MergeResult:
    plan: MergePlan
    dry_run: bool
    world_size: int
    device: str
    output_path: Optional[str] = None
    manifest_path: Optional[str] = None
    files: List[dict] = field(default_factory=list)
    num_bytes_read: int = 0
    num_bytes_written: int = 0
    num_tensors_merged: int = 0
    num_units_resumed: int = 0
    peak_rss_by_rank: List[int] = field(default_factory=list)
    bytes_read_by_rank: List[int] = field(default_factory=list)
    metadata_bytes_exchanged: int = 0
    model_weights_from: str = ""      # as the manifest records it
    model_weights_notes: List[str] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)

    @property
    def read_gbps(self) -> float:
        return self.num_bytes_read / max(self.timings.get("merge", 0.0), 1e-9) / 1e9

    @property
    def write_gbps(self) -> float:
        return self.num_bytes_written / max(self.timings.get("merge", 0.0), 1e-9) / 1e9


def merge(options: Optional[MergeOptions] = None, **kwargs) -> MergeResult:
    """Merge checkpoints as ``options`` (or keyword arguments for MergeOptions) say.

    Call it on every rank of a job (torchrun, deepspeed, mpiexec) or in one process. Every rank
    returns the same result, or raises the same MergeError naming each failing rank's problem.
    """
    options = options or MergeOptions(**kwargs)
    collective = Collective(backend=options.backend, timeout_minutes=options.timeout_minutes)
    try:
        return MergeRun(options, collective).run()
    finally:
        collective.close()


class MergeRun:
    """One merge on one rank: the steps in order, with what they hand each other.

    The watcher (pmm_dist.watcher.update) runs its updates through the same steps, overriding
    ``_plan_and_shares`` and ``_prepare`` (its own plan and staging) and the hooks below: its
    share merger (incremental arithmetic), the manifest's sources (the window, not only the
    checkpoints read) and a step just before the commit (the running state's record).
    """

    def __init__(self, options: MergeOptions, collective: Collective):
        self.options, self.collective = options, collective
        self.started = time.perf_counter()
        self.timings: Dict[str, float] = {}
        self.snapshot = None  # the coordinator's record of every input file, to detect changes
        self.identity = None  # what the fingerprint hashes, to name differences on --resume
        self.planning_format = None  # the coordinator's format instance, which planned (and parsed metadata)

    def _timed(self, name: str, tick: float) -> None:
        self.timings[name] = time.perf_counter() - tick

    def run(self) -> MergeResult:
        options, collective = self.options, self.collective
        device = choose_device(options.device, collective.local_rank)
        if device.type == "cpu" and not options.dry_run:
            fused_kernels()  # starts loading the compiled loops in the background, beside planning
        plan, share = collective.scatter_step("plan", self._plan_and_shares)
        self._timed("plan", self.started)
        fmt = self.planning_format or resolve_format(plan.format_name, options.sources)
        tick = time.perf_counter()
        problems = [p for rank_problems in collective.step("check", lambda: check_share(fmt, plan, share, collective.rank))
                    for p in rank_problems]
        if problems:
            raise InputError(problems)
        self._timed("validate", tick)
        result = MergeResult(plan=plan, dry_run=options.dry_run, world_size=collective.world_size, device=str(device))
        if options.dry_run:
            if collective.is_coordinator and not options.quiet:
                print(format_plan(plan), flush=True)
            return self._finish(result)
        if plan.already_complete:
            return self._already_committed(result)

        staging = Staging(plan.out, plan.output.checkpoint_dirname)
        collective.coordinator_step("stage", lambda: self._prepare(staging, plan))
        tick = time.perf_counter()
        merger = self.share_merger(fmt, plan, share, staging, device)
        try:
            outcomes: Optional[List[ShareOutcome]] = collective.gather_step("merge", merger.run)
        except MergeError as exc:
            # Bad input (a NaN, a corrupt file) fails the same command again: its staged files are
            # no use to a --resume, and would only make the corrected command be refused. Every rank
            # has stopped writing once the step failed on all of them.
            if collective.is_coordinator and not exc.resumable and not getattr(exc, "interrupted", False):
                staging.discard()
            raise
        self._timed("merge", tick)
        metadata_bytes = collective.total_bytes_exchanged()
        tick = time.perf_counter()
        summary = collective.coordinator_step("commit", lambda: self._commit(fmt, plan, staging, outcomes, result,
                                                                            metadata_bytes, tick))
        for name, value in summary.items():
            setattr(result, name, value)
        self._timed("commit", tick)
        return self._finish(result)

    # -- the coordinator's parts -------------------------------------------------------------------
    def _plan_and_shares(self):
        plan, self.snapshot, self.identity, self.planning_format = plan_merge_with_format(self.options,
                                                                                           self.collective.world_size)
        faults.inject("plan", self.collective.rank)
        return plan.rank_payloads()

    def _prepare(self, staging: Staging, plan: MergePlan) -> None:
        done = staging.prepare(plan.fingerprint, self.identity, self.options.resume)
        if self.options.resume and not self.options.quiet:
            print(f"resuming: {done} of {plan.num_units} units already merged", flush=True)

    # -- hooks -------------------------------------------------------------------------------------
    def share_merger(self, fmt, plan: MergePlan, share, staging: Staging, device) -> ShareMerger:
        return ShareMerger(fmt, plan, share, staging, device, self.collective.rank,
                           show_progress=self.collective.is_coordinator and not self.options.quiet)

    def manifest_sources(self, plan: MergePlan) -> List[dict]:
        return [{"iteration": c.iteration, "path": c.path} for c in plan.checkpoints]

    def before_commit(self, fmt, plan: MergePlan, staging: Staging, outcomes: List[ShareOutcome]) -> None:
        """Coordinator, every unit merged, nothing committed yet."""

    def _commit(self, fmt, plan: MergePlan, staging: Staging, outcomes: List[ShareOutcome], result: MergeResult,
                metadata_bytes: int, commit_started: float) -> dict:
        self.before_commit(fmt, plan, staging, outcomes)
        results = [r for outcome in outcomes for r in outcome.results]
        done_now = [r for outcome in outcomes for r in outcome.done_now()]
        # Work done in this run only: units resumed from an interrupted run are counted apart.
        summary = {"num_bytes_read": sum(r.num_bytes_read for r in done_now),
                   "num_tensors_merged": sum(r.num_tensors_merged for r in done_now),
                   "num_units_resumed": sum(len(o.resumed) for o in outcomes),
                   "peak_rss_by_rank": [o.peak_rss for o in outcomes],
                   "bytes_read_by_rank": [sum(r.num_bytes_read for r in o.done_now()) for o in outcomes],
                   "metadata_bytes_exchanged": metadata_bytes}
        resumed_paths = {plan.output.file_path(r.relpath) for r in results} - \
            {plan.output.file_path(r.relpath) for r in done_now}

        weights_from, weights_notes = model_weights_summary(results, default=plan.model_weights_from)

        def manifest_for(files: List[dict]) -> Manifest:
            timings = dict(self.timings, commit=time.perf_counter() - commit_started,
                           total=time.perf_counter() - self.started)
            return Manifest(
                format=plan.format_name, method=plan.method, method_options=plan.method_options, weights=plan.weights,
                sources=self.manifest_sources(plan),
                optimizer=str(plan.optimizer_policy), layout=plan.layout,
                output_checkpoint=plan.output.checkpoint_dirname, tracker=plan.output.commit_marker, files=files,
                fingerprint=plan.fingerprint, world_size=result.world_size, device=result.device,
                tensor_filter={k: list(v) for k, v in vars(plan.tensor_filter).items() if v},
                bytes_read=summary["num_bytes_read"], bytes_read_by_source=list(plan.bytes_read_by_source),
                bytes_written=sum(f["bytes"] for f in files if f["path"] not in resumed_paths),
                tensors_merged=summary["num_tensors_merged"], units_resumed=summary["num_units_resumed"],
                metadata_bytes_exchanged=metadata_bytes, peak_rss_bytes_by_rank=summary["peak_rss_by_rank"],
                timings_s={k: round(v, 6) for k, v in timings.items()}, created_unix=time.time(),
                source_layouts=plan.source_layouts, model_weights_from=weights_from,
                model_weights_notes=weights_notes, pmm_dist_version=__version__)

        output_path, manifest_path, files = commit(fmt, plan, staging, results, self.snapshot,
                                                   self.options.overwrite, manifest_for)
        return dict(summary, output_path=output_path, manifest_path=manifest_path, files=files,
                    model_weights_from=weights_from, model_weights_notes=weights_notes,
                    num_bytes_written=sum(f["bytes"] for f in files if f["path"] not in resumed_paths))

    # -- endings -----------------------------------------------------------------------------------
    def _already_committed(self, result: MergeResult) -> MergeResult:
        plan = result.plan
        manifest = Manifest.read(plan.out)
        result.output_path = plan.output.checkpoint_path(plan.out)
        result.manifest_path = os.path.join(plan.out, MANIFEST)
        result.files = manifest.files
        result.num_bytes_written = manifest.bytes_written
        result.num_units_resumed = plan.num_units
        result.model_weights_from, result.model_weights_notes = manifest.model_weights_from, manifest.model_weights_notes
        self.timings["merge"] = 0.0
        return self._finish(result)

    def _finish(self, result: MergeResult) -> MergeResult:
        self.timings["total"] = time.perf_counter() - self.started
        result.timings = dict(self.timings)
        return result
