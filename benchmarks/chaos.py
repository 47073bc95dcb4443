"""Chaos run: kill merges at K random points, resume each, and compare with an uninterrupted merge.

    python -m benchmarks.chaos --kills 10 [--seed 0] [--work DIR]

Half the kills are SIGKILLs at random fault points inside the engine (any rank, any unit, the
commit steps), half are SIGKILLs of the whole launcher process group after a random delay.
Every killed merge is re-run with --resume (and, if that run is also cut short, resumed again)
and its output compared byte for byte with the uninterrupted reference. Prints
"K kills, K resumes, 0 mismatches" when all is well; exits 1 on any mismatch.
"""
import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile

from pmm_dist.testing.synthetic import generate_run

ARGS = ["--method", "ema", "--alpha", "0.2", "--last", "4", "--quiet", "--device", "cpu"]


def command(run_dir, out, world_size, resume=False):
    base = [sys.executable, "-m", "pmm_dist", "merge", run_dir, "--out", out, *ARGS] + (["--resume"] if resume else [])
    if world_size == 1:
        return base
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
            *base[1:]]


def digest(out):
    files = {}
    for directory, _, names in os.walk(out):
        for name in names:
            if name != "pmm_manifest.json":
                path = os.path.join(directory, name)
                files[os.path.relpath(path, out)] = open(path, "rb").read()
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    work = args.work or tempfile.mkdtemp(prefix="pmm_chaos_")
    run_dir, ref = os.path.join(work, "run"), os.path.join(work, "reference")
    if not os.path.isdir(run_dir):
        generate_run(run_dir, iterations=[100, 200, 300, 400, 500], tp=2, pp=2, ep=2, num_layers=4, hidden_size=256,
                     ffn_hidden_size=512, num_experts=4, vocab_size=1024)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(command(run_dir, ref, 1) + ["--overwrite"], check=True, env=env)
    expected = digest(ref)
    points = ["plan@0", "validate@1", "unit:0@0", "unit:1@1", "unit:2@0", "unit:3@1", "commit:recorded@0",
              "commit:moved@0", "commit:manifest@0"]
    kills = resumes = mismatches = 0
    for k in range(args.kills):
        out = os.path.join(work, f"out{k}")
        shutil.rmtree(out, ignore_errors=True)  # a re-used work directory: start every trial afresh
        world_size = rng.choice([1, 2])
        if k % 2 == 0:
            point = rng.choice([p for p in points if world_size == 2 or p.endswith("@0")])
            how = f"fault {point}"
            proc = subprocess.run(command(run_dir, out, world_size), env=dict(env, PMM_DIST_FAULT=f"{point}=kill"),
                                  capture_output=True)
            killed = proc.returncode != 0
        else:
            delay = rng.uniform(0.5, 4.0)
            how = f"SIGKILL of the process group after {delay:.2f} s"
            proc = subprocess.Popen(command(run_dir, out, world_size), env=env, start_new_session=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                proc.wait(timeout=delay)
                killed = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed = True
        if not killed:
            print(f"[{k}] {how}: the merge finished first (not counted)")
            continue
        kills += 1
        loadable = os.path.exists(os.path.join(out, "latest_checkpointed_iteration.txt")) and \
            not os.path.exists(os.path.join(out, ".pmm_staging"))
        resume = subprocess.run(command(run_dir, out, world_size, resume=True), env=env, capture_output=True,
                                text=True)
        resumes += resume.returncode == 0
        same = resume.returncode == 0 and digest(out) == expected and not loadable
        mismatches += not same
        errors = [line for line in resume.stderr.splitlines() if "pmm-dist" in line or "Error" in line]
        print(f"[{k}] world size {world_size}, {how}: resumed {'OK' if same else 'MISMATCH'}"
              + ("" if resume.returncode == 0 else f" ({' | '.join(errors[:3])[:600]})"), flush=True)
    print(f"{kills} kills, {resumes} resumes, {mismatches} mismatches")
    return 0 if mismatches == 0 and resumes == kills else 1


if __name__ == "__main__":
    raise SystemExit(main())
