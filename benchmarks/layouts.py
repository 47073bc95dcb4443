"""Mixed-layout DCP merge against the same-layout merge of the same bytes.

    python -m benchmarks.layouts                     # 4 checkpoints of ~64 MiB each
    python -m benchmarks.layouts --size-mb 16 --repeats 2

Two runs of the same tensors (fp32 and bf16 matrices, hand-made DCP checkpoints from
pmm_dist.testing.synthetic_dcp): in the "same" run every checkpoint is chunked as the newest
(rows over 4 ranks, as FSDP shards); in the "mixed" run the older checkpoints were saved at
other layouts (rows over 3 ranks, columns over 2 ranks, whole on 1 rank, in turn), so each
output chunk is assembled from byte-range pieces of other chunks. Both are merged (SMA, one
process, warm page cache) and the engine's merge time compared: the ratio mixed / same is the
cost of the layout change. The issue's target is at most 1.2.

``--newest-split columns`` chunks the newest by columns instead (as a TP split of dim 1): the
older checkpoints' pieces are then boxes of columns of their chunks, read as the rows holding
them when the runs are short (the worst case of the partial reads).
"""
import argparse
import os
import shutil
import tempfile
import time

import torch

import pmm_dist
from pmm_dist.testing.synthetic_dcp import split, write_dcp

_OLDER_LAYOUTS = [("rows", 3), ("columns", 2), ("whole", 1)]


def _chunks(shape, layout, num):
    if layout == "whole":
        return [((0,) * len(shape), tuple(shape))]
    return split(shape, 0 if layout == "rows" else 1, num)


def make_runs(work: str, size_mb: float, num_checkpoints: int, newest_split: str = "rows") -> dict:
    """Two run directories holding the same bytes, one same-layout, one mixed-layout."""
    cols = 2048
    rows = 1024
    per_tensor = rows * cols * 3  # an fp32 and a bf16 matrix of rows x cols
    num_tensors = max(1, round(size_mb * (1 << 20) / per_tensor))
    generator = torch.Generator().manual_seed(0)
    values = {}
    for k in range(num_tensors):
        values[f"model.layers.{k}.weight"] = torch.randn(rows, cols, generator=generator)
        values[f"model.layers.{k}.proj"] = torch.randn(rows, cols, generator=generator).to(torch.bfloat16)
    runs = {"same": os.path.join(work, "same"), "mixed": os.path.join(work, "mixed")}
    for step in range(1, num_checkpoints + 1):
        newest = step == num_checkpoints
        for name, run in runs.items():
            layout, num = (newest_split, 4) if newest or name == "same" else \
                _OLDER_LAYOUTS[(step - 1) % len(_OLDER_LAYOUTS)]
            # The arithmetic does not depend on the values: every checkpoint holds the same ones.
            write_dcp(os.path.join(run, f"step-{step}"),
                      {fqn: (value, _chunks(value.shape, layout, num)) for fqn, value in values.items()},
                      num_files=num)
    return runs


def _merge_once(run: str, out: str):
    shutil.rmtree(out, ignore_errors=True)
    result = pmm_dist.merge(sources=[run], out=out, method="sma", device="cpu", quiet=True)
    shutil.rmtree(out, ignore_errors=True)
    return result


def merge_seconds(runs: dict, work: str, repeats: int) -> dict:
    """The best engine merge time of each run over ``repeats`` merges, the runs taking turns (on
    a shared machine the load drifts: alternating exposes both to it alike), after one merge
    each to warm the page cache."""
    best = {name: float("inf") for name in runs}
    results = {}
    for attempt in range(repeats + 1):
        for name, run in runs.items():
            results[name] = _merge_once(run, os.path.join(work, f"out-{name}"))
            if attempt:
                best[name] = min(best[name], results[name].timings["merge"])
    return {name: {"merge_s": best[name], "bytes_read": r.num_bytes_read, "bytes_written": r.num_bytes_written,
                   "bytes_read_by_source": list(r.plan.bytes_read_by_source)} for name, r in results.items()}


def mixed_layout_ratio(size_mb: float = 64, num_checkpoints: int = 4, repeats: int = 3, work: str = None,
                       newest_split: str = "rows") -> dict:
    """Merge time of the mixed-layout run over that of the same-layout run of the same bytes."""
    own = work is None
    work = work or tempfile.mkdtemp(prefix="pmm-layouts-")
    try:
        started = time.perf_counter()
        runs = make_runs(work, size_mb, num_checkpoints, newest_split)
        generated = time.perf_counter() - started
        measured = merge_seconds(runs, work, repeats)
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    return {"size_mb_per_checkpoint": size_mb, "checkpoints": num_checkpoints, "repeats": repeats,
            "newest_split": newest_split,
            "generate_s": round(generated, 3), "same": measured["same"], "mixed": measured["mixed"],
            "ratio": measured["mixed"]["merge_s"] / measured["same"]["merge_s"],
            "read_ratio": measured["mixed"]["bytes_read"] / measured["same"]["bytes_read"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=64, help="bytes per checkpoint, MiB (default 64)")
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--newest-split", choices=("rows", "columns"), default="rows")
    parser.add_argument("--work", default=None, help="where to write the runs (default: a temporary directory)")
    opts = parser.parse_args(argv)
    report = mixed_layout_ratio(opts.size_mb, opts.checkpoints, opts.repeats, opts.work, opts.newest_split)
    for name in ("same", "mixed"):
        entry = report[name]
        print(f"{name:>5}: merge {entry['merge_s']:.3f} s, read {entry['bytes_read'] / 2**20:.1f} MiB "
              f"(per source: {', '.join(f'{n / 2**20:.1f}' for n in entry['bytes_read_by_source'])} MiB)")
    print(f"ratio mixed / same: {report['ratio']:.3f} (bytes read {report['read_ratio']:.3f}); target <= 1.2")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
