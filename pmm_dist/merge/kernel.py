"""The arithmetic: a weighted sum of N same-shaped tensors, accumulated wide, cast once.

Tensor-major streaming: one small accumulator block at a time, the N sources' matching blocks
added into it one after another (memory-mapped, paged in when added and released after), so
memory does not grow with N.
"""
import ctypes
import ctypes.util
import math
import mmap
import sys
from typing import Optional, Sequence

import torch

from ..errors import InputError

_PAGE = mmap.PAGESIZE
_MADV_WILLNEED = 3
_MADV_DONTNEED = 4
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _madvise = _libc.madvise
    _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _madvise = None


# Elements per block: the float64 accumulator of one block (8 MiB) stays in cache while all N
# sources are added into it, so accumulator traffic never reaches memory.
BLOCK_ELEMENTS = 1 << 20
ACCUMULATOR_DTYPE = torch.float64


_NONFINITE_HINT = ("; merge a window without that checkpoint (--iterations, --last), or pass --on-nonfinite warn "
                   "(or ignore) to merge it anyway")


def is_mergeable(value) -> bool:
    """Float tensors are averaged; integer tensors, extra state and non-tensors come from the newest."""
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def weighted_sum(sources: Sequence[torch.Tensor], weights: Sequence[float], device: torch.device,
                 *, sources_are_mapped: bool = False, on_nonfinite: str = "ignore", what: str = "tensor",
                 source_names: Optional[Sequence[str]] = None, staged: Optional[bool] = None) -> torch.Tensor:
    """``sum_i weights[i] * sources[i]``, returned on CPU in the newest source's dtype.

    Accumulates in float64, block by block, and rounds once to the stored dtype. fp32
    accumulation would be enough for most elements, but where the N weighted values cancel
    (an element crossing zero between checkpoints) its error exceeds one ulp of the small
    result; in float64 the result is the correctly rounded weighted sum in practice.
    ``sources_are_mapped``: the sources come from ``torch.load(mmap=True)`` and each block's
    pages are dropped from this process once added (see ``advise_pages``).
    ``on_nonfinite``: "error" raises InputError naming ``what`` and the offending source in
    ``source_names`` when a NaN/Inf reaches the result, "warn" prints that, "ignore" does not
    look (one sum over the cached accumulator block, not a pass over the N sources).
    ``staged``: copy source blocks to ``device`` through the double-buffered stager (default:
    whenever ``device`` is not the CPU; tests force it on the CPU to exercise that path).
    """
    assert len(sources) == len(weights) and sources
    stored = sources[-1].dtype
    flat_sources = [s.reshape(-1) for s in sources]
    numel = flat_sources[0].numel()
    result = torch.empty(numel, dtype=stored)
    acc = torch.empty(min(numel, BLOCK_ELEMENTS), dtype=ACCUMULATOR_DTYPE, device=device)
    to_device = _Stager(device, stored, acc.numel()) if (device.type != "cpu" if staged is None else staged) \
        else (lambda piece: piece)
    for begin in range(0, numel, BLOCK_ELEMENTS):
        end = min(begin + BLOCK_ELEMENTS, numel)
        block = acc[: end - begin]
        if sources_are_mapped and end < numel:  # ask the kernel to read the next blocks ahead
            for source in flat_sources:
                advise_pages(source[end:end + BLOCK_ELEMENTS], _MADV_WILLNEED)
        for index, (source, weight) in enumerate(zip(flat_sources, weights)):
            piece = to_device(source[begin:end])
            if index == 0:
                block.copy_(piece)  # upcast first, then scale in the wide type
                block.mul_(weight)
            else:
                block.add_(piece, alpha=weight)  # mixed-dtype add_: upcast inside the kernel
            if sources_are_mapped:
                advise_pages(source[begin:end], _MADV_DONTNEED)
        # A NaN or Inf anywhere makes the sum non-finite: one reduction instead of an isfinite pass
        # (a float64 sum of stored-dtype values cannot overflow by itself).
        if on_nonfinite != "ignore" and not math.isfinite(block.sum().item()):
            _report_nonfinite(flat_sources, begin, end, on_nonfinite, what, source_names)
            on_nonfinite = "ignore"  # one report per tensor
        result[begin:end].copy_(block)  # the one rounding to the stored dtype
    return result.view(sources[-1].shape)


class Accumulator:
    """The weighted sum of ``weighted_sum``, fed one whole source at a time.

    For formats that can only read a stored chunk whole (a DCP blob): memory is one float64
    copy of the tensor plus the one source being added, whatever N. Element by element the
    arithmetic (first source copied and scaled, the others added with their weight, one
    rounding at the end) is the same as ``weighted_sum``'s, so results are identical.

    A source may also arrive in pieces (a checkpoint saved at another parallel layout stores
    this tensor chunked differently): ``add(piece, weight, name, region=..., first=...)`` for
    each piece, ``region`` the piece's index box in the accumulated tensor and ``first`` True
    for the pieces of the first source. Pieces of one source must cover the tensor exactly once
    (the planner verifies it), so each element sees the same operations as above.
    """

    def __init__(self, shape, device: torch.device, *, on_nonfinite: str = "ignore", what: str = "tensor"):
        self.acc = torch.empty(shape, dtype=ACCUMULATOR_DTYPE, device=device)
        self.device, self.on_nonfinite, self.what = device, on_nonfinite, what
        self.count = 0
        self.stored = None

    def add(self, source: torch.Tensor, weight: float, name: str, *, region: Optional[tuple] = None,
            first: Optional[bool] = None) -> None:
        src = source if self.device.type == "cpu" else source.to(self.device)
        target = self.acc if region is None else self.acc[region]
        if (self.count == 0) if first is None else first:
            target.copy_(src)
            target.mul_(weight)
        else:
            target.add_(src, alpha=weight)
        self.count += 1
        self.stored = source.dtype
        if self.on_nonfinite != "ignore" and not math.isfinite(target.sum().item()):
            message = f"non-finite values (NaN/Inf) in {self.what} of {name}" + \
                (_NONFINITE_HINT if self.on_nonfinite == "error" else "")
            if self.on_nonfinite == "error":
                raise InputError(message)
            print(f"pmm-dist: warning: {message}", file=sys.stderr, flush=True)
            self.on_nonfinite = "ignore"  # one report per tensor

    def result(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The sum rounded to the sources' dtype; with ``dtype``, then to that one, as a trainer
        rounds its fp32 masters to its bf16 model copy (so the two agree bit for bit)."""
        assert self.count, "no source was added"
        result = self.acc.to(self.stored)
        return (result if dtype is None else result.to(dtype)).cpu()


class _Stager:
    """Host-to-device copies of source blocks through two reusable staging buffers.

    On CUDA the buffers are pinned, so ``to(device, non_blocking=True)`` is a true asynchronous
    DMA: the copy of the next source block overlaps the add of this one, and an event per buffer
    guards its reuse. Reading memory-mapped pages into a pinned buffer is the one host copy.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, numel: int):
        self.device = device
        self.cuda = device.type == "cuda"
        self.buffers = [torch.empty(numel, dtype=dtype, pin_memory=self.cuda) for _ in range(2)]
        self.events = [None, None]
        self.turn = 0

    def __call__(self, piece: torch.Tensor) -> torch.Tensor:
        turn, self.turn = self.turn, self.turn ^ 1
        if self.events[turn] is not None:
            self.events[turn].synchronize()  # the copy that last used this buffer is done
        staging = self.buffers[turn][: piece.numel()]
        staging.copy_(piece)
        on_device = staging.to(self.device, non_blocking=True)
        if self.cuda:
            self.events[turn] = torch.cuda.Event()
            self.events[turn].record()
        return on_device


def _report_nonfinite(flat_sources, begin, end, policy, what, source_names) -> None:
    names = source_names or [f"source {i}" for i in range(len(flat_sources))]
    culprits = [names[i] for i, s in enumerate(flat_sources) if not bool(torch.isfinite(s[begin:end]).all())]
    message = (f"non-finite values (NaN/Inf) in {what} of {', '.join(culprits) or 'the weighted sum (overflow)'}"
               f"{_NONFINITE_HINT if policy == 'error' else ''}")
    if policy == "error":
        raise InputError(message)
    print(f"pmm-dist: warning: {message}", file=sys.stderr, flush=True)


def advise_pages(tensor: torch.Tensor, advice: int) -> None:
    """madvise the whole pages inside a memory-mapped source tensor's bytes.

    MADV_WILLNEED starts reading the next block from disk while this one is summed.
    MADV_DONTNEED drops a block's pages from this process once added: they stay in the page
    cache but no longer count towards this rank's resident set, which therefore stays flat in
    N. Only for tensors of ``torch.load(mmap=True)``: those are private, never-written file
    mappings whose dropped pages are re-read from the file if touched again (a tied weight
    sharing the storage); on anonymous memory DONTNEED would zero the data."""
    if _madvise is None or tensor.device.type != "cpu":
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first = (start + _PAGE - 1) // _PAGE * _PAGE
    last = end // _PAGE * _PAGE
    if last > first:
        _madvise(first, last - first, advice)

