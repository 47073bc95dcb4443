"""Compensated arithmetic on tensors: values as hi + lo pairs of float64 (about 106 bits).

The watcher's running state is updated over and over (a window slides by adding one checkpoint
and subtracting another, an EMA is scaled by 1-alpha at every step), so rounding errors of a
plain float64 state would add up with the run's length, and where the window's values cancel
they would exceed one ulp of the small result. Here every product and sum is error-free
(Dekker's split, Knuth's two-sum), so a value is kept to ~2^-106 of its magnitude per update
instead of 2^-53: after a million updates still below 2^-86, far inside one ulp of float32
(2^-24) even when the result cancels to 2^-40 of its terms. The float64 reference the tests
compare against has errors of 2^-53 of its terms itself.

A pair is ``(hi, lo)`` with ``lo`` None when it is zero (a source's value, or a state whose
compensation vanished), to skip the work. All functions are elementwise and allocate new tensors.
"""
from typing import Optional, Sequence, Tuple, Union

import torch

Pair = Tuple[torch.Tensor, Optional[torch.Tensor]]
Operand = Union[torch.Tensor, Pair]   # a source block (its stored dtype) or a pair
_SPLITTER = 134217729.0               # 2^27 + 1: splits a float64 into two halves of <= 26 bits
# Sources of these dtypes have at most 24 significant bits: a product with either half of a
# split float64 coefficient (<= 27 bits) is exact in float64, so two multiplications suffice.
_NARROW = (torch.bfloat16, torch.float16, torch.float32)


def two_sum(a: torch.Tensor, b: torch.Tensor) -> Pair:
    """s + e == a + b exactly (Knuth), for any magnitudes."""
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, e


def fast_two_sum(a: torch.Tensor, b: torch.Tensor) -> Pair:
    """s + e == a + b exactly, provided |a| >= |b| (or a == 0)."""
    s = a + b
    return s, b - (s - a)


def _split_scalar(c: float) -> Tuple[float, float]:
    t = _SPLITTER * c
    high = t - (t - c)
    return high, c - high


def _split(x: torch.Tensor) -> Pair:
    t = x * _SPLITTER
    high = t - (t - x)
    return high, x - high


def product(x: torch.Tensor, c: float) -> Pair:
    """``x * c`` exactly, as a pair (``x`` of any float dtype, upcast to float64)."""
    x64 = x.to(torch.float64)
    if c == 1.0:
        return x64, None
    if c == -1.0:
        return -x64, None
    c_high, c_low = _split_scalar(c)
    if x.dtype in _NARROW:
        if c_low == 0.0:  # c has <= 26 bits (small integers, powers of two): one exact product
            return x64 * c, None
        return two_sum(x64 * c_high, x64 * c_low)
    p = x64 * c
    x_high, x_low = _split(x64)
    e = ((x_high * c_high - p) + x_high * c_low + x_low * c_high) + x_low * c_low
    return p, e


def scale(pair: Pair, c: float) -> Pair:
    """``(hi + lo) * c`` to ~2^-106 relative."""
    hi, lo = pair
    if c == 1.0:
        return pair
    if c == -1.0:
        return -hi, (None if lo is None else -lo)
    p, e = product(hi, c)
    if lo is not None:
        e = lo * c if e is None else e + lo * c
    return (p, None) if e is None else fast_two_sum(p, e)


def add(a: Pair, b: Pair) -> Pair:
    """``a + b`` to ~2^-106 relative (the accurate double-double sum)."""
    s, e = two_sum(a[0], b[0])
    lows = [low for low in (a[1], b[1]) if low is not None]
    if not lows:
        return s, e
    if len(lows) == 2:
        t, f = two_sum(lows[0], lows[1])
    else:
        t, f = lows[0], None
    s, e = two_sum(s, e + t)  # a two-sum, not a fast one: s may have cancelled below e + t
    if f is not None:
        s, e = fast_two_sum(s, e + f)
    return s, e


def combine(terms: Sequence[Tuple[float, Operand]], like: torch.Tensor) -> Pair:
    """``sum_k coef_k * operand_k`` as a pair; zero (shaped like ``like``) for no terms."""
    total: Optional[Pair] = None
    for coef, operand in terms:
        value = product(operand, coef) if isinstance(operand, torch.Tensor) else scale(operand, coef)
        total = value if total is None else add(total, value)
    if total is None:
        return torch.zeros(like.shape, dtype=torch.float64, device=like.device), None
    return total


def rounded(pair: Pair) -> torch.Tensor:
    """The float64 nearest the pair (its hi, once normalised)."""
    hi, lo = pair
    return hi if lo is None else hi + lo
