import pytest

from pmm_dist.plan.selection import select_iterations

AVAILABLE = [1000, 2000, 3000, 4000, 5000, 6000, 6500]


def test_default_is_all():
    assert select_iterations(AVAILABLE) == AVAILABLE


def test_last():
    assert select_iterations(AVAILABLE, last=3) == [5000, 6000, 6500]
    with pytest.raises(ValueError, match="--last 9"):
        select_iterations(AVAILABLE, last=9)


def test_interval_counts_back_from_the_newest():
    assert select_iterations([1000, 2000, 3000, 4000], interval=1000, last=3) == [2000, 3000, 4000]
    assert select_iterations([1000, 2000, 3000, 4000], interval=2000) == [2000, 4000]


def test_interval_names_the_missing_iteration():
    with pytest.raises(ValueError, match="5500"):
        select_iterations(AVAILABLE, interval=500, last=3)


def test_explicit_iterations():
    assert select_iterations(AVAILABLE, iterations=[6000, 2000]) == [2000, 6000]
    with pytest.raises(ValueError, match="2500 not found"):
        select_iterations(AVAILABLE, iterations=[2500])
    with pytest.raises(ValueError, match="do not combine"):
        select_iterations(AVAILABLE, iterations=[2000], last=2)


def test_empty_and_bad_values():
    with pytest.raises(ValueError, match="no checkpoints"):
        select_iterations([])
    with pytest.raises(ValueError, match="--interval"):
        select_iterations(AVAILABLE, interval=0)
