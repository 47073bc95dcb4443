"""Step 5, on the coordinator: make the staged output the output, atomically and resumably.

    1. no input changed since planning (sizes and mtimes)
    2. every result recorded, with the format's own metadata files (finalize)   -> committed.json
    3. --overwrite: the previous output is removed, its commit marker first     -> cleared.flag
    4. the staged checkpoint moves into place (one rename, or file by file with the marker last)
    5. the manifest
    6. the commit marker: from now on the output is loadable

Each step is recorded before the next begins, so a merge killed anywhere in here and re-run
with --resume picks up exactly where it stopped.
"""
import hashlib
import os
from typing import Callable, List, Sequence, Tuple

from ..errors import InputError
from ..formats import CheckpointFormat
from ..io.atomic import remove_temporaries_of, remove_tree_quietly, write_atomically
from ..io.staging import STAGING, InputSnapshot, Staging, changed_inputs
from ..plan.types import OutputKind, UnitResult
from . import faults
from .manifest import MANIFEST, Manifest
from .planning import MergePlan

ManifestFactory = Callable[[List[dict]], Manifest]


def commit(fmt: CheckpointFormat, plan: MergePlan, staging: Staging, results: Sequence[UnitResult],
           snapshot: InputSnapshot, overwrite: bool, manifest_for: ManifestFactory) -> Tuple[str, str, List[dict]]:
    """Returns (output checkpoint path, manifest path, the files written as listed in the manifest)."""
    changed = changed_inputs(snapshot)
    if changed:
        raise InputError(changed + ["nothing was committed; re-run the merge once the inputs are stable"])
    recorded = staging.commit_record()
    if recorded is None:
        recorded = list(results) + fmt.finalize(staging.data_dir, plan.checkpoints, results, plan.optimizer_policy)
        staging.record_commit(recorded)
    faults.inject("commit:recorded", 0)
    if overwrite and not staging.has_flag("cleared"):
        _clear_previous_output(plan.out, plan.output.commit_marker)
        staging.set_flag("cleared")
    layout = plan.output
    if os.path.isdir(staging.data_dir):  # not yet (or not completely) moved into place
        if layout.kind == OutputKind.RUN_DIRECTORY:
            os.replace(staging.data_dir, layout.checkpoint_path(plan.out))  # the whole checkpoint in one step
        else:
            _move_entries_except(staging.data_dir, plan.out, layout.commit_marker)
    faults.inject("commit:moved", 0)
    files = [{"path": layout.file_path(r.relpath), "bytes": r.num_bytes_written, "sha256": r.sha256}
             for r in recorded]
    tracker = fmt.tracker_text(plan.checkpoints[-1]).encode() if layout.kind == OutputKind.RUN_DIRECTORY else None
    if tracker is not None:  # listed like every file written, though it is written last
        files.append({"path": layout.commit_marker, "bytes": len(tracker), "sha256": hashlib.sha256(tracker).hexdigest()})
    files.sort(key=lambda f: f["path"])
    for name in (MANIFEST, layout.commit_marker):  # a run killed while writing them left these
        remove_temporaries_of(os.path.join(plan.out, name))
    manifest_path = manifest_for(files).write(plan.out)
    faults.inject("commit:manifest", 0)
    if tracker is not None:
        write_atomically(os.path.join(plan.out, layout.commit_marker), lambda f: f.write(tracker))
    else:
        marker = os.path.join(staging.data_dir, layout.commit_marker)
        if os.path.exists(marker):
            os.replace(marker, os.path.join(plan.out, layout.commit_marker))
    staging.discard()
    return layout.checkpoint_path(plan.out), manifest_path, files


def _move_entries_except(staged: str, out: str, marker: str) -> None:
    """Move the staged entries into the output root; the commit marker stays staged until the
    manifest is written."""
    for entry in sorted(os.listdir(staged)):
        if entry != marker:
            os.replace(os.path.join(staged, entry), os.path.join(out, entry))


def _clear_previous_output(out: str, commit_marker: str) -> None:
    """--overwrite: invalidate the old output first (its commit marker), then remove the rest of it."""
    marker = os.path.join(out, commit_marker)
    if os.path.exists(marker):
        os.remove(marker)
    for entry in os.listdir(out):
        if entry == STAGING:
            continue
        path = os.path.join(out, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            remove_tree_quietly(path)
        else:
            os.remove(path)
