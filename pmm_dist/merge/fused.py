"""Compiled block kernels for ``kernel.weighted_sum`` on the CPU (optional: needs numba).

Why: torch's mixed-dtype ``add_`` (bf16 source into a float64 accumulator) converts element by
element outside its vectorised loops (~1 GB/s of bf16 per core); a pure-torch workaround needs
two extra passes per source (bf16->fp32->fp64 copies). Here one loop per (block, source) reads
the stored bits, widens them and does the float64 fused multiply-add in SIMD registers.

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
def _widen(x):
    return np.float64(x)


@numba.njit(**_JIT)
def _widen_bf16(bits):
    return np.float64(_u32_as_f32(np.uint32(bits) << np.uint32(16)))


def _kernels(widen):
    @numba.njit(**_JIT)
    def scale(acc, src, weight):
        for i in range(acc.shape[0]):
            acc[i] = weight * widen(src[i])

    @numba.njit(**_JIT)
    def add(acc, src, weight):
        for i in range(acc.shape[0]):
            acc[i] = _fma(weight, widen(src[i]), acc[i])
    return scale, add


scale_bf16, add_bf16 = _kernels(_widen_bf16)   # src: uint16 bits of bf16
scale_float, add_float = _kernels(_widen)      # src: float32 or float64


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


# source dtype name -> (numpy dtype the torch tensor is viewed as, scale kernel, add kernel)
SOURCE_KERNELS = {
    "bfloat16": (np.uint16, scale_bf16, add_bf16),
    "float32": (np.float32, scale_float, add_float),
    "float64": (np.float64, scale_float, add_float),
}
# stored dtype name -> (numpy dtype of the result's view, store kernel)
STORE_KERNELS = {
    "bfloat16": (np.uint16, store_bf16),
    "float32": (np.float32, store_float),
    "float64": (np.float64, store_float),
}
