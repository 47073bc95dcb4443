"""Synthetic plans and sharded runs at the scale of a large job, without processes or tensor data.

For benchmarks/scale.py and tests/test_scale.py: what the coordinator plans and what each rank
receives at thousands of ranks and a hundred thousand shard files.

- ``synthetic_plan``: a MergePlan of synthetic WorkUnits (Megatron-like relpaths, sizes spread
  like a real TP x PP x EP layout: embedding and output shards larger), balanced by the engine's
  own ``assign_units``;
- ``make_sharded_run``: a Megatron legacy run directory with real shard directories and files,
  each file tiny (the first shard of a checkpoint a real ``torch.save`` with saved ``args``,
  every other one a hard link to it), so that the real format's planning runs on real paths.
"""
import argparse
import os
import random
from typing import List, Tuple

from ..plan.assign import assign_units
from ..plan.types import CheckpointRef, OutputKind, OutputLayout, UnitResult, WorkUnit


_LINKS_PER_FILE = 30_000  # ext4 allows 65000 hard links to one file


def shard_layout_for(num_files: int) -> Tuple[int, int, int]:
    """A (TP, PP, EP) whose product is at least ``num_files``: TP 8, PP up to 999, EP as needed."""
    tp = 8 if num_files >= 8 else num_files
    pp = min(999, max(1, -(-num_files // tp)))
    ep = max(1, -(-num_files // (tp * pp)))
    return tp, pp, ep


def synthetic_units(num_units: int, seed: int = 0) -> List[WorkUnit]:
    rng = random.Random(seed)
    tp, pp, ep = shard_layout_for(num_units)
    units = []
    for index in range(num_units):
        t, rest = index % tp, index // tp
        p, e = rest % pp, rest // pp
        size = int(rng.lognormvariate(18, 0.3))  # ~70 MB, a few x spread
        if p in (0, pp - 1):
            size *= 3  # the stages holding the embedding and the output layer
        units.append(WorkUnit(f"mp_rank_{t:02d}_{p:03d}_{e:03d}/model_optim_rng.pt", size))
    return units


def synthetic_plan(num_units: int, world_size: int, num_checkpoints: int = 8, seed: int = 0):
    """(MergePlan, seconds spent in assign_units) for ``num_units`` output files on ``world_size`` ranks."""
    import time

    from ..engine.planning import MergePlan
    from ..plan.selection import TensorFilter
    from ..plan.types import NonfinitePolicy, OptimizerPolicy

    units = synthetic_units(num_units, seed)
    started = time.perf_counter()
    shares = assign_units(units, world_size, num_checkpoints)
    assign_seconds = time.perf_counter() - started
    checkpoints = [CheckpointRef(1000 * (i + 1), f"/lustre/project/runs/gpt-moe-1t/iter_{1000 * (i + 1):07d}")
                   for i in range(num_checkpoints)]
    tp, pp, ep = shard_layout_for(num_units)
    plan = MergePlan(format_name="megatron", method="ema", method_options={"alpha": 0.2}, checkpoints=checkpoints,
                     weights=[1.0 / num_checkpoints] * num_checkpoints,
                     layout={"tp": tp, "pp": pp, "ep": ep, "shards": num_units},
                     source_layouts=[{"tp": tp, "pp": pp, "ep": ep, "shards": num_units}] * num_checkpoints,
                     output=OutputLayout(OutputKind.RUN_DIRECTORY, "latest_checkpointed_iteration.txt",
                                         f"iter_{checkpoints[-1].iteration:07d}"),
                     out="/lustre/project/runs/gpt-moe-1t-ema", optimizer_policy=OptimizerPolicy.DROP,
                     on_nonfinite=NonfinitePolicy.ERROR, tensor_filter=TensorFilter(), fingerprint="f" * 64,
                     num_units=len(units), units=tuple(units), shares=tuple(tuple(s) for s in shares))
    return plan, assign_seconds


def synthetic_results(share) -> List[UnitResult]:
    """What merging a share reports back: one UnitResult per file (as the formats return them)."""
    return [UnitResult(u.relpath, u.num_bytes, u.num_bytes * 8, "0123456789abcdef" * 4, 400) for u in share]


def make_sharded_run(run_dir: str, num_checkpoints: int, num_files: int) -> Tuple[int, int, int]:
    """A Megatron legacy run of ``num_checkpoints`` checkpoints of (TP, PP, EP) shards, at least
    ``num_files`` of them (the layout is returned); idempotent. Every shard file is a hard link
    to one small ``torch.save`` (planning reads the first shard's args only; sizes and names of
    the others)."""
    import torch

    from ..formats.megatron import MODEL_FILE, TRACKER, shard_dirname

    tp, pp, ep = shard_layout_for(num_files)
    iterations = [100 * (i + 1) for i in range(num_checkpoints)]
    marker = os.path.join(run_dir, TRACKER)
    if os.path.isfile(marker) and open(marker).read().strip() == str(iterations[-1]):
        return tp, pp, ep
    os.makedirs(run_dir, exist_ok=True)
    args = argparse.Namespace(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              expert_model_parallel_size=ep, num_layers=2 * pp, hidden_size=64, seed=1234,
                              num_experts=ep)
    template = os.path.join(run_dir, "shard_template.pt")
    for iteration in iterations:
        ckpt = os.path.join(run_dir, f"iter_{iteration:07d}")
        for index, (t, p, e) in enumerate((t, p, e) for t in range(tp) for p in range(pp) for e in range(ep)):
            if index % _LINKS_PER_FILE == 0:  # a fresh file every so often: file systems cap links per inode
                torch.save({"args": args, "iteration": iteration, "checkpoint_version": 3.0,
                            "model": {"w": torch.zeros(4)}}, template + ".new")
                os.replace(template + ".new", template)
            shard = os.path.join(ckpt, shard_dirname(t, p, e, pp, ep))
            os.makedirs(shard, exist_ok=True)
            target = os.path.join(shard, MODEL_FILE)
            if not os.path.exists(target):
                os.link(template, target)
        os.remove(template)
    with open(marker, "w") as f:
        f.write(str(iterations[-1]))
    return tp, pp, ep
