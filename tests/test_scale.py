"""Scale properties that are not timings (the timings are benchmarks/scale.py): what each rank
receives in the plan step, what goes to the coordinator only, and how often planning reads a
source's metadata, at thousands of ranks, simulated in this process."""
import os
import pickle
from collections import Counter

import pytest

import pmm_dist.io.safe_load as loader
from pmm_dist.dist import collective as collective_module
from pmm_dist.dist.collective import Collective
from pmm_dist.engine.execution import check_share
from pmm_dist.engine.options import MergeOptions
from pmm_dist.engine.planning import plan_merge
from pmm_dist.formats import resolve_format
from pmm_dist.testing.scale import make_sharded_run, synthetic_plan, synthetic_results

PER_UNIT_BYTES = 150  # a pickled WorkUnit in a share (measured ~70)


def _size(obj) -> int:
    return len(pickle.dumps(obj))


@pytest.fixture(scope="module")
def big_plan():
    plan, _ = synthetic_plan(20_000, 1024, num_checkpoints=8)
    return plan


def test_each_rank_receives_its_own_share_and_a_plan_without_unit_lists(big_plan):
    payloads = big_plan.rank_payloads()
    assert len(payloads) == 1024
    assert payloads[0] == (big_plan, big_plan.shares[0])  # the coordinator keeps the whole plan
    for rank, (plan, share) in enumerate(payloads[1:], start=1):
        assert share == big_plan.shares[rank]
        assert plan.units == () and plan.shares == () and plan.num_units == 20_000
        assert plan.checkpoints == big_plan.checkpoints and plan.fingerprint == big_plan.fingerprint
    every = [u for share in big_plan.shares for u in share]
    assert sorted(u.relpath for u in every) == sorted(u.relpath for u in big_plan.units)  # each unit once


def test_what_a_rank_receives_is_bounded_by_its_share_not_by_the_job(big_plan):
    small_plan, _ = synthetic_plan(2_000, 1024, num_checkpoints=8)
    light_big, light_small = _size(big_plan.for_rank()), _size(small_plan.for_rank())
    assert abs(light_big - light_small) < 32  # independent of the number of units (digits of counts aside)
    assert _size(big_plan) > 100 * light_big
    units_per_rank = -(-20_000 // 1024)
    for plan, share in big_plan.rank_payloads()[1:]:
        assert len(share) <= 2 * units_per_rank  # balanced by bytes; similar files, similar counts
        assert _size((plan, share)) <= light_big + PER_UNIT_BYTES * len(share) + 64


def _fake_world(monkeypatch, rank: int, world_size: int) -> dict:
    """A Collective at ``rank`` of ``world_size`` whose torch.distributed calls are recorded."""
    sent = {"scatter": None, "all_gather": [], "gather": [], "broadcast": []}

    class FakeDist:
        @staticmethod
        def scatter_object_list(box, outgoing, src):
            sent["scatter"] = outgoing
            box[0] = "received"

        @staticmethod
        def broadcast_object_list(box, src):
            sent["broadcast"].append(box[0])

        @staticmethod
        def all_gather_object(out, obj):
            sent["all_gather"].append(obj)
            out[:] = [obj] * len(out)

        @staticmethod
        def gather_object(obj, out, dst):
            sent["gather"].append(obj)
            if out is not None:
                out[:] = [obj] * len(out)

    monkeypatch.setattr(collective_module, "dist", FakeDist)
    c = Collective.__new__(Collective)
    c.rank, c.world_size, c.local_rank, c.bytes_exchanged, c._owns_group = rank, world_size, 0, 0, False
    c.sigterm_raises = True
    return {"collective": c, "sent": sent}


def test_the_coordinators_own_plan_does_not_travel(monkeypatch, big_plan):
    """scatter_object_list pads every rank's bytes to the largest object's: the coordinator's
    whole plan must not be among them."""
    world = _fake_world(monkeypatch, 0, 1024)
    payloads = big_plan.rank_payloads()
    mine = world["collective"].scatter_step("plan", lambda: payloads)
    assert mine == payloads[0]
    outgoing = world["sent"]["scatter"]
    assert outgoing[0] is None and outgoing[1:] == payloads[1:]
    largest = max(_size(p) for p in payloads[1:])
    verdict = _size((None, None))  # broadcast first: did planning fail?
    assert world["collective"].bytes_exchanged == (verdict + largest) * 1023 < _size(payloads[0]) * 1023 / 50
    assert world["sent"]["broadcast"] == [(None, None)]  # the verdict only


@pytest.mark.parametrize("rank", [0, 7])
def test_per_file_results_go_to_the_coordinator_only(monkeypatch, big_plan, rank):
    world = _fake_world(monkeypatch, rank, 1024)
    results = synthetic_results(big_plan.shares[rank])
    gathered = world["collective"].gather_step("merge", lambda: results)
    assert world["sent"]["all_gather"] == [None]  # every rank learns only whether another failed
    assert world["sent"]["gather"] == [results]
    assert (gathered is not None) == (rank == 0)


@pytest.fixture
def counted_loads(monkeypatch):
    """Pickles actually parsed by safe_load, per file."""
    loads = Counter()
    original = loader._load

    def counting(path, *args, **kwargs):
        loads[os.path.abspath(path)] += 1
        return original(path, *args, **kwargs)

    monkeypatch.setattr(loader, "_load", counting)
    return loads


def test_planning_reads_each_checkpoints_metadata_once(tmp_path, counted_loads):
    run = tmp_path / "run"
    make_sharded_run(str(run), num_checkpoints=3, num_files=48)
    plan, snapshot, _ = plan_merge(MergeOptions(sources=[str(run)], out=str(tmp_path / "out"), format="auto",
                                                device="cpu", dry_run=True), 4096)
    assert plan.num_units == 48 and len(snapshot) == 3 * 48 and len(plan.shares) == 4096
    assert counted_loads and max(counted_loads.values()) == 1, counted_loads
    assert len(counted_loads) == 3  # one metadata file per checkpoint (its first shard's saved args)
    # outside planning nothing is remembered: a watcher's next round sees new files
    counted_loads.clear()
    for _ in range(2):  # a new job (or a watcher's next round) has a new format instance
        resolve_format("megatron", [str(run)]).run_identity(plan.checkpoints[0])
    assert list(counted_loads.values()) == [2]


def test_a_rank_reads_only_the_files_of_its_own_share(tmp_path, counted_loads):
    run = tmp_path / "run"
    make_sharded_run(str(run), num_checkpoints=3, num_files=48)
    plan, _, _ = plan_merge(MergeOptions(sources=[str(run)], out=str(tmp_path / "out"), device="cpu",
                                         dry_run=True), 64)
    fmt = resolve_format(plan.format_name, [str(run)])
    for rank in (5, 63):  # a rank with one unit, and one without any
        counted_loads.clear()
        share = plan.rank_payloads()[rank][1]
        assert check_share(fmt, plan.for_rank(), share, rank) == []
        expected = {os.path.join(c.path, u.relpath) for u in share for c in plan.checkpoints}
        # ... and each checkpoint's saved args (its first shard), once, which place its layers and
        # experts (issue 11: sources may be at another PP/EP)
        args_files = {os.path.join(c.path, "mp_rank_00_000", "model_optim_rng.pt") for c in plan.checkpoints}
        assert expected <= set(counted_loads) <= expected | args_files, counted_loads
        assert all(n == 1 for n in counted_loads.values())
