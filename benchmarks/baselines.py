"""Peers measured beside pmm_dist, run in their own processes so their memory is their own.

``naive``: what fairseq's average_checkpoints.py and NeMo's averaging scripts do — load every
checkpoint whole with torch.load, sum in fp32, divide, save. Prints a JSON line with its time
and peak RSS.

    python -m benchmarks.baselines naive RUN OUT ITERATION [ITERATION ...]
"""
import json
import os
import sys
import time

import torch

from pmm_dist.engine.report import peak_rss_bytes
from pmm_dist.io.safe_load import safe_load


def naive_average(run_dir: str, out_dir: str, iterations) -> dict:
    started = time.perf_counter()
    first = os.path.join(run_dir, f"iter_{iterations[0]:07d}")
    shards = sorted(os.listdir(first))
    for shard in shards:
        states = [safe_load(os.path.join(run_dir, f"iter_{it:07d}", shard, "model_optim_rng.pt"), mmap=False)
                  for it in iterations]  # every checkpoint whole in memory, as the scripts do
        averaged = dict(states[-1])
        for key in [k for k in averaged if k.startswith("model")]:
            merged = {}
            for name, tensor in states[-1][key].items():
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                    total = sum(s[key][name].float() for s in states)
                    merged[name] = (total / len(states)).to(tensor.dtype)
                else:
                    merged[name] = tensor
            averaged[key] = merged
        os.makedirs(os.path.join(out_dir, shard), exist_ok=True)
        path = os.path.join(out_dir, shard, "model_optim_rng.pt")
        torch.save(averaged, path)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        del states, averaged
    return {"seconds": time.perf_counter() - started, "peak_rss_bytes": peak_rss_bytes()}


if __name__ == "__main__":
    if len(sys.argv) < 5 or sys.argv[1] != "naive":
        print(__doc__)
        raise SystemExit(2)
    print(json.dumps(naive_average(sys.argv[2], sys.argv[3], [int(x) for x in sys.argv[4:]])))
