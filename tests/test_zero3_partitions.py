"""The ZeRO-3 partition geometry against a brute-force model of DeepSpeed's partitioning.

The model partitions each parameter at a world size the way deepspeed's ``_partition_param``
does (ceil(numel / world_size) elements per rank, the tail padded) and concatenates a rank's
partitions in parameter order, cut into sub-groups at random places (both sides' cuts must not
matter). Remapping every rank's stream from one world size to another must give exactly the
partitions made directly at the target size, padding untouched.
"""
import random

import pytest
import torch

from pmm_dist.formats.zero3_partitions import copy_pieces, gather_pieces, partition_size, stream_numel, value_runs

PAD = -1.0


def _params(numels):
    return [torch.arange(n, dtype=torch.float64) + 1000 * i for i, n in enumerate(numels)]


def _streams(params, world_size):
    streams = []
    for rank in range(world_size):
        parts = []
        for param in params:
            size = partition_size(param.numel(), world_size)
            part = torch.full((size,), PAD, dtype=torch.float64)
            piece = param[rank * size:(rank + 1) * size]
            part[:piece.numel()] = piece
            parts.append(part)
        streams.append(torch.cat(parts))
    return streams


def _cut(stream, rng):
    n = stream.numel()
    cuts = sorted(rng.sample(range(1, n), min(n - 1, rng.randint(0, 3)))) if n > 1 else []
    bounds = [0, *cuts, n]
    return [stream[a:b].clone() for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("seed", range(6))
def test_remapped_streams_equal_direct_partitions(seed):
    rng = random.Random(seed)
    for _ in range(60):
        numels = [rng.randint(1, 17) for _ in range(rng.randint(1, 6))]
        params = _params(numels)
        source_ws, world_size = rng.randint(1, 6), rng.randint(1, 6)
        sources = [_cut(s, rng) for s in _streams(params, source_ws)]
        for rank, want in enumerate(_streams(params, world_size)):
            assert want.numel() == stream_numel(numels, world_size)
            out = _cut(torch.full_like(want, PAD), rng)
            pieces = gather_pieces(numels, world_size, rank, source_ws)
            copied = copy_pieces(pieces, lambda r: sources[r], out)
            assert torch.equal(torch.cat(out), want), (numels, source_ws, world_size, rank)
            assert copied == int((want != PAD).sum())  # every real element once, no padding


def test_equal_world_sizes_map_each_rank_onto_itself():
    numels = [120, 15, 15, 15, 90, 6]  # the real test model's parameters (rank 1 pads three of them)
    for world_size in (1, 2, 3):
        for rank in range(world_size):
            pieces = gather_pieces(numels, world_size, rank, world_size)
            assert all(p.source_rank == rank and p.source_start == p.start for p in pieces)
    assert len(gather_pieces(numels, 1, 0, 1)) == 1  # no padding at one rank: one run


def test_more_ranks_than_elements():
    # a 1-element parameter at world size 4: ranks 1..3 hold only its padding, and give nothing
    assert gather_pieces([1], 4, 2, 1) == []
    # back to world size 1: rank 0's first 3 elements are contiguous, then 2 from each other rank
    assert [(p.source_rank, p.source_start, p.start, p.length) for p in gather_pieces([1, 8], 1, 0, 4)] == \
        [(0, 0, 0, 3), (1, 1, 3, 2), (2, 1, 5, 2), (3, 1, 7, 2)]


@pytest.mark.parametrize("seed", range(3))
def test_value_runs_are_exactly_the_places_without_padding(seed):
    """value_runs (what a merge at one world size reads; the rest, padding, is written as zero)
    against the brute-force streams: every place in a run holds a parameter's element, every
    place outside one is padding, for random parameters, world sizes and sub-group cuts."""
    rng = random.Random(seed)
    for _ in range(60):
        numels = [rng.randint(1, 17) for _ in range(rng.randint(1, 6))]
        world_size = rng.randint(1, 6)
        for rank, stream in enumerate(_streams(_params(numels), world_size)):
            groups = _cut(stream, rng)
            runs = value_runs(numels, world_size, rank, [g.numel() for g in groups])
            assert len(runs) == len(groups)
            for group, group_runs in zip(groups, runs):
                held = torch.zeros(group.numel(), dtype=torch.bool)
                for begin, end in group_runs:
                    assert 0 <= begin < end <= group.numel() and not held[begin:end].any()
                    held[begin:end] = True
                assert torch.equal(held, group != PAD), (numels, world_size, rank)


def test_value_runs_of_the_real_test_model():
    # rank 1 of 2 pads three 15-element parameters by one place each; rank 0 is one run
    numels = [120, 15, 15, 15, 90, 6]
    assert value_runs(numels, 2, 0, [stream_numel(numels, 2)]) == [[(0, 132)]]
    assert value_runs(numels, 2, 1, [100, 32]) == [[(0, 67), (68, 75), (76, 83), (84, 100)], [(0, 32)]]
