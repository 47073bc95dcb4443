"""Step 1, on the coordinator: from options to a plan, reading metadata only.

Discovery, selection, weights, the format's validation of the file layout, the output's shape,
the fingerprint that makes ``--resume`` safe, and the assignment of output files to ranks.
"""
import os
from dataclasses import dataclass, replace
from typing import Dict, List, Sequence, Tuple

from .. import __version__
from ..errors import InputError, MergeError, UsageError
from ..formats import CheckpointFormat, resolve_format
from ..io.staging import STAGING, InputSnapshot, fingerprint, snapshot_inputs
from ..merge.methods import get_method
from ..plan.assign import assign_units
from ..plan.selection import select_iterations
from ..plan.types import CheckpointRef, NonfinitePolicy, OptimizerPolicy, OutputKind, OutputLayout, WorkUnit
from .manifest import Manifest
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
    output: OutputLayout
    out: str
    optimizer_policy: OptimizerPolicy
    on_nonfinite: NonfinitePolicy
    fingerprint: str
    num_units: int
    units: Tuple[WorkUnit, ...] = ()
    shares: Tuple[Tuple[WorkUnit, ...], ...] = ()
    already_complete: bool = False
    """--resume found this very merge already committed: nothing left to do."""
    bytes_read_by_source: Tuple[int, ...] = ()
    """What the merge reads from each checkpoint, oldest first (from the plan: --dry-run, manifest)."""

    def for_rank(self) -> "MergePlan":
        """What a non-coordinator rank needs besides its share: everything but the unit lists."""
        return replace(self, units=(), shares=())


def plan_merge(options: MergeOptions, world_size: int) -> Tuple[MergePlan, InputSnapshot]:
    """The plan and a snapshot (size, mtime) of every input file, to detect changes before commit."""
    for src in options.sources:
        if not os.path.exists(src):
            raise UsageError(f"{src}: no such file or directory")
    fmt = resolve_format(options.format, options.sources)
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
    snapshot = snapshot_inputs(checkpoints)
    units = fmt.plan_units(checkpoints, options.optimizer, world_size)
    output = fmt.output_layout(checkpoints[-1])
    # What makes two runs produce the same bytes: resuming is allowed only if all of it is equal.
    description = {"version": __version__, "format": fmt.name, "weights": weights,
                   "checkpoints": [(c.iteration, c.path) for c in checkpoints], "optimizer": options.optimizer,
                   "on_nonfinite": options.on_nonfinite, "output_dirname": output.checkpoint_dirname,
                   "units": [(u.relpath, u.action, u.num_bytes) for u in units]}
    plan = MergePlan(format_name=fmt.name, method=method.name,
                     method_options={k: v for k, v in method.options(options.method_options()).items() if v is not None},
                     checkpoints=checkpoints, weights=weights, layout=fmt.layout(checkpoints), output=output,
                     out=os.path.abspath(options.out), optimizer_policy=options.optimizer,
                     on_nonfinite=options.on_nonfinite, fingerprint=fingerprint(description, snapshot),
                     num_units=len(units), units=tuple(units),
                     bytes_read_by_source=tuple(fmt.bytes_read_by_source(units, checkpoints)),
                     shares=tuple(tuple(s) for s in assign_units(units, world_size, len(checkpoints))))
    plan = replace(plan, already_complete=options.resume and _committed_already(plan))
    check_output(options, checkpoints, plan.already_complete)
    return plan, snapshot


def _committed_already(plan: MergePlan) -> bool:
    """--resume of a merge that was killed after it committed (while exiting): the output has
    its commit marker and a manifest with this very merge's fingerprint."""
    manifest = Manifest.read_if_present(plan.out)
    return manifest is not None and manifest.fingerprint == plan.fingerprint and \
        os.path.exists(os.path.join(plan.out, plan.output.commit_marker)) and \
        not os.path.exists(os.path.join(plan.out, STAGING))


def check_output(options: MergeOptions, checkpoints: Sequence[CheckpointRef], finished: bool = False) -> None:
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
