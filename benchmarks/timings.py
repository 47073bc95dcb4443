"""Wall-clock times the tests deliberately do not assert (a bound in seconds fails on a busy machine).

    python -m benchmarks.timings [--repeats 3] [--work DIR]

- failure latency: a 2-rank merge of a tiny synthetic run whose rank 1 fails at its first unit;
  seconds from launch until every rank has exited (tests/test_resilience.py checks that every
  rank fails with the message, tests/test_collective.py that no rank waits for a failed one);
- DCP planning: ``plan_units`` + ``assign_units`` of the synthetic 2400-chunk DCP run of
  tests/test_dcp_planner.py at 1000 and 4096 ranks (that test checks the plan itself).
"""
import argparse
import os
import pathlib
import subprocess
import tempfile
import time

from benchmarks.chaos import command
from pmm_dist.testing.synthetic import generate_run


def seconds_to_fail_every_rank(work: str, repeats: int = 3) -> list:
    """Seconds until a 2-rank merge whose rank 1 fails (injected fault at unit 0) has exited."""
    run_dir = os.path.join(work, "run")
    if not os.path.isdir(run_dir):
        generate_run(run_dir, iterations=[1, 2, 3, 4], tp=2, pp=2, ep=1, num_layers=2, hidden_size=16,
                     ffn_hidden_size=32, num_experts=0, vocab_size=32)
    env = dict(os.environ, OMP_NUM_THREADS="1", PMM_DIST_FAULT="unit:0@1=raise")
    times = []
    for k in range(repeats):
        started = time.monotonic()
        proc = subprocess.run(command(run_dir, os.path.join(work, f"out{k}"), 2), env=env, capture_output=True,
                              text=True)
        times.append(time.monotonic() - started)
        assert proc.returncode != 0 and "injected fault at unit:0 on rank 1" in proc.stderr, proc.stderr[-3000:]
    return times


def seconds_to_plan_dcp(work: str, world_size: int) -> float:
    """Seconds to plan and balance the synthetic DCP run of tests/test_dcp_planner.py."""
    from pmm_dist.formats.dcp import DcpFormat
    from pmm_dist.plan import assign_units
    from tests.test_dcp_planner import _metadata, _write_run  # the test's synthetic metadata, not a copy
    root = pathlib.Path(work) / "dcp"
    if not root.is_dir():
        _write_run(root, {100: _metadata(), 200: _metadata(), 300: _metadata()})
    fmt = DcpFormat()
    checkpoints = fmt.discover([str(root)])
    started = time.perf_counter()
    assign_units(fmt.plan_units(checkpoints, "drop", world_size), world_size)
    return time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="pmm_timings_")
    fail = seconds_to_fail_every_rank(work, args.repeats)
    print(f"failure latency, 2 ranks, rank 1 fails: {', '.join(f'{t:.2f}' for t in fail)} s")
    for world_size in (1000, 4096):
        print(f"DCP planning at {world_size} ranks: {seconds_to_plan_dcp(work, world_size):.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
