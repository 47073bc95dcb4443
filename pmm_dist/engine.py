"""The merge engine: plan on the coordinator, check and merge rank-locally, commit last.

    merge(MergeOptions(...)) -> MergeResult

Collective steps, each through the exception-robust helper (no rank hangs if another fails):
  1. (coordinator) discover, select, weigh, validate the file layout, assign units -> broadcast
  2. (every rank)  check its units in every source (keys, shapes, dtypes) -> gathered verdicts
  3. (coordinator) prepare the staging directory (fresh, or continue it with --resume)
  4. (every rank)  merge its units into the staging directory -> gathered results
  5. (coordinator) check no input changed, let the format finalize, move the staged checkpoint
                   into place, write the manifest, then the tracker (the output is now loadable)
Only plans, verdicts and results cross ranks; tensor data never does.
"""
import json
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence

import torch

from . import __version__
from .atomic import copy_atomically, remove_tree_quietly, write_json_atomically
from .collective import Collective
from .errors import InputError, MergeError
from .faults import inject
from .formats import CheckpointRef, MergeContext, UnitResult, resolve_format
from .methods import get_method
from .planner import WorkUnit, assign_units
from .report import format_plan, peak_rss_bytes, progress_bar
from .selection import select_iterations
from .staging import STAGING, Staging, changed_inputs, fingerprint, snapshot_inputs

MANIFEST = "pmm_manifest.json"
MANIFEST_FORMAT_VERSION = 1
OPTIMIZER_POLICIES = ("drop", "latest")
NONFINITE_POLICIES = ("error", "warn", "ignore")
# Units a rank works on at once: two overlap one unit's writing with the next one's arithmetic,
# at the price of holding up to two output files in memory.
UNITS_IN_FLIGHT = 2


@dataclass(frozen=True, kw_only=True)
class MergeOptions:
    """Everything a merge needs; the CLI builds one of these from its flags."""
    sources: Sequence[str]
    """One run directory (tracker + checkpoint dirs) or several checkpoint directories."""
    out: str
    """Output root: receives the tracker, one checkpoint directory and pmm_manifest.json."""
    method: str = "sma"
    """sma | wma | ema | weighted (see pmm_dist.methods)."""
    alpha: Optional[float] = None
    """EMA rate (default 0.2)."""
    weights: Optional[Sequence[float]] = None
    """Explicit weights for method 'weighted', oldest checkpoint first."""
    normalize: bool = True
    """Normalise explicit weights to sum 1."""
    last: Optional[int] = None
    interval: Optional[int] = None
    iterations: Optional[Sequence[int]] = None
    format: str = "auto"
    device: Optional[str] = None
    """cpu | cuda; default cuda when available."""
    optimizer: str = "drop"
    """drop: weights only. latest: newest checkpoint's optimizer, scheduler and RNG state."""
    on_nonfinite: str = "error"
    """error | warn | ignore: what a NaN/Inf in a merged tensor does."""
    dry_run: bool = False
    overwrite: bool = False
    resume: bool = False
    """Continue an interrupted merge into the same --out with identical inputs and options."""
    quiet: bool = False
    backend: str = "gloo"
    """Process-group backend for the metadata exchange (gloo suffices: no tensors cross ranks)."""
    timeout_minutes: float = 180.0

    def __post_init__(self):
        if not self.sources:
            raise ValueError("no sources given: pass a run directory or checkpoint directories")
        if not self.out:
            raise ValueError("--out is required")
        if self.optimizer not in OPTIMIZER_POLICIES:
            raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZER_POLICIES)}, got {self.optimizer!r}")
        if self.device not in (None, "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device and self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda requested but no CUDA device is available")
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"--on-nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {self.on_nonfinite!r}")
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"--backend must be gloo or nccl, got {self.backend!r}")
        get_method(self.method)  # unknown names fail here, listing the valid ones


@dataclass(frozen=True)
class MergePlan:
    """The coordinator's plan; small, picklable, broadcast to every rank."""
    format_name: str
    method: str
    method_options: Dict[str, object]
    checkpoints: List[CheckpointRef]
    weights: List[float]
    layout: Dict[str, object]
    units: List[WorkUnit]
    shares: List[List[WorkUnit]]
    out: str
    output_dirname: str
    optimizer_policy: str
    fingerprint: str
    already_complete: bool = False
    """--resume found this very merge already committed: nothing left to do."""


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
    metadata_bytes_exchanged: int = 0
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
        return _run(options, collective)
    finally:
        collective.close()


def _run(options: MergeOptions, collective: Collective) -> MergeResult:
    timings: Dict[str, float] = {}
    started = time.perf_counter()
    snapshot = {}  # the coordinator's record of every input file, to detect changes before commit

    def plan_on_coordinator():
        plan, snapshot_taken = build_plan(options, collective.world_size)
        snapshot.update(snapshot_taken)
        inject("plan", collective.rank)
        return plan

    plan: MergePlan = collective.coordinator_step(plan_on_coordinator)
    timings["plan"] = time.perf_counter() - started

    fmt = resolve_format(plan.format_name, options.sources)
    my_units = plan.shares[collective.rank]
    tick = time.perf_counter()

    def check_my_units():
        inject("validate", collective.rank)
        return [p for unit in my_units if unit.action == "merge" for p in fmt.check_unit(unit, plan.checkpoints)]

    problems = [p for rank_problems in collective.step(check_my_units) for p in rank_problems]
    if problems:
        raise InputError(problems)
    timings["validate"] = time.perf_counter() - tick
    device = _choose_device(options.device, collective.local_rank)
    result = MergeResult(plan=plan, dry_run=options.dry_run, world_size=collective.world_size, device=str(device))
    if options.dry_run:
        if collective.is_coordinator and not options.quiet:
            print(format_plan(plan), flush=True)
        timings["total"] = time.perf_counter() - started
        result.timings = timings
        return result
    if plan.already_complete:
        return _finished_result(result, plan, timings, started)

    staging = Staging(plan.out, plan.output_dirname)
    collective.coordinator_step(lambda: _prepare(staging, plan, options))
    tick = time.perf_counter()
    outcomes = collective.step(lambda: _merge_share(
        fmt, plan, my_units, staging, device, options.on_nonfinite, collective.rank,
        show_progress=collective.is_coordinator and not options.quiet))
    timings["merge"] = time.perf_counter() - tick
    unit_results = [r for outcome in outcomes for r in outcome["results"]]
    result.num_bytes_read = sum(r.num_bytes_read for r in unit_results)
    result.num_tensors_merged = sum(r.num_tensors_merged for r in unit_results)
    result.num_units_resumed = sum(o["resumed"] for o in outcomes)
    result.peak_rss_by_rank = [o["peak_rss"] for o in outcomes]
    result.metadata_bytes_exchanged = collective.total_bytes_exchanged()
    tick = time.perf_counter()
    result.timings = timings
    committed = collective.coordinator_step(lambda: _commit(fmt, plan, options, result, unit_results, staging,
                                                            snapshot, started, tick))
    result.output_path, result.manifest_path, result.files = committed
    result.num_bytes_written = sum(f["bytes"] for f in result.files)
    timings["commit"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - started
    return result


def build_plan(options: MergeOptions, world_size: int):
    """Coordinator: discovery, selection, weights, layout validation and the unit assignment.
    Returns the plan and a snapshot (size, mtime) of every input file."""
    for src in options.sources:
        if not os.path.exists(src):
            raise InputError(f"{src}: no such file or directory")
    fmt = resolve_format(options.format, options.sources)
    available = fmt.discover(options.sources)
    where = options.sources[0] if len(options.sources) == 1 else f"the {len(options.sources)} given checkpoints"
    try:
        selected = set(select_iterations([c.iteration for c in available], last=options.last,
                                         interval=options.interval, iterations=options.iterations, where=where))
        method = get_method(options.method)
        method_options = {"alpha": options.alpha, "weights": options.weights,
                          "normalize": None if options.normalize else False}
        checkpoints = [c for c in available if c.iteration in selected]
        weights = method.weights(len(checkpoints), **method_options)
    except ValueError as exc:
        raise MergeError(str(exc)) from None
    snapshot = snapshot_inputs(checkpoints)
    units = fmt.plan_units(checkpoints, options.optimizer, world_size)
    if options.method == "ema" and options.alpha is None:
        method_options["alpha"] = 0.2
    method_options = {k: v for k, v in method_options.items() if v is not None}
    output_dirname = fmt.output_dirname(checkpoints[-1])
    # What makes two runs produce the same bytes: resuming is allowed only if all of it is equal.
    description = {"version": __version__, "format": fmt.name, "weights": weights,
                   "checkpoints": [(c.iteration, c.path) for c in checkpoints], "optimizer": options.optimizer,
                   "on_nonfinite": options.on_nonfinite, "output_dirname": output_dirname,
                   "units": [(u.relpath, u.action, u.num_bytes) for u in units]}
    plan = MergePlan(format_name=fmt.name, method=options.method, method_options=method_options,
                     checkpoints=checkpoints, weights=weights, layout=fmt.layout(checkpoints), units=units,
                     shares=assign_units(units, world_size), out=os.path.abspath(options.out),
                     output_dirname=output_dirname, optimizer_policy=options.optimizer,
                     fingerprint=fingerprint(description, snapshot))
    plan = replace(plan, already_complete=options.resume and _finished_output(plan, fmt))
    _check_output(options, checkpoints, plan.already_complete)
    return plan, snapshot


def _finished_result(result: MergeResult, plan: MergePlan, timings, started: float) -> MergeResult:
    with open(os.path.join(plan.out, MANIFEST)) as f:
        manifest = json.load(f)
    result.output_path = os.path.join(plan.out, plan.output_dirname) if plan.output_dirname else plan.out
    result.manifest_path = os.path.join(plan.out, MANIFEST)
    result.files = manifest["files"]
    result.num_bytes_written = manifest["bytes_written"]
    result.num_units_resumed = len(plan.units)
    timings["total"] = time.perf_counter() - started
    result.timings = dict(timings, merge=0.0)
    return result


def _finished_output(plan: MergePlan, fmt) -> bool:
    """--resume of a merge that was killed after it committed (while exiting): the output has
    its tracker and a manifest with this very merge's fingerprint."""
    try:
        with open(os.path.join(plan.out, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    return manifest.get("fingerprint") == plan.fingerprint and \
        os.path.exists(os.path.join(plan.out, fmt.tracker_relpath())) and \
        not os.path.exists(os.path.join(plan.out, STAGING))


def _check_output(options: MergeOptions, checkpoints: Sequence[CheckpointRef], finished: bool = False) -> None:
    out = os.path.realpath(options.out)
    inputs = {os.path.realpath(p) for p in options.sources} | {os.path.realpath(c.path) for c in checkpoints}
    for path in sorted(inputs):
        if out == path or _is_within(out, path) or _is_within(path, out):
            raise MergeError(f"--out {options.out} overlaps the input {path}; the output may never be "
                             "(inside) an input, nor contain one")
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise MergeError(f"--out {options.out} exists and is not a directory")
        leftovers = [e for e in os.listdir(out) if e != STAGING]
        # An interrupted commit leaves our own files next to the staging area: --resume finishes it.
        interrupted = options.resume and os.path.isdir(os.path.join(out, STAGING))
        if leftovers and not options.overwrite and not interrupted and not finished:
            raise MergeError(f"--out {options.out} already exists and is not empty "
                             f"(holds {', '.join(sorted(leftovers)[:3])}); pass --overwrite to replace it")
    parent = out if os.path.isdir(out) else os.path.dirname(out)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.access(parent, os.W_OK | os.X_OK):
        raise MergeError(f"--out {options.out}: {parent} is not writable")


def _is_within(path: str, parent: str) -> bool:
    return os.path.commonpath([path, parent]) == parent and path != parent


def _choose_device(requested: Optional[str], local_rank: int) -> torch.device:
    if requested == "cpu" or (requested is None and not torch.cuda.is_available()):
        return torch.device("cpu")
    if requested and ":" in requested:
        return torch.device(requested)
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _prepare(staging: Staging, plan: MergePlan, options: MergeOptions) -> None:
    done = staging.prepare(plan.fingerprint, options.resume)
    if options.resume and not options.quiet:
        print(f"resuming: {done} of {len(plan.units)} units already merged", flush=True)


def _merge_share(fmt, plan: MergePlan, units: Sequence[WorkUnit], staging: Staging, device: torch.device,
                 on_nonfinite: str, rank: int, show_progress: bool) -> dict:
    """Merge this rank's units, UNITS_IN_FLIGHT at a time: while one unit's file is being
    serialised, hashed and fsynced (I/O, the GIL released), the next one is summed."""
    num_sources = len(plan.checkpoints)
    planned = [u.num_bytes * (num_sources if u.action == "merge" else 1) for u in units]
    bar = progress_bar(sum(planned), enabled=show_progress, description=f"merging (rank 0 of {len(plan.shares)})")
    lock = threading.Lock()
    resumed = []

    def merge_one(unit: WorkUnit, budget: int):
        shown = [0]

        def advance(num_bytes):
            # Progress in planned bytes: a file's tensors are only part of its size.
            with lock:
                step = min(num_bytes, budget - shown[0])
                if bar is not None and step > 0:
                    bar.update(step)
                shown[0] += step

        outcome = staging.completed(unit)
        if outcome is None:
            context = MergeContext(weights=plan.weights, device=device, optimizer_policy=plan.optimizer_policy,
                                   on_progress=advance, on_nonfinite=on_nonfinite)
            outcome = fmt.merge_unit(unit, plan.checkpoints, staging.data_dir, context) if unit.action == "merge" \
                else _copy_newest(unit, plan.checkpoints, staging.data_dir, context)
            staging.mark_done(unit, outcome)
        else:
            resumed.append(unit)
        advance(budget)
        return outcome

    results = []
    try:
        with ThreadPoolExecutor(max_workers=UNITS_IN_FLIGHT, thread_name_prefix="pmm-unit") as pool:
            pending = deque()
            for unit, budget in zip(units, planned):
                pending.append(pool.submit(merge_one, unit, budget))
                if len(pending) >= UNITS_IN_FLIGHT:
                    _collect(pending, results, rank)
            while pending:
                _collect(pending, results, rank)
    finally:
        if bar is not None:
            bar.close()
    return {"results": results, "resumed": len(resumed), "peak_rss": peak_rss_bytes()}


def _copy_newest(unit: WorkUnit, checkpoints: Sequence[CheckpointRef], destination: str,
                 context: MergeContext) -> UnitResult:
    """A ``copy`` unit, in every format: the newest checkpoint's file, byte for byte (never unpickled)."""
    num_bytes, sha = copy_atomically(os.path.join(checkpoints[-1].path, unit.relpath),
                                     os.path.join(destination, unit.relpath))
    context.on_progress(num_bytes)
    return UnitResult(unit.relpath, num_bytes, num_bytes, sha, 0)


def _collect(pending: deque, results: list, rank: int) -> None:
    try:
        results.append(pending.popleft().result())
    except BaseException:
        for future in pending:  # do not start more work; running units finish, then we raise
            future.cancel()
        raise
    inject(f"unit:{len(results) - 1}", rank)


def _commit(fmt, plan: MergePlan, options: MergeOptions, result: MergeResult, unit_results, staging: Staging,
            snapshot, started: float, commit_started: float):
    changed = changed_inputs(snapshot)
    if changed:
        raise InputError(changed + ["nothing was committed; re-run the merge once the inputs are stable"])
    out = plan.out
    final = os.path.join(out, plan.output_dirname) if plan.output_dirname else out
    # Each step below is recorded before the next, so a merge killed anywhere in here and re-run
    # with --resume picks up exactly where it stopped.
    recorded = staging.commit_record()
    if recorded is None:
        recorded = list(unit_results) + fmt.finalize(staging.data_dir, plan.checkpoints, unit_results,
                                                     plan.optimizer_policy)
        staging.record_commit(recorded)
    unit_results = recorded
    inject("commit:recorded", 0)
    if options.overwrite and not staging.has_flag("cleared"):
        _clear_previous_output(out, fmt.tracker_relpath())
        staging.set_flag("cleared")
    if os.path.isdir(staging.data_dir):  # not yet (or not completely) moved into place
        if plan.output_dirname:
            os.replace(staging.data_dir, final)  # one atomic rename puts the whole checkpoint in place
        else:
            _move_entries(staging.data_dir, out, last=fmt.tracker_relpath())
            os.rmdir(staging.data_dir)
    inject("commit:moved", 0)
    prefix = f"{plan.output_dirname}/" if plan.output_dirname else ""
    files = sorted(({"path": prefix + r.relpath, "bytes": r.num_bytes_written, "sha256": r.sha256}
                    for r in unit_results), key=lambda f: f["path"])
    result.files = files
    result.num_bytes_written = sum(f["bytes"] for f in files)
    timings = dict(result.timings, commit=time.perf_counter() - commit_started, total=time.perf_counter() - started)
    manifest_path = os.path.join(out, MANIFEST)
    write_json_atomically(manifest_path, _manifest(plan, options, result, fmt, timings))
    inject("commit:manifest", 0)
    fmt.write_tracker(out, plan.checkpoints[-1])  # last: from now on the output is loadable
    staging.discard()
    return final, manifest_path, files


def _manifest(plan: MergePlan, options: MergeOptions, result: MergeResult, fmt, timings) -> dict:
    return {
        "format_version": MANIFEST_FORMAT_VERSION,
        "pmm_dist_version": __version__,
        "created_unix": time.time(),
        "format": plan.format_name,
        "method": plan.method,
        "method_options": plan.method_options,
        "weights": plan.weights,
        "sources": [{"iteration": c.iteration, "path": c.path} for c in plan.checkpoints],
        "optimizer": options.optimizer,
        "layout": plan.layout,
        "output_checkpoint": plan.output_dirname,
        "tracker": fmt.tracker_relpath(),
        "files": result.files,
        "world_size": result.world_size,
        "device": result.device,
        "bytes_read": result.num_bytes_read,
        "bytes_written": result.num_bytes_written,
        "tensors_merged": result.num_tensors_merged,
        "units_resumed": result.num_units_resumed,
        "metadata_bytes_exchanged": result.metadata_bytes_exchanged,
        "peak_rss_bytes_by_rank": result.peak_rss_by_rank,
        "fingerprint": plan.fingerprint,
        "timings_s": {k: round(v, 6) for k, v in timings.items()},
    }


def _move_entries(staging: str, out: str, last: str) -> None:
    """Move the staged entries into the output root (for formats whose root is the checkpoint);
    the format's tracker file, if staged, is left for write_tracker / moved last."""
    for entry in sorted(os.listdir(staging)):
        if entry != last:
            os.replace(os.path.join(staging, entry), os.path.join(out, entry))
    if os.path.exists(os.path.join(staging, last)):
        os.replace(os.path.join(staging, last), os.path.join(out, last))


def _clear_previous_output(out: str, tracker_relpath: str) -> None:
    """--overwrite: invalidate the old output first (tracker), then remove the rest of it."""
    tracker = os.path.join(out, tracker_relpath)
    if os.path.exists(tracker):
        os.remove(tracker)
    for entry in os.listdir(out):
        if entry == STAGING:
            continue
        path = os.path.join(out, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            remove_tree_quietly(path)
        else:
            os.remove(path)
