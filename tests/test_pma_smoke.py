"""PMA smoke test: what merging must buy, on a real megatron-core GPTModel, in under a minute.

benchmarks/pma/smoke.py trains a tiny byte-level GPTModel (2 layers, hidden 64, fixed seed) on the
Python standard library's .py files with warmup then constant LR, saving Megatron-LM legacy
checkpoints; merges its last 4 constant-LR checkpoints with ``python -m pmm_dist merge --method sma``;
loads the result strictly into a fresh GPTModel. With the LR still high, the checkpoints scatter
around a basin, and their average must sit lower in it than they do on average: the SMA's held-out
loss must be below the mean held-out loss of the checkpoints it merged. A merge that scaled,
misweighted, mixed up or dropped tensors would fail this (or the strict load).
"""
import json

import pytest

from .conftest import run_python

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*Transformer Engine and Apex are not installed:UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:megatron.*"),
]


def test_sma_of_constant_lr_checkpoints_beats_their_mean_loss(tmp_path):
    proc = run_python(["-m", "benchmarks.pma.smoke", "--workdir", tmp_path, "--seed", "1234"], check="the smoke run")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["iterations"] == [240, 260, 280, 300]
    assert result["merged_iteration"] == 300
    assert "optimizer" not in result["merged_keys"]  # --optimizer drop: weights only
    losses = result["held_out"]
    assert all(1.5 < x < 3.5 for x in losses), f"the run did not train as expected: {losses}"
    mean = sum(losses) / len(losses)
    assert result["sma_held_out"] < mean, (
        f"SMA of the last {len(losses)} constant-LR checkpoints: held-out {result['sma_held_out']:.4f}, "
        f"not below their mean {mean:.4f} (each: {', '.join(f'{x:.4f}' for x in losses)})")
