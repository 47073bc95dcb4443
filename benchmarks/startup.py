"""Start-up time of the command line, beside ``import torch`` (the target: <= import torch + 0.3 s).

    python -m benchmarks.startup [--repeats 7]

Each command is a fresh interpreter, run ``--repeats`` times, the commands interleaved (a busy
machine slows them alike); the median wall time of each is reported, and what each imports
beyond the interpreter (``python -X importtime``: whether torch, numba or a format was loaded).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMMANDS = {
    "python (nothing)": ["-c", "pass"],
    "import torch": ["-c", "import torch"],
    "pmm-dist --help": ["-m", "pmm_dist", "--help"],
    "pmm-dist merge --help": ["-m", "pmm_dist", "merge", "--help"],
    "pmm-dist --version": ["-m", "pmm_dist", "--version"],
    "import pmm_dist": ["-c", "import pmm_dist"],
}
WATCHED = ("torch", "numpy", "numba", "torch.distributed", "torch.distributed.checkpoint", "safetensors",
           "pmm_dist.formats.megatron", "pmm_dist.formats.dcp", "pmm_dist.merge.kernel", "tqdm")


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p),
                OMP_NUM_THREADS="1")


def wall_seconds(args, env) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def imported(args, env) -> list:
    """Which of WATCHED the command imports."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *args], cwd=REPO, env=env, check=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    names = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return [name for name in WATCHED if name in names]


def measure(repeats: int = 7, verbose: bool = True) -> dict:
    env = _env()
    for args in COMMANDS.values():  # warm the page cache and the bytecode caches
        wall_seconds(args, env)
    times = {name: [] for name in COMMANDS}
    for _ in range(repeats):
        for name, args in COMMANDS.items():
            times[name].append(wall_seconds(args, env))
    median = {name: statistics.median(v) for name, v in times.items()}
    torch_s = median["import torch"]
    result = {"repeats": repeats, "median_seconds": median, "min_seconds": {n: min(v) for n, v in times.items()},
              "over_import_torch_seconds": {n: median[n] - torch_s for n in COMMANDS},
              "imports": {name: imported(args, env) for name, args in COMMANDS.items()}}
    if verbose:
        print(f"start-up, median of {repeats} (seconds; target: the --help commands <= import torch + 0.3 s)")
        for name in COMMANDS:
            print(f"  {name:24s} {median[name]:6.3f}  ({median[name] - torch_s:+.3f} vs import torch)  "
                  f"imports: {', '.join(result['imports'][name]) or '-'}", flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line at the end")
    args = parser.parse_args(argv)
    result = measure(args.repeats)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
