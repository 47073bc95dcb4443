"""Mixed-layout DCP merge against the same-layout merge of the same bytes.

    python -m benchmarks.layouts                     # 4 checkpoints of ~64 MiB each
    python -m benchmarks.layouts --size-mb 16 --repeats 2

Two runs of the same tensors (fp32 and bf16 matrices, hand-made DCP checkpoints from
pmm_dist.testing.synthetic_dcp): in the "same" run every checkpoint is chunked as the newest
(rows over 4 ranks); in the "mixed" run the older checkpoints were saved at other layouts
(rows over 3 ranks, columns over 2 ranks, whole on 1 rank, in turn), so each output chunk is
assembled from byte-range pieces of other chunks. Both are merged (SMA, one process, warm page
cache) and the engine's merge time compared: the ratio mixed / same is the cost of the layout
change. The issue's target is at most 1.2.
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


def make_runs(work: str, size_mb: float, num_checkpoints: int) -> dict:
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
            layout, num = ("rows", 4) if newest or name == "same" else _OLDER_LAYOUTS[(step - 1) % len(_OLDER_LAYOUTS)]
            # The arithmetic does not depend on the values: every checkpoint holds the same ones.
            write_dcp(os.path.join(run, f"step-{step}"),
                      {fqn: (value, _chunks(value.shape, layout, num)) for fqn, value in values.items()},
                      num_files=num)
    return runs


def merge_seconds(run: str, out: str, repeats: int) -> dict:
    """The best engine merge time of ``repeats`` merges (after one to warm the page cache)."""
    best, result = float("inf"), None
    for _ in range(repeats + 1):
        shutil.rmtree(out, ignore_errors=True)
        result = pmm_dist.merge(sources=[run], out=out, method="sma", device="cpu", quiet=True)
        best = min(best, result.timings["merge"])
    shutil.rmtree(out, ignore_errors=True)
    return {"merge_s": best, "bytes_read": result.num_bytes_read, "bytes_written": result.num_bytes_written,
            "bytes_read_by_source": list(result.plan.bytes_read_by_source)}


def mixed_layout_ratio(size_mb: float = 64, num_checkpoints: int = 4, repeats: int = 3, work: str = None) -> dict:
    """Merge time of the mixed-layout run over that of the same-layout run of the same bytes."""
    own = work is None
    work = work or tempfile.mkdtemp(prefix="pmm-layouts-")
    try:
        started = time.perf_counter()
        runs = make_runs(work, size_mb, num_checkpoints)
        generated = time.perf_counter() - started
        measured = {name: merge_seconds(run, os.path.join(work, f"out-{name}"), repeats) for name, run in runs.items()}
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    return {"size_mb_per_checkpoint": size_mb, "checkpoints": num_checkpoints, "repeats": repeats,
            "generate_s": round(generated, 3), "same": measured["same"], "mixed": measured["mixed"],
            "ratio": measured["mixed"]["merge_s"] / measured["same"]["merge_s"],
            "read_ratio": measured["mixed"]["bytes_read"] / measured["same"]["bytes_read"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=64, help="bytes per checkpoint, MiB (default 64)")
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=None, help="where to write the runs (default: a temporary directory)")
    opts = parser.parse_args(argv)
    report = mixed_layout_ratio(opts.size_mb, opts.checkpoints, opts.repeats, opts.work)
    for name in ("same", "mixed"):
        entry = report[name]
        print(f"{name:>5}: merge {entry['merge_s']:.3f} s, read {entry['bytes_read'] / 2**20:.1f} MiB "
              f"(per source: {', '.join(f'{n / 2**20:.1f}' for n in entry['bytes_read_by_source'])} MiB)")
    print(f"ratio mixed / same: {report['ratio']:.3f} (bytes read {report['read_ratio']:.3f}); target <= 1.2")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
