"""What a watcher is asked to do: the merge options (one flag per MergeOptions field, as for
``pmm-dist merge``) plus how to follow the run. ``pmm-dist watch`` builds its flags from both."""
import os
from dataclasses import dataclass, fields, replace
from typing import Any, Dict, Optional

from ..engine.options import MergeOptions, option
from ..errors import UsageError
from ..merge.methods import get_method

# MergeOptions fields a watcher sets itself (or has no use for): no flags for them.
NOT_WATCH_OPTIONS = ("sources", "out", "iterations", "dry_run", "overwrite", "resume")


@dataclass(frozen=True, kw_only=True)
class WatchOptions:
    run_dir: str = option("", "the run directory to follow (its tracker or commit markers say which checkpoints "
                              "are complete)", positional=True, nargs=None, metavar="RUN_DIR")
    out: str = option("", "where merges are published (with the watcher's state in OUT_DIR/.pmm_watch)",
                      required=True, metavar="OUT_DIR")
    poll: float = option(30.0, "seconds between looks at RUN_DIR (default: 30)", metavar="SECONDS")
    keep: int = option(1, "published merges kept in OUT_DIR, the newest first (default: 1; 0 keeps all)",
                       metavar="K")
    once: bool = option(False, "publish what is due now and exit (cron, tests)")
    backfill: bool = option(False, "publish every complete checkpoint not yet published, oldest first, instead of "
                                   "only the newest")
    then: Optional[str] = option(None, "shell command run after each publish, with PMM_MERGED_PATH, PMM_ITERATION "
                                       "and PMM_METHOD in its environment; its failure is reported, watching goes on",
                                 metavar="CMD")
    merge: MergeOptions = None  # the merge flags; sources=[run_dir], out=out (no flag of its own)

    def __post_init__(self):
        if not self.run_dir:
            raise UsageError("no run directory given")
        if self.merge is None:
            raise UsageError("merge options missing (use WatchOptions.create)")
        if self.poll <= 0:
            raise UsageError(f"--poll must be positive, got {self.poll}")
        if self.keep < 0:
            raise UsageError(f"--keep must be 0 (keep all) or more, got {self.keep}")
        for name in NOT_WATCH_OPTIONS[2:]:
            if getattr(self.merge, name):
                raise UsageError(f"--{name.replace('_', '-')} is not an option of watch (the watcher chooses the "
                                 "iterations of each merge itself and always resumes)")
        method = get_method(self.merge.method)
        fixed = method.fixed_count(self.merge.method_options())
        if fixed is not None and self.merge.last not in (None, fixed):
            raise UsageError(f"--last {self.merge.last} but {fixed} explicit weights: the window has as many "
                             "checkpoints as there are weights")

    @classmethod
    def create(cls, run_dir: Optional[str] = None, **kwargs: Any) -> "WatchOptions":
        """From keyword arguments: the watch's own (poll, keep, once, backfill, then) and any
        MergeOptions field (method, alpha, last, interval, format, device, ...)."""
        own = {f.name for f in fields(cls)} - {"merge"}
        merge_names = {f.name for f in fields(MergeOptions)} - set(NOT_WATCH_OPTIONS)
        unknown = sorted(set(kwargs) - own - merge_names)
        if unknown:
            raise UsageError(f"unknown watch option(s) {', '.join(unknown)}")
        mine: Dict[str, Any] = {k: v for k, v in kwargs.items() if k in own}
        run_dir = run_dir if run_dir is not None else mine.pop("run_dir", None)
        mine.pop("run_dir", None)
        if not run_dir:
            raise UsageError("no run directory given")
        if not mine.get("out"):
            raise UsageError("--out is required")
        merge = MergeOptions(sources=[str(run_dir)], out=str(mine["out"]),
                             **{k: v for k, v in kwargs.items() if k in merge_names})
        return cls(run_dir=str(run_dir), merge=merge, **{k: v for k, v in mine.items() if k != "run_dir"})

    @property
    def window_length(self) -> Optional[int]:
        """--last, or the number of explicit weights."""
        if self.merge.last is not None:
            return self.merge.last
        return get_method(self.merge.method).fixed_count(self.merge.method_options())

    def merge_options_for(self, out: str, **changes) -> MergeOptions:
        return replace(self.merge, out=out, **changes)

    @property
    def out_path(self) -> str:
        return os.path.abspath(self.out)
