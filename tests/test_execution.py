"""engine.execution.ShareMerger: how many units a rank merges at once (memory bound by output size)."""
import threading
import time
from types import SimpleNamespace

import torch

from pmm_dist.engine import execution
from pmm_dist.plan.types import Action, OptimizerPolicy, UnitResult, WorkUnit
from pmm_dist.plan.selection import TensorFilter


class _CountingFormat:
    """merge_unit sleeps a little and records how many units were being merged at once."""

    def __init__(self):
        self.lock, self.running, self.most = threading.Lock(), 0, 0
        self.order = []

    def merge_unit(self, unit, checkpoints, destination, context):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.order.append(unit.relpath)
        time.sleep(0.02)
        with self.lock:
            self.running -= 1
        return UnitResult(unit.relpath, unit.num_bytes, 0, "", 0)


def _merge(units):
    fmt = _CountingFormat()
    plan = SimpleNamespace(checkpoints=[object(), object()], weights=[0.5, 0.5], optimizer_policy=OptimizerPolicy.DROP,
                           on_nonfinite="error", tensor_filter=TensorFilter())
    staging = SimpleNamespace(completed=lambda unit: None, mark_done=lambda unit, outcome: None, data_dir="/nowhere")
    outcome = execution.ShareMerger(fmt, plan, units, staging, torch.device("cpu"), 0, show_progress=False).run()
    assert [r.relpath for r in outcome.results] == [u.relpath for u in units]  # results in share order
    return fmt


def test_small_units_overlap():
    fmt = _merge([WorkUnit(f"f{i}", 1 << 20) for i in range(6)])
    assert fmt.most == execution.UNITS_IN_FLIGHT


def test_units_whose_outputs_exceed_the_headroom_run_one_at_a_time():
    """Two outputs of 600 MiB each do not fit in the largest (600 MiB) + the 512 MiB headroom."""
    fmt = _merge([WorkUnit(f"f{i}", 600 << 20) for i in range(4)])
    assert fmt.most == 1


def test_a_large_unit_still_overlaps_with_small_ones_and_copies():
    units = [WorkUnit("big", 2 << 30), WorkUnit("small", 100 << 20), WorkUnit("big2", 2 << 30, Action.MERGE)]
    fmt = _merge(units)
    assert fmt.most == 2  # big + small fit in 2 GiB + 512 MiB; big2 waits for big
