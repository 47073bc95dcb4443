"""Metadata reads memoised while the coordinator plans one merge.

Planning asks the same questions of a source many times (a checkpoint's shard directories when
it is recognised, discovered, laid out and validated; its first shard's saved args for the run
identity, the layout and each unit check), and at 100k shard files each repetition costs
seconds. Inside ``planning_reads()`` a directory is listed and a checkpoint file's pickle is
parsed once; the plan is made from one consistent view of the inputs (the input snapshot taken
during planning is what detects later changes, before the commit). Outside it (the ranks' check
and merge steps, a watcher's next round) nothing is cached, so no listing goes stale.
"""
import contextlib
import gc
import os
import threading
from typing import Callable, Dict, List, Optional, Tuple, TypeVar

T = TypeVar("T")
_state = threading.local()


@contextlib.contextmanager
def planning_reads():
    """Memoise ``memoised`` reads in this thread until the block ends (nested blocks share one cache)."""
    if getattr(_state, "cache", None) is not None:
        yield
        return
    _state.cache = {}
    try:
        yield
    finally:
        _state.cache = None


def remember_file_stats(stats: Dict[str, Tuple[int, int]]) -> None:
    """The input snapshot's (size, mtime_ns) by path (io/staging.snapshot_inputs: every file of
    every source, taken before the format validates them), for ``file_size`` and ``is_file``
    inside this ``planning_reads`` block: at 100k shard files, a stat each again costs a second."""
    cache = getattr(_state, "cache", None)
    if cache is not None:
        cache[("file_stats", None)] = stats


def _known_stat(path: str) -> Optional[Tuple[int, int]]:
    cache = getattr(_state, "cache", None)
    stats = cache.get(("file_stats", None)) if cache is not None else None
    return stats.get(path) if stats is not None else None


def file_size(path: str) -> int:
    """``os.path.getsize``, from the snapshot where it has the file."""
    known = _known_stat(path)
    return known[0] if known is not None else os.path.getsize(path)


def is_file(path: str) -> bool:
    """``os.path.isfile``, from the snapshot where it has the file."""
    return _known_stat(path) is not None or os.path.isfile(path)


def memoised(kind: str, key, read: Callable[[], T]) -> T:
    """``read()``, or inside ``planning_reads`` the value it returned the first time for (kind, key).
    Values are shared between callers: treat them as read-only. Errors are not remembered."""
    cache = getattr(_state, "cache", None)
    if cache is None:
        return read()
    if (kind, key) not in cache:
        cache[(kind, key)] = read()
    return cache[(kind, key)]


def scan_directory(path: str) -> Tuple[Tuple[str, bool], ...]:
    """Sorted (name, is a directory) of ``path``'s entries, from one ``scandir`` (the entry types
    come with the listing: no stat per entry); () if it is missing, not a directory or unreadable."""
    def read():
        try:
            with os.scandir(path) as entries:
                return tuple(sorted((e.name, e.is_dir()) for e in entries))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return ()
    return memoised("scandir", os.path.abspath(path), read)


def subdirectories(path: str) -> List[str]:
    """Sorted names of the directories in ``path`` (symbolic links to directories included, as
    ``os.path.isdir`` counts them)."""
    return [name for name, is_dir in scan_directory(path) if is_dir]


@contextlib.contextmanager
def gc_paused():
    """No cyclic garbage collection inside the block (nested blocks: until the outermost ends).
    Unpickling a DCP ``.metadata`` of 1M chunks creates millions of objects, none of them
    garbage, and the collections they trigger walk all of them again and again: half of the
    parse time, and more in the planning after it (benchmarks/scale.py --dcp-chunks).
    What the block made and still holds is frozen when it ends (``gc.freeze``): the first
    collection after it would otherwise walk the whole plan and parsed metadata once more,
    seconds at a million chunks, to find nothing. A later block (the watcher plans again and
    again) first returns those objects to the collector and collects what of them is garbage."""
    was_enabled = gc.isenabled()
    if was_enabled and gc.get_freeze_count():
        gc.unfreeze()
        gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.freeze()
            gc.enable()
