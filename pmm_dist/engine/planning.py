"""Step 1, on the coordinator: from options to a plan, reading metadata only.

Discovery, selection, weights, the format's validation of the file layout, the output's shape,
the fingerprint that makes ``--resume`` safe, and the assignment of output files to ranks.
"""
import os
from dataclasses import dataclass, replace
from typing import Dict, List, Sequence, Tuple

from .. import __version__
from ..errors import InputError, OutputError, UsageError
from ..formats import CheckpointFormat, resolve_format
from ..io.planning_reads import gc_paused, planning_reads, remember_file_stats
from ..io.staging import STAGING, InputSnapshot, Staging, fingerprint, identity, snapshot_inputs
from ..merge.methods import get_method
from ..plan.assign import assign_units
from ..plan.selection import TensorFilter, select_iterations
from ..plan.types import CheckpointRef, NonfinitePolicy, OptimizerPolicy, OutputLayout, WorkUnit
from .manifest import MANIFEST, Manifest
from .options import MergeOptions


@dataclass(frozen=True)
class MergePlan:
    """The coordinator's plan. Every rank receives it without ``units`` and ``shares`` (which
    only the coordinator holds), plus its own share of the units."""
    format_name: str
    method: str
    method_options: Dict[str, object]
    checkpoints: List[CheckpointRef]
    weights: List[float]
    layout: Dict[str, object]
    source_layouts: List[Dict[str, object]]   # each checkpoint's own layout, oldest first
    output: OutputLayout
    out: str
    optimizer_policy: OptimizerPolicy
    on_nonfinite: NonfinitePolicy
    tensor_filter: TensorFilter
    fingerprint: str
    num_units: int
    units: Tuple[WorkUnit, ...] = ()
    shares: Tuple[Tuple[WorkUnit, ...], ...] = ()
    already_complete: bool = False
    """--resume found this very merge already committed: nothing left to do."""
    bytes_read_by_source: Tuple[int, ...] = ()
    """What the merge reads from each checkpoint, oldest first (from the plan: --dry-run, manifest)."""
    model_weights_from: str = ""
    """Whether the merged model weights come from the fp32 masters or the model copies (the format's word)."""

    def for_rank(self) -> "MergePlan":
        """What a non-coordinator rank needs besides its share: everything but the unit lists."""
        return replace(self, units=(), shares=())

    def rank_payloads(self) -> List[Tuple["MergePlan", Tuple[WorkUnit, ...]]]:
        """What each rank receives in the plan step: (plan, its share). The coordinator keeps the
        whole plan; every other rank gets the plan without unit lists (one object, its size
        independent of the number of units) and its own share only."""
        light = self.for_rank()
        return [(self if rank == 0 else light, share) for rank, share in enumerate(self.shares)]


def plan_merge(options: MergeOptions, world_size: int) -> Tuple[MergePlan, InputSnapshot, dict]:
    """The plan, a snapshot (size, mtime) of every input file, to detect changes before commit,
    and the merge's identity (what its fingerprint hashes, kept to say what differs on --resume).
    Each directory is listed and each metadata file parsed once (io/planning_reads.py). Without
    the cyclic GC: planning makes millions of small objects at a million chunks (parsed metadata,
    items) and frees none of them, and collections walking them all cost more than the planning.
    The format's parsed metadata is freed before collections resume."""
    with planning_reads(), gc_paused():
        return _plan_merge(options, world_size)[:3]


def plan_merge_with_format(options: MergeOptions, world_size: int
                           ) -> Tuple[MergePlan, InputSnapshot, dict, CheckpointFormat]:
    """``plan_merge``, and the format instance that planned: the coordinator goes on with it (to
    check, merge and finalize), so what planning parsed (a DCP ``.metadata``) is not parsed again."""
    with planning_reads(), gc_paused():
        return _plan_merge(options, world_size)


def _plan_merge(options: MergeOptions, world_size: int) -> Tuple[MergePlan, InputSnapshot, dict, CheckpointFormat]:
    for src in options.sources:
        if not os.path.exists(src):
            raise UsageError(f"{src}: no such file or directory")
    fmt = resolve_format(options.format, options.sources)
    if options.optimizer not in fmt.optimizer_policies:
        raise UsageError(f"--optimizer {options.optimizer} is not implemented for {fmt.name} checkpoints (it takes "
                         f"{', '.join(str(p) for p in fmt.optimizer_policies)})")
    available = fmt.discover(options.sources)
    where = options.sources[0] if len(options.sources) == 1 else f"the {len(options.sources)} given checkpoints"
    try:
        selected = set(select_iterations([c.iteration for c in available], last=options.last,
                                         interval=options.interval, iterations=options.iterations, where=where))
    except ValueError as exc:  # the flags are well-formed (MergeOptions checked them): the run lacks what they ask
        raise InputError(str(exc)) from None
    checkpoints = [c for c in available if c.iteration in selected]
    method = get_method(options.method)
    weights = method.weights(len(checkpoints), **options.method_options())
    check_one_run(fmt, checkpoints, options.allow_mixed_runs)
    snapshot = snapshot_inputs(checkpoints)
    remember_file_stats(snapshot)
    units = fmt.plan_units(checkpoints, options.optimizer, world_size)
    output = fmt.output_layout(checkpoints[-1])
    # What makes two runs produce the same bytes: resuming is allowed only if all of it is equal.
    description = {"version": __version__, "format": fmt.name, "weights": weights,
                   "checkpoints": [(c.iteration, c.path) for c in checkpoints], "optimizer": options.optimizer,
                   "on_nonfinite": options.on_nonfinite, "output_dirname": output.checkpoint_dirname,
                   "include": list(options.include or ()), "exclude": list(options.exclude or ()),
                   "units": [(u.relpath, u.action, u.num_bytes) for u in units]}
    plan = MergePlan(format_name=fmt.name, method=method.name,
                     method_options={k: v for k, v in method.options(options.method_options()).items() if v is not None},
                     checkpoints=checkpoints, weights=weights, layout=fmt.layout(checkpoints),
                     source_layouts=[fmt.checkpoint_layout(c) for c in checkpoints], output=output,
                     out=os.path.abspath(options.out), optimizer_policy=options.optimizer,
                     on_nonfinite=options.on_nonfinite, tensor_filter=options.tensor_filter(),
                     fingerprint=fingerprint(description, snapshot),
                     num_units=len(units), units=tuple(units),
                     bytes_read_by_source=tuple(fmt.bytes_read_by_source(units, checkpoints)),
                     model_weights_from=fmt.model_weights_source(checkpoints, options.optimizer),
                     shares=tuple(tuple(s) for s in assign_units(units, world_size, len(checkpoints))))
    plan = replace(plan, already_complete=options.resume and _committed_already(plan))
    check_output(options, fmt, checkpoints, plan.already_complete)
    return plan, snapshot, identity(description, snapshot), fmt


def check_one_run(fmt: CheckpointFormat, checkpoints: Sequence[CheckpointRef], allow_mixed_runs: bool) -> None:
    """Refuse checkpoints whose run identity (as the format records it) differs from the newest's."""
    newest = fmt.run_identity(checkpoints[-1])
    differing = []
    for ckpt in checkpoints[:-1]:
        identity = fmt.run_identity(ckpt)
        # Only what both record: a checkpoint that records less is not thereby of another run.
        keys = sorted(k for k in set(identity) & set(newest) if identity[k] != newest[k])
        if keys:
            differing.append(f"{ckpt.path} has " + ", ".join(
                f"{k}={identity[k]!r} (the newest has {k}={newest[k]!r})" for k in keys[:4]) +
                (" ..." if len(keys) > 4 else ""))
    if differing and not allow_mixed_runs:
        shown = "; ".join(differing[:3]) + (f"; and {len(differing) - 3} more" if len(differing) > 3 else "")
        raise InputError(f"the checkpoints come from different runs (or different models) than the newest, "
                         f"{checkpoints[-1].path}: {shown}. Pass --allow-mixed-runs to merge them anyway")


def _committed_already(plan: MergePlan) -> bool:
    """--resume of a merge that was killed after it committed (while exiting): the output has
    its commit marker and a manifest with this very merge's fingerprint."""
    manifest = Manifest.read_if_present(plan.out)
    return manifest is not None and manifest.fingerprint == plan.fingerprint and \
        os.path.exists(os.path.join(plan.out, plan.output.commit_marker)) and \
        not os.path.exists(os.path.join(plan.out, STAGING))


def check_output(options: MergeOptions, fmt: CheckpointFormat, checkpoints: Sequence[CheckpointRef],
                 finished: bool = False) -> None:
    """--out may receive this merge: it overlaps no checkpoint, and what it holds is ours to replace."""
    out = os.path.realpath(options.out)
    for path in sorted({os.path.realpath(c.path) for c in checkpoints}):
        if out == path or _is_within(out, path) or _is_within(path, out):
            raise OutputError(f"--out {options.out} overlaps the input {path}; the output may never be "
                              "(inside) an input, nor contain one")
    for source in sorted({os.path.realpath(p) for p in options.sources}):
        # Inside a run directory is fine where the format would never take the output for a
        # checkpoint of the run (RUN/merged beside RUN/iter_*), never at or above the run.
        if out == source or _is_within(source, out) or (
                _is_within(out, source) and fmt.names_checkpoint(os.path.relpath(out, source).split(os.sep)[0])):
            raise OutputError(f"--out {options.out} overlaps the input {source}; the output may never be "
                              "(inside) an input, nor contain one" +
                              (f" (inside a run directory, give it a name that is no checkpoint's, e.g. "
                               f"{os.path.join(source, 'merged')})" if _is_within(out, source) else ""))
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise OutputError(f"--out {options.out} exists and is not a directory")
        _check_existing_output(options, out, finished)
    parent = out if os.path.isdir(out) else os.path.dirname(out)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"--out {options.out}: {parent} is not writable")


def _check_existing_output(options: MergeOptions, out: str, finished: bool) -> None:
    entries = sorted(os.listdir(out))
    staged = Staging.find(out)
    if staged is not None and not options.resume and not options.overwrite:
        raise OutputError(f"--out {options.out} holds an interrupted merge ({staged.num_done()} units finished, "
                          f"in {staged.root}): re-run its command with --resume to continue it, or add --overwrite "
                          "to discard it and start over")
    leftovers = [e for e in entries if e != STAGING]
    if not leftovers or finished or (options.resume and staged is not None):
        return  # empty, our own interrupted merge (--resume finishes it), or this very merge, committed
    if not options.overwrite:
        raise OutputError(f"--out {options.out} already exists and is not empty "
                          f"(holds {', '.join(leftovers[:3])}); pass --overwrite to replace it")
    previous = Manifest.read_if_present(out)
    if previous is None:
        raise OutputError(f"refusing to --overwrite {options.out}: it is not a pmm_dist output (no readable "
                          f"{MANIFEST}) and holds {', '.join(leftovers[:5])}{' ...' if len(leftovers) > 5 else ''}; "
                          "nothing was removed. Remove it yourself or choose another --out")
    ours = {MANIFEST, previous.tracker, previous.output_checkpoint} | {f["path"].split("/")[0] for f in previous.files}
    foreign = [e for e in leftovers if e not in ours]
    if foreign:
        raise OutputError(f"refusing to --overwrite {options.out}: besides a previous pmm_dist output it holds "
                          f"{', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, which the merge did not "
                          "write; nothing was removed")


def _is_within(path: str, parent: str) -> bool:
    return os.path.commonpath([path, parent]) == parent and path != parent
