"""Kernel micro-benchmark: GB/s of stored-dtype input per core for the weighted sum of N tensors.

    python -m benchmarks.kernel                       # 8 sources of 4M bf16 elements, 5 rounds
    python -m benchmarks.kernel --sources 16 --elements 8M --dtype float32 --rounds 7
    python -m benchmarks.kernel --mapped              # sources torch.load(mmap=True) from files

One thread (``torch.set_num_threads(1)``: "per core"). Every candidate runs on the same tensors,
the candidates interleaved round after round, so a busy machine slows them alike: compare the
ratios to ``before``, not the absolute figures. Exact candidates must be bit-identical to
``before`` (checked every round); all are checked against the float64 reference to one ulp.

Candidates:
- before: the kernel as it was (1M-element float64 blocks, mixed-dtype ``add_``), kept here verbatim
  as the baseline;
- torch: today's pure-torch fallback (32K blocks, bf16 -> fp32 -> fp64 same-dtype copies);
- fused: today's default, numba loops widening and adding in one pass (pmm_dist.merge.fused),
  up to four sources per pass;
- fused, one source per pass: the same without ``fused.GROUP_KERNELS`` (the kernel before they came);
- fp32 EFT: a candidate measured, not adopted: float32 double-float accumulation (weights split
  in two float32s, products by FMA TwoProd, sums by TwoSum; ~48 bits) in numba, within one ulp
  but not bit-identical to the float64 kernels;
- fp32 only (inexact): fp32 accumulation with mixed-dtype ``add_``, what the exact kernels are
  measured against (not within one ulp where the weighted values cancel);
- read only: one ``sum`` per source, a rough floor for touching every input byte once.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from pmm_dist.merge import kernel

GB = 1e9


def before(sources, weights):
    """The kernel before issue 12 (merge/kernel.py at cc8c16d), CPU path, without page advice."""
    block_elements = 1 << 20
    flat = [s.reshape(-1) for s in sources]
    numel = flat[0].numel()
    result = torch.empty(numel, dtype=sources[-1].dtype)
    acc = torch.empty(min(numel, block_elements), dtype=torch.float64)
    for begin in range(0, numel, block_elements):
        end = min(begin + block_elements, numel)
        block = acc[: end - begin]
        for index, (source, weight) in enumerate(zip(flat, weights)):
            if index == 0:
                block.copy_(source[begin:end])
                block.mul_(weight)
            else:
                block.add_(source[begin:end], alpha=weight)
        result[begin:end].copy_(block)
    return result


def _with_backend(backend, grouped=True):
    def run(sources, weights, mapped=False):
        saved = kernel._fused_module
        kernel._fused_module = None if backend == "torch" else kernel.fused_kernels(wait=True)
        saved_groups = kernel._fused_module.GROUP_KERNELS if kernel._fused_module else None
        if not grouped:
            kernel._fused_module.GROUP_KERNELS = {}
        try:
            return kernel.weighted_sum(sources, weights, torch.device("cpu"), sources_are_mapped=mapped,
                                       on_nonfinite="error")
        finally:
            if saved_groups is not None:
                kernel._fused_module.GROUP_KERNELS = saved_groups
            kernel._fused_module = saved
    return run


def fp32_only(sources, weights):
    flat = [s.reshape(-1) for s in sources]
    block_elements = 1 << 15
    result = torch.empty(flat[0].numel(), dtype=sources[-1].dtype)
    acc = torch.empty(min(flat[0].numel(), block_elements), dtype=torch.float32)
    for begin in range(0, flat[0].numel(), block_elements):
        end = min(begin + block_elements, flat[0].numel())
        block = acc[: end - begin]
        for index, (source, weight) in enumerate(zip(flat, weights)):
            if index == 0:
                torch.mul(source[begin:end], weight, out=block)
            else:
                block.add_(source[begin:end], alpha=weight)
        result[begin:end].copy_(block)
    return result


_EFT = None


def _eft_kernels():
    """The double-float (two float32s) accumulation, compiled on first use (benchmark only)."""
    global _EFT
    if _EFT is not None:
        return _EFT
    import numba
    import numpy as np
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    from pmm_dist.merge.fused import _u32_as_f32, store_bf16

    @intrinsic
    def fma32(typingctx, a, b, c):
        def codegen(context, builder, signature, args):
            single = ir.FloatType()
            fn = builder.module.declare_intrinsic("llvm.fma", [single], ir.FunctionType(single, [single] * 3))
            return builder.call(fn, args)
        return types.float32(types.float32, types.float32, types.float32), codegen

    @numba.njit(nogil=True, boundscheck=False, fastmath=False)
    def scale(hi, lo, src, w_hi, w_lo):
        for i in range(hi.shape[0]):
            x = _u32_as_f32(np.uint32(src[i]) << np.uint32(16))
            p = w_hi * x
            e = fma32(w_hi, x, -p) + w_lo * x  # TwoProd, plus the weight's low part
            h = p + e
            lo[i] = e - (h - p)
            hi[i] = h

    @numba.njit(nogil=True, boundscheck=False, fastmath=False)
    def accumulate(hi, lo, src, w_hi, w_lo):
        for i in range(hi.shape[0]):
            x = _u32_as_f32(np.uint32(src[i]) << np.uint32(16))
            p = w_hi * x
            e = fma32(w_hi, x, -p) + w_lo * x
            a = hi[i]
            s = a + p  # TwoSum
            bp = s - a
            t = (a - (s - bp)) + (p - bp) + e + lo[i]
            h = s + t  # renormalise
            lo[i] = t - (h - s)
            hi[i] = h

    def add(hi, lo, src, w_hi, w_lo, first):
        (scale if first else accumulate)(hi, lo, src, w_hi, w_lo)

    @numba.njit(nogil=True, boundscheck=False, fastmath=False)
    def collapse(acc, hi, lo):
        for i in range(hi.shape[0]):
            acc[i] = np.float64(hi[i]) + np.float64(lo[i])

    _EFT = (add, collapse, store_bf16)
    return _EFT


def fp32_eft(sources, weights):
    import numpy as np
    add, collapse, store = _eft_kernels()
    block = 1 << 16
    numel = sources[0].numel()
    views = [kernel._numpy_view(s.reshape(-1), np.uint16) for s in sources]
    split = [(np.float32(w), np.float32(w - float(np.float32(w)))) for w in weights]
    hi, lo, acc = np.empty(block, np.float32), np.empty(block, np.float32), np.empty(block)
    result = torch.empty(numel, dtype=torch.bfloat16)
    out = kernel._numpy_view(result, np.uint16)
    for begin in range(0, numel, block):
        end = min(begin + block, numel)
        n = end - begin
        for index, (view, (w_hi, w_lo)) in enumerate(zip(views, split)):
            add(hi[:n], lo[:n], view[begin:end], w_hi, w_lo, index == 0)
        collapse(acc[:n], hi[:n], lo[:n])
        store(out[begin:end], acc[:n])
    return result


def read_only(sources, weights):
    for source in sources:
        source.sum()
    return None


def candidates() -> dict:
    found = {"before": (before, True), "torch": (_with_backend("torch"), True)}
    if kernel.fused_kernels(wait=True) is not None:
        found["fused"] = (_with_backend("fused"), True)
        found["fused, one source per pass"] = (_with_backend("fused", grouped=False), True)
        found["fp32 EFT (candidate)"] = (fp32_eft, "one ulp")
    found["fp32 only (inexact)"] = (fp32_only, False)
    found["read only"] = (read_only, False)
    return found


def make_sources(num_sources: int, numel: int, dtype: torch.dtype, seed: int = 0):
    """Checkpoints of one run: a common tensor plus small drifts (so some elements cross zero)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=gen)
    return [(base + 0.05 * torch.randn(numel, generator=gen)).to(dtype) for _ in range(num_sources)]


def ema_weights(n: int, alpha: float = 0.2):
    # irregular weights: products are not exact, so fma vs mul+add would show
    return [(1 - alpha) ** (n - 1)] + [alpha * (1 - alpha) ** (n - i) for i in range(2, n + 1)]


def _mapped(sources, work):
    paths = []
    for i, source in enumerate(sources):
        path = os.path.join(work, f"source{i}.pt")
        torch.save({"w": source}, path)
        paths.append(path)
    return [torch.load(p, mmap=True, weights_only=True)["w"] for p in paths]


def measure(num_sources=8, numel=1 << 22, dtype=torch.bfloat16, rounds=5, mapped=False, verbose=True) -> dict:
    """Best GB/s per candidate over ``rounds`` interleaved rounds, and the ratio to ``before``."""
    torch.set_num_threads(1)
    sources = make_sources(num_sources, numel, dtype)
    weights = ema_weights(num_sources)
    with tempfile.TemporaryDirectory() as work:
        if mapped:
            sources = _mapped(sources, work)
        found = candidates()
        input_bytes = sum(s.numel() * s.element_size() for s in sources)
        expected = before(sources, weights)
        _check_one_ulp(expected, sources, weights)
        for name, (fn, _) in list(found.items()):  # compile / warm up
            if name.startswith("fp32 EFT") and dtype != torch.bfloat16:
                del found[name]  # written for bf16 sources only
                continue
            fn([s[:1 << 16] for s in sources], weights)
        speeds = {name: [] for name in found}
        checked_eft = False
        for _ in range(rounds):
            for name, (fn, exact) in found.items():
                args = (sources, weights, True) if mapped and name.startswith(("torch", "fused")) else (sources, weights)
                started = time.perf_counter()
                out = fn(*args)
                speeds[name].append(input_bytes / (time.perf_counter() - started) / GB)
                if exact == "one ulp" and not checked_eft and dtype == torch.bfloat16:
                    _check_one_ulp(out, sources, weights)
                    checked_eft = True
                elif exact is True:
                    assert torch.equal(out.view(torch.int16), expected.view(torch.int16)) if dtype != torch.float64 \
                        else torch.equal(out, expected), f"{name} differs from before"
    best = {name: max(v) for name, v in speeds.items()}
    result = {"sources": num_sources, "elements": numel, "dtype": str(dtype).rsplit(".", 1)[-1], "mapped": mapped,
              "rounds": rounds, "gbps_best": best, "gbps_median": {n: statistics.median(v) for n, v in speeds.items()},
              "ratio_to_before": {n: best[n] / best["before"] for n in best}}
    if verbose:
        print(f"kernel: {num_sources} x {numel} {result['dtype']}{' (mapped)' if mapped else ''}, "
              f"1 thread, best of {rounds}")
        for name in found:
            print(f"  {name:27s} {best[name]:6.2f} GB/s (median {result['gbps_median'][name]:5.2f})  "
                  f"{result['ratio_to_before'][name]:5.2f}x before", flush=True)
    return result


def _check_one_ulp(merged, sources, weights):
    from tests.helpers import assert_merged_within_one_ulp  # the tests' independent reference
    sample = slice(0, min(merged.numel(), 1 << 18))
    assert_merged_within_one_ulp(merged[sample], [s[sample] for s in sources], weights, "kernel benchmark")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", type=int, default=8)
    parser.add_argument("--elements", default="4M", help="elements per source (K/M suffixes)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mapped", action="store_true", help="sources memory-mapped from files (page advice on)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line at the end")
    args = parser.parse_args(argv)
    scale = {"K": 1 << 10, "M": 1 << 20}.get(args.elements[-1:].upper(), 1)
    numel = int(args.elements.rstrip("kKmM")) * scale
    result = measure(args.sources, numel, getattr(torch, args.dtype), args.rounds, args.mapped)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
