"""Command line: ``pmm-dist merge|watch|verify|inspect ...`` (also ``python -m pmm_dist``, and under torchrun).

A thin layer over the library: parse flags, run, print on rank 0, and turn errors into a
message plus an exit code on every rank (0 ok, 1 input problem, 2 bad usage, 130 interrupted).
"""
import argparse
import os
import sys
from typing import List, Optional

from .. import __version__
from ..formats import available_formats
from .merge import add_merge_arguments, epilog, run_merge
from .watch import DESCRIPTION as WATCH_DESCRIPTION, EPILOG as WATCH_EPILOG, add_watch_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pmm-dist",
        description="Merge the checkpoints of one pre-training run (PMA: SMA, WMA, EMA or explicit weights), "
                    "rank-locally and shard by shard, into a checkpoint of the same framework and layout.")
    parser.add_argument("--version", action="version", version=f"pmm_dist {__version__}")
    # `deepspeed --module pmm_dist merge ...` puts --local_rank=N BEFORE the command name.
    parser.add_argument("--local_rank", "--local-rank", dest="launcher_local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    m = commands.add_parser("merge", help="merge N checkpoints into one", epilog=epilog(),
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            description="Merge N checkpoints of one run into one checkpoint in the same format. "
                                        "Run it in one process or on every rank of torchrun / deepspeed / mpiexec: "
                                        "each rank merges its own byte-balanced share of the shard files.")
    add_merge_arguments(m)
    m.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    w = commands.add_parser("watch", help="keep the merge of a run's newest checkpoints current, as they land",
                            description=WATCH_DESCRIPTION, epilog=WATCH_EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_watch_arguments(w)
    w.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    v = commands.add_parser("verify", help="check a merged output against its manifest",
                            description="Check a merged output: manifest and tracker present, every file with its "
                                        "size and sha256, nothing unlisted, and (when the sources still exist) the "
                                        "tensor names, shapes and dtypes of the newest source. Exit 0 if all is well, "
                                        "1 on any mismatch.")
    v.add_argument("out", help="the --out directory of a merge")
    v.add_argument("--no-sources", action="store_true", help="do not compare with the source checkpoints")

    i = commands.add_parser("inspect", help="list the checkpoints of a run",
                            description="List a run's checkpoints: format, parallel layout, iterations, sizes.")
    i.add_argument("sources", nargs="+", metavar="SOURCE", help="a run directory or checkpoint directories")
    i.add_argument("--format", default="auto", choices=["auto", *available_formats()])
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "verify":
        from .verify import run_verify
        return run_verify(args)
    if args.command == "inspect":
        from .inspect import run_inspect
        return run_inspect(args)
    local_rank = args.local_rank if args.local_rank is not None else args.launcher_local_rank
    if local_rank is not None:  # the deepspeed launcher passes --local_rank instead of the env var
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    if args.command == "watch":
        from .watch import run_watch
        return run_watch(args)
    return run_merge(args)


def entry() -> None:
    """Console-script and ``python -m pmm_dist`` entry: exit without interpreter teardown.

    After the last collective the work is done and flushed; a normal interpreter exit with a
    process group and third-party native threads (gloo; megatron-core, imported for its
    allow-list) was seen to abort now and then ("terminate called without an active
    exception", SIGABRT), which would turn a finished merge into a failed exit code."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
