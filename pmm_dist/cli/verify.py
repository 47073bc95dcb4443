"""``pmm-dist verify OUT``: a merged output checked against its manifest, read-only."""
import json
import os
import sys
from dataclasses import dataclass, field
from typing import List

from ..engine.manifest import MANIFEST, Manifest
from ..errors import InputError
from ..formats import format_class
from ..io.atomic import sha256_of_file
from ..io.staging import STAGING

WATCH_INDEX = "pmm_watch_index.json"  # pmm_dist.watcher.ledger.INDEX_FILE (not imported: verify stays light)


@dataclass
class Verdict:
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)   # what was not checked, and why


def verify_output(out: str, *, check_sources: bool = True) -> List[str]:
    """Problems found in a merged output, compared with its manifest (empty list: all good)."""
    return check_output(out, check_sources=check_sources).problems


def check_output(out: str, *, check_sources: bool = True) -> Verdict:
    """Checks the manifest and commit marker exist, every listed file has its size and sha256, no
    unlisted file sits in the checkpoint, and (when the sources are still there and the format
    can list tensors) the output's float tensors have the newest source's names, shapes, dtypes.
    """
    verdict = Verdict()
    manifest_path = os.path.join(out, MANIFEST)
    if not os.path.isdir(out):
        verdict.problems.append(f"{out}: no such directory")
        return verdict
    if not os.path.exists(manifest_path) and os.path.isfile(os.path.join(out, WATCH_INDEX)):
        return _check_watch_index(out, check_sources)
    try:
        manifest = Manifest.read(out)
    except FileNotFoundError:
        verdict.problems.append(f"{manifest_path}: missing (not a pmm_dist output, or the merge never committed)")
        return verdict
    except (OSError, ValueError) as exc:
        verdict.problems.append(f"{manifest_path}: not a valid manifest ({exc})")
        return verdict
    problems = verdict.problems
    tracker = os.path.join(out, manifest.tracker)
    if not manifest.tracker or not os.path.exists(tracker):
        problems.append(f"{tracker}: tracker missing: the output is not loadable")
    listed = set()
    for entry in manifest.files:
        path = os.path.join(out, entry["path"])
        listed.add(os.path.normpath(path))
        if not os.path.isfile(path):
            problems.append(f"{path}: missing")
        elif os.path.getsize(path) != entry["bytes"]:
            problems.append(f"{path}: size {os.path.getsize(path)} != {entry['bytes']} in the manifest")
        elif sha256_of_file(path) != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (corrupted or modified)")
    checkpoint_dir = os.path.join(out, manifest.output_checkpoint)
    ignored = {os.path.normpath(manifest_path), os.path.normpath(tracker)}
    for directory, dirs, files in os.walk(checkpoint_dir):
        if directory == os.path.normpath(out):
            dirs[:] = [d for d in dirs if d != STAGING]
        for name in files:
            path = os.path.normpath(os.path.join(directory, name))
            if path not in listed and path not in ignored:
                problems.append(f"{path}: not listed in the manifest")
    if os.path.exists(os.path.join(out, STAGING)):
        problems.append(f"{os.path.join(out, STAGING)}: an unfinished merge's staging area is still present")
    if not check_sources:
        verdict.notes.append("the comparison with the sources was skipped (--no-sources)")
    elif not problems:
        _compare_with_newest_source(manifest, checkpoint_dir, verdict)
    return verdict


def _check_watch_index(out: str, check_sources: bool) -> Verdict:
    """A ``pmm-dist watch`` output of a format whose merge is a checkpoint root (DCP, HF): each
    merge the index lists is checked as a merge output of its own."""
    verdict = Verdict()
    index_path = os.path.join(out, WATCH_INDEX)
    try:
        with open(index_path) as f:
            merges = json.load(f)["merges"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        verdict.problems.append(f"{index_path}: not a valid watch index ({exc})")
        return verdict
    for entry in merges:
        inner = check_output(os.path.join(out, entry["path"]), check_sources=check_sources)
        verdict.problems += inner.problems
        verdict.notes += [note for note in inner.notes if note not in verdict.notes]
    return verdict


def _compare_with_newest_source(manifest: Manifest, checkpoint_dir: str, verdict: Verdict) -> None:
    newest = manifest.sources[-1]["path"] if manifest.sources else None
    if newest is None or not os.path.isdir(newest):
        verdict.notes.append(f"the comparison with the sources was skipped: the newest source {newest} no longer "
                             "exists")
        return
    fmt = format_class(manifest.format)()
    try:
        expected = fmt.tensor_inventory(newest)
        actual = fmt.tensor_inventory(checkpoint_dir)
    except InputError as exc:
        verdict.problems.append(str(exc))
        return
    if expected is None or actual is None:
        verdict.notes.append(f"the comparison with the sources was skipped: format {manifest.format} cannot list "
                             "its tensors")
        return
    verdict.problems += [f"{checkpoint_dir}: tensor '{k}' missing (present in the source {newest})"
                         for k in sorted(expected.keys() - actual.keys())]
    verdict.problems += [f"{checkpoint_dir}: unexpected tensor '{k}' (absent from the source {newest})"
                         for k in sorted(actual.keys() - expected.keys())]
    verdict.problems += [f"{checkpoint_dir}: tensor '{k}' is {actual[k]} but {expected[k]} in the source {newest}"
                         for k in sorted(expected.keys() & actual.keys()) if expected[k] != actual[k]]


def run_verify(args) -> int:
    verdict = check_output(args.out, check_sources=not args.no_sources)
    if verdict.problems:
        print(f"pmm-dist: verify FAILED for {args.out}:", file=sys.stderr)
        for problem in verdict.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(f"OK: {args.out} matches its manifest" + "".join(f"; {note}" for note in verdict.notes))
    return 0
