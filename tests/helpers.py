"""Test helpers: an independent float64 reference, one-ulp comparison, merge weights, file helpers.

The process runners and the fixtures are in conftest.py.
"""
import math
import os
from typing import List, Sequence

import torch

_MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}


def trusted_load(path: str):
    """Test inputs are our own files: plain torch.load, independent of pmm_dist's loader."""
    return torch.load(path, map_location="cpu", weights_only=False)


def float64_reference(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    total = torch.zeros(tensors[0].shape, dtype=torch.float64)
    for tensor, weight in zip(tensors, weights):
        total += float(weight) * tensor.to(torch.float64)
    return total


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers at ``values`` (float64 in, float64 out)."""
    finfo = torch.finfo(dtype)
    _, exponent = torch.frexp(values.abs().clamp_min(finfo.tiny))
    return torch.ldexp(torch.ones_like(values), (exponent - 1 - _MANTISSA_BITS[dtype]).to(torch.int64)).to(torch.float64)


def assert_merged_within_one_ulp(actual: torch.Tensor, sources: Sequence[torch.Tensor],
                                 weights: Sequence[float], what: str) -> None:
    """``actual`` is within one ulp (of its dtype) of the float64 weighted sum of ``sources``.

    Where the weighted values cancel to almost nothing, a float64 sum (the reference's, and the
    engine's, whose operation order may differ) is only known to within its rounding error
    e = N * 2^-53 * sum |w_i x_i|; that error is allowed on top of the ulp (it is ~1e-16 of the
    terms, so it only matters for results that cancel to below that).
    """
    reference = float64_reference(sources, weights)
    assert actual.shape == reference.shape, f"{what}: shape {actual.shape} != {reference.shape}"
    magnitude = sum(abs(float(w)) * s.to(torch.float64).abs() for s, w in zip(sources, weights))
    reference_error = 2.0 * len(sources) * 2.0 ** -53 * magnitude
    err = ((actual.to(torch.float64) - reference).abs() - 2 * reference_error).clamp_min(0)
    bound = torch.maximum(ulp(reference, actual.dtype), ulp(actual.to(torch.float64), actual.dtype))
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"{what}: {worst:.3f} ulp from the float64 reference (dtype {actual.dtype})"


def zero3_padding(param_shapes, world_size: int, rank: int) -> List[int]:
    """The places of a DeepSpeed ZeRO-3 rank's stream (its fp32 flat groups together) that are
    padding, worked out independently of pmm_dist: each parameter (param_shapes order) takes
    ceil(numel / world_size) places on every rank, its own elements first. DeepSpeed leaves
    the padding uninitialized; a merge writes zeros there."""
    places, offset = [], 0
    for numel in (math.prod(shape) for group in param_shapes for shape in group.values()):
        size = -(-numel // world_size)
        held = max(0, min(size, numel - rank * size))
        places += range(offset + held, offset + size)
        offset += size
    return places


def without_padding(groups: Sequence[torch.Tensor], places: Sequence[int]) -> List[torch.Tensor]:
    """Copies of a rank's flat groups with the stream's ``places`` set to zero."""
    stream = torch.cat([g.detach().reshape(-1) for g in groups]).clone()
    stream[list(places)] = 0
    return list(stream.split([g.numel() for g in groups]))


def sma(n): return [1.0 / n] * n


def ema(n, alpha):
    return [(1 - alpha) ** (n - 1)] + [alpha * (1 - alpha) ** (n - i) for i in range(2, n + 1)]


def wma(n): return [i / (n * (n + 1) / 2) for i in range(1, n + 1)]


def shard_files(ckpt_dir: str) -> List[str]:
    """Relative paths of every file under a checkpoint directory."""
    return sorted(os.path.relpath(os.path.join(d, f), ckpt_dir) for d, _, fs in os.walk(ckpt_dir) for f in fs)
