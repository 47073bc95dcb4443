"""The output's private work area, which makes merges atomic and resumable.

    OUT/.pmm_staging/data/<checkpoint dir>/...   merged files, each written tmp + fsync + rename
    OUT/.pmm_staging/state/fingerprint.json      what this merge is (inputs, options, plan) and its hash
    OUT/.pmm_staging/state/done/<unit>.json      one marker per finished unit, written after it
    OUT/.pmm_staging/state/committed.json        every file's result: from here on only moving is left
    OUT/.pmm_staging/state/cleared.flag          --overwrite has removed the previous output

Nothing under the staging directory is ever loadable by a trainer (no tracker points at it).
A merge that fails or is killed leaves it in place; ``--resume`` with an identical fingerprint
redoes only the units without a marker, so the result is bitwise that of an uninterrupted run.
"""
import hashlib
import json
import os
from dataclasses import asdict
from typing import Dict, List, Optional, Sequence, Tuple

from .atomic import remove_tree_quietly, write_json_atomically
from ..errors import InputError, NotResumable
from ..plan.types import CheckpointRef, UnitResult, WorkUnit

STAGING = ".pmm_staging"
InputSnapshot = Dict[str, Tuple[int, int]]


def snapshot_inputs(checkpoints: Sequence[CheckpointRef]) -> InputSnapshot:
    """(size, mtime_ns) of every file of every source checkpoint; refuses symbolic links inside
    a checkpoint (a link could point anywhere, and the file behind it could change unseen).

    At 100k shard directories per checkpoint this is the bulk of planning: scandir, not os.walk
    + islink + stat, since the entry types come with the listing (one lstat per file, none per
    directory). Threads were measured no faster on a local disk (benchmarks/scale.py)."""
    snapshot: InputSnapshot = {}
    for ckpt in checkpoints:
        if os.path.islink(ckpt.path):
            raise InputError(f"{ckpt.path}: is a symbolic link; pass the real checkpoint directory")
        pending = [ckpt.path]
        while pending:
            try:
                entries = list(os.scandir(pending.pop()))
            except OSError:  # as os.walk: an unreadable directory is skipped (its files fail later, named)
                continue
            for entry in entries:
                if entry.is_symlink():
                    raise InputError(f"{entry.path}: symbolic link inside a source checkpoint is refused "
                                     f"(points to {os.readlink(entry.path)})")
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                else:
                    stat = entry.stat(follow_symlinks=False)
                    snapshot[entry.path] = (stat.st_size, stat.st_mtime_ns)
    return snapshot


def changed_inputs(snapshot: InputSnapshot) -> list:
    """Source files whose size or modification time changed since ``snapshot`` was taken."""
    changed = []
    for path, (size, mtime) in sorted(snapshot.items()):
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            changed.append(f"{path}: removed while the merge ran")
            continue
        if (stat.st_size, stat.st_mtime_ns) != (size, mtime):
            changed.append(f"{path}: modified while the merge ran (size {size} -> {stat.st_size})")
    return changed


def fingerprint(description: dict, snapshot: InputSnapshot) -> str:
    """The hash of ``identity``: the description as JSON, then a line ``path NUL size NUL
    mtime_ns`` per input file in path order (one unambiguous record each, as no path holds a
    NUL; at 208k files: 0.48 s as the JSON of the whole identity, 0.35 s so, the sort included)."""
    hasher = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode())
    hasher.update("".join(f"{path}\0{size}\0{mtime}\n" for path, (size, mtime) in sorted(snapshot.items()))
                  .encode("utf-8", "surrogateescape"))
    return hasher.hexdigest()


def identity(description: dict, snapshot: InputSnapshot) -> dict:
    return {"plan": description, "inputs": sorted(snapshot.items())}


def differences(recorded: dict, current: dict) -> List[str]:
    """What differs between two merges' identities, named: options by key, inputs by file."""
    recorded = json.loads(json.dumps(recorded, default=str))
    current = json.loads(json.dumps(current, default=str))
    found = []
    old_plan, new_plan = recorded.get("plan", {}), current.get("plan", {})
    for key in sorted(set(old_plan) | set(new_plan)):
        if old_plan.get(key) != new_plan.get(key):
            found.append(f"{key} ({_short(old_plan.get(key))} -> {_short(new_plan.get(key))})"
                         if key != "units" else "the planned output files")
    old_inputs, new_inputs = dict(map(tuple, recorded.get("inputs", []))), dict(map(tuple, current.get("inputs", [])))
    for path in sorted(set(old_inputs) | set(new_inputs)):
        if old_inputs.get(path) != new_inputs.get(path):
            what = "added" if path not in old_inputs else "removed" if path not in new_inputs else "modified"
            found.append(f"input {path} ({what})")
    return found


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


class Staging:
    def __init__(self, out: str, output_dirname: str):
        self.root = os.path.join(out, STAGING)
        self.data_dir = os.path.join(self.root, "data", output_dirname) if output_dirname else \
            os.path.join(self.root, "data")
        self.state_dir = os.path.join(self.root, "state")
        self._done_dir = os.path.join(self.state_dir, "done")
        self._fingerprint_path = os.path.join(self.state_dir, "fingerprint.json")
        self._commit_path = os.path.join(self.state_dir, "committed.json")

    @classmethod
    def find(cls, out: str) -> Optional["Staging"]:
        """The staging area of an interrupted merge in ``out``, if there is one."""
        staging = cls(out, "")
        return staging if staging.exists() else None

    def exists(self) -> bool:
        return os.path.isfile(self._fingerprint_path)

    def prepare(self, merge_fingerprint: str, identity: dict, resume: bool) -> int:
        """Coordinator: start afresh, or (``resume``) continue an identical merge. Returns the
        number of units already finished."""
        if resume and self.exists():
            recorded = self.recorded()
            if recorded.get("fingerprint") != merge_fingerprint:
                changed = differences(recorded.get("identity", {}), identity) or ["the inputs or options"]
                raise NotResumable(f"refusing to --resume in {self.root}: {'; '.join(changed[:6])}"
                                   f"{' ...' if len(changed) > 6 else ''} differ from the interrupted merge. "
                                   "Run the interrupted merge's own command with --resume, or run this one with "
                                   "--overwrite to discard the interrupted merge and start over.")
            self._remove_temporary_files()
            return self.num_done()
        remove_tree_quietly(self.root)
        os.makedirs(self.data_dir, exist_ok=True)
        os.makedirs(self._done_dir, exist_ok=True)
        write_json_atomically(self._fingerprint_path, {"fingerprint": merge_fingerprint, "identity": identity})
        return 0

    def recorded(self) -> dict:
        """What the staged merge recorded about itself (fingerprint and identity), or {}."""
        try:
            with open(self._fingerprint_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def num_done(self) -> int:
        """Units with a marker (a marker a kill interrupted is a temporary file, and no marker)."""
        if not os.path.isdir(self._done_dir):
            return 0
        return sum(name.endswith(".json") for name in os.listdir(self._done_dir))

    def completed(self, unit: WorkUnit) -> Optional[UnitResult]:
        """The recorded result of ``unit`` if it finished and its file is still intact."""
        if self.commit_record() is not None:  # interrupted while committing: every unit is done
            with open(self._marker(unit)) as f:
                return UnitResult(**json.load(f))
        try:
            with open(self._marker(unit)) as f:
                result = UnitResult(**json.load(f))
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return None
        path = os.path.join(self.data_dir, result.relpath)
        if not os.path.isfile(path) or os.path.getsize(path) != result.num_bytes_written:
            return None
        return result

    def mark_done(self, unit: WorkUnit, result: UnitResult) -> None:
        write_json_atomically(self._marker(unit), asdict(result))

    def record_commit(self, results: Sequence[UnitResult]) -> None:
        write_json_atomically(self._commit_path, [asdict(r) for r in results])

    def commit_record(self) -> Optional[list]:
        """Every unit's (and the format's finalize) results, once the commit has begun."""
        try:
            with open(self._commit_path) as f:
                return [UnitResult(**r) for r in json.load(f)]
        except FileNotFoundError:
            return None

    def set_flag(self, name: str) -> None:
        write_json_atomically(os.path.join(self.state_dir, f"{name}.flag"), {})

    def has_flag(self, name: str) -> bool:
        return os.path.isfile(os.path.join(self.state_dir, f"{name}.flag"))

    def discard(self) -> None:
        remove_tree_quietly(self.root)

    def _marker(self, unit: WorkUnit) -> str:
        return os.path.join(self._done_dir, hashlib.sha1(f"{unit.action}:{unit.relpath}".encode()).hexdigest() + ".json")

    def _remove_temporary_files(self) -> None:
        # Files a killed writer left under a temporary name (see atomic.temporary_name).
        for directory, _, files in os.walk(self.root):
            for name in files:
                if ".tmp." in name:
                    os.remove(os.path.join(directory, name))
