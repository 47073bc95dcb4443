"""Command line: ``pmm-dist merge|verify|inspect ...`` (also ``python -m pmm_dist``, and under torchrun).

A thin layer over ``pmm_dist.merge``: parse flags into MergeOptions, run, print the summary on
rank 0, and turn errors into a message plus a non-zero exit code on every rank.
"""
import argparse
import json
import os
import re
import sys
from typing import List, Optional

from . import __version__
from .engine import MergeOptions, merge
from .errors import MergeError
from .formats import available_formats
from .methods import available_methods
from .report import format_summary
from .staging import STAGING
from .verification import describe_run, format_run_description, verify_output

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

MERGE_EPILOG = """\
methods (weights w_i, oldest checkpoint first, N checkpoints):
  sma       w_i = 1/N
  wma       w_i = i / (N(N+1)/2)
  ema       w_1 = (1-alpha)^(N-1), w_i = alpha (1-alpha)^(N-i) for i >= 2  (sums to 1)
  weighted  w_i from --weights, normalised to sum 1 unless --no-normalize

selection (default: every checkpoint found):
  --last N                 the newest N checkpoints
  --interval V [--last N]  newest, newest-V, newest-2V, ... (a missing one is an error)
  --iterations a,b,c       exactly these

examples:
  pmm-dist merge /ckpt/run --out /ckpt/run_ema --method ema --alpha 0.2 --last 8 --interval 1000
  torchrun --standalone --nproc-per-node 8 -m pmm_dist merge /ckpt/run --out /ckpt/run_sma --last 10
  pmm-dist merge /ckpt/run/iter_0009000 /ckpt/run/iter_0010000 --out /tmp/avg --dry-run

loading the result (same parallel layout as the sources; see README.md):
  Megatron-LM (torch, torch_dist):  --load OUT --finetune --no-load-optim --no-load-rng
  DeepSpeed:  engine.load_checkpoint(OUT, load_module_only=True, load_optimizer_states=False,
                                     load_lr_scheduler_states=False)
  PyTorch DCP: dcp.load(state, checkpoint_id=OUT);  Hugging Face: from_pretrained(OUT)

after a crash or kill: re-run the same command with --resume (finished files are kept).
Exit status: 0 on success, 1 on a merge error (message names the file and key), 2 on bad usage.
"""


def _int_list(text: str) -> List[int]:
    """Iterations, or checkpoint names ending in one (global_step1000, iter_0001000)."""
    found = [re.fullmatch(r"(?:[A-Za-z_]+)?0*(\d+)", x.strip()) for x in text.split(",") if x.strip()]
    if not all(found):
        raise argparse.ArgumentTypeError(f"expected iterations (or tags like global_step1000) separated by "
                                         f"commas, got {text!r}")
    return [int(match.group(1)) for match in found]


def _float_list(text: str) -> List[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


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

    m = commands.add_parser("merge", help="merge N checkpoints into one", epilog=MERGE_EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            description="Merge N checkpoints of one run into one checkpoint in the same format. "
                                        "Run it in one process or on every rank of torchrun / deepspeed / mpiexec: "
                                        "each rank merges its own byte-balanced share of the shard files.")
    m.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="one run directory (tracker + iter_* dirs) or several checkpoint directories")
    m.add_argument("--out", required=True, help="output directory (refused if it exists, unless --overwrite)")
    m.add_argument("--method", default="sma", choices=available_methods(), help="merge method (default: sma)")
    m.add_argument("--alpha", type=float, default=None, help="EMA rate, 0 < alpha <= 1 (default: 0.2)")
    m.add_argument("--weights", type=_float_list, default=None,
                   help="explicit weights w1,w2,... oldest first (method 'weighted')")
    m.add_argument("--no-normalize", dest="normalize", action="store_false",
                   help="use --weights as given instead of normalising them to sum 1")
    m.add_argument("--last", type=int, default=None, help="merge the newest N checkpoints")
    m.add_argument("--interval", type=int, default=None, help="iterations between merged checkpoints")
    m.add_argument("--iterations", type=_int_list, default=None,
                   help="exact iterations a,b,c to merge (or tags: global_step1000,...)")
    m.add_argument("--format", default="auto", choices=["auto", *available_formats()],
                   help="checkpoint format (default: detect)")
    m.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    m.add_argument("--optimizer", default="drop", choices=["drop", "latest"],
                   help="drop: weights only (default); latest: copy the newest checkpoint's optimizer, "
                        "scheduler and RNG state unchanged")
    m.add_argument("--on-nonfinite", default="error", choices=["error", "warn", "ignore"],
                   help="a NaN/Inf in a merged tensor: fail naming tensor and checkpoint (default), warn, or ignore")
    m.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    m.add_argument("--resume", action="store_true",
                   help="finish an interrupted merge into the same --out (same inputs and options), "
                        "redoing only the files not yet merged")
    m.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    m.add_argument("--backend", default="gloo", choices=["gloo", "nccl"],
                   help="process-group backend for the metadata exchange (default: gloo)")
    m.add_argument("--timeout-minutes", type=float, default=180.0,
                   help="how long a rank waits for the others at a collective step (default: 180)")
    m.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

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
        return _verify(args)
    if args.command == "inspect":
        return _inspect(args)
    local_rank = args.local_rank if args.local_rank is not None else args.launcher_local_rank
    if local_rank is not None:  # the deepspeed launcher passes --local_rank instead of the env var
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    try:
        options = MergeOptions(
            sources=args.sources, out=args.out, method=args.method, alpha=args.alpha, weights=args.weights,
            normalize=args.normalize, last=args.last, interval=args.interval, iterations=args.iterations,
            format=args.format, device=args.device, optimizer=args.optimizer, on_nonfinite=args.on_nonfinite,
            dry_run=args.dry_run, overwrite=args.overwrite, resume=args.resume, quiet=args.quiet, backend=args.backend,
            timeout_minutes=args.timeout_minutes)
    except ValueError as exc:
        print(f"pmm-dist: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    is_coordinator = _is_coordinator()
    try:
        result = merge(options)
    except MergeError as exc:
        if is_coordinator:
            print(f"pmm-dist: error: {exc}", file=sys.stderr, flush=True)
            if os.path.isdir(os.path.join(options.out, STAGING)):
                print(f"pmm-dist: nothing was committed; finished files are kept in "
                      f"{os.path.join(options.out, STAGING)}: re-run the same command with --resume to continue",
                      file=sys.stderr, flush=True)
        return EXIT_ERROR
    if is_coordinator and not options.quiet and result.plan.already_complete:
        print(f"{result.output_path}: this merge had already committed (interrupted while exiting?); nothing to do",
              flush=True)
    elif is_coordinator and not options.quiet and not options.dry_run:
        print(format_summary(result), flush=True)
    return EXIT_OK


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


def _is_coordinator() -> bool:
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if var in os.environ:
            return int(os.environ[var]) == 0
    return True


def _verify(args) -> int:
    problems = verify_output(args.out, check_sources=not args.no_sources)
    if problems:
        print(f"pmm-dist: verify FAILED for {args.out}:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_ERROR
    print(f"OK: {args.out} matches its manifest")
    return EXIT_OK


def _inspect(args) -> int:
    try:
        info = describe_run(args.sources, args.format)
    except MergeError as exc:
        print(f"pmm-dist: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(info, indent=2) if args.json else format_run_description(info))
    return EXIT_OK
