"""The arithmetic: a weighted sum of N same-shaped tensors, accumulated wide, cast once.

Tensor-major streaming: one accumulator per tensor, the N sources read one after another
(memory-mapped, so each source tensor is paged in when it is added and released after),
so memory does not grow with N.
"""
import ctypes
import ctypes.util
import mmap
from typing import Sequence

import torch

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _madvise = _libc.madvise
    _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _madvise = None


def accumulator_dtype(stored: torch.dtype) -> torch.dtype:
    """fp32 for 16-bit weights; fp64 for fp32 (and wider) weights, so that the sum of N fp32
    values is correctly rounded once instead of carrying N fp32 rounding errors."""
    return torch.float64 if stored.itemsize >= 4 else torch.float32


def is_mergeable(value) -> bool:
    """Float tensors are averaged; integer tensors, extra state and non-tensors come from the newest."""
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def weighted_sum(sources: Sequence[torch.Tensor], weights: Sequence[float], device: torch.device,
                 *, sources_are_mapped: bool = False) -> torch.Tensor:
    """``sum_i weights[i] * sources[i]`` in a wide accumulator, returned on CPU in the stored dtype.

    ``sources_are_mapped``: the sources come from ``torch.load(mmap=True)``; their pages are
    dropped from this process after use (see ``release_pages``)."""
    assert len(sources) == len(weights) and sources
    stored = sources[-1].dtype
    acc = torch.empty(sources[0].shape, dtype=accumulator_dtype(stored), device=device)
    for index, (source, weight) in enumerate(zip(sources, weights)):
        src = source if device.type == "cpu" else source.to(device, non_blocking=True)
        if index == 0:
            acc.copy_(src)  # upcast first, then scale in the wide type
            acc.mul_(weight)
        else:
            acc.add_(src, alpha=weight)  # mixed dtype add_: the source is upcast inside the kernel
        if sources_are_mapped:
            release_pages(source)
    return acc.to(stored).cpu() if device.type != "cpu" else acc.to(stored)


def release_pages(tensor: torch.Tensor) -> None:
    """Drop a memory-mapped source tensor's pages from this process once it has been read.

    The pages stay in the page cache but no longer count towards this rank's resident set,
    which therefore stays flat in N. Only for tensors of ``torch.load(mmap=True)``: those are
    private, never-written file mappings whose dropped pages are re-read from the file if
    touched again (a tied weight sharing the storage); on anonymous memory the same call
    would zero the data. Only whole pages inside the tensor's own bytes are dropped."""
    if _madvise is None or tensor.device.type != "cpu":
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first = (start + _PAGE - 1) // _PAGE * _PAGE
    last = end // _PAGE * _PAGE
    if last > first:
        _madvise(first, last - first, _MADV_DONTNEED)

