"""Compiled block kernels for ``kernel.weighted_sum`` on the CPU (optional: needs numba).

Why: torch's mixed-dtype ``add_`` (bf16 source into a float64 accumulator) converts element by
element outside its vectorised loops (~1 GB/s of bf16 per core); a pure-torch workaround needs
two extra passes per source (bf16->fp32->fp64 copies). Here one loop per block and group of up
to four sources (``GROUP_KERNELS``) reads the stored bits, widens them and does the float64 fused
multiply-adds in SIMD registers, loading and storing the accumulator once per group.

The arithmetic is exactly torch's, so results are bit-identical to the pure-torch fallback:
the first source is ``acc = w * x`` (one rounding, as ``copy_`` + ``mul_``) and every other
``acc = fma(w, x, acc)`` (one rounding, as torch's vectorised ``add_(x, alpha=w)``); the store
to bf16 is torch's: round to float32, then round-to-nearest-even to bf16.

bf16 arrays arrive as their uint16 bits (numpy has no bf16): a bf16 is the top half of the
float32 with the same bits, so widening is a shift and a bit cast, both exact.

Compiled on first use of each signature and cached on disk (``cache=True``: numba's cache next
to this file, or its per-user cache directory when that is not writable).
"""
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_JIT = dict(nogil=True, cache=True, boundscheck=False, fastmath=False)  # no reassociation: exact order


@intrinsic
def _fma(typingctx, a, b, c):
    """llvm.fma.f64: a * b + c rounded once (vectorises to vfmadd)."""
    def codegen(context, builder, signature, args):
        double = ir.DoubleType()
        fn = builder.module.declare_intrinsic("llvm.fma", [double], ir.FunctionType(double, [double] * 3))
        return builder.call(fn, args)
    return types.float64(types.float64, types.float64, types.float64), codegen


@intrinsic
def _u32_as_f32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def _f32_as_u32(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def _f64_as_u64(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))
    return types.uint64(types.float64), codegen


@numba.njit(**_JIT)
def _widen_bf16(bits):
    return np.float64(_u32_as_f32(np.uint32(bits) << np.uint32(16)))


# Four plain top-level functions rather than one factory of closures: numba's disk cache does not
# hit for closures (each process would compile them again, ~1 s).
@numba.njit(**_JIT)
def scale_bf16(acc, src, weight):
    """acc = weight * src, src the uint16 bits of bf16 values."""
    for i in range(acc.shape[0]):
        acc[i] = weight * _widen_bf16(src[i])


@numba.njit(**_JIT)
def add_bf16(acc, src, weight):
    """acc = fma(weight, src, acc), src the uint16 bits of bf16 values."""
    for i in range(acc.shape[0]):
        acc[i] = _fma(weight, _widen_bf16(src[i]), acc[i])


@numba.njit(**_JIT)
def scale_float(acc, src, weight):
    """acc = weight * src, src float32 or float64."""
    for i in range(acc.shape[0]):
        acc[i] = weight * np.float64(src[i])


@numba.njit(**_JIT)
def add_float(acc, src, weight):
    """acc = fma(weight, src, acc), src float32 or float64."""
    for i in range(acc.shape[0]):
        acc[i] = _fma(weight, np.float64(src[i]), acc[i])


# Several sources per pass: the accumulator block is loaded and stored once for two or four
# sources instead of once for each. Each element sees the same roundings, in the same order, as
# with the single-source kernels one after the other (an fma rounds once, and its float64 result
# is what the next fma takes), so the bits are the same. Measured by benchmarks/kernel.py (one
# thread, the whole weighted_sum): 8 bf16 sources 8.1 GB/s, against 5.6 GB/s one per pass; 4
# mapped fp32 sources 5.4 against 4.8 GB/s.
@numba.njit(**_JIT)
def scale_add_bf16(acc, a, weight_a, b, weight_b):
    """acc = fma(weight_b, b, weight_a * a): scale_bf16 then add_bf16, in one pass."""
    for i in range(acc.shape[0]):
        acc[i] = _fma(weight_b, _widen_bf16(b[i]), weight_a * _widen_bf16(a[i]))


@numba.njit(**_JIT)
def add2_bf16(acc, a, weight_a, b, weight_b):
    """acc = fma(weight_b, b, fma(weight_a, a, acc)): add_bf16 twice, in one pass."""
    for i in range(acc.shape[0]):
        acc[i] = _fma(weight_b, _widen_bf16(b[i]), _fma(weight_a, _widen_bf16(a[i]), acc[i]))


@numba.njit(**_JIT)
def scale_add4_bf16(acc, a, weight_a, b, weight_b, c, weight_c, d, weight_d):
    """scale_bf16 then add_bf16 three times, in one pass."""
    for i in range(acc.shape[0]):
        value = _fma(weight_b, _widen_bf16(b[i]), weight_a * _widen_bf16(a[i]))
        value = _fma(weight_c, _widen_bf16(c[i]), value)
        acc[i] = _fma(weight_d, _widen_bf16(d[i]), value)


@numba.njit(**_JIT)
def add4_bf16(acc, a, weight_a, b, weight_b, c, weight_c, d, weight_d):
    """add_bf16 four times, in one pass."""
    for i in range(acc.shape[0]):
        value = _fma(weight_b, _widen_bf16(b[i]), _fma(weight_a, _widen_bf16(a[i]), acc[i]))
        value = _fma(weight_c, _widen_bf16(c[i]), value)
        acc[i] = _fma(weight_d, _widen_bf16(d[i]), value)


@numba.njit(**_JIT)
def scale_add_float(acc, a, weight_a, b, weight_b):
    """acc = fma(weight_b, b, weight_a * a): scale_float then add_float, in one pass."""
    for i in range(acc.shape[0]):
        acc[i] = _fma(weight_b, np.float64(b[i]), weight_a * np.float64(a[i]))


@numba.njit(**_JIT)
def add2_float(acc, a, weight_a, b, weight_b):
    """acc = fma(weight_b, b, fma(weight_a, a, acc)): add_float twice, in one pass."""
    for i in range(acc.shape[0]):
        acc[i] = _fma(weight_b, np.float64(b[i]), _fma(weight_a, np.float64(a[i]), acc[i]))


@numba.njit(**_JIT)
def scale_add4_float(acc, a, weight_a, b, weight_b, c, weight_c, d, weight_d):
    """scale_float then add_float three times, in one pass."""
    for i in range(acc.shape[0]):
        value = _fma(weight_b, np.float64(b[i]), weight_a * np.float64(a[i]))
        value = _fma(weight_c, np.float64(c[i]), value)
        acc[i] = _fma(weight_d, np.float64(d[i]), value)


@numba.njit(**_JIT)
def add4_float(acc, a, weight_a, b, weight_b, c, weight_c, d, weight_d):
    """add_float four times, in one pass."""
    for i in range(acc.shape[0]):
        value = _fma(weight_b, np.float64(b[i]), _fma(weight_a, np.float64(a[i]), acc[i]))
        value = _fma(weight_c, np.float64(c[i]), value)
        acc[i] = _fma(weight_d, np.float64(d[i]), value)


@numba.njit(**_JIT)
def store_bf16(out, acc):
    """out (uint16 bits) = bf16(float32(acc)), torch's rounding; NaN stays NaN."""
    for i in range(acc.shape[0]):
        value = acc[i]
        bits = _f32_as_u32(np.float32(value))
        rounded = np.uint16((bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16))
        out[i] = rounded if value == value else np.uint16(0x7FC0)


@numba.njit(**_JIT)
def store_float(out, acc):
    for i in range(acc.shape[0]):
        out[i] = acc[i]


@numba.njit(**_JIT)
def all_finite(acc) -> bool:
    """No NaN/Inf in acc: an integer OR of the exponent test (vectorises; a float sum would not,
    without reassociation)."""
    exponent = np.uint64(0x7FF0000000000000)
    bad = np.uint64(0)
    for i in range(acc.shape[0]):
        bad |= np.uint64((_f64_as_u64(acc[i]) & exponent) == exponent)
    return bad == 0


def warm_up() -> None:
    """Every kernel once on tiny arrays: loads each from the disk cache (or compiles it, the first
    time), and numba's own lazy start-up, so that the first real call does not."""
    acc = np.zeros(4)
    for view_as, scale, add in SOURCE_KERNELS.values():
        src = np.zeros(4, view_as)
        scale(acc, src, 1.0)
        add(acc, src, 1.0)
        for count, (scale_group, add_group) in GROUP_KERNELS.get(add, {}).items():
            scale_group(acc, *(src, 1.0) * count)
            add_group(acc, *(src, 1.0) * count)
    for view_as, store in STORE_KERNELS.values():
        store(np.zeros(4, view_as), acc)
    all_finite(acc)


# source dtype name -> (numpy dtype the torch tensor is viewed as, scale kernel, add kernel)
SOURCE_KERNELS = {
    "bfloat16": (np.uint16, scale_bf16, add_bf16),
    "float32": (np.float32, scale_float, add_float),
    "float64": (np.float64, scale_float, add_float),
}
# a single-source add kernel -> {number of sources: (scale kernel, add kernel)}: the kernels for
# that many consecutive sources of one dtype that each take it (one dtype, so that numba compiles
# one signature per group size, not one per mix of float32 and float64)
GROUP_KERNELS = {add_bf16: {4: (scale_add4_bf16, add4_bf16), 2: (scale_add_bf16, add2_bf16)},
                 add_float: {4: (scale_add4_float, add4_float), 2: (scale_add_float, add2_float)}}
# stored dtype name -> (numpy dtype of the result's view, store kernel)
STORE_KERNELS = {
    "bfloat16": (np.uint16, store_bf16),
    "float32": (np.float32, store_float),
    "float64": (np.float64, store_float),
}
