"""Benchmarks: pmm_dist beside the roofline and its peers, measured in one run on the same inputs.

    python -m benchmarks.run                 # ~4 GB of input (4 checkpoints of ~1 GB), a few minutes
    python -m benchmarks.run --quick         # ~0.4 GB, under a minute
    python -m benchmarks.run --size-gb 8 --ranks 1,2,4 --cold
    python -m benchmarks.run --quick --only kernel,startup,scale   # some parts only

Measures, on a synthetic Megatron-LM run (TP=2, PP=2 -> 4 shard files per checkpoint, bf16):
- roofline: reading every input byte sequentially with 16 MiB buffers + writing the output bytes
  (fsynced), timed on the same files in the same run;
- pmm_dist at each rank count (engine time from its manifest, and wall time with start-up);
- the naive baseline (benchmarks/baselines.py: load every checkpoint whole, sum in fp32, save);
- mergekit `linear` against pmm_dist --format hf on safetensors checkpoints, when mergekit is
  installed (benchmarks/hf_vs_mergekit.py);
- peak RSS per rank against the budget "largest output file + 2 x largest tensor in fp32 +
  0.5 GiB", and its flatness in N (N=2 vs N=16); metadata bytes exchanged per tensor;
- with --cold, the same after dropping the page cache (as when the data exceeds RAM);
- every format side by side (benchmarks/formats.py: one entry per format, --formats), each on
  its own files against its own roofline, as a merge and as a whole process (against roofline
  + ``import torch``);
- the kernel micro-benchmark (benchmarks/kernel.py: GB/s of bf16 input per core, the kernel
  before issue 12, the pure-torch fallback, the compiled default, fp32 accumulation);
- start-up of the command line beside ``import torch`` (benchmarks/startup.py);
- scale without processes (benchmarks/scale.py: planning at 4096 ranks x 100k files, metadata
  bytes per rank; with the full run also the real Megatron legacy planning of 100k shard files).
The parts run in their own processes; ``--only`` picks some (``PARTS``).
Writes benchmarks/results/<date>-<name>.{json,md,png}.
"""
import argparse
import datetime
import fcntl
import importlib.util
import json
import mmap
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
PARTS = ("ranks", "naive", "mergekit", "cold", "n_sweep", "formats", "kernel", "startup", "scale")


def machine_description() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    mem = next((int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    disk = shutil.disk_usage(REPO)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "disk_total_bytes": disk.total,
            "python": platform.python_version(), "torch": torch.__version__, "kernel": platform.release(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


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


def write_bytes(path: str, num_bytes: int) -> dict:
    """Seconds to write ``num_bytes`` and fsync them, buffered and with O_DIRECT: the roofline
    takes the faster (pmm_dist writes large files with O_DIRECT where the file system takes it,
    so buffered writes alone, the rooflines of runs 1-9, are not the floor; on these machines
    they vary several-fold in system CPU, direct ones do not)."""
    buffered = _write_bytes(path, num_bytes, direct=False)
    direct = _write_bytes(path, num_bytes, direct=True)
    return {"write_seconds": min(buffered, direct), "buffered_write_seconds": buffered, "direct_write_seconds": direct}


def _roofline(t_read: float, writes: dict, **more) -> dict:
    return dict(more, read_seconds=t_read, **writes, seconds=t_read + writes["write_seconds"],
                buffered_seconds=t_read + writes["buffered_write_seconds"])


def _write_bytes(path: str, num_bytes: int, direct: bool) -> float:
    if direct and not hasattr(os, "O_DIRECT"):  # not Linux: no direct writes to time (nor does pmm_dist make them)
        return float("inf")
    chunk = 16 << 20
    buffer = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0))
    try:
        whole = num_bytes // 4096 * 4096 if direct else num_bytes
        for offset in range(0, whole, chunk):
            os.write(fd, memoryview(buffer)[: min(chunk, whole - offset)])
        if whole < num_bytes:  # the tail: O_DIRECT writes whole blocks only
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            os.write(fd, memoryview(buffer)[: num_bytes - whole])
        os.fsync(fd)
    except OSError:  # no direct I/O on this file system
        if not direct:
            raise
        return float("inf")
    finally:
        os.close(fd)
        buffer.close()
    elapsed = time.perf_counter() - started
    os.remove(path)
    return elapsed


def drop_page_cache(files) -> str:
    """Makes ``files`` cold: each file's pages evicted (fsync, then posix_fadvise DONTNEED: the
    clean pages of a file one may open go, no root needed), and the kernel's whole page cache
    dropped too where that is allowed. Returns how."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "posix_fadvise(DONTNEED) of every input file, and drop_caches"
    except OSError:
        return "posix_fadvise(DONTNEED) of every input file"


def run_pmm(run_dir, out: str, ranks: int, extra=()) -> dict:
    """``run_dir``: a run directory, or a list of sources."""
    sources = [run_dir] if isinstance(run_dir, str) else list(run_dir)
    merge = ["-m", "pmm_dist", "merge", *sources, "--out", out, "--overwrite", "--quiet", "--device", "cpu", *extra]
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
            "timings": manifest["timings_s"],
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
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts (default all: {','.join(PARTS)})")
    parser.add_argument("--keep-runs", action="store_true", help="keep the generated runs of every format (cached "
                                                                 "for the next run; several GB each)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved roofline + merge repeats per format "
                                                                   "(medians reported; default 3)")
    parser.add_argument("--formats", default=None, help="formats side by side (default: every entry of "
                                                          "benchmarks/formats.py)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size_gb, args.ranks = 0.4, "1,2"
    ranks = [int(r) for r in args.ranks.split(",")]
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    os.makedirs(args.work, exist_ok=True)
    report = {"date": datetime.date.today().isoformat(), "machine": machine_description(),
              "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
              "size_gb": args.size_gb, "checkpoints": args.checkpoints, "parts": parts}
    # the parts that need no run directory first: they are small, and a failure shows early
    if "kernel" in parts:
        report["kernel"] = _part("benchmarks.kernel", *(["--elements", "1M", "--rounds", "3"] if args.quick
                                                         else ["--elements", "4M", "--rounds", "5"]))
    if "startup" in parts:
        report["startup"] = _part("benchmarks.startup", "--repeats", "3" if args.quick else "7")
    if "scale" in parts:
        report["scale"] = _part("benchmarks.scale", "--work", args.work,
                                *(["--files", "10000", "--real-files", "10000", "--dcp-chunks", "100000"] if args.quick
                                  else ["--files", "100000", "--real-files", "100000", "--dcp-chunks", "1000000"]))
    if "formats" in parts:
        report["formats"] = _formats(args, report.get("startup"))
    if not set(parts) & {"ranks", "naive", "mergekit", "cold", "n_sweep"}:
        _write_reports(report, args)
        return 0
    run_dir = os.path.join(args.work, f"run_{args.checkpoints}x{args.size_gb / args.checkpoints:.3f}GB")
    iterations = make_run(run_dir, args.checkpoints, args.size_gb * GB / args.checkpoints)
    files = input_files(run_dir)
    input_bytes = sum(os.path.getsize(p) for p in files)
    output_bytes = sum(os.path.getsize(p) for p in files if f"iter_{iterations[-1]:07d}" in p)
    budget_base = 2 * 4 * largest_tensor_numel(run_dir) + 0.5 * 2**30
    # Each rank count in interleaved repeats with a roofline before each (medians), as the formats:
    # one roofline beside one merge moves several-fold with this disk's write speed.
    rooflines, by_ranks = [], {}
    for _ in range(args.repeats):
        for r in (ranks if "ranks" in parts else ranks[:1]):
            rooflines.append(warm_roofline(files, output_bytes, args.work))
            by_ranks.setdefault(r, []).append(run_pmm(run_dir, os.path.join(args.work, f"out_pmm_{r}"), r))
    roofline = _median_by(rooflines, "seconds")
    t_read, t_write = roofline["read_seconds"], roofline["write_seconds"]
    report["roofline_warm"] = dict(roofline, repeats_seconds=[x["seconds"] for x in rooflines])
    print(f"roofline (warm, median of {len(rooflines)}): read {input_bytes / GB:.2f} GB in {t_read:.2f} s, write "
          f"{output_bytes / GB:.2f} GB in {t_write:.2f} s -> {roofline['gbps']:.2f} GB/s of input", flush=True)
    report["pmm_dist"] = []
    for r, results in by_ranks.items():
        result = dict(_median_by(results, "seconds"), repeats_seconds=[x["seconds"] for x in results])
        result["gbps"] = input_bytes / result["seconds"] / GB
        result["fraction_of_roofline"] = roofline["seconds"] / result["seconds"]
        result["rss_budget_bytes"] = result["largest_output_file"] + budget_base
        report["pmm_dist"].append(result)
        print(f"pmm_dist {r} rank(s): {result['seconds']:.2f} s ({result['wall_seconds']:.2f} s wall), "
              f"{result['gbps']:.2f} GB/s = {result['fraction_of_roofline']:.2f} of roofline, peak RSS "
              f"{max(result['peak_rss_bytes_by_rank']) / 2**30:.2f} GiB (budget {result['rss_budget_bytes'] / 2**30:.2f})",
              flush=True)
    pmm1 = report["pmm_dist"][0]
    if not args.no_naive and "naive" in parts:
        naive = run_naive(run_dir, os.path.join(args.work, "out_naive"), iterations)
        naive["gbps"] = input_bytes / naive["seconds"] / GB
        naive["pmm_speedup"] = naive["seconds"] / pmm1["seconds"]
        report["naive"] = naive
        print(f"naive torch.load/average/save: {naive['seconds']:.2f} s, peak RSS {naive['peak_rss_bytes'] / 2**30:.2f} "
              f"GiB; pmm_dist 1 rank is {naive['pmm_speedup']:.2f}x faster", flush=True)
    if "mergekit" in parts:
        report["mergekit"] = _maybe_mergekit(args)
    if args.cold and "cold" in parts:
        report["cold"] = _cold(run_dir, files, output_bytes, args.work, args.repeats)
    if "n_sweep" in parts:
        report["n_sweep"] = _n_sweep(args)
    _write_reports(report, args)
    return 0


def warm_roofline(files, output_bytes: int, work: str) -> dict:
    """Reading every input byte (page cache warmed first) + writing the output bytes with fsync
    (``write_bytes``: buffered or O_DIRECT, the faster)."""
    input_bytes = sum(os.path.getsize(p) for p in files)
    read_all(files)  # warm the page cache
    t_read = read_all(files)
    roofline = _roofline(t_read, write_bytes(os.path.join(work, "roofline.tmp"), output_bytes),
                         input_bytes=input_bytes, output_bytes=output_bytes)
    roofline["gbps"] = input_bytes / roofline["seconds"] / GB
    return roofline


def _part(module: str, *args) -> dict:
    """A part measured in its own process (its own threads setting, its own memory); its JSON line."""
    proc = subprocess.run([sys.executable, "-m", module, *args, "--json"], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    if proc.returncode != 0:
        print(f"{module} failed:\n{proc.stderr[-2000:]}", flush=True)
        return {"failed": proc.stderr[-2000:]}
    lines = proc.stdout.strip().splitlines()
    print("\n".join(lines[:-1]), flush=True)  # its own summary
    return json.loads(lines[-1])


def _formats(args, startup) -> list:
    """Every format of benchmarks/formats.py on its own files: roofline, merge, whole process."""
    from benchmarks.formats import CASES, NOT_YET
    names = args.formats.split(",") if args.formats else [*CASES, *NOT_YET]
    import_torch = (startup or {}).get("median_seconds", {}).get("import torch") or _import_torch_seconds()
    per_checkpoint = args.size_gb * GB / args.checkpoints
    rows = []
    for name in names:
        if name not in CASES:
            rows.append({"format": name, "skipped": NOT_YET.get(name, "no such entry in benchmarks/formats.py")})
            print(f"format {name}: not measured ({rows[-1]['skipped']})", flush=True)
            continue
        case = CASES[name]
        run_dir = os.path.join(args.work, f"fmt_{name}_{args.checkpoints}x{per_checkpoint / GB:.3f}GB")
        sources = case.make(run_dir, args.checkpoints, per_checkpoint)
        checkpoints = sorted(d for d in (sources if len(sources) > 1 else
                                         [os.path.join(sources[0], e) for e in os.listdir(sources[0])])
                             if os.path.isdir(d))
        files = [f for ckpt in checkpoints for f in case.files(ckpt)]
        output_bytes = sum(os.path.getsize(f) for f in case.output_files(checkpoints[-1]))
        # Interleaved repeats, medians taken: this disk's write speed varies several-fold from one
        # minute to the next, so one roofline beside one merge says little.
        rooflines, results = [], []
        for _ in range(args.repeats):
            rooflines.append(warm_roofline(files, output_bytes, args.work))
            results.append(run_pmm(sources, os.path.join(args.work, f"out_fmt_{name}"), 1,
                                   ["--format", name, *case.merge_args]))
        roofline = _median_by(rooflines, "seconds")
        result = _median_by(results, "seconds")
        # the median of the buffered-write rooflines, each repeat's own (not the buffered write of
        # the repeat whose roofline is the median: that one's write may be the fast kind)
        buffered_roofline = _median_by(rooflines, "buffered_seconds")["buffered_seconds"]
        row = {"format": name, "description": case.description, "roofline": roofline, "pmm_dist": result,
               "buffered_roofline_seconds": buffered_roofline,
               "repeats": {"roofline_seconds": [r["seconds"] for r in rooflines],
                           "buffered_roofline_seconds": [r["buffered_seconds"] for r in rooflines],
                           "merge_seconds": [r["seconds"] for r in results],
                           "process_seconds": [r["wall_seconds"] for r in results]},
               "import_torch_seconds": import_torch,
               "merge_vs_roofline": roofline["seconds"] / result["seconds"],
               "process_vs_roofline_plus_import_torch": (roofline["seconds"] + import_torch) / result["wall_seconds"],
               # against the rooflines of runs 1-9 (buffered writes), for comparison with them
               "merge_vs_buffered_roofline": buffered_roofline / result["seconds"]}
        rows.append(row)
        if not args.keep_runs:
            shutil.rmtree(run_dir, ignore_errors=True)
        print(f"format {name}: {roofline['input_bytes'] / GB:.2f} GB, roofline {roofline['seconds']:.2f} s, merge "
              f"{result['seconds']:.2f} s ({row['merge_vs_roofline']:.2f} of roofline), whole process "
              f"{result['wall_seconds']:.2f} s ({row['process_vs_roofline_plus_import_torch']:.2f} of roofline + "
              f"import torch); against the buffered-write roofline {row['merge_vs_buffered_roofline']:.2f}", flush=True)
    return rows


def _median_by(samples: list, key: str) -> dict:
    """The sample whose ``key`` is the median (the lower one of an even count)."""
    return sorted(samples, key=lambda sample: sample[key])[(len(samples) - 1) // 2]


def _import_torch_seconds() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - started


def _cold(run_dir, files, output_bytes, work, repeats: int) -> dict:
    """Roofline and merge with the inputs out of the page cache (as when the data exceeds RAM),
    interleaved, medians taken."""
    rooflines, merges = [], []
    for _ in range(repeats):
        how = drop_page_cache(files)
        t_read = read_all(files)
        rooflines.append(_roofline(t_read, write_bytes(os.path.join(work, "roofline.tmp"), output_bytes)))
        drop_page_cache(files)
        merges.append(run_pmm(run_dir, os.path.join(work, "out_pmm_cold"), 1))
    roofline, pmm = _median_by(rooflines, "seconds"), _median_by(merges, "seconds")
    result = {"how": how, "roofline_seconds": roofline["seconds"], "read_seconds": roofline["read_seconds"],
              "pmm_seconds": pmm["seconds"], "fraction_of_roofline": roofline["seconds"] / pmm["seconds"],
              "repeats": {"roofline_seconds": [r["seconds"] for r in rooflines],
                          "merge_seconds": [r["seconds"] for r in merges]}}
    print(f"cold cache ({how}): roofline {roofline['seconds']:.2f} s, pmm_dist 1 rank {pmm['seconds']:.2f} s "
          f"({result['fraction_of_roofline']:.2f} of roofline)", flush=True)
    return result


def _n_sweep(args) -> list:
    """Cost and peak RSS as a function of N at a fixed checkpoint size (1 rank)."""
    per_checkpoint = (0.02 if args.quick else 0.5) * GB  # the target: flat in N at 0.5 GB+ checkpoints
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
        shutil.rmtree(run_dir, ignore_errors=True)  # up to 8 GB each: the disk holds one at a time
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
    report["load_average_at_end"] = list(os.getloadavg())  # the machine may be shared: read figures with it
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
    lines = [f"# pmm_dist benchmark, {report['date']}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_bytes'] / 2**30:.0f} GiB RAM, "
             f"Python {m['python']}, torch {m['torch']}, kernel {m['kernel']}.", "",
             f"Command: `{report['command']}`", ""]
    if report.get("load_average_at_end"):
        lines += [f"Load average at the end (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in report['load_average_at_end'])} "
                  f"on {m['cores']} cores.", ""]
    lines += [f"GPU: {m['gpu']}." if m.get("gpu") else "GPU: none on this machine; the `--device cuda` path was not "
              "measured (its logic is tested on the CPU).", ""]
    if "roofline_warm" in report:
        lines += _main_section(report)
    for section in (_formats_section, _kernel_section, _startup_section, _scale_section):
        lines += section(report)
    return "\n".join(lines)


def _main_section(report: dict) -> list:
    roof = report["roofline_warm"]
    lines = [f"Input: {report['checkpoints']} checkpoints, {roof['input_bytes'] / GB:.2f} GB in all (TP=2, PP=2, bf16); "
             f"output {roof['output_bytes'] / GB:.2f} GB. Page cache warm unless noted.", "",
             "| what | seconds | GB/s of input | vs roofline | peak RSS per rank (GiB) | RSS budget (GiB) | metadata B/tensor |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: |",
             f"| roofline (median of {len(roof.get('repeats_seconds', [0]))}: read {roof['read_seconds']:.2f} s + write "
             f"{roof['write_seconds']:.2f} s; buffered write {roof.get('buffered_write_seconds', float('nan')):.2f} s) | "
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
        lines.append(f"Cold page cache ({c['how']}; median of {len(c['repeats']['merge_seconds'])}): roofline "
                     f"{c['roofline_seconds']:.2f} s (read {c['read_seconds']:.2f} s), pmm_dist 1 rank "
                     f"{c['pmm_seconds']:.2f} s = **{c['fraction_of_roofline']:.2f}** of roofline (target 0.85).")
    sweep = report.get("n_sweep")
    if sweep:
        lines += ["", "Cost as a function of N (1 rank, fixed checkpoint size):", "",
                  "| N | seconds | GB/s of input | peak RSS (MiB) |", "| ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['n']} | {r['seconds']:.2f} | {r['gbps']:.2f} | {r['peak_rss_bytes_by_rank'][0] / 2**20:.0f} |"
                  for r in sweep]
        lines += ["", f"Peak RSS N={sweep[-1]['n']} vs N={sweep[0]['n']}: "
                  f"{sweep[-1]['peak_rss_bytes_by_rank'][0] / sweep[0]['peak_rss_bytes_by_rank'][0]:.3f}x.", ""]
    return lines


def _formats_section(report: dict) -> list:
    rows = report.get("formats")
    if not rows:
        return []
    lines = ["## Every format side by side (1 rank, warm page cache, each against its own files)", "",
             "The roofline reads every input byte and writes the output bytes with fsync, buffered or with "
             "O_DIRECT, whichever is faster (read s + write s; buffered alone, as in runs 1-9, in the last column).", "",
             "| format | input GB | roofline s | merge s | merge vs roofline (target 0.9) | process s | process vs "
             "roofline + import torch (target 0.8) | peak RSS (GiB) | merge vs buffered-write roofline |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['format']} | | | | not measured: {row['skipped']} | | | | |")
            continue
        roof, pmm = row["roofline"], row["pmm_dist"]
        lines.append(f"| {row['format']} | {roof['input_bytes'] / GB:.2f} | {roof['seconds']:.2f} ({roof['read_seconds']:.2f} + "
                     f"{roof['write_seconds']:.2f}) | {pmm['seconds']:.2f} | "
                     f"{row['merge_vs_roofline']:.2f} | {pmm['wall_seconds']:.2f} | "
                     f"{row['process_vs_roofline_plus_import_torch']:.2f} | "
                     f"{max(pmm['peak_rss_bytes_by_rank']) / 2**30:.2f} | "
                     f"{row.get('merge_vs_buffered_roofline', float('nan')):.2f} |")  # nan: a report before run 10
    return lines + [""]


def _kernel_section(report: dict) -> list:
    k = report.get("kernel")
    if not k or "failed" in k:
        return [f"Kernel micro-benchmark failed: {k['failed'][-300:]}", ""] if k else []
    lines = [f"## Kernel: GB/s of {k['dtype']} input per core ({k['sources']} sources x {k['elements']} elements, "
             f"1 thread, best of {k['rounds']} interleaved rounds)", "",
             "| kernel | GB/s (best) | GB/s (median) | vs before |", "| --- | ---: | ---: | ---: |"]
    for name, best in k["gbps_best"].items():
        lines.append(f"| {name} | {best:.2f} | {k['gbps_median'][name]:.2f} | {k['ratio_to_before'][name]:.2f}x |")
    return lines + ["", "Exact kernels are bit-identical to `before` (checked every round) and within one ulp of "
                    "the float64 reference; target: >= 2.5 GB/s exact.", ""]


def _startup_section(report: dict) -> list:
    s = report.get("startup")
    if not s or "failed" in s:
        return []
    lines = [f"## Start-up (median of {s['repeats']} fresh interpreters; target: --help <= import torch + 0.3 s)", "",
             "| command | seconds | vs import torch | imports |", "| --- | ---: | ---: | --- |"]
    for name, seconds in s["median_seconds"].items():
        lines.append(f"| `{name}` | {seconds:.3f} | {s['over_import_torch_seconds'][name]:+.3f} | "
                     f"{', '.join(s['imports'][name]) or '-'} |")
    return lines + [""]


def _scale_section(report: dict) -> list:
    sc = report.get("scale")
    if not sc or "failed" in sc:
        return []
    s = sc["synthetic"]
    b = s["bytes_per_rank"]
    lines = [f"## Scale without processes: {s['ranks']} ranks x {s['files']} files, {s['checkpoints']} checkpoints", "",
             f"- assign_units (the LPT balancer): {s['assign_seconds']:.2f} s; payloads built and pickled: "
             f"{s['payload_seconds']:.2f} s; {s['units_per_rank']['min']}-{s['units_per_rank']['max']} files per rank.",
             f"- plan step, metadata bytes per rank: {b['min']}-{b['max']} B (median {b['median']:.0f}; scatter pads "
             f"to {s['bytes_received_per_rank_padded']} B); the coordinator sends {s['coordinator_sends_bytes'] / 1e6:.1f} "
             f"MB in all; the whole plan, which stays on the coordinator, is {s['whole_plan_bytes'] / 1e6:.1f} MB.",
             f"- merge step: each rank sends its per-file results to the coordinator only "
             f"(<= {s['results_bytes_per_rank']['max']} B; {s['coordinator_receives_result_bytes'] / 1e6:.1f} MB "
             f"arrive there) and all-gathers {s['failure_flag_bytes_per_rank']} B of failure flags."]
    r = sc.get("real_files")
    if r:
        lines.append(f"- real Megatron legacy planning (`plan_merge`, tiny hard-linked shard files): {r['checkpoints']} "
                     f"checkpoints x {r['files_per_checkpoint']} shard files at {r['ranks']} ranks: "
                     f"**{r['plan_merge_seconds']:.2f} s** warm (" +
                     ", ".join(f"{k} {v:.2f} s" for k, v in r["phases_seconds"].items()) +
                     f"); each checkpoint's metadata parsed {r['metadata_reads_per_checkpoint']}x"
                     + (f"; the first pass, with the tree's directory entries as the last run left them, took "
                        f"{r['first_pass_seconds']:.2f} s." if "first_pass_seconds" in r else "."))
    d = sc.get("dcp")
    if d:
        lines.append(f"- DCP planning (`plan_merge`, FSDP2-shaped `.metadata` as DCP pickles it, {d['metadata_bytes'] / 1e6:.0f} "
                     f"MB each): {d['checkpoints']} checkpoints x {d['chunks_per_checkpoint']} chunks ({d['tensors']} "
                     f"tensors over {d['saved_world_size']} files) at {d['ranks']} ranks: **{d['plan_merge_seconds']:.2f} s** ("
                     + ", ".join(f"{k} {v:.2f} s" for k, v in d["phases_seconds"].items()) +
                     f"); metadata parses per file: {d['metadata_parses']}; each rank receives "
                     f"{d['bytes_per_rank']['min']}-{d['bytes_per_rank']['max']} B of plan.")
    return lines + [""]


def _plot(report: dict, path: str) -> None:
    """One panel per part measured: ranks, N sweep, formats against their rooflines, kernel."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    formats = [r for r in report.get("formats") or [] if "skipped" not in r]
    kernel = report.get("kernel") if "failed" not in (report.get("kernel") or {"failed": 1}) else None
    panels = [drawer for drawer, present in ((_ranks_panel, report.get("pmm_dist")), (_sweep_panel, report.get("n_sweep")),
                                             (_formats_panel, formats), (_kernel_panel, kernel)) if present]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for axis, drawer in zip(axes[0], panels):
        drawer(axis, report)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _ranks_panel(axis, report):
    ranks = [r["ranks"] for r in report["pmm_dist"]]
    axis.plot(ranks, [r["gbps"] for r in report["pmm_dist"]], "o-", label="pmm_dist")
    axis.axhline(report["roofline_warm"]["gbps"], color="gray", linestyle="--", label="roofline (read + write)")
    if "naive" in report:
        axis.axhline(report["naive"]["gbps"], color="red", linestyle=":", label="naive load/average/save")
    axis.set_xlabel(f"ranks ({report['machine']['cores']} cores)")
    axis.set_ylabel("GB/s of input")
    axis.set_xticks(ranks)
    axis.set_ylim(bottom=0)
    axis.set_title("Megatron legacy: throughput vs ranks")
    axis.legend()


def _sweep_panel(axis, report):
    sweep = report["n_sweep"]
    axis.plot([r["n"] for r in sweep], [r["gbps"] for r in sweep], "o-", label="GB/s")
    axis.set_xlabel("N checkpoints")
    axis.set_ylabel("GB/s of input")
    axis.set_ylim(bottom=0)
    twin = axis.twinx()
    twin.plot([r["n"] for r in sweep], [r["peak_rss_bytes_by_rank"][0] / 2**20 for r in sweep], "s--", color="green")
    twin.set_ylabel("peak RSS (MiB)", color="green")
    twin.set_ylim(bottom=0)
    axis.set_title("throughput and memory vs N (1 rank)")


def _formats_panel(axis, report):
    rows = [r for r in report["formats"] if "skipped" not in r]
    names = [r["format"] for r in rows]
    x = range(len(rows))
    axis.bar([i - 0.2 for i in x], [r["merge_vs_roofline"] for r in rows], width=0.4, label="merge / roofline")
    axis.bar([i + 0.2 for i in x], [r["process_vs_roofline_plus_import_torch"] for r in rows], width=0.4,
             label="process / (roofline + import torch)")
    axis.axhline(0.9, color="gray", linestyle="--", label="targets 0.9, 0.8")
    axis.axhline(0.8, color="gray", linestyle=":")
    axis.set_xticks(list(x), names, rotation=20)
    axis.set_ylabel("fraction of the roofline")
    axis.set_title("every format, 1 rank, warm cache")
    axis.legend(fontsize=7)


def _kernel_panel(axis, report):
    value = report["kernel"]
    names = list(value["gbps_best"])
    axis.barh(names, [value["gbps_best"][n] for n in names])
    axis.axvline(2.5, color="gray", linestyle="--", label="target (exact)")
    axis.set_xlabel(f"GB/s of {value['dtype']} input per core")
    axis.set_title("kernel")
    axis.legend()


if __name__ == "__main__":
    raise SystemExit(main())
