import sys

import pytest
import torch

from pmm_dist.formats.masters import rounded
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


# -- the two implementations of the block arithmetic (compiled numba loops, pure torch) ------------
BACKENDS = ["torch", "numba"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Each test below runs with the compiled kernels and with the pure-torch fallback, on tensors
    of any size (FUSED_MIN_ELEMENTS lowered), in blocks small enough to have many and a ragged one."""
    if request.param == "numba":
        pytest.importorskip("numba")
        monkeypatch.setattr(kernel, "_fused_module", kernel._UNSET)
        monkeypatch.setenv("PMM_DIST_KERNEL", "numba")
        assert kernel.fused_kernels() is not None
    else:
        monkeypatch.setattr(kernel, "_fused_module", None)
    monkeypatch.setattr(kernel, "FUSED_MIN_ELEMENTS", 0)
    monkeypatch.setattr(kernel, "BLOCK_ELEMENTS", 1000)
    monkeypatch.setattr(kernel, "ADVICE_BLOCKS", 3)
    return request.param


def _ema(n, alpha=0.3):  # irregular weights: products inexact, so a mul+add would differ from an fma
    return [(1 - alpha) ** (n - 1)] + [alpha * (1 - alpha) ** (n - i) for i in range(2, n + 1)]


def _drifting(n, numel, dtype, seed=0):
    """Checkpoints of one run: a common tensor plus drift, so many elements cancel to near zero."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=gen)
    return [(base + 0.3 * torch.randn(numel, generator=gen)).to(dtype) for _ in range(n)]


def _bits(tensor):
    return tensor.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_each_backend_within_one_ulp(backend, dtype):
    sources = _drifting(7, 12_345, dtype)
    weights = _ema(7)
    merged = kernel.weighted_sum(sources, weights, torch.device("cpu"), on_nonfinite="error")
    assert merged.dtype == dtype
    assert_merged_within_one_ulp(merged, sources, weights, f"{backend} {dtype}")


@pytest.mark.parametrize("dtypes", [(torch.bfloat16,) * 5, (torch.float32,) * 5, (torch.float64,) * 3,
                                    (torch.float32, torch.bfloat16, torch.float16, torch.bfloat16),
                                    # runs of one dtype summed 4, 2 or 1 per pass (fused.GROUP_KERNELS)
                                    (torch.bfloat16, torch.bfloat16, torch.float32, torch.bfloat16,
                                     torch.float64, torch.float32, torch.bfloat16),
                                    (torch.bfloat16,) * 4 + (torch.float32,) * 2 + (torch.bfloat16,) * 3,
                                    (torch.float64, torch.float32, torch.float64, torch.float32)])
def test_compiled_kernels_are_bit_identical_to_torch(monkeypatch, dtypes):
    pytest.importorskip("numba")
    sources = [s.to(d) for s, d in zip(_drifting(len(dtypes), 9_999, torch.float32, seed=3), dtypes)]
    sources[1][17] = float("inf")  # non-finite values take the same path too
    sources[2][17] = float("-inf")
    sources[2][18] = float("inf")
    weights = _ema(len(dtypes))
    monkeypatch.setattr(kernel, "FUSED_MIN_ELEMENTS", 0)
    monkeypatch.setattr(kernel, "BLOCK_ELEMENTS", 1000)
    results = {}
    for name, module in (("torch", None), ("numba", kernel.fused_kernels(wait=True))):
        assert name == "torch" or module is not None
        monkeypatch.setattr(kernel, "_fused_module", module)
        results[name] = kernel.weighted_sum(sources, weights, torch.device("cpu"))
    nan = torch.isnan(results["torch"])  # any NaN is a NaN (torch's bits for one vary by its code path)
    assert torch.equal(nan, torch.isnan(results["numba"])) and nan[17] and nan.sum() == 1  # inf + -inf
    assert torch.equal(_bits(results["torch"])[~nan], _bits(results["numba"])[~nan])
    assert torch.isinf(results["numba"][18])


def test_group_kernels_round_as_the_single_ones_do():
    """Several sources in one pass (fused.GROUP_KERNELS) leave the float64 accumulator bit for
    bit as the single-source kernels one after the other. Checked in float64, before the store:
    a difference in its last bits would hardly ever show after rounding to the stored dtype."""
    pytest.importorskip("numba")
    import numpy as np
    from pmm_dist.merge import fused
    weights = _ema(9)
    for name, (view_as, scale, add) in fused.SOURCE_KERNELS.items():
        sources = [_numpy_bits(s) for s in _drifting(9, 50_000, getattr(torch, name), seed=5)]
        alone = np.empty(50_000)
        scale(alone, sources[0], weights[0])
        for source, weight in zip(sources[1:], weights[1:]):
            add(alone, source, weight)
        for count, (scale_group, add_group) in fused.GROUP_KERNELS[add].items():
            grouped = np.empty(50_000)
            done = count
            scale_group(grouped, *[x for k in range(count) for x in (sources[k], weights[k])])
            while done + count <= len(sources):
                add_group(grouped, *[x for k in range(done, done + count) for x in (sources[k], weights[k])])
                done += count
            for k in range(done, len(sources)):
                add(grouped, sources[k], weights[k])
            assert np.array_equal(alone.view(np.uint64), grouped.view(np.uint64)), (name, count)


def _numpy_bits(tensor):
    """A tensor as the fused kernels take it: bf16 as its uint16 bits, others as they are."""
    return tensor.view(torch.int16).numpy().view("uint16") if tensor.dtype == torch.bfloat16 else tensor.numpy()


def test_accumulator_matches_weighted_sum(backend):
    sources = _drifting(5, 5_003, torch.bfloat16, seed=4)
    weights = _ema(5)
    acc = kernel.Accumulator((5_003,), torch.device("cpu"), on_nonfinite="error")
    for index, (source, weight) in enumerate(zip(sources, weights)):
        acc.add(source, weight, f"source {index}")
    assert torch.equal(_bits(acc.result()), _bits(kernel.weighted_sum(sources, weights, torch.device("cpu"))))


def test_accumulator_reports_nonfinite(backend):
    acc = kernel.Accumulator((4000,), torch.device("cpu"), on_nonfinite="error", what="item 'w'")
    acc.add(torch.ones(4000), 0.5, "a.distcp")
    bad = torch.ones(4000)
    bad[3999] = float("nan")
    with pytest.raises(InputError, match="item 'w' of b.distcp"):
        acc.add(bad, 0.5, "b.distcp")


def test_each_backend_reports_nonfinite(backend, capsys):
    sources = [torch.ones(3000).bfloat16(), torch.ones(3000).bfloat16()]
    sources[1][2500] = float("nan")
    with pytest.raises(InputError, match="key 'w' of b.pt"):
        kernel.weighted_sum(sources, [0.5, 0.5], torch.device("cpu"), on_nonfinite="error", what="key 'w'",
                            source_names=["a.pt", "b.pt"])
    assert torch.isnan(kernel.weighted_sum(sources, [0.5, 0.5], torch.device("cpu"))[2500])


def test_sources_that_require_grad(backend):
    """DeepSpeed saves parameters with requires_grad: merged, and flagged as they were."""
    sources = [torch.nn.Parameter(t) for t in _drifting(3, 4000, torch.float32)]
    merged = kernel.weighted_sum(sources, _ema(3), torch.device("cpu"), on_nonfinite="error")
    assert merged.requires_grad and merged.is_leaf
    assert_merged_within_one_ulp(merged.detach(), [s.detach() for s in sources], _ema(3), backend)
    acc = kernel.Accumulator((4000,), torch.device("cpu"))
    for index, (source, weight) in enumerate(zip(sources, _ema(3))):
        acc.add(source, weight, f"source {index}")
    assert acc.result().requires_grad and torch.equal(acc.result().detach(), merged.detach())


def test_sources_of_different_sizes_are_refused(backend):
    with pytest.raises(ValueError, match="different sizes"):
        kernel.weighted_sum([torch.ones(3000), torch.ones(2999)], [0.5, 0.5], torch.device("cpu"))


def test_without_numba_the_torch_kernel_runs(monkeypatch):
    """numba is optional: when it cannot be imported, ``auto`` falls back to torch, ``numba`` fails."""
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba -> ImportError
    monkeypatch.delitem(sys.modules, "pmm_dist.merge.fused", raising=False)
    monkeypatch.delattr(sys.modules["pmm_dist.merge"], "fused", raising=False)
    monkeypatch.setattr(kernel, "_fused_module", kernel._UNSET)
    monkeypatch.setenv("PMM_DIST_KERNEL", "auto")
    assert kernel.fused_kernels(wait=True) is None
    sources = _drifting(3, 70_000, torch.bfloat16)
    assert_merged_within_one_ulp(kernel.weighted_sum(sources, _ema(3), torch.device("cpu")), sources, _ema(3), "torch")
    monkeypatch.setattr(kernel, "_fused_module", kernel._UNSET)
    monkeypatch.setenv("PMM_DIST_KERNEL", "numba")
    with pytest.raises(ImportError):
        kernel.fused_kernels()
    monkeypatch.setattr(kernel, "_fused_module", kernel._UNSET)
    monkeypatch.setenv("PMM_DIST_KERNEL", "fast")
    with pytest.raises(ValueError, match="PMM_DIST_KERNEL"):
        kernel.fused_kernels()


def test_auto_loads_the_compiled_kernels_in_the_background(monkeypatch):
    """With ``auto`` the first large tensor starts loading numba and is summed by the torch kernel
    meanwhile (the same bits); once loaded, the compiled kernels take over."""
    pytest.importorskip("numba")
    monkeypatch.setattr(kernel, "_fused_module", kernel._UNSET)
    monkeypatch.setenv("PMM_DIST_KERNEL", "auto")
    sources = _drifting(3, kernel.FUSED_MIN_ELEMENTS, torch.bfloat16)
    first = kernel.weighted_sum(sources, _ema(3), torch.device("cpu"))  # starts the load, does not wait
    module = kernel.fused_kernels(wait=True)
    assert module is not None and kernel.fused_kernels() is module
    assert torch.equal(_bits(first), _bits(kernel.weighted_sum(sources, _ema(3), torch.device("cpu"))))


# -- page advice of memory-mapped sources ----------------------------------------------------------
def _mapped_sources(tmp_path, n, numel, dtype=torch.bfloat16):
    sources = _drifting(n, numel, dtype, seed=5)
    mapped = []
    for index, source in enumerate(sources):
        torch.save({"w": source}, tmp_path / f"s{index}.pt")
        mapped.append(torch.load(tmp_path / f"s{index}.pt", mmap=True, weights_only=True)["w"])
    return sources, mapped


def test_page_advice_releases_every_page_once_and_reads_ahead(backend, tmp_path, monkeypatch):
    """Every whole page of every mapped source is released (DONTNEED) exactly once, in order and
    only after it was added; every page is asked for (WILLNEED) before the sum reaches it, at
    least half the read-ahead distance ahead, in steps without gaps."""
    sources, mapped = _mapped_sources(tmp_path, 3, 50_000)
    monkeypatch.setattr(kernel, "READ_AHEAD_BYTES", 12_000 * mapped[0].element_size())  # 12 groups of 1000
    calls = []
    monkeypatch.setattr(kernel, "_madvise", lambda start, length, advice: calls.append((start, length, advice)))
    merged = kernel.weighted_sum(mapped, _ema(3), torch.device("cpu"), sources_are_mapped=True)
    assert torch.equal(_bits(merged), _bits(kernel.weighted_sum(sources, _ema(3), torch.device("cpu"))))
    page = kernel._PAGE
    for source in mapped:
        start, end = source.data_ptr(), source.data_ptr() + source.numel() * source.element_size()
        released = sorted((s, s + n) for s, n, a in calls if a == kernel._MADV_DONTNEED and start - page < s < end)
        assert released[0][0] == (start + page - 1) // page * page and released[-1][1] == end // page * page
        assert all(a[1] == b[0] for a, b in zip(released, released[1:])), "a gap or an overlap between releases"
        ahead = sorted((s, s + n) for s, n, a in calls if a == kernel._MADV_WILLNEED and start - page < s < end)
        assert len(ahead) >= 3 and ahead[0][0] <= start and ahead[-1][1] >= end
        assert all(a[1] >= b[0] for a, b in zip(ahead, ahead[1:])), "a gap in the read-ahead"
        # the order of the calls: a page is released only after it was asked for
        order = [(a, s) for s, n, a in calls if start - page < s < end]
        first_release = next(i for i, (a, _) in enumerate(order) if a == kernel._MADV_DONTNEED)
        assert order[0][0] == kernel._MADV_WILLNEED and first_release > 0


def test_mapped_pages_are_released_from_this_process(tmp_path, monkeypatch):
    """After a merge of mapped sources, (almost) none of their pages are resident in this process."""
    monkeypatch.setattr(kernel, "FUSED_MIN_ELEMENTS", 0)
    _, mapped = _mapped_sources(tmp_path, 4, 1 << 21)  # 4 MiB of bf16 each
    kernel.weighted_sum(mapped, _ema(4), torch.device("cpu"), sources_are_mapped=True)
    resident = _resident_bytes_of_files(str(tmp_path))
    assert resident <= 4 * 2 * kernel._PAGE, f"{resident} bytes of the sources still mapped in"


def _resident_bytes_of_files(folder: str) -> int:
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                inside = len(fields) >= 6 and fields[5].startswith(folder)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


def _assert_the_exact_sum_rounded_once(sources, counts) -> None:
    """The merge with weights counts[i] / sum(counts) is the exact weighted sum rounded once to the
    stored dtype; the one-source-at-a-time Accumulator agrees bit for bit."""
    total = sum(counts)
    weights = [k / total for k in counts]
    exact = (sum(k * s.double() for k, s in zip(counts, sources)) / total).to(sources[0].dtype)
    merged = kernel.weighted_sum(sources, weights, torch.device("cpu"))
    assert torch.equal(_bits(merged), _bits(exact)), f"{counts}: {(merged != exact).sum().item()} elements off"
    accumulator = kernel.Accumulator(sources[0].shape, torch.device("cpu"), weights=weights)
    for source, weight in zip(sources, weights):
        accumulator.add(source, weight, "source")
    assert torch.equal(_bits(accumulator.result()), _bits(merged))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equal_weights_give_the_nearest_value_of_the_exact_mean(backend, dtype):
    """SMA (every weight 1/n): the sum divided by n once, so even a mean exactly halfway between
    two stored values is the nearest one, ties to even (multiplying by the rounded 1/n was one
    ulp off at ~1% of fp32 elements)."""
    generator = torch.Generator().manual_seed(7)
    for n in (3, 6, 10, 2, 4, 16):  # powers of two: the weights as they are (exact), no division
        sources = [(1 + 0.01 * torch.randn(20_000, generator=generator)).to(dtype) for _ in range(n)]
        _assert_the_exact_sum_rounded_once(sources, [1] * n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", [(1, 2, 3), (1, 2, 3, 4), (1, 2), (3, 7)])  # WMA 3 and 4, --weights 1,2 / 3,7
def test_weights_of_small_integers_over_n_give_the_exact_sum_rounded_once(backend, dtype, counts):
    """Weights k_i / n (WMA, integer --weights): the sum with the integer weights is exact and is
    divided once, so values whose weighted sum is exactly 0 give 0 (with the rounded weights
    k_i / n, a float64 residue of ~1e-20 was left, which the watcher's exact running sums do not)."""
    generator = torch.Generator().manual_seed(11)
    sources = [(1 + 0.01 * torch.randn(20_000, generator=generator)).to(dtype) for _ in counts]
    for source in sources[:-1]:  # element 0: k_1 x_1 + ... + k_N x_N = 0 exactly, where it can be
        source[0] = 2 ** -12
    sources[-1][0] = -(2 ** -12) * sum(counts[:-1]) / counts[-1] if sum(counts[:-1]) % counts[-1] == 0 else 0.0
    _assert_the_exact_sum_rounded_once(sources, counts)


@pytest.mark.parametrize("stored,model", [(torch.float32, torch.bfloat16), (torch.float64, torch.bfloat16),
                                          (torch.float64, torch.float32), (torch.float32, torch.float16),
                                          (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("weights", [_ema(4), [0.25] * 4, [1 / 3] * 3])
def test_rounded_to_gives_the_bits_of_rounding_the_merged_master(backend, stored, model, weights):
    """``rounded_to`` (a merged master straight to the model's dtype, in the kernel's store where
    it can) gives exactly ``masters.rounded`` of the merged master: through float32, as the
    trainer rounds it. Element 0 of the mean of four is 1 + 2^-8 + 2^-24: past a bf16 tie in
    float64, on the tie between two floats in float32, which rounds to 1 + 2^-8 (even), a bf16
    tie, which rounds to 1.0 (even); rounded once from float64 it would be 1 + 2^-7."""
    sources = [s.to(stored) for s in _drifting(len(weights), 5_000, torch.float32, seed=7)]
    for index, source in enumerate(sources):  # fp32 values whose mean has a bit below float32's
        source[0] = 1 + 2 ** -8 + (2 ** -23 if index % 2 else 0) if stored != torch.float64 else 1 + 2 ** -8 + 2 ** -24
    like = torch.empty(5_000, dtype=model)
    expected = rounded(kernel.weighted_sum(sources, weights, torch.device("cpu")), like)
    for staged in (False, True):  # True: the blocks through the device path's staging buffers
        merged = kernel.weighted_sum(sources, weights, torch.device("cpu"), rounded_to=model, staged=staged)
        assert merged.dtype == model
        assert torch.equal(_bits(merged), _bits(expected)), (backend, stored, model, staged)
    if model == torch.bfloat16 and stored != torch.bfloat16 and weights == [0.25] * 4:
        assert merged[0] == 1.0


def test_result_memory_reuses_a_buffer_only_once_nothing_refers_to_it():
    from pmm_dist.merge.result_memory import ResultMemory
    memory = ResultMemory(limit_bytes=8 << 20, min_bytes=1 << 20)
    numel = (1 << 20) // 2  # 1 MiB of bf16
    first = memory.empty(numel, torch.bfloat16)
    first_address = first.data_ptr()
    view, array = first[10:20], first.view(torch.int16).numpy()
    del first
    second = memory.empty(numel, torch.bfloat16)  # the view and the array still hold the first
    assert second.data_ptr() != first_address
    del view
    assert memory.empty(numel, torch.bfloat16).data_ptr() != first_address  # the array still does
    del array
    third = memory.empty(numel, torch.bfloat16)
    assert third.data_ptr() == first_address and third.shape == (numel,) and third.dtype == torch.bfloat16
    # another dtype of the same byte size shares the buffer; other sizes get their own
    del third
    assert memory.empty(numel // 2, torch.float32).data_ptr() == first_address
    assert memory.empty(numel + 1, torch.bfloat16).data_ptr() != first_address


def test_result_memory_holds_at_most_its_limit():
    from pmm_dist.merge.result_memory import ResultMemory
    memory = ResultMemory(limit_bytes=4 << 20, min_bytes=1 << 20)
    taken = [memory.empty(1 << 20, torch.uint8) for _ in range(6)]  # 6 MiB taken at once: 4 held
    assert memory.held_bytes() == 4 << 20 and len({t.data_ptr() for t in taken}) == 6
    del taken
    # free buffers of one size make room for another
    bigger = [memory.empty(2 << 20, torch.uint8) for _ in range(2)]
    assert memory.held_bytes() == 4 << 20
    assert memory.empty(8 << 20, torch.uint8).numel() == 8 << 20  # over the limit: not held
    assert memory.held_bytes() == 4 << 20
    del bigger
    small = memory.empty(1000, torch.uint8)  # under min_bytes: plain torch.empty
    assert memory.held_bytes() == 4 << 20 and small.numel() == 1000


def test_a_merged_result_kept_is_never_overwritten_by_the_next(monkeypatch):
    from pmm_dist.merge import result_memory
    monkeypatch.setattr(kernel, "RESULTS", result_memory.ResultMemory(limit_bytes=64 << 20, min_bytes=1 << 10))
    gen = torch.Generator().manual_seed(5)
    first_sources = [torch.randn(300_000, generator=gen).bfloat16() for _ in range(3)]
    second_sources = [torch.randn(300_000, generator=gen).bfloat16() for _ in range(3)]
    weights = [0.5, 0.25, 0.25]
    kept = kernel.weighted_sum(first_sources, weights, torch.device("cpu"))
    expected = kept.clone()
    second = kernel.weighted_sum(second_sources, weights, torch.device("cpu"))
    assert second.data_ptr() != kept.data_ptr() and torch.equal(kept, expected)
    assert_merged_within_one_ulp(second, second_sources, weights, "second")
    address = second.data_ptr()
    del second  # dropped: the next result of its size is stored in its memory
    third = kernel.weighted_sum(second_sources[::-1], weights, torch.device("cpu"))
    assert third.data_ptr() == address and torch.equal(kept, expected)
    assert_merged_within_one_ulp(third, second_sources[::-1], weights, "third")
