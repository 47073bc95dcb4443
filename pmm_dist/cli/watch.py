"""``pmm-dist watch``: the merge flags (as ``merge``'s) plus the watch's own, then the watcher."""
import argparse
import sys
from dataclasses import fields

from ..errors import MergeError, UsageError
from ..watcher.options import NOT_WATCH_OPTIONS, WatchOptions
from .merge import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, add_merge_arguments, add_option_arguments, \
    is_coordinator, options_or_usage_error

DESCRIPTION = """\
Follow a training run's checkpoints and publish, whenever its commit marker names a new complete
checkpoint, the merge of the window ending at it. After each update OUT_DIR holds exactly what
`pmm-dist merge RUN_DIR --out OUT_DIR <same flags> --iterations <window>` would write, plus the
previous merges --keep retains, in the format's own run layout; the running state that keeps
updates cheap lives in OUT_DIR/.pmm_watch. Run it beside the trainer (one process, or every
rank of torchrun / deepspeed / mpiexec), or from cron with --once."""

EPILOG = """\
window (as for merge, over the checkpoints so far):
  --last N [--interval V]  the newest N (all of them while the run has fewer); without --last
                           every checkpoint so far (ema: the recursion over the whole run)

layout of OUT_DIR:
  Megatron (legacy, torch_dist):  iter_N/ ... + latest_checkpointed_iteration.txt (written last)
  DeepSpeed:                      global_stepN/ ... + latest (written last)
  DCP, Hugging Face:              <checkpoint name>/ per merge + pmm_watch_index.json (written last)
  pmm_manifest.json: the newest merge's, where merge puts it (OUT_DIR/, or OUT_DIR/<name>/ for DCP
  and HF); each kept merge's also in OUT_DIR/.pmm_watch/published/<name>/ (Megatron, DeepSpeed).

examples:
  pmm-dist watch /ckpt/run --out /ckpt/run_ema --method ema --alpha 0.2
  pmm-dist watch /ckpt/run --out /ckpt/run_sma --last 8 --keep 0 --then 'sbatch eval.sh "$PMM_MERGED_PATH"'
  pmm-dist watch /ckpt/run --out /ckpt/run_curve --method ema --backfill --keep 0 --once

SIGTERM or Ctrl-C: stop after the current update (a second Ctrl-C: at once); SIGKILL: start the same
command again, it continues where it was. Exit status: 0 (with --once: every due merge published),
1 an update failed (with --once), 2 bad usage, 130 interrupted by a second Ctrl-C.
"""


def add_watch_arguments(parser: argparse.ArgumentParser) -> None:
    add_option_arguments(parser, WatchOptions)
    add_merge_arguments(parser, exclude=NOT_WATCH_OPTIONS)


def options_from_args(args: argparse.Namespace) -> WatchOptions:
    own = {f.name for f in fields(WatchOptions)} - {"merge"}
    given = {k: v for k, v in vars(args).items() if k in own or k in _merge_fields()}
    return WatchOptions.create(**given)


def _merge_fields():
    from ..engine.options import MergeOptions
    return {f.name for f in fields(MergeOptions)} - set(NOT_WATCH_OPTIONS)


def run_watch(args: argparse.Namespace) -> int:
    from ..watcher import watch
    options = options_or_usage_error(lambda: options_from_args(args))
    if options is None:
        return EXIT_USAGE
    try:
        result = watch(options=options)
    except KeyboardInterrupt:
        if is_coordinator():
            print("pmm-dist watch: interrupted; the update in progress is redone by the next start", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MergeError as exc:
        if getattr(exc, "interrupted", False):
            if is_coordinator():
                print("pmm-dist watch: interrupted; the update in progress is redone by the next start",
                      file=sys.stderr)
            return EXIT_INTERRUPTED
        if is_coordinator():
            print(f"pmm-dist: error: {exc}", file=sys.stderr, flush=True)
            for rank, text in sorted(getattr(exc, "tracebacks", {}).items()):
                print(f"pmm-dist: [rank {rank}] internal error, traceback:\n{text}", file=sys.stderr, flush=True)
        return EXIT_USAGE if isinstance(exc, UsageError) or getattr(exc, "usage", False) else EXIT_ERROR
    if result.stopped and is_coordinator() and not options.merge.quiet:
        print("pmm-dist watch: stopped", flush=True)
    if options.once and result.failures:
        return EXIT_ERROR
    return EXIT_OK
