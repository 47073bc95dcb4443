"""pmm_dist: rank-local merging (PMA: SMA, WMA, EMA, weighted) of sharded training checkpoints."""
__version__ = "0.1.0"

# The engine (and with it torch, ~1.5 s) is imported when first used, not with the package, so
# that `pmm-dist --help` and `--version` start at once (benchmarks/startup.py). The subpackage
# pmm_dist.merge is imported first: importing it later would rebind the name `merge` below.
from . import merge as _merge_package  # noqa: E402,F401
from .errors import InputError, MergeError, RankFailure, UsageError  # noqa: E402
from .merge.methods import available_methods, get_method  # noqa: E402

_LAZY = {"MergeOptions": "pmm_dist.engine.options", "MergePlan": "pmm_dist.engine.planning",
         "MergeResult": "pmm_dist.engine.run", "WatchOptions": "pmm_dist.watcher", "WatchResult": "pmm_dist.watcher"}


def merge(options=None, **kwargs):
    """Merge checkpoints as ``options`` (a MergeOptions) or keyword arguments for MergeOptions
    say; see ``pmm_dist.engine.run.merge``."""
    from .engine.run import merge as run
    return run(options, **kwargs)


def watch(*args, **kwargs):
    """Follow a run and publish the merge of each new checkpoint's window; see ``pmm_dist.watcher.watch``."""
    from .watcher import watch as run
    return run(*args, **kwargs)


def watch_once(*args, **kwargs):
    """Publish what is due now, in-process (a trainer's hook after it saves); see ``pmm_dist.watcher.watch_once``."""
    from .watcher import watch_once as run
    return run(*args, **kwargs)


def __getattr__(name):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["merge", "MergeOptions", "MergePlan", "MergeResult", "MergeError", "InputError", "RankFailure",
           "UsageError", "available_methods", "get_method", "watch", "watch_once", "WatchOptions", "WatchResult",
           "__version__"]
