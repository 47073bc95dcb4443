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


def test_chunk_item_init_matches_its_declared_fields():
    """ChunkItem's hand-written __init__ (fast at a million items) takes exactly the declared
    fields, in order, with their defaults, and stays frozen and comparable."""
    import dataclasses
    import inspect
    from pmm_dist.plan.types import Action, ChunkItem
    declared = [(f.name, f.default) for f in dataclasses.fields(ChunkItem)]
    parameters = list(inspect.signature(ChunkItem.__init__).parameters.values())[1:]
    assert [(p.name, p.default if p.default is not inspect.Parameter.empty else dataclasses.MISSING)
            for p in parameters] == declared
    values = {name: f"value of {name}" for name, _ in declared}
    item = ChunkItem(**values)
    assert {name: getattr(item, name) for name, _ in declared} == values
    assert item == ChunkItem(*values.values()) and hash(item) == hash(ChunkItem(*values.values()))
    try:
        item.key = "other"
    except dataclasses.FrozenInstanceError:
        pass
    else:
        raise AssertionError("ChunkItem is no longer frozen")
    assert ChunkItem("k", (0,), Action.MERGE, 8) == dataclasses.replace(ChunkItem("k", (0,), Action.MERGE, 8))


def test_chunk_item_pickles_as_its_constructor_arguments():
    """The plan step pickles ChunkItems by the million: as constructor arguments (no field
    names per item), every field round-trips, nested pieces and locations included."""
    import pickle
    from pmm_dist.plan.types import Action, ChunkedKey, ChunkItem, Piece
    import torch
    piece = Piece((0, 0), (0, 0), (2, 4), (2, 4))
    item = ChunkItem("layers.0.w", (0, 0), Action.MERGE, 64, sources=((piece,), None), source_key="optim.w",
                     sizes=(4, 4), copied=("__0_0.distcp", 0, 64), stored=((("__0_0.distcp", 8, 32),), (("b", 0, 64),)),
                     spec=ChunkedKey(torch.bfloat16, torch.float32, "layers.0.w"))
    data = pickle.dumps([item, item])
    back = pickle.loads(data)
    assert back == [item, item] and type(back[0]) is ChunkItem and back[0].__dict__ == item.__dict__
    assert b"num_bytes" not in data and b"source_key" not in data
    # In a share, a unit pickles its items as their fields' tuples: no pickled call per item.
    from pmm_dist.plan.types import OptimizerPolicy, WorkUnit
    unit = WorkUnit("__3_0.distcp", 128, Action.MERGE, (item, ChunkItem("b", None, Action.COPY, 64)), OptimizerPolicy.MERGE)
    data = pickle.dumps((unit, unit))
    back = pickle.loads(data)
    assert back == (unit, unit) and all(type(it) is ChunkItem for it in back[0].items)
    assert [it.__dict__ for it in back[0].items] == [it.__dict__ for it in unit.items]
    assert b"ChunkItem" not in data
    named = WorkUnit("model-00001-of-00002.safetensors", 64, items=("lm_head.weight", "embed.weight"))
    assert pickle.loads(pickle.dumps(named)) == named  # an HF shard's items are tensor names
    assert pickle.loads(pickle.dumps(WorkUnit("a.pt", 8))) == WorkUnit("a.pt", 8)
