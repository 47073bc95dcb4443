"""Boxes of a tensor's global index space: intersection, exact-cover checks, read spans.

A chunked checkpoint (DCP, torch_dist) stores each tensor as chunks, each a box of the global
tensor given by its offsets and sizes. Two checkpoints saved at different parallel layouts chunk
the same tensor differently; merging them needs, for each output chunk, the parts of each
source's chunks that overlap it. Everything here is a pure function of shapes, so the planner
can verify and map any layout from metadata alone, and it is unit-tested at scale without files.

A ``Box`` is ``(offsets, sizes)``, two tuples of ints of the tensor's number of dims (``((), ())``
for a scalar: one element).
"""
import bisect
import itertools
import math
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

Box = Tuple[Tuple[int, ...], Tuple[int, ...]]

# At most this many cells of the boundary grid are examined to locate a gap (a report only).
_MAX_GAP_CELLS = 1 << 20


def volume(sizes: Sequence[int]) -> int:
    return math.prod(sizes)


def intersect(a: Box, b: Box) -> Optional[Box]:
    """The overlap of two boxes, None if they share no element."""
    offsets, sizes = [], []
    for a_off, a_size, b_off, b_size in zip(a[0], a[1], b[0], b[1]):
        begin, end = max(a_off, b_off), min(a_off + a_size, b_off + b_size)
        if end <= begin:
            return None
        offsets.append(begin)
        sizes.append(end - begin)
    return tuple(offsets), tuple(sizes)


def describe(box: Box) -> str:
    """``[0:4, 8:16]``: the box as index ranges, for messages."""
    return "[" + ", ".join(f"{o}:{o + s}" for o, s in zip(box[0], box[1])) + "]"


def _sweep_dim(boxes: Sequence[Box]) -> int:
    """The dim along which the boxes' starts differ most: sweeping along it keeps few boxes active."""
    ndim = len(boxes[0][0]) if boxes else 0
    if ndim <= 1:
        return 0
    return max(range(ndim), key=lambda d: (len({b[0][d] for b in boxes}), -d))


def overlapping_pairs(left: Sequence[Box], right: Sequence[Box]) -> Iterator[Tuple[int, int, Box]]:
    """Every (i, j, overlap) with ``left[i]`` and ``right[j]`` sharing elements.

    A sweep along one dim: left boxes sorted by their start there; a right box is compared only
    with the left boxes that start before its end, scanning back from the last one and stopping
    where no earlier box reaches its start (a running maximum of the ends). For chunkings that
    split that dim (FSDP rows, TP columns) few boxes are compared, so this is near-linear in the
    number of chunks instead of quadratic."""
    nonempty_left = [i for i, b in enumerate(left) if volume(b[1]) > 0]
    nonempty_right = [j for j, b in enumerate(right) if volume(b[1]) > 0]
    if not nonempty_left or not nonempty_right:
        return
    if not left[nonempty_left[0]][0]:  # scalars: one element each
        for i in nonempty_left:
            for j in nonempty_right:
                yield i, j, ((), ())
        return
    dim = _sweep_dim([left[i] for i in nonempty_left] + [right[j] for j in nonempty_right])
    by_start = sorted(nonempty_left, key=lambda i: left[i][0][dim])
    starts = [left[i][0][dim] for i in by_start]
    reach = list(itertools.accumulate((left[i][0][dim] + left[i][1][dim] for i in by_start), max))
    for j in nonempty_right:
        box = right[j]
        begin, end = box[0][dim], box[0][dim] + box[1][dim]
        k = bisect.bisect_left(starts, end) - 1  # the last left box starting before this one's end
        while k >= 0 and reach[k] > begin:
            overlap = intersect(left[by_start[k]], box)
            if overlap is not None:
                yield by_start[k], j, overlap
            k -= 1


@dataclass(frozen=True)
class CoverageProblem:
    """Why a chunk list does not cover a tensor exactly once."""
    kind: str                  # "outside", "overlap" or "gap"
    region: Box                # the elements concerned (global indices)
    chunks: Tuple[int, ...]    # the chunks involved (indices into the list given)

    def describe(self, chunk_boxes: Sequence[Box]) -> str:
        named = " and ".join(f"the chunk at {list(chunk_boxes[c][0])} (sizes {list(chunk_boxes[c][1])})"
                             for c in self.chunks)
        if self.kind == "outside":
            return f"{named} reaches outside the global shape at {describe(self.region)}"
        if self.kind == "overlap":
            return f"elements {describe(self.region)} are stored twice, by {named}"
        return f"elements {describe(self.region)} are in no chunk (a gap)"


def coverage_problems(shape: Sequence[int], chunks: Sequence[Box], limit: int = 3) -> List[CoverageProblem]:
    """Up to ``limit`` reasons why ``chunks`` do not cover ``shape`` exactly once; [] if they do.

    Each chunk must lie inside the tensor, no two may overlap, and their volumes must add up
    to the tensor's: disjoint boxes inside the tensor with the full volume cover every element."""
    shape = tuple(shape)
    if tiles_along_one_dim(shape, chunks):
        return []
    problems: List[CoverageProblem] = []
    for c, (offsets, sizes) in enumerate(chunks):
        if len(offsets) != len(shape) or len(sizes) != len(shape) or \
                any(o < 0 or s < 0 or o + s > n for o, s, n in zip(offsets, sizes, shape)):
            problems.append(CoverageProblem("outside", (tuple(offsets), tuple(sizes)), (c,)))
            if len(problems) >= limit:
                return problems
    if problems:
        return problems
    for i, j, overlap in overlapping_pairs(chunks, chunks):
        if i < j:
            problems.append(CoverageProblem("overlap", overlap, (i, j)))
            if len(problems) >= limit:
                return problems
    if problems:
        return problems
    if sum(volume(sizes) for _, sizes in chunks) != volume(shape):
        problems.append(CoverageProblem("gap", find_gap(shape, chunks), ()))
    return problems


def tiles_along_one_dim(shape: Sequence[int], chunks: Sequence[Box]) -> bool:
    """Whether the chunks are slices of one dim, whole along every other, that follow one
    another from 0 to its end: then they cover the tensor exactly once. The common chunking
    (FSDP rows, TP columns), decided in one sort instead of the general sweep; False says
    nothing (the general check decides)."""
    if not shape or not chunks:
        return False
    first_offsets, first_sizes = chunks[0]
    cut = [d for d, (o, s, n) in enumerate(zip(first_offsets, first_sizes, shape)) if o != 0 or s != n]
    dim = cut[0] if cut else 0
    if len(cut) > 1:
        return False
    # Per chunk only slices and comparisons (a million chunks: this runs once per chunk).
    rank, after = len(shape), dim + 1
    whole_before, whole_after = tuple(shape[:dim]), tuple(shape[after:])
    zeros_before, zeros_after = (0,) * dim, (0,) * (rank - after)
    spans = []
    for offsets, sizes in chunks:
        if len(offsets) != rank or len(sizes) != rank or tuple(sizes[after:]) != whole_after or \
                tuple(offsets[after:]) != zeros_after or (dim and (tuple(sizes[:dim]) != whole_before or
                                                           tuple(offsets[:dim]) != zeros_before)):
            return False
        spans.append((offsets[dim], sizes[dim]))
    spans.sort()
    end = 0
    for begin, size in spans:
        if begin != end or size < 0:
            return False
        end += size
    return end == shape[dim]


def find_gap(shape: Sequence[int], chunks: Sequence[Box]) -> Box:
    """One box of elements that no (disjoint, in-bounds) chunk covers; the whole tensor if the
    boundary grid is too large to search (the message then still says there is a gap)."""
    shape = tuple(shape)
    cuts = [sorted({0, n} | {o for offsets, _ in chunks for o in offsets[d:d + 1]}
                   | {o + s for offsets, sizes in chunks for o, s in zip(offsets[d:d + 1], sizes[d:d + 1])})
            for d, n in enumerate(shape)]
    num_cells = math.prod(len(c) - 1 for c in cuts)
    if num_cells > _MAX_GAP_CELLS:
        return (tuple(0 for _ in shape), shape)
    covered = set()
    for offsets, sizes in chunks:
        if volume(sizes) == 0:
            continue
        ranges = [range(cut.index(o), cut.index(o + s)) for cut, o, s in zip(cuts, offsets, sizes)]
        covered.update(itertools.product(*ranges))
    for cell in itertools.product(*[range(len(c) - 1) for c in cuts]):
        if cell not in covered:
            return (tuple(cuts[d][k] for d, k in enumerate(cell)),
                    tuple(cuts[d][k + 1] - cuts[d][k] for d, k in enumerate(cell)))
    return (tuple(0 for _ in shape), shape)  # pragma: no cover - volumes said there is a gap


def map_chunks(outputs: Sequence[Box], stored: Sequence[Box]) -> List[List[Tuple[int, Box]]]:
    """For each output chunk, the stored chunks that overlap it and the overlaps, as
    ``[(stored index, overlap box), ...]`` in stored order (disjoint when ``stored`` tiles)."""
    pieces: List[List[Tuple[int, Box]]] = [[] for _ in outputs]
    for j, i, overlap in overlapping_pairs(stored, outputs):
        pieces[i].append((j, overlap))
    for found in pieces:
        found.sort()
    return pieces


def contiguous_strides(sizes: Sequence[int]) -> Tuple[int, ...]:
    """The strides torch gives a contiguous tensor of ``sizes`` (sizes 0 count as 1)."""
    strides, step = [], 1
    for size in reversed(sizes):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


# Separate reads of the runs of a box instead of one read of the slab holding them, when the
# bytes between two runs are at least a page: a smaller gap saves no disk read (the kernel
# reads whole pages) and costs a read call per run. (Measured on a warm page cache, both ways
# cost about the same: the float64 accumulation dominates; benchmarks/layouts.py.)
MIN_GAP_BYTES = 4096


@dataclass(frozen=True)
class ReadSpan:
    """Where a box's elements lie in a row-major chunk, in elements from the chunk's start.

    Runs of ``run`` contiguous elements, one per index of the leading dims: ``counts`` of them
    along each, ``steps`` apart, the first at ``first``, in the box's row-major order. The
    slab ``[first, end)`` is the one contiguous range from the box's first element to just past
    its last: it holds every run."""
    first: int
    run: int
    counts: Tuple[int, ...]
    steps: Tuple[int, ...]
    end: int

    @property
    def num_runs(self) -> int:
        return volume(self.counts)

    @property
    def numel(self) -> int:
        return self.num_runs * self.run

    @property
    def slab_numel(self) -> int:
        return self.end - self.first

    def starts(self) -> Iterator[int]:
        for index in itertools.product(*(range(c) for c in self.counts)):
            yield self.first + sum(i * step for i, step in zip(index, self.steps))

    def reads_runs(self, itemsize: int) -> bool:
        """Read run by run (True) or the slab at once: run by run when the gaps between runs
        are large (a box of columns of a wide chunk), the slab when the runs are contiguous or
        nearly so (a box of rows)."""
        return self.num_runs > 1 and (self.steps[-1] - self.run) * itemsize >= MIN_GAP_BYTES

    def num_bytes_read(self, itemsize: int) -> int:
        return (self.numel if self.reads_runs(itemsize) else self.slab_numel) * itemsize


def read_span(chunk_sizes: Sequence[int], box_offsets: Sequence[int], box_sizes: Sequence[int]) -> ReadSpan:
    """The runs of a box (``box_offsets`` relative to the chunk) inside a row-major chunk.

    The trailing dims the box spans whole merge into one run with the last dim it cuts; the
    dims before that one repeat the run."""
    if volume(box_sizes) == 0:
        return ReadSpan(0, 0, (0,), (0,), 0)
    strides = contiguous_strides(chunk_sizes)
    cut = len(chunk_sizes)  # dims from ``cut`` on are spanned whole
    while cut > 0 and box_offsets[cut - 1] == 0 and box_sizes[cut - 1] == chunk_sizes[cut - 1]:
        cut -= 1
    if cut == 0:
        return ReadSpan(0, volume(chunk_sizes), (), (), volume(chunk_sizes))
    first = sum(o * st for o, st in zip(box_offsets, strides))
    end = sum((o + s - 1) * st for o, s, st in zip(box_offsets, box_sizes, strides)) + 1
    return ReadSpan(first, box_sizes[cut - 1] * strides[cut - 1], tuple(box_sizes[:cut - 1]),
                    tuple(strides[:cut - 1]), end)
