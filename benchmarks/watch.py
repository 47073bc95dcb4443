"""Continuous PMA: bytes read and time per update of ``pmm-dist watch`` against a full re-merge.

    python -m benchmarks.watch [--checkpoints 32] [--hidden 256] [--layers 4] [--work DIR] [--report PATH]

A synthetic Megatron-LM run (bf16 weights only, as --no-save-optim saves them; TP=1) of L checkpoints
is followed by the watcher with --backfill (one publish per checkpoint, oldest first), for
unbounded EMA and for SMA and EMA windows of 4 and 16. At run lengths 4, 8, 16, ... each update
is compared with what a full re-merge of the same window costs (``pmm_dist.merge --iterations``,
the way one would keep a merge current without the watcher). Bytes read are the manifests'
(tensor data and, for the watcher, its running state); times are wall-clock seconds per update
in one process on this machine (shared: rough). The state's size on disk is reported too.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import pmm_dist
from pmm_dist.testing.synthetic import generate_run

CONFIGS = [("ema", None), ("sma", 4), ("ema", 4), ("sma", 16), ("ema", 16)]


def _mib(num_bytes: float) -> str:
    return f"{num_bytes / 2 ** 20:.2f}"


def run_benchmark(work: str, num_checkpoints: int, hidden: int, layers: int) -> dict:
    run = os.path.join(work, "run")
    iterations = [100 * (k + 1) for k in range(num_checkpoints)]
    if not os.path.isdir(run):
        generate_run(run, iterations=iterations, tp=1, pp=1, ep=1, num_layers=layers, hidden_size=hidden,
                     ffn_hidden_size=4 * hidden, num_experts=0, vocab_size=4 * hidden, optimizer_state=False)
    ckpt_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(run, "iter_0000100"))
                     for f in fs)
    samples = [n for n in (4, 8, 16, 32, 64, 128) if n <= num_checkpoints]
    results = {"checkpoints": num_checkpoints, "checkpoint_file_bytes": ckpt_bytes, "configs": []}
    for method, last in CONFIGS:
        out = os.path.join(work, f"watch_{method}_{last}")
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        watched = pmm_dist.watch(run, out=out, method=method, last=last, backfill=True, once=True, quiet=True,
                                 device="cpu", handle_signals=False)
        total = time.perf_counter() - started
        assert watched.ok, watched.failures
        state_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
                          os.walk(os.path.join(out, ".pmm_watch", "states")) for f in fs if f.endswith(".pmmstate"))
        rows = []
        for n in samples:
            published = watched.published[n - 1]
            window = iterations[:n][-last:] if last else iterations[:n]
            full_out = os.path.join(work, "full")
            shutil.rmtree(full_out, ignore_errors=True)
            tick = time.perf_counter()
            full = pmm_dist.merge(sources=[run], out=full_out, method=method, iterations=window, quiet=True,
                                  device="cpu")
            rows.append({"run_length": n, "window": len(window), "watch_bytes_read": published.bytes_read,
                         "watch_seconds": round(published.seconds, 3), "watch_reads": published.reads,
                         "watch_incremental": published.incremental, "full_bytes_read": full.num_bytes_read,
                         "full_seconds": round(time.perf_counter() - tick, 3)})
        seconds = sorted(p.seconds for p in watched.published[1:])
        results["configs"].append({"method": method, "last": last, "rows": rows, "state_bytes": state_bytes,
                                   "backfill_seconds": round(total, 2),
                                   "median_update_seconds": round(seconds[len(seconds) // 2], 3),
                                   "update_bytes_read": [p.bytes_read for p in watched.published]})
        print(f"{method} last={last}: {len(watched.published)} updates in {total:.1f} s, state {_mib(state_bytes)} MiB",
              flush=True)
    return results


def report(results: dict) -> str:
    lines = ["# pmm-dist watch: cost per update against a full re-merge",
             "",
             f"Synthetic Megatron-LM run, {results['checkpoints']} checkpoints of "
             f"{_mib(results['checkpoint_file_bytes'])} MiB each (bf16 weights only). One process, CPU, a shared "
             "2-core machine: times are rough.",
             "",
             "| method | window | run length | watch: checkpoints read | watch MiB read | watch s | "
             "full re-merge MiB read | full s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for config in results["configs"]:
        window = config["last"] or "all"
        for row in config["rows"]:
            lines.append(f"| {config['method']} | {window} | {row['run_length']} | {len(row['watch_reads'])}"
                         f"{' + state' if row['watch_incremental'] else ''} | {_mib(row['watch_bytes_read'])} | "
                         f"{row['watch_seconds']:.2f} | {_mib(row['full_bytes_read'])} | {row['full_seconds']:.2f} |")
    lines += ["", "Per configuration: the running state on disk after the last update, the median time of an "
              "update (all but the first, which merges one checkpoint from scratch) and the whole backfill:", ""]
    lines += [f"- {c['method']} window {c['last'] or 'all'}: state {_mib(c['state_bytes'])} MiB, median update "
              f"{c['median_update_seconds']:.2f} s, {results['checkpoints']} updates in {c['backfill_seconds']} s"
              for c in results["configs"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--report", default=None, help="write the markdown report here (and .json beside it)")
    args = parser.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="pmm_watch_bench_")
    results = run_benchmark(work, args.checkpoints, args.hidden, args.layers)
    text = report(results)
    print(text)
    if args.report:
        with open(args.report, "w") as f:
            f.write(text)
        with open(os.path.splitext(args.report)[0] + ".json", "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
