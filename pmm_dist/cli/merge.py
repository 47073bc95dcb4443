"""``pmm-dist merge``: flags derived from MergeOptions' fields, then the engine, then the summary."""
import argparse
import os
import re
import shlex
import sys
import time
import typing
from dataclasses import MISSING, fields
from typing import Callable, List, Optional, TypeVar

from ..engine.options import METHOD_OPTION, MergeOptions
from ..errors import MergeError, RankFailure, UsageError
from ..formats import loading_hints
from ..merge.methods import available_methods, get_method
from ..io.staging import Staging
from ..plan.types import Choice

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
REPORT_GRACE_S = 2.0  # how long the other ranks wait, failing, for the coordinator's report
T = TypeVar("T")

def epilog() -> str:
    """--help's closing text: the methods' formulas and the formats' loading commands come from
    their own modules' registries."""
    methods = "\n".join(f"  {name:9} {get_method(name).summary}" for name in available_methods())
    loading = "\n".join(f"  {name:14} {hint}" for name, hint in loading_hints().items())
    return (f"methods (weights w_i, oldest checkpoint first, N checkpoints):\n{methods}\n\n{_USAGE_NOTES}"
            f"loading the result (see README.md):\n{loading}\n\n{_EXIT_NOTES}")


_USAGE_NOTES = """\
selection (default: every checkpoint found):
  --last N                 the newest N checkpoints
  --interval V [--last N]  newest, newest-V, newest-2V, ... (a missing one is an error)
  --iterations a,b,c       exactly these

examples:
  pmm-dist merge /ckpt/run --out /ckpt/run_ema --method ema --alpha 0.2 --last 8 --interval 1000
  torchrun --standalone --nproc-per-node 8 -m pmm_dist merge /ckpt/run --out /ckpt/run_sma --last 10
  pmm-dist merge /ckpt/run/iter_0009000 /ckpt/run/iter_0010000 --out /tmp/avg --dry-run

"""
_EXIT_NOTES = """\
after a crash or kill: re-run the same command with --resume (finished files are kept).
Exit status: 0 on success, 1 on a merge error (message names the file and key), 2 on bad usage,
130 when interrupted.
"""


def _iterations(text: str) -> List[int]:
    """Iterations, or checkpoint names ending in one (global_step1000, iter_0001000, checkpoint-1000)."""
    found = [re.fullmatch(r"(?:[A-Za-z][\w.-]*?[_.-]?)?0*(\d+)", x.strip()) for x in text.split(",") if x.strip()]
    if not all(found):
        raise argparse.ArgumentTypeError(f"expected iterations (or tags like global_step1000) separated by "
                                         f"commas, got {text!r}")
    return [int(match.group(1)) for match in found]


def _floats(text: str) -> List[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def _globs(text: str) -> List[str]:
    return [pattern.strip() for pattern in text.split(",") if pattern.strip()]


_PARSERS = {"iterations": _iterations, "floats": _floats, "globs": _globs}
_REPEATABLE = ("globs",)  # may be given several times, the values joined
_SCALARS = {int: int, float: float, str: str}


def add_merge_arguments(parser: argparse.ArgumentParser, exclude: typing.Collection[str] = ()) -> None:
    """One flag per MergeOptions field (but those in ``exclude``)."""
    add_option_arguments(parser, MergeOptions, exclude)


def add_option_arguments(parser: argparse.ArgumentParser, options_class, exclude: typing.Collection[str] = ()) -> None:
    """One flag per field of an options dataclass, from the field's type, default and metadata."""
    hints = typing.get_type_hints(options_class)
    for f in fields(options_class):
        if f.name in exclude or "help" not in f.metadata:
            continue
        meta, hint = f.metadata, hints[f.name]
        if meta.get("positional"):
            nargs = {"nargs": meta.get("nargs", "+")} if meta.get("nargs", "+") else {}
            parser.add_argument(f.name, metavar=meta.get("metavar"), help=meta["help"], **nargs)
            continue
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        kwargs = {"dest": f.name, "help": meta["help"], "default": None if f.default is MISSING else f.default}
        if meta.get(METHOD_OPTION):  # which methods take it, and their default, from the methods themselves
            takers = [m for m in available_methods() if f.name in get_method(m).defaults]
            defaults = {get_method(m).defaults[f.name] for m in takers} - {None}
            kwargs["help"] += f" (--method {' or '.join(takers)}" + \
                (f"; default: {defaults.pop()})" if len(defaults) == 1 and "const" not in meta else ")")
        base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
        if "const" in meta:
            kwargs.update(action="store_const", const=meta["const"])
        elif hint is bool:
            kwargs.update(action="store_true")
        elif isinstance(base, type) and issubclass(base, Choice):
            kwargs.update(choices=base.values(), default=str(f.default))
        else:
            kwargs["type"] = _PARSERS[meta["parse"]] if "parse" in meta else _SCALARS[base]
            if meta.get("parse") in _REPEATABLE:
                kwargs["action"] = "extend"
            if "metavar" in meta:
                kwargs["metavar"] = meta["metavar"]
            if "choices" in meta:
                kwargs["choices"] = list(meta["choices"])
            if meta.get("required"):
                kwargs.update(required=True)
                del kwargs["default"]
        parser.add_argument(flag, **kwargs)


def options_from_args(args: argparse.Namespace) -> MergeOptions:
    return MergeOptions(**{f.name: getattr(args, f.name) for f in fields(MergeOptions)})


def options_or_usage_error(build: Callable[[], T]) -> Optional[T]:
    """What ``build()`` makes of the flags, or None once the usage error is printed (exit 2)."""
    try:
        return build()
    except (UsageError, ValueError) as exc:
        print(f"pmm-dist: error: {exc}", file=sys.stderr)
        return None


def run_merge(args: argparse.Namespace) -> int:
    # the engine (torch, the collective) only now: building the parser must not import them
    from ..dist.collective import sigterm_as_exception
    from ..engine.report import format_summary
    from ..engine.run import merge
    options = options_or_usage_error(lambda: options_from_args(args))
    if options is None:
        return EXIT_USAGE
    coordinator = is_coordinator()
    try:
        with sigterm_as_exception():
            result = merge(options)
    except MergeError as exc:
        return _report_failure(exc, options, coordinator)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM outside a step (inside one, the collective reports it)
        return _report_failure(MergeError("interrupted"), options, coordinator, interrupted=True)
    if not coordinator or options.quiet:
        return EXIT_OK
    if options.dry_run:
        pass  # the engine printed the plan
    elif result.plan.already_complete:
        print(f"{result.output_path}: this merge had already committed (interrupted while exiting?); nothing to do",
              flush=True)
    else:
        print(format_summary(result), flush=True)
    return EXIT_OK


def _report_failure(exc: MergeError, options: MergeOptions, coordinator: bool, interrupted: bool = False) -> int:
    """One message on the coordinator; the --resume hint only where resuming can succeed."""
    interrupted = interrupted or getattr(exc, "interrupted", False)
    usage = isinstance(exc, UsageError) or getattr(exc, "usage", False)
    if coordinator:
        staged = Staging.find(options.out)
        state = (f"{staged.num_done()} finished units are kept in {staged.root}" if staged is not None
                 else "nothing was staged")
        if interrupted:
            print(f"pmm-dist: interrupted: nothing was committed, {state}; to continue: {resume_command()}",
                  file=sys.stderr, flush=True)
        else:
            print(f"pmm-dist: error: {exc}", file=sys.stderr, flush=True)
            for rank, text in sorted(getattr(exc, "tracebacks", {}).items()):
                print(f"pmm-dist: [rank {rank}] internal error, traceback:\n{text}", file=sys.stderr, flush=True)
            if staged is not None and exc.resumable:
                print(f"pmm-dist: nothing was committed, {state}: once the cause is fixed, continue with: "
                      f"{resume_command()}", file=sys.stderr, flush=True)
    elif isinstance(exc, RankFailure) and not interrupted:
        # Every rank knows the failure, and the coordinator reports it. Launchers that end every rank
        # as soon as one exits non-zero (mpiexec) must not end the coordinator before it has.
        time.sleep(REPORT_GRACE_S)
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_USAGE if usage else EXIT_ERROR


def resume_command() -> str:
    """The command this process runs, with --resume: exact for one process; under a launcher,
    the launcher's own command line with --resume added."""
    args = [a for a in sys.argv[1:] if a != "--resume" and not a.startswith("--local_rank")]
    command = shlex.join(["pmm-dist", *args, "--resume"])
    return command if int(os.environ.get("WORLD_SIZE", "1")) == 1 else \
        f"your launcher's command with --resume added (each rank runs: {command})"


def is_coordinator() -> bool:
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if var in os.environ:
            return int(os.environ[var]) == 0
    return True
