"""Benchmarks: pmm_dist beside the roofline and its peers, measured in one run on the same inputs.

    python -m benchmarks.run                 # ~4 GB of input (4 checkpoints of ~1 GB), a few minutes
    python -m benchmarks.run --quick         # ~0.4 GB, under a minute
    python -m benchmarks.run --size-gb 8 --ranks 1,2,4 --cold

Measures, on a synthetic Megatron-LM run (TP=2, PP=2 -> 4 shard files per checkpoint, bf16):
- roofline: reading every input byte sequentially with 16 MiB buffers + writing the output bytes
  (fsynced), timed on the same files in the same run;
- pmm_dist at each rank count (engine time from its manifest, and wall time with start-up);
- the naive baseline (benchmarks/baselines.py: load every checkpoint whole, sum in fp32, save);
- mergekit `linear` against pmm_dist --format hf on safetensors checkpoints, when mergekit is
  installed (benchmarks/hf_vs_mergekit.py);
- peak RSS per rank against the budget "largest output file + 2 x largest tensor in fp32 +
  0.5 GiB", and its flatness in N (N=2 vs N=16); metadata bytes exchanged per tensor;
- with --cold, the same after dropping the page cache (as when the data exceeds RAM).
Writes benchmarks/results/<date>-<name>.{json,md,png}.
"""
import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import torch

from pmm_dist.testing.synthetic import generate_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 1e9


def machine_description() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    mem = next((int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    disk = shutil.disk_usage(REPO)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "disk_total_bytes": disk.total,
            "python": platform.python_version(), "torch": torch.__version__, "kernel": platform.release()}


def make_run(run_dir: str, num_checkpoints: int, bytes_per_checkpoint: float) -> list:
    """A TP=2/PP=2 bf16 run; the first checkpoint is generated, the others are copies of it
    (the arithmetic does not depend on the values; copies keep generation fast)."""
    iterations = [100 * (i + 1) for i in range(num_checkpoints)]
    if os.path.isfile(os.path.join(run_dir, "latest_checkpointed_iteration.txt")):
        return iterations
    shutil.rmtree(run_dir, ignore_errors=True)
    hidden = 2048 if bytes_per_checkpoint >= 0.5 * GB else 512
    embeddings = 2 * 2 * 8192 * hidden  # input and output embedding, bf16
    per_layer = 2 * 16 * hidden * hidden  # qkv, proj, SwiGLU fc1 (2 x 4h) and fc2, bf16
    num_layers = max(2, 2 * round((bytes_per_checkpoint - embeddings) / per_layer / 2))  # even: PP=2
    generate_run(run_dir, iterations=[iterations[0]], tp=2, pp=2, ep=1, num_layers=num_layers, hidden_size=hidden,
                 ffn_hidden_size=4 * hidden, num_experts=0, vocab_size=8192, optimizer_state=False)
    first = os.path.join(run_dir, f"iter_{iterations[0]:07d}")
    for it in iterations[1:]:
        shutil.copytree(first, os.path.join(run_dir, f"iter_{it:07d}"))
    with open(os.path.join(run_dir, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iterations[-1]))
    return iterations


def input_files(run_dir: str) -> list:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(run_dir) for f in fs if f.endswith(".pt"))


def read_all(paths) -> float:
    buffer = bytearray(16 << 20)
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    return time.perf_counter() - started


def write_bytes(path: str, num_bytes: int) -> float:
    buffer = bytes(16 << 20)
    started = time.perf_counter()
    with open(path, "wb") as f:
        for offset in range(0, num_bytes, len(buffer)):
            f.write(buffer[: min(len(buffer), num_bytes - offset)])
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - started
    os.remove(path)
    return elapsed


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def run_pmm(run_dir: str, out: str, ranks: int, extra=()) -> dict:
    merge = ["-m", "pmm_dist", "merge", run_dir, "--out", out, "--overwrite", "--quiet", "--device", "cpu", *extra]
    cmd = [sys.executable, *merge] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *merge]
    env = dict(os.environ, PYTHONPATH=REPO)
    if ranks > 1:
        env["OMP_NUM_THREADS"] = "1"
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    wall = time.perf_counter() - started
    manifest = json.load(open(os.path.join(out, "pmm_manifest.json")))
    return {"ranks": ranks, "seconds": manifest["timings_s"]["total"], "wall_seconds": wall,
            "bytes_read": manifest["bytes_read"], "bytes_written": manifest["bytes_written"],
            "peak_rss_bytes_by_rank": manifest["peak_rss_bytes_by_rank"], "tensors": manifest["tensors_merged"],
            "metadata_bytes": manifest["metadata_bytes_exchanged"],
            "metadata_bytes_per_tensor": manifest["metadata_bytes_exchanged"] / max(manifest["tensors_merged"], 1),
            "largest_output_file": max(f["bytes"] for f in manifest["files"])}


def run_naive(run_dir: str, out: str, iterations) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.baselines", "naive", run_dir, out,
                           *map(str, iterations)], check=True, capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def largest_tensor_numel(run_dir: str) -> int:
    from pmm_dist.io.safe_load import safe_load
    newest = input_files(run_dir)[-1]
    return max(t.numel() for t in safe_load(newest)["model"].values() if isinstance(t, torch.Tensor))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=4.0, help="total input size (default 4)")
    parser.add_argument("--checkpoints", type=int, default=4, help="N merged checkpoints (default 4)")
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--quick", action="store_true", help="~0.4 GB, ranks 1,2, small N sweep")
    parser.add_argument("--cold", action="store_true", help="also measure with the page cache dropped")
    parser.add_argument("--no-naive", action="store_true")
    parser.add_argument("--work", default=os.path.join(REPO, "benchmarks", "work"))
    parser.add_argument("--results", default=os.path.join(REPO, "benchmarks", "results"))
    parser.add_argument("--name", default=None, help="report name (default: quick or full)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size_gb, args.ranks = 0.4, "1,2"
    ranks = [int(r) for r in args.ranks.split(",")]
    os.makedirs(args.work, exist_ok=True)
    report = {"date": datetime.date.today().isoformat(), "machine": machine_description(),
              "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
              "size_gb": args.size_gb, "checkpoints": args.checkpoints}
    run_dir = os.path.join(args.work, f"run_{args.checkpoints}x{args.size_gb / args.checkpoints:.3f}GB")
    iterations = make_run(run_dir, args.checkpoints, args.size_gb * GB / args.checkpoints)
    files = input_files(run_dir)
    input_bytes = sum(os.path.getsize(p) for p in files)
    output_bytes = sum(os.path.getsize(p) for p in files if f"iter_{iterations[-1]:07d}" in p)
    read_all(files)  # warm the page cache
    t_read = read_all(files)
    t_write = write_bytes(os.path.join(args.work, "roofline.tmp"), output_bytes)
    roofline = {"read_seconds": t_read, "write_seconds": t_write, "seconds": t_read + t_write,
                "input_bytes": input_bytes, "output_bytes": output_bytes,
                "gbps": input_bytes / (t_read + t_write) / GB}
    report["roofline_warm"] = roofline
    print(f"roofline (warm): read {input_bytes / GB:.2f} GB in {t_read:.2f} s, write {output_bytes / GB:.2f} GB "
          f"in {t_write:.2f} s -> {roofline['gbps']:.2f} GB/s of input", flush=True)
    budget_base = 2 * 4 * largest_tensor_numel(run_dir) + 0.5 * 2**30
    report["pmm_dist"] = []
    for r in ranks:
        result = run_pmm(run_dir, os.path.join(args.work, f"out_pmm_{r}"), r)
        result["gbps"] = input_bytes / result["seconds"] / GB
        result["fraction_of_roofline"] = roofline["seconds"] / result["seconds"]
        result["rss_budget_bytes"] = result["largest_output_file"] + budget_base
        report["pmm_dist"].append(result)
        print(f"pmm_dist {r} rank(s): {result['seconds']:.2f} s ({result['wall_seconds']:.2f} s wall), "
              f"{result['gbps']:.2f} GB/s = {result['fraction_of_roofline']:.2f} of roofline, peak RSS "
              f"{max(result['peak_rss_bytes_by_rank']) / 2**30:.2f} GiB (budget {result['rss_budget_bytes'] / 2**30:.2f})",
              flush=True)
    pmm1 = report["pmm_dist"][0]
    if not args.no_naive:
        naive = run_naive(run_dir, os.path.join(args.work, "out_naive"), iterations)
        naive["gbps"] = input_bytes / naive["seconds"] / GB
        naive["pmm_speedup"] = naive["seconds"] / pmm1["seconds"]
        report["naive"] = naive
        print(f"naive torch.load/average/save: {naive['seconds']:.2f} s, peak RSS {naive['peak_rss_bytes'] / 2**30:.2f} "
              f"GiB; pmm_dist 1 rank is {naive['pmm_speedup']:.2f}x faster", flush=True)
    report["mergekit"] = _maybe_mergekit(args)
    if args.cold:
        report["cold"] = _cold(run_dir, files, output_bytes, args.work)
    report["n_sweep"] = _n_sweep(args)
    _write_reports(report, args)
    return 0


def _cold(run_dir, files, output_bytes, work) -> dict:
    if not drop_page_cache():
        return {"skipped": "cannot drop the page cache (needs root)"}
    t_read = read_all(files)
    t_write = write_bytes(os.path.join(work, "roofline.tmp"), output_bytes)
    drop_page_cache()
    pmm = run_pmm(run_dir, os.path.join(work, "out_pmm_cold"), 1)
    result = {"roofline_seconds": t_read + t_write, "read_seconds": t_read, "pmm_seconds": pmm["seconds"],
              "fraction_of_roofline": (t_read + t_write) / pmm["seconds"]}
    print(f"cold cache: roofline {t_read + t_write:.2f} s, pmm_dist 1 rank {pmm['seconds']:.2f} s "
          f"({result['fraction_of_roofline']:.2f} of roofline)", flush=True)
    return result


def _n_sweep(args) -> list:
    """Cost and peak RSS as a function of N at a fixed checkpoint size (1 rank)."""
    per_checkpoint = (0.02 if args.quick else 0.1) * GB
    rows = []
    for n in ([2, 4, 8] if args.quick else [2, 4, 8, 16]):
        run_dir = os.path.join(args.work, f"sweep_{n}x{per_checkpoint / GB:.2f}GB")
        make_run(run_dir, n, per_checkpoint)
        read_all(input_files(run_dir))
        result = run_pmm(run_dir, os.path.join(args.work, "out_sweep"), 1)
        result["n"] = n
        result["gbps"] = sum(os.path.getsize(p) for p in input_files(run_dir)) / result["seconds"] / GB
        rows.append(result)
        print(f"N={n}: {result['seconds']:.2f} s, {result['gbps']:.2f} GB/s, peak RSS "
              f"{result['peak_rss_bytes_by_rank'][0] / 2**20:.0f} MiB", flush=True)
    return rows


def _maybe_mergekit(args) -> dict:
    """mergekit `linear` vs pmm_dist --format hf on the same safetensors checkpoints, when
    mergekit is installed (benchmarks/hf_vs_mergekit.py, run as its own process)."""
    if importlib.util.find_spec("mergekit") is None:
        return {}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.hf_vs_mergekit", "--repeats", "1" if args.quick else "3",
                           "--checkpoints", str(args.checkpoints), "--work", os.path.join(args.work, "hf")],
                          capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    text = proc.stdout.strip() if proc.returncode == 0 else f"failed: {proc.stderr.strip()[-500:]}"
    print(text, flush=True)
    return {"text": text}


def _write_reports(report: dict, args) -> None:
    os.makedirs(args.results, exist_ok=True)
    name = args.name or ("quick" if args.quick else "full")
    stem = os.path.join(args.results, f"{report['date']}-{name}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(markdown_report(report))
    _plot(report, stem + ".png")
    print(f"wrote {stem}.json, .md, .png")


def markdown_report(report: dict) -> str:
    m = report["machine"]
    roof = report["roofline_warm"]
    lines = [f"# pmm_dist benchmark, {report['date']}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_bytes'] / 2**30:.0f} GiB RAM, "
             f"Python {m['python']}, torch {m['torch']}, kernel {m['kernel']}.", "",
             f"Command: `{report['command']}`", "",
             f"Input: {report['checkpoints']} checkpoints, {roof['input_bytes'] / GB:.2f} GB in all (TP=2, PP=2, bf16); "
             f"output {roof['output_bytes'] / GB:.2f} GB. Page cache warm unless noted.", "",
             "| what | seconds | GB/s of input | vs roofline | peak RSS per rank (GiB) | RSS budget (GiB) | metadata B/tensor |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: |",
             f"| roofline (read {roof['read_seconds']:.2f} s + write {roof['write_seconds']:.2f} s) | "
             f"{roof['seconds']:.2f} | {roof['gbps']:.2f} | 1.00 | | | |"]
    for r in report["pmm_dist"]:
        lines.append(f"| pmm_dist, {r['ranks']} rank(s) (wall {r['wall_seconds']:.1f} s) | {r['seconds']:.2f} | "
                     f"{r['gbps']:.2f} | {r['fraction_of_roofline']:.2f} | "
                     f"{', '.join(f'{b / 2**30:.2f}' for b in r['peak_rss_bytes_by_rank'])} | "
                     f"{r['rss_budget_bytes'] / 2**30:.2f} | {r['metadata_bytes_per_tensor']:.0f} |")
    if "naive" in report:
        n = report["naive"]
        lines.append(f"| naive torch.load + fp32 sum + save | {n['seconds']:.2f} | {n['gbps']:.2f} | "
                     f"{roof['seconds'] / n['seconds']:.2f} | {n['peak_rss_bytes'] / 2**30:.2f} | | |")
    lines.append("")
    if "naive" in report:
        lines.append(f"pmm_dist (1 rank) vs naive: **{report['naive']['pmm_speedup']:.2f}x** faster.")
    if report.get("mergekit"):
        lines += ["", "mergekit `linear` vs `pmm_dist --format hf` on the same safetensors checkpoints "
                  "(benchmarks/hf_vs_mergekit.py, seconds):", "", "```", report["mergekit"]["text"], "```"]
    if report.get("cold") and "skipped" not in report["cold"]:
        c = report["cold"]
        lines.append(f"Cold page cache: roofline {c['roofline_seconds']:.2f} s, pmm_dist 1 rank {c['pmm_seconds']:.2f} s "
                     f"= **{c['fraction_of_roofline']:.2f}** of roofline.")
    lines += ["", "Cost as a function of N (1 rank, fixed checkpoint size):", "",
              "| N | seconds | GB/s of input | peak RSS (MiB) |", "| ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['n']} | {r['seconds']:.2f} | {r['gbps']:.2f} | {r['peak_rss_bytes_by_rank'][0] / 2**20:.0f} |"
              for r in report["n_sweep"]]
    sweep = report["n_sweep"]
    lines += ["", f"Peak RSS N={sweep[-1]['n']} vs N={sweep[0]['n']}: "
              f"{sweep[-1]['peak_rss_bytes_by_rank'][0] / sweep[0]['peak_rss_bytes_by_rank'][0]:.3f}x.", ""]
    return "\n".join(lines)


def _plot(report: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    ranks = [r["ranks"] for r in report["pmm_dist"]]
    left.plot(ranks, [r["gbps"] for r in report["pmm_dist"]], "o-", label="pmm_dist")
    left.axhline(report["roofline_warm"]["gbps"], color="gray", linestyle="--", label="roofline (read + write)")
    if "naive" in report:
        left.axhline(report["naive"]["gbps"], color="red", linestyle=":", label="naive load/average/save")
    left.set_xlabel("ranks")
    left.set_ylabel("GB/s of input")
    left.set_xticks(ranks)
    left.set_title("throughput vs ranks")
    left.legend()
    sweep = report["n_sweep"]
    right.plot([r["n"] for r in sweep], [r["gbps"] for r in sweep], "o-", label="GB/s")
    right.set_xlabel("N checkpoints")
    right.set_ylabel("GB/s of input")
    twin = right.twinx()
    twin.plot([r["n"] for r in sweep], [r["peak_rss_bytes_by_rank"][0] / 2**20 for r in sweep], "s--", color="green")
    twin.set_ylabel("peak RSS (MiB)", color="green")
    right.set_title("throughput and memory vs N (1 rank)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
