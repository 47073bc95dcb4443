import random

from pmm_dist.plan import WorkUnit, assign_units


def test_every_unit_assigned_once_and_deterministic():
    rng = random.Random(0)
    units = [WorkUnit(f"mp_rank_{i:02d}/model_optim_rng.pt", rng.randint(1, 10**9)) for i in range(5000)]
    shares = assign_units(units, 4096)
    assert len(shares) == 4096
    flat = [u for share in shares for u in share]
    assert sorted(flat, key=lambda u: u.relpath) == sorted(units, key=lambda u: u.relpath)
    assert shares == assign_units(list(reversed(units)), 4096)


def test_bytes_are_balanced():
    rng = random.Random(1)
    units = [WorkUnit(f"f{i}", rng.randint(10**6, 10**8)) for i in range(256)]
    loads = [sum(u.num_bytes for u in share) for share in assign_units(units, 8)]
    biggest = max(u.num_bytes for u in units)
    assert max(loads) - min(loads) <= biggest  # LPT bound


def test_more_ranks_than_units_leaves_ranks_idle():
    shares = assign_units([WorkUnit("a", 5), WorkUnit("b", 3)], 4)
    assert sorted(len(s) for s in shares) == [0, 0, 1, 1]
