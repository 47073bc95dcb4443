"""The arithmetic: a weighted sum of N same-shaped tensors, accumulated wide, cast once.

Tensor-major streaming: one small accumulator block at a time, the N sources' matching blocks
added into it one after another (memory-mapped, paged in when added and released after), so
memory does not grow with N.

Two implementations of the block arithmetic, bit-identical (tests/test_kernel.py checks both):
compiled loops from ``fused`` (numba, an optional dependency: ``pip install pmm_dist[fast]``)
and pure torch. Which one runs: ``PMM_DIST_KERNEL`` = ``auto`` (default: numba when importable),
``numba`` (required) or ``torch``.
"""
import ctypes
import ctypes.util
import functools
import math
import mmap
import os
import sys
import threading
from fractions import Fraction
from typing import Optional, Sequence, Tuple

import torch

from ..errors import InputError
from .result_memory import RESULTS

_PAGE = mmap.PAGESIZE
_MADV_WILLNEED = 3
_MADV_DONTNEED = 4
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _madvise = _libc.madvise
    _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _madvise = None


# Elements per block: the float64 accumulator of one block (512 KiB), the source blocks being
# added and the conversion buffers all stay in a core's L2 cache while the N sources are added,
# so accumulator traffic never reaches memory. Measured (benchmarks/kernel.py, bf16): 1M-element
# blocks (8 MiB, the previous size) are ~1.5x slower in torch; 32K-128K are alike, smaller ones
# pay per-call overhead.
BLOCK_ELEMENTS = 1 << 16
# Memory-mapped sources are advised (read ahead, pages released) every this many blocks: one
# madvise per source per 512 KiB of bf16 instead of one per block (a syscall and a TLB flush
# each); at most one such group per source is mapped in at a time, whatever the tensor size
# (N=16 bf16 sources: 8 MiB).
ADVICE_BLOCKS = 4
# How far ahead of the sum each mapped source is asked for (MADV_WILLNEED), in bytes. One group
# ahead (512 KiB) keeps a warm page cache fed, but from disk the reads of N sources interleave in
# requests that small and the disk waits for the arithmetic; this far ahead it streams. The pages
# go to the page cache (dropped from this process's RSS after use), N x 16 MiB at most in flight.
READ_AHEAD_BYTES = 16 << 20
# Below this many elements the compiled kernels are not worth importing numba for (~0.5 s): a
# merge of small tensors only never loads it.
FUSED_MIN_ELEMENTS = 1 << 16
ACCUMULATOR_DTYPE = torch.float64
# Denominators (and integer weights) of integer_weights: window lengths up to ~360 for WMA.
_MAX_DENOMINATOR = 1 << 16


_NONFINITE_HINT = ("; merge a window without that checkpoint (--iterations, --last), or pass --on-nonfinite warn "
                   "(or ignore) to merge it anyway")


def is_mergeable(value) -> bool:
    """Float tensors are averaged; integer tensors, extra state and non-tensors come from the newest."""
    return isinstance(value, torch.Tensor) and value.is_floating_point()


# -- which block arithmetic -----------------------------------------------------------------------
# Importing numba and loading the compiled kernels from its disk cache costs ~0.5-0.8 s per
# process, as much as summing a few GB faster saves. With ``auto`` they are therefore loaded in a
# background thread when the first large tensor arrives, and the torch kernel (bit-identical)
# runs until they are ready: a small merge never waits for them.
_UNSET, _LOADING = object(), object()
_fused_module = _UNSET  # _UNSET: not asked yet; _LOADING; None: not available; else the module
_fused_loader: Optional[threading.Thread] = None
_fused_lock = threading.Lock()


def fused_kernels(wait: bool = False):
    """The ``fused`` module (numba kernels) if it is ready, else None (numba missing, still
    loading, or ``PMM_DIST_KERNEL=torch``). ``wait``: until the background load has finished."""
    global _fused_module, _fused_loader
    with _fused_lock:
        if _fused_module is _UNSET:
            choice = os.environ.get("PMM_DIST_KERNEL", "auto")
            if choice not in ("auto", "numba", "torch"):
                raise ValueError(f"PMM_DIST_KERNEL must be auto, numba or torch, got {choice!r}")
            if choice == "torch":
                _fused_module = None
            elif choice == "numba":  # required: load now, and let an ImportError say why not
                _fused_module = _load_fused()
            else:
                _fused_module = _LOADING
                _fused_loader = threading.Thread(target=_load_fused_in_background, name="pmm-dist-kernels",
                                                 daemon=True)
                _fused_loader.start()
        loader = _fused_loader
    if wait and _fused_module is _LOADING and loader is not None:
        loader.join()
    module = _fused_module
    return None if module is _LOADING else module


def fused_kernels_pending() -> bool:
    """True while the background load of the compiled loops is under way."""
    return _fused_module is _LOADING


def _load_fused():
    from . import fused
    fused.warm_up()
    return fused


def _load_fused_in_background() -> None:
    global _fused_module
    try:
        module = _load_fused()
    except Exception:  # noqa: BLE001 - numba missing or broken: the torch kernel does the work
        module = None
    _fused_module = module


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]  # torch.bfloat16 -> "bfloat16", the keys of fused's tables


def _numpy_view(tensor: torch.Tensor, dtype):
    """The tensor's memory as a numpy array of ``dtype`` (same item size), no copy."""
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.detach().view(as_int).numpy().view(dtype)


class _Widener:
    """Source blocks widened to float64 by same-dtype copies into reusable buffers: bf16/fp16 ->
    fp32 -> fp64, each copy vectorised (torch's mixed-dtype ``add_`` converts element by element,
    ~2x slower), the buffers small enough to stay in cache."""

    def __init__(self, block_size: int, device: torch.device):
        self.wide = torch.empty(block_size, dtype=ACCUMULATOR_DTYPE, device=device)
        self.narrow = torch.empty(block_size, dtype=torch.float32, device=device)

    def __call__(self, piece: torch.Tensor) -> torch.Tensor:
        if piece.dtype == ACCUMULATOR_DTYPE:
            return piece
        if piece.dtype.itemsize < 4:
            narrow = self.narrow[: piece.numel()]
            narrow.copy_(piece)
            piece = narrow
        wide = self.wide[: piece.numel()]
        wide.copy_(piece)
        return wide


def _accumulate_torch(block: torch.Tensor, piece: torch.Tensor, weight: float, first: bool) -> None:
    if first:
        torch.mul(piece, weight, out=block)  # the first source scaled in the wide type
    else:
        block.add_(piece, alpha=weight)  # one rounding: torch's add_ is a fused multiply-add


class _TorchBlocks:
    """The block arithmetic in torch; ``to_device``: the staging of source blocks (CUDA)."""

    def __init__(self, sources, weights, result, block_size, device, to_device):
        self.sources, self.weights, self.result = sources, weights, result
        self.acc = torch.empty(block_size, dtype=ACCUMULATOR_DTYPE, device=device)
        self.widen = _Widener(block_size, device)
        self.to_device = to_device

    def add_block(self, begin, end):
        block = self.acc[: end - begin]
        for index, (source, weight) in enumerate(zip(self.sources, self.weights)):
            _accumulate_torch(block, self.widen(self.to_device(source[begin:end])), weight, index == 0)
        return block

    def all_finite(self, block) -> bool:
        # A NaN or Inf anywhere makes the sum non-finite: one reduction instead of an isfinite pass
        # (a float64 sum of stored-dtype values cannot overflow by itself).
        return math.isfinite(block.sum().item())

    def store(self, block, begin, end):
        self.result[begin:end].copy_(block)  # the one rounding to the stored dtype


class _FusedBlocks:
    """The same arithmetic in the compiled loops of ``fused``: each source block widened and
    added in one pass (see that module). Only for CPU tensors of the dtypes it has kernels for."""

    def __init__(self, module, sources, weights, result, block_size):
        self.module = module
        names = [_dtype_name(source.dtype) for source in sources]
        views, scales, adds = [], [], []
        for source, name in zip(sources, names):
            view_as, scale, add = module.SOURCE_KERNELS[name]
            views.append(_numpy_view(source, view_as))
            scales.append(scale)
            adds.append(add)
        weights = [float(w) for w in weights]
        # The calls that add one block, in source order: up to four consecutive sources of one
        # dtype in one call (fused.GROUP_KERNELS), the first call scaling instead of adding.
        self.steps = []
        index = 0
        while index < len(views):
            same = 1
            while index + same < len(views) and names[index + same] == names[index]:
                same += 1
            groups = module.GROUP_KERNELS.get(adds[index], {})
            count = max([c for c in groups if c <= same], default=1)
            group_scale, group_add = groups[count] if count > 1 else (scales[index], adds[index])
            self.steps.append((group_scale if index == 0 else group_add, views[index:index + count],
                               weights[index:index + count]))
            index += count
        view_as, self.store_kernel = module.STORE_KERNELS[_dtype_name(result.dtype)]
        self.result = _numpy_view(result, view_as)
        self.acc_tensor = torch.empty(block_size, dtype=ACCUMULATOR_DTYPE)
        self.acc = self.acc_tensor.numpy()

    @staticmethod
    def supports(module, sources, result) -> bool:
        names = [_dtype_name(t.dtype) for t in sources]
        return all(n in module.SOURCE_KERNELS for n in names) and \
            _dtype_name(result.dtype) in module.STORE_KERNELS

    def add_block(self, begin, end):
        block = self.acc[: end - begin]
        for add, views, weights in self.steps:
            arguments = []
            for view, weight in zip(views, weights):
                arguments += (view[begin:end], weight)
            add(block, *arguments)
        return block

    def all_finite(self, block) -> bool:
        return bool(self.module.all_finite(block))

    def store(self, block, begin, end):
        self.store_kernel(self.result[begin:end], block)


def integer_weights(weights: Sequence[float]) -> Optional[Tuple[Tuple[float, ...], int]]:
    """(k_1, ..., k_N, n) when every weight is the float nearest k_i / n for small integers k_i
    (SMA: 1/N; WMA: i / (N(N+1)/2); integer --weights, normalised), else None.

    Why: the sum of the sources times small integers is exact in float64 for stored-dtype values
    of similar size, so dividing it by n once gives the exact weighted sum, correctly rounded. A
    mean that lies exactly halfway between two stored values (common: sums of fp32 values have a
    few more bits than fp32, and dividing by an even n halves them) rounds to even, as the float64
    reference does, and values whose weighted sum is exactly 0 give 0. Multiplying each source by
    the rounded k_i / n lands just off such values instead (one ulp off in ~1% of fp32 elements,
    within tolerance but not the nearest value). The watcher's running sums (the window's sum,
    WMA's ramp) are exact too and divided once by the same n (watcher.context), so its merges are
    these bits.

    None too when n is a power of two: the weights are then exact and scaling by them commutes
    with every rounding of the sum, so the weighted sum as it stands gives the same bits, without a
    pass of divisions (a third of the arithmetic's time for N = 4; most SMA windows are 2, 4, 8, 16)."""
    return _integer_weights(tuple(float(w) for w in weights)) if weights else None


@functools.lru_cache(maxsize=256)
def _integer_weights(weights: Tuple[float, ...]) -> Optional[Tuple[Tuple[float, ...], int]]:
    # cached: ~0.15 ms of fractions per call, and a merge calls it once per tensor with the same weights
    if not all(math.isfinite(w) for w in weights):
        return None
    fractions = [Fraction(w).limit_denominator(_MAX_DENOMINATOR) for w in weights]
    n = math.lcm(*(f.denominator for f in fractions))
    if n <= 1 or n > _MAX_DENOMINATOR or not n & (n - 1):
        return None
    ks = [f.numerator * (n // f.denominator) for f in fractions]
    if any(abs(k) >= _MAX_DENOMINATOR or k / n != w for k, w in zip(ks, weights)):
        return None
    return tuple(float(k) for k in ks), n


def divisor_of(coefficient: float) -> Optional[int]:
    """n where ``coefficient`` is the float nearest 1/n for an integer n > 1 that is not a power of
    two (the division ``integer_weights`` makes), else None."""
    if not coefficient > 0:
        return None
    n = round(1.0 / coefficient)
    return n if 1 < n <= _MAX_DENOMINATOR and 1.0 / n == coefficient and n & (n - 1) else None


# (stored dtype, model dtype) pairs for which rounding the float64 sum straight to the model's
# dtype gives the bits of rounding it to the stored dtype first and then through float32 to the
# model's (the trainer's copy of its masters into the model): bf16(f32(f64(x))) = bf16(f32(x))
# as every store to bf16 rounds through float32 (fused.store_bf16, torch's copy_), and
# f32(f64(x)) = f32(x).
_ONE_STORE_ROUNDINGS = {(torch.float32, torch.bfloat16), (torch.float64, torch.bfloat16), (torch.float64, torch.float32)}


def weighted_sum(sources: Sequence[torch.Tensor], weights: Sequence[float], device: torch.device,
                 *, sources_are_mapped: bool = False, on_nonfinite: str = "ignore", what: str = "tensor",
                 source_names: Optional[Sequence[str]] = None, staged: Optional[bool] = None,
                 rounded_to: Optional[torch.dtype] = None) -> torch.Tensor:
    """``sum_i weights[i] * sources[i]``, returned on CPU in the newest source's dtype; with
    ``rounded_to``, then rounded through float32 to that dtype, as a trainer rounds its fp32
    masters to its model copy (``masters.rounded``). Where one store gives those bits
    (_ONE_STORE_ROUNDINGS) it is done in one: no fp32 result to write, fault in and read again.

    Accumulates in float64, block by block, and rounds once to the stored dtype. fp32
    accumulation would be enough for most elements, but where the N weighted values cancel
    (an element crossing zero between checkpoints) its error exceeds one ulp of the small
    result; in float64 the result is the correctly rounded weighted sum in practice.
    ``sources_are_mapped``: the sources come from ``torch.load(mmap=True)`` and their pages are
    read ahead and dropped from this process once added (see ``advise_pages``).
    ``on_nonfinite``: "error" raises InputError naming ``what`` and the offending source in
    ``source_names`` when a NaN/Inf reaches the result, "warn" prints that, "ignore" does not
    look (one vectorised test of the cached accumulator block, not a pass over the N sources).
    ``staged``: copy source blocks to ``device`` through the double-buffered stager (default:
    whenever ``device`` is not the CPU; tests force it on the CPU to exercise that path).
    """
    assert len(sources) == len(weights) and sources
    exact = integer_weights(weights)
    divisor = None
    if exact is not None:
        weights, divisor = exact
    stored = sources[-1].dtype
    result_dtype, then_rounded = stored, rounded_to is not None and rounded_to != stored
    if then_rounded and (stored, rounded_to) in _ONE_STORE_ROUNDINGS:
        result_dtype, then_rounded = rounded_to, False
    # detached: the arithmetic writes into buffers (out=, compiled loops), which autograd refuses
    # for a source that requires grad (DeepSpeed saves parameters so)
    flat_sources = [s.detach().reshape(-1) for s in sources]
    numel = flat_sources[0].numel()
    if any(s.numel() != numel for s in flat_sources):  # the compiled loops do not check bounds
        raise ValueError(f"{what}: sources of different sizes {[s.numel() for s in flat_sources]}")
    result = RESULTS.empty(numel, result_dtype)
    block_size = max(1, min(numel, BLOCK_ELEMENTS))
    staged = device.type != "cpu" if staged is None else staged
    may_fuse = device.type == "cpu" and not staged and numel >= FUSED_MIN_ELEMENTS
    blocks = None
    advice = _PageAdvice(flat_sources, BLOCK_ELEMENTS * ADVICE_BLOCKS) if sources_are_mapped else None
    for begin in range(0, numel, BLOCK_ELEMENTS):
        end = min(begin + BLOCK_ELEMENTS, numel)
        # The compiled loops load in the background: a large tensor switches to them between two
        # blocks once they are ready (both give the same bits, block by block).
        if blocks is None or (may_fuse and not isinstance(blocks, _FusedBlocks)):
            module = fused_kernels() if may_fuse else None
            if module is not None and _FusedBlocks.supports(module, flat_sources, result):
                blocks = _FusedBlocks(module, flat_sources, weights, result, block_size)
            elif blocks is None:
                to_device = _Stager(device, stored, block_size) if staged else (lambda piece: piece)
                blocks = _TorchBlocks(flat_sources, weights, result, block_size, device, to_device)
                may_fuse = may_fuse and fused_kernels_pending()
        if advice is not None:
            advice.before(begin)
        block = blocks.add_block(begin, end)
        if divisor is not None:
            block /= divisor  # in place, numpy or torch: one correctly rounded division
        if on_nonfinite != "ignore" and not blocks.all_finite(block):
            _report_nonfinite(flat_sources, begin, end, on_nonfinite, what, source_names)
            on_nonfinite = "ignore"  # one report per tensor
        blocks.store(block, begin, end)
    if advice is not None:
        advice.done()
    if then_rounded:
        result = rounded_through_float32(result, rounded_to)
    return _as_stored(result.view(sources[-1].shape), sources)


def rounded_through_float32(result: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A merge in its stored dtype as a model of ``dtype`` holds it: rounded through float32, as
    a trainer rounds its fp32 masters (``masters.rounded``); ``result`` where it is ``dtype``."""
    return result if result.dtype == dtype else result.to(torch.float32).to(dtype)


def merged_requires_grad(sources: Sequence[torch.Tensor]) -> bool:
    """Whether the merge of ``sources`` is flagged ``requires_grad``: when a source was, as the
    sources are saved (the flag is part of what torch.save writes)."""
    return any(s.requires_grad for s in sources)


def _as_stored(result: torch.Tensor, sources) -> torch.Tensor:
    return result.requires_grad_(merged_requires_grad(sources))


class _PageAdvice:
    """madvise of memory-mapped sources by groups of blocks: at the start of each group, the next
    group's pages are asked for (MADV_WILLNEED: the disk reads ahead while this group is summed)
    and the previous group's released (MADV_DONTNEED, see ``advise_pages``). WILLNEED fills the
    page cache only, so at most one group per source is mapped in this process at a time."""

    def __init__(self, sources, group: int):
        self.sources, self.group = sources, group
        self.numel = sources[0].numel()
        self.ahead = max(2 * group, READ_AHEAD_BYTES // max(1, min(s.element_size() for s in sources)))
        self.advised = 0   # elements asked for (WILLNEED), in every source
        self.released = 0  # elements whose pages are released, in every source

    def before(self, begin: int) -> None:
        if begin % self.group:
            return
        # Asked for in steps of half the distance: one madvise per source per 8 MiB, at least
        # 8 MiB ahead of the sum.
        target = min(self.numel, begin + self.ahead)
        if target >= min(self.numel, self.advised + self.ahead // 2) and target > self.advised:
            for source in self.sources:
                advise_pages(source[self.advised:target], _MADV_WILLNEED)
            self.advised = target
        self._release(begin)

    def done(self) -> None:
        self._release(self.numel)

    def _release(self, upto: int) -> None:
        if upto > self.released:
            for source in self.sources:
                # from the page holding the first unreleased element: its part before that element
                # was added already (the previous group), except on the tensor's first page
                advise_pages(source[self.released:upto], _MADV_DONTNEED, whole_first_page=self.released > 0)
            self.released = upto


class Accumulator:
    """The weighted sum of ``weighted_sum``, fed one whole source at a time.

    For formats that can only read a stored chunk whole (a DCP blob): memory is one float64
    copy of the tensor plus the one source being added, whatever N. Element by element the
    arithmetic (first source scaled, the others added with their weight in one fused
    multiply-add, one rounding at the end) is the same as ``weighted_sum``'s, so results are
    identical; on the CPU it runs in the same compiled loops when numba is there.

    A source may also arrive in pieces (a checkpoint saved at another parallel layout stores
    this tensor chunked differently): ``add(piece, weight, name, region=..., first=...)`` for
    each piece, ``region`` the piece's index box in the accumulated tensor and ``first`` True
    for the pieces of the first source. Pieces of one source must cover the tensor exactly once
    (the planner verifies it), so each element sees the same operations as above (torch's
    ``add_(alpha=)``, which the compiled loops reproduce bit for bit).
    """

    def __init__(self, shape, device: torch.device, *, on_nonfinite: str = "ignore", what: str = "tensor",
                 weights: Optional[Sequence[float]] = None):
        self.acc = torch.empty(shape, dtype=ACCUMULATOR_DTYPE, device=device)
        # ``weights``: all the merge's weights, to sum with integer weights and divide once where
        # they are k_i / n, as weighted_sum does (each weight given to ``add`` stands for its k_i).
        exact = integer_weights(weights) if weights else None
        self._divisor = exact and exact[1]
        self._integer = dict(zip(weights, exact[0])) if exact else {}  # each weight -> its k
        self.device, self.on_nonfinite, self.what = device, on_nonfinite, what
        self.count = 0
        self.stored = None
        self.requires_grad = False
        self._may_fuse = device.type == "cpu" and self.acc.numel() >= FUSED_MIN_ELEMENTS
        self._fused = self._acc_view = None
        self._use_fused_when_ready()

    def _use_fused_when_ready(self) -> None:
        """The compiled loops once loaded (between two sources: both give the same bits)."""
        if self._fused is None and self._may_fuse:
            self._fused = fused_kernels()
            if self._fused is not None:
                self._acc_view = self.acc.view(-1).numpy()
            else:
                self._may_fuse = fused_kernels_pending()

    def add(self, source: torch.Tensor, weight: float, name: str, *, region: Optional[tuple] = None,
            first: Optional[bool] = None) -> None:
        src = (source if self.device.type == "cpu" else source.to(self.device)).detach()
        if self._divisor is not None:
            weight = self._integer[weight]
        if region is not None:  # a piece: into its box of the sum (a strided view)
            target = self.acc[region]
            if first:
                target.copy_(src)
                target.mul_(weight)
            else:
                target.add_(src, alpha=weight)
        else:
            if source.numel() != self.acc.numel():
                raise ValueError(f"{self.what}: {source.numel()} elements added to a sum of {self.acc.numel()}")
            self._use_fused_when_ready()
            kernels = self._fused.SOURCE_KERNELS.get(_dtype_name(src.dtype)) if self._fused else None
            if kernels is not None:
                view_as, scale, add = kernels
                (scale if self.count == 0 else add)(self._acc_view, _numpy_view(src.reshape(-1), view_as),
                                                    float(weight))
            else:  # block by block through cache-sized buffers: no second full-size copy
                acc, flat = self.acc.view(-1), src.reshape(-1)
                widen = _Widener(min(acc.numel(), BLOCK_ELEMENTS), self.device)
                for begin in range(0, acc.numel(), BLOCK_ELEMENTS):
                    end = min(begin + BLOCK_ELEMENTS, acc.numel())
                    _accumulate_torch(acc[begin:end], widen(flat[begin:end]), weight, self.count == 0)
        self.count += 1
        self.stored = source.dtype
        self.requires_grad = self.requires_grad or source.requires_grad
        if self.on_nonfinite != "ignore" and not (
                math.isfinite(target.sum().item()) if region is not None else self._all_finite()):
            message = f"non-finite values (NaN/Inf) in {self.what} of {name}" + \
                (_NONFINITE_HINT if self.on_nonfinite == "error" else "")
            if self.on_nonfinite == "error":
                raise InputError(message)
            print(f"pmm-dist: warning: {message}", file=sys.stderr, flush=True)
            self.on_nonfinite = "ignore"  # one report per tensor

    def _all_finite(self) -> bool:
        if self._acc_view is not None:
            return bool(self._fused.all_finite(self._acc_view))
        return math.isfinite(self.acc.sum().item())

    def result(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The sum rounded to the sources' dtype; with ``dtype``, then to that one, as a trainer
        rounds its fp32 masters to its bf16 model copy (so the two agree bit for bit)."""
        assert self.count, "no source was added"
        if self._divisor is not None:
            self.acc /= self._divisor
            self._divisor = None  # divided once, whatever calls follow
        store = self._fused.STORE_KERNELS.get(_dtype_name(self.stored)) if self._fused else None
        if store is None:
            result = self.acc.to(self.stored).cpu()
        else:
            result = RESULTS.empty(self.acc.numel(), self.stored).view(self.acc.shape)
            view_as, kernel = store
            kernel(_numpy_view(result.view(-1), view_as), self._acc_view)
        return (result if dtype is None else result.to(dtype)).requires_grad_(self.requires_grad)


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


def release_pages(tensor: torch.Tensor) -> None:
    """Drop a memory-mapped source tensor's whole pages from this process (MADV_DONTNEED, see
    ``advise_pages``: only for tensors of ``torch.load(mmap=True)``)."""
    advise_pages(tensor, _MADV_DONTNEED)


def advise_pages(tensor: torch.Tensor, advice: int, *, whole_first_page: bool = False) -> None:
    """madvise the pages of a memory-mapped source tensor's bytes.

    MADV_WILLNEED starts reading the next block from disk while this one is summed: every page
    the bytes touch (reading a neighbour's page ahead is harmless).
    MADV_DONTNEED, on the whole pages inside the bytes only (``whole_first_page``: and the page
    the first byte is on, when what precedes it there is done with), drops a block's pages from this process once added: they stay in the page
    cache but no longer count towards this rank's resident set, which therefore stays flat in
    N. Only for tensors of ``torch.load(mmap=True)``: those are private, never-written file
    mappings whose dropped pages are re-read from the file if touched again (a tied weight
    sharing the storage); on anonymous memory DONTNEED would zero the data."""
    if _madvise is None or tensor.device.type != "cpu":
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    outward = advice == _MADV_WILLNEED
    first = start // _PAGE * _PAGE if whole_first_page or outward else (start + _PAGE - 1) // _PAGE * _PAGE
    last = (end + _PAGE - 1) // _PAGE * _PAGE if outward else end // _PAGE * _PAGE
    if last > first:
        _madvise(first, last - first, advice)

