"""Continuous PMA: follow a run's checkpoints on disk and keep their merge current.

    pmm_dist.watch("/ckpt/run", out="/ckpt/run_ema", method="ema", alpha=0.2)        # until stopped
    pmm_dist.watch_once("/ckpt/run", out="/ckpt/run_ema", method="ema", alpha=0.2)   # after a save

Each update reads the new checkpoint, the few the method's rules need (the one leaving a
window), and a running state under OUT/.pmm_watch, never the whole window again; see
watcher.update for how an update is chosen and watcher.state for the state's files.
"""
import threading
from typing import TYPE_CHECKING, Any, Optional

from .options import WatchOptions

if TYPE_CHECKING:
    from .loop import WatchResult

# The loop (and with it the engine and torch) is imported when a watch starts, not with the
# package: `pmm-dist watch --help` builds its flags from WatchOptions alone.
_LAZY = ("PublishedMerge", "WatchResult")


def __getattr__(name):
    if name in _LAZY:
        from . import loop
        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def watch(run_dir: Optional[str] = None, *, options: Optional[WatchOptions] = None,
          stop: Optional[threading.Event] = None, handle_signals: Optional[bool] = None,
          **kwargs: Any) -> "WatchResult":
    """Publish the merge of the window ending at each new complete checkpoint of ``run_dir``.

    Keyword arguments: ``out`` (required), the watch's ``poll``, ``keep``, ``once``, ``backfill``,
    ``then``, and any merge option (``method``, ``alpha``, ``weights``, ``last``, ``interval``,
    ``format``, ``device``, ``optimizer``, ...). Runs until ``stop`` is set (or, in the main
    thread with ``handle_signals``, the default there, SIGTERM/SIGINT: after the current update),
    or after one look with ``once=True``. Call it on every rank of a job, or in one process.
    """
    from .loop import run_watcher
    options = options or WatchOptions.create(run_dir, **kwargs)
    if handle_signals is None:
        handle_signals = threading.current_thread() is threading.main_thread()
    return run_watcher(options, stop=stop, handle_signals=handle_signals)


def watch_once(run_dir: Optional[str] = None, **kwargs: Any) -> "WatchResult":
    """The hook for a training script, after it saved a checkpoint (on every rank, as the save):
    publish what is due now and return. Same options as ``watch``; installs no signal handlers."""
    kwargs.setdefault("once", True)
    return watch(run_dir, handle_signals=False, **kwargs)


__all__ = ["watch", "watch_once", "WatchOptions", "WatchResult", "PublishedMerge"]
