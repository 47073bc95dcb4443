"""Box arithmetic of chunked checkpoints (pmm_dist.plan.regions): pure functions, no files."""
import itertools
import random
import time

import pytest
import torch

from pmm_dist.testing.synthetic_dcp import split
from pmm_dist.plan.regions import (contiguous_strides, coverage_problems, describe, find_gap, intersect, map_chunks,
                                   overlapping_pairs, read_span, volume)


def grid(shape, counts):
    """A chunk grid: ``counts[d]`` near-equal parts along each dim."""
    cuts = [[n * k // c for k in range(c + 1)] for n, c in zip(shape, counts)]
    return [(tuple(cut[i] for cut, i in zip(cuts, index)), tuple(cut[i + 1] - cut[i] for cut, i in zip(cuts, index)))
            for index in itertools.product(*(range(c) for c in counts))]


def brute_pairs(left, right):
    return sorted((i, j, o) for i, a in enumerate(left) for j, b in enumerate(right)
                  for o in [intersect(a, b)] if o is not None)


def test_intersect_and_describe():
    assert intersect(((0, 0), (4, 8)), ((2, 4), (4, 8))) == ((2, 4), (2, 4))
    assert intersect(((0, 0), (4, 8)), ((4, 0), (4, 8))) is None  # touching is not overlapping
    assert intersect(((), ()), ((), ())) == ((), ())  # scalars: one element
    assert describe(((2, 4), (2, 4))) == "[2:4, 4:8]"


@pytest.mark.parametrize("shape, chunks", [
    ((10, 4), split((10, 4), 0, 3)), ((10, 4), split((10, 4), 1, 3)), ((9, 7, 5), grid((9, 7, 5), (2, 3, 2))),
    ((), [((), ())]),
    ((0, 4), split((0, 4), 0, 2)),  # an empty tensor: its empty chunks cover it
])
def test_exact_tilings_pass(shape, chunks):
    assert coverage_problems(shape, chunks) == []


def test_gap_overlap_and_outside_are_located():
    rows = split((10, 4), 0, 2)
    gap = [rows[0], ((6, 0), (4, 4))]
    (problem,) = coverage_problems((10, 4), gap)
    assert problem.kind == "gap" and problem.region == ((5, 0), (1, 4))
    assert problem.describe(gap) == "elements [5:6, 0:4] are in no chunk (a gap)"
    overlap = [((0, 0), (6, 4)), rows[1]]
    (problem,) = coverage_problems((10, 4), overlap)
    assert problem.kind == "overlap" and problem.region == ((5, 0), (1, 4)) and problem.chunks == (0, 1)
    assert "elements [5:6, 0:4] are stored twice, by the chunk at [0, 0] (sizes [6, 4]) and the chunk at [5, 0]" \
        in problem.describe(overlap)
    outside = [rows[0], ((5, 0), (6, 4))]
    assert [p.kind for p in coverage_problems((10, 4), outside)] == ["outside"]
    # A gap in the middle of a 2-D grid, found by its region.
    cells = grid((8, 8), (4, 4))
    assert find_gap((8, 8), cells[:5] + cells[6:]) == cells[5]
    duplicated = cells + [cells[7]]
    assert [(p.kind, p.region) for p in coverage_problems((8, 8), duplicated)] == [("overlap", cells[7])]


def test_overlapping_pairs_equals_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        ndim = rng.randint(1, 3)
        shape = tuple(rng.randint(1, 12) for _ in range(ndim))
        left = grid(shape, [rng.randint(1, n) for n in shape])
        right = grid(shape, [rng.randint(1, n) for n in shape])
        assert sorted(overlapping_pairs(left, right)) == brute_pairs(left, right)
        # and an arbitrary (overlapping) box list against a tiling
        boxes = []
        for _ in range(rng.randint(1, 6)):
            offsets = tuple(rng.randrange(n) for n in shape)
            boxes.append((offsets, tuple(rng.randint(1, n - o) for o, n in zip(offsets, shape))))
        assert sorted(overlapping_pairs(boxes, right)) == brute_pairs(boxes, right)
        assert sorted(overlapping_pairs(right, boxes)) == brute_pairs(right, boxes)


def test_map_chunks_covers_each_output_chunk_exactly_once():
    rng = random.Random(1)
    for _ in range(100):
        shape = tuple(rng.randint(1, 16) for _ in range(rng.randint(1, 3)))
        outputs = grid(shape, [rng.randint(1, n) for n in shape])
        stored = grid(shape, [rng.randint(1, n) for n in shape])
        for out, pieces in zip(outputs, map_chunks(outputs, stored)):
            # the pieces, relative to the output chunk, tile it; each lies in its stored chunk
            relative = [(tuple(o - b for o, b in zip(box[0], out[0])), box[1]) for _, box in pieces]
            assert coverage_problems(out[1], relative) == []
            assert all(intersect(stored[j], box) == box for j, box in pieces)


def test_read_span_selects_the_box():
    rng = random.Random(2)
    for _ in range(300):
        sizes = tuple(rng.randint(1, 7) for _ in range(rng.randint(1, 4)))
        chunk = torch.arange(volume(sizes)).view(sizes)
        offsets = tuple(rng.randrange(n) for n in sizes)
        box = tuple(rng.randint(1, n - o) for o, n in zip(offsets, sizes))
        expected = chunk[tuple(slice(o, o + s) for o, s in zip(offsets, box))]
        span = read_span(sizes, offsets, box)
        flat = chunk.reshape(-1)
        runs = torch.cat([flat[s:s + span.run] for s in span.starts()])
        assert torch.equal(runs.view(box), expected)  # run by run, in row-major order
        slab = flat[span.first:span.end]
        assert torch.equal(slab.as_strided(box, contiguous_strides(sizes)), expected)  # one slab, strided
        assert span.numel == volume(box) and span.slab_numel <= volume(sizes)


def test_read_span_of_row_and_column_splits():
    rows = read_span((1000, 256), (250, 0), (500, 256))
    assert (rows.first, rows.num_runs, rows.slab_numel) == (250 * 256, 1, 500 * 256)  # one contiguous run
    columns = read_span((1000, 256), (0, 128), (1000, 128))
    assert columns.num_runs == 1000 and columns.run == 128 and columns.slab_numel == 999 * 256 + 128
    assert not columns.reads_runs(4)  # 512-byte runs: one slab read is cheaper
    wide = read_span((64, 1 << 16), (0, 1 << 15), (64, 1 << 15))
    assert wide.reads_runs(4) and wide.num_bytes_read(4) == 64 * (1 << 15) * 4  # 128 KiB runs: run by run
    whole = read_span((4, 5), (0, 0), (4, 5))
    assert (whole.first, whole.end, whole.num_runs) == (0, 20, 1)


def test_large_layout_change_is_fast():
    """A world-size-4096 row split against 3000 rows, and a 64 x 64 grid against 4096 columns:
    near-linear sweeps, well under a second or two each in Python."""
    shape = (1 << 20, 1024)
    outputs, stored = split(shape, 0, 4096), split(shape, 0, 3000)
    started = time.perf_counter()
    assert coverage_problems(shape, outputs) == [] and coverage_problems(shape, stored) == []
    mapping = map_chunks(outputs, stored)
    cuts = {o[0] for o, _ in outputs + stored}
    assert all(1 <= len(p) <= 2 for p in mapping) and sum(len(p) for p in mapping) == len(cuts)
    elapsed = time.perf_counter() - started
    wide = (4096, 1 << 14)
    cells, columns = grid(wide, (64, 64)), split(wide, 1, 4096)
    started = time.perf_counter()
    assert coverage_problems(wide, cells) == []
    mapping = map_chunks(cells, columns)
    assert sum(len(p) for p in mapping) == 4096 * 64
    elapsed = max(elapsed, time.perf_counter() - started)
    assert elapsed < 10, f"{elapsed:.1f} s"
    gap = stored[:1500] + stored[1501:]
    assert [(p.kind, p.region) for p in coverage_problems(shape, gap)] == [("gap", stored[1500])]


def test_accumulating_pieces_equals_accumulating_whole_chunks():
    """Sources added piece by piece into regions give the same result as added whole, to the bit."""
    from pmm_dist.merge.kernel import Accumulator
    generator = torch.Generator().manual_seed(3)
    shape = (37, 20)
    sources = [torch.randn(shape, generator=generator).to(torch.bfloat16) for _ in range(3)]
    weights = [0.2, 0.3, 0.5]
    whole = Accumulator(shape, torch.device("cpu"))
    for source, weight in zip(sources, weights):
        whole.add(source, weight, "s")
    pieces = Accumulator(shape, torch.device("cpu"))
    layouts = [split(shape, 0, 3), grid(shape, (2, 3)), None]  # the last source stores the chunk whole
    for i, (source, weight, boxes) in enumerate(zip(sources, weights, layouts)):
        if boxes is None:
            pieces.add(source, weight, "s")
            continue
        for offsets, sizes in boxes:
            region = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
            pieces.add(source[region], weight, "s", region=region, first=i == 0)
    assert torch.equal(whole.result(), pieces.result())
