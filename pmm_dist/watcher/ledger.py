"""``OUT/.pmm_watch``: what a watcher has seen, published and kept, so a restart continues exactly.

    OUT/.pmm_watch/watch.json          the options that decide the outputs (a restart with others is refused)
    OUT/.pmm_watch/history.json        checkpoints seen, merges published (in order), --then exit codes
    OUT/.pmm_watch/pending.json        the update in progress (its output, to clear if it is abandoned)
    OUT/.pmm_watch/states/<iteration>/ a published merge's running state (watcher.state; state.json last)
    OUT/.pmm_watch/published/<name>/pmm_manifest.json   each kept merge's manifest (run-directory formats,
                                       whose root holds only the newest one, as ``merge`` writes it)
    OUT/.pmm_watch/trash/              merges and states on their way out (renamed here, then removed)

Every file is written atomically, and its content depends only on the run and the options (no
times, no process ids): a watcher killed and restarted leaves the same bytes as one that was not.
``history.json`` is the watcher's own commit record: a merge is published for the watcher once it
is listed there (after the format's tracker or the index names it).
"""
import os
import shutil
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from ..errors import UsageError
from ..io.atomic import remove_temporaries_of, remove_tree_quietly, write_json_atomically
from .state import read_json

WATCH_DIR = ".pmm_watch"
INDEX_FILE = "pmm_watch_index.json"
FORMAT_VERSION = 1


@dataclass
class Published:
    """One published merge."""
    iteration: int
    dirname: str                      # the merged checkpoint, relative to OUT
    window: Dict[str, int]            # {"first", "last", "count"}: the iterations merged
    reads: List[int]                  # the checkpoints this update read
    incremental: bool                 # read a running state (else: the whole window)
    bytes_read: int                   # checkpoints and state, as in its manifest
    state: bool                       # its running state was kept
    layout: str = "run-directory"     # the format's OutputKind: where the merge sits in OUT
    then: Optional[int] = None        # --then's exit status, once it ran


@dataclass
class History:
    checkpoints: Dict[int, str] = field(default_factory=dict)   # every complete checkpoint seen
    published: List[Published] = field(default_factory=list)

    @property
    def last(self) -> Optional[Published]:
        return self.published[-1] if self.published else None


class Ledger:
    def __init__(self, out: str):
        self.out = os.path.abspath(out)
        self.root = os.path.join(self.out, WATCH_DIR)
        self.states_root = os.path.join(self.root, "states")
        self._history_path = os.path.join(self.root, "history.json")
        self._identity_path = os.path.join(self.root, "watch.json")
        self._pending_path = os.path.join(self.root, "pending.json")

    # -- identity --------------------------------------------------------------------------------
    def identity(self) -> Optional[dict]:
        return read_json(self._identity_path)

    def claim(self, identity: dict) -> None:
        """Record the options that decide the outputs; a watcher with other ones is refused."""
        recorded = self.identity()
        if recorded is None:
            write_json_atomically(self._identity_path, identity)
            return
        differing = sorted(k for k in set(recorded) | set(identity) if recorded.get(k) != identity.get(k))
        if differing:
            shown = "; ".join(f"{k}: {recorded.get(k)!r} there, {identity.get(k)!r} now" for k in differing)
            raise UsageError(f"{self.out} holds the merges of a watch with other options ({shown}); use another "
                             "--out, or the same options")

    # -- history ---------------------------------------------------------------------------------
    def load(self) -> History:
        data = read_json(self._history_path)
        if not data:
            return History()
        return History(checkpoints={int(it): path for it, path in data["checkpoints"]},
                       published=[Published(**entry) for entry in data["published"]])

    def save(self, history: History) -> None:
        write_json_atomically(self._history_path, {
            "format_version": FORMAT_VERSION,
            "checkpoints": [[it, path] for it, path in sorted(history.checkpoints.items())],
            "published": [asdict(p) for p in history.published]})

    # -- the update in progress ------------------------------------------------------------------
    def pending(self) -> Optional[dict]:
        return read_json(self._pending_path)

    def set_pending(self, target: int, dirname: str) -> None:
        write_json_atomically(self._pending_path, {"iteration": target, "dirname": dirname})

    def clear_pending(self) -> None:
        if os.path.exists(self._pending_path):
            os.remove(self._pending_path)

    # -- states ----------------------------------------------------------------------------------
    def state_dir(self, iteration: int) -> str:
        return os.path.join(self.states_root, str(iteration))

    def state_info(self, iteration: int) -> Optional[dict]:
        """A state's description (state.json), None while it is incomplete."""
        return read_json(os.path.join(self.state_dir(iteration), "state.json"))

    def state_iterations(self) -> List[int]:
        try:
            return sorted(int(e) for e in os.listdir(self.states_root) if e.isdigit())
        except FileNotFoundError:
            return []

    # -- published manifests (run-directory formats) ---------------------------------------------
    def manifest_copy(self, dirname: str) -> str:
        return os.path.join(self.root, "published", dirname, "pmm_manifest.json")

    # -- the index (checkpoint-root formats) -----------------------------------------------------
    def write_index(self, kept: List[Published], method: str) -> None:
        """``OUT/pmm_watch_index.json``, written last: the newest published merge and the kept ones."""
        newest = kept[-1]
        remove_temporaries_of(os.path.join(self.out, INDEX_FILE))  # a watcher killed while writing it left these
        write_json_atomically(os.path.join(self.out, INDEX_FILE), {
            "format_version": FORMAT_VERSION, "latest": newest.dirname, "iteration": newest.iteration,
            "method": method,
            "merges": [{"iteration": p.iteration, "path": p.dirname, "window": p.window} for p in kept]})

    # -- removal ---------------------------------------------------------------------------------
    def discard(self, path: str) -> None:
        """Remove a merge or state: first renamed out of sight (one step), then deleted, so a
        half-deleted directory never sits under a name a reader or the watcher would use."""
        if not os.path.lexists(path):
            return
        trash = os.path.join(self.root, "trash")
        os.makedirs(trash, exist_ok=True)
        target = os.path.join(trash, os.path.basename(path))
        suffix = 0
        while os.path.lexists(target):
            suffix += 1
            target = os.path.join(trash, f"{os.path.basename(path)}.{suffix}")
        os.replace(path, target)
        self.empty_trash()

    def empty_trash(self) -> None:
        trash = os.path.join(self.root, "trash")
        if os.path.isdir(trash):
            for entry in os.listdir(trash):
                path = os.path.join(trash, entry)
                if os.path.isdir(path) and not os.path.islink(path):
                    remove_tree_quietly(path)
                else:
                    os.remove(path)
            shutil.rmtree(trash, ignore_errors=True)

    def remove_temporary_files(self) -> None:
        """Left by a killed writer (see io.atomic.temporary_name)."""
        for directory, _, names in os.walk(self.root):
            for name in names:
                if ".tmp." in name:
                    os.remove(os.path.join(directory, name))

