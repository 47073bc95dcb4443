import pytest
import torch

from pmm_dist.merge import kernel
from pmm_dist.errors import InputError

from .helpers import assert_merged_within_one_ulp


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(kernel, "BLOCK_ELEMENTS", 1000)  # many blocks, a ragged last one


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_weighted_sum_within_one_ulp(small_blocks, dtype):
    gen = torch.Generator().manual_seed(0)
    sources = [torch.randn(37, 101, generator=gen).to(dtype) for _ in range(5)]
    weights = [0.1, 0.2, 0.3, 0.15, 0.25]
    merged = kernel.weighted_sum(sources, weights, torch.device("cpu"))
    assert merged.dtype == dtype and merged.shape == (37, 101)
    assert_merged_within_one_ulp(merged, sources, weights, str(dtype))


def test_staged_device_path_matches_direct_path(small_blocks):
    gen = torch.Generator().manual_seed(1)
    sources = [torch.randn(5003, generator=gen).bfloat16() for _ in range(4)]
    weights = [0.4, 0.3, 0.2, 0.1]
    direct = kernel.weighted_sum(sources, weights, torch.device("cpu"))
    staged = kernel.weighted_sum(sources, weights, torch.device("cpu"), staged=True)
    assert torch.equal(direct, staged)


@pytest.mark.gpu  # skipped without CUDA (conftest.py)
def test_cuda_matches_cpu():
    sources = [torch.randn(3_000_001).bfloat16() for _ in range(3)]
    weights = [0.2, 0.3, 0.5]
    assert torch.equal(kernel.weighted_sum(sources, weights, torch.device("cuda")),
                       kernel.weighted_sum(sources, weights, torch.device("cpu")))


def test_nonfinite_policy_names_tensor_and_source(small_blocks, capsys):
    sources = [torch.ones(3000), torch.ones(3000)]
    sources[1][2500] = float("inf")
    with pytest.raises(InputError, match="key 'w' of b.pt"):
        kernel.weighted_sum(sources, [0.5, 0.5], torch.device("cpu"), on_nonfinite="error", what="key 'w'",
                            source_names=["a.pt", "b.pt"])
    kernel.weighted_sum(sources, [0.5, 0.5], torch.device("cpu"), on_nonfinite="warn", source_names=["a", "b"])
    assert "warning" in capsys.readouterr().err
    assert torch.isinf(kernel.weighted_sum(sources, [0.5, 0.5], torch.device("cpu"))[2500])


def test_non_float_is_not_mergeable():
    assert kernel.is_mergeable(torch.ones(2)) and not kernel.is_mergeable(torch.ones(2, dtype=torch.int64))
    assert not kernel.is_mergeable(None) and not kernel.is_mergeable(b"x")
