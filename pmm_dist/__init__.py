"""pmm_dist: rank-local merging (PMA: SMA, WMA, EMA, weighted) of sharded training checkpoints."""
__version__ = "0.1.0"

from .engine import MergeOptions, MergePlan, MergeResult, merge  # noqa: E402
from .errors import InputError, MergeError, RankFailure, UsageError  # noqa: E402
from .merge.methods import available_methods, get_method  # noqa: E402
from .watcher import WatchOptions, WatchResult, watch, watch_once  # noqa: E402

__all__ = ["merge", "MergeOptions", "MergePlan", "MergeResult", "MergeError", "InputError", "RankFailure",
           "UsageError", "available_methods", "get_method", "watch", "watch_once", "WatchOptions", "WatchResult",
           "__version__"]
