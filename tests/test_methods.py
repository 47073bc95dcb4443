import math

import pytest

from pmm_dist.merge.methods import available_methods, get_method


def test_registry_lists_all_methods():
    assert available_methods() == ["ema", "sma", "weighted", "wma"]


def test_sma_and_wma():
    assert get_method("sma").weights(4) == [0.25] * 4
    assert get_method("wma").weights(4) == pytest.approx([0.1, 0.2, 0.3, 0.4])


@pytest.mark.parametrize("alpha,n", [(0.2, 10), (0.1, 3), (0.2, 1), (1.0, 4)])
def test_ema_weights_follow_the_recursion_and_sum_to_one(alpha, n):
    weights = get_method("ema").weights(n, alpha=alpha)
    assert math.isclose(sum(weights), 1.0, rel_tol=1e-12)
    # E_1 = M_1; E_i = alpha M_i + (1-alpha) E_{i-1}, applied to unit vectors.
    expected = [0.0] * n
    for i in range(n):
        expected = [(1 - alpha) * e for e in expected] if i else expected
        expected[i] += 1.0 if i == 0 else alpha
    assert weights == pytest.approx(expected, rel=1e-12)


def test_ema_is_not_the_shrunken_closed_form():
    weights = get_method("ema").weights(10, alpha=0.2)
    shrunken = [0.2 * 0.8 ** (10 - i) for i in range(1, 11)]
    assert sum(shrunken) == pytest.approx(1 - 0.8 ** 10)
    assert weights[0] == pytest.approx(0.8 ** 9) and weights[0] != pytest.approx(shrunken[0])


def test_ema_default_alpha_and_bad_alpha():
    assert get_method("ema").weights(3) == get_method("ema").weights(3, alpha=0.2)
    with pytest.raises(ValueError, match="alpha"):
        get_method("ema").weights(3, alpha=0.0)


def test_explicit_weights_normalised_or_not():
    assert get_method("weighted").weights(3, weights=[1, 1, 2]) == [0.25, 0.25, 0.5]
    assert get_method("weighted").weights(3, weights=[1, 1, 2], normalize=False) == [1, 1, 2]
    with pytest.raises(ValueError, match="3 checkpoints"):
        get_method("weighted").weights(3, weights=[1, 2])
    with pytest.raises(ValueError, match="needs --weights"):
        get_method("weighted").weights(3)


def test_options_a_method_does_not_take_are_refused():
    with pytest.raises(ValueError, match="takes no option alpha"):
        get_method("sma").weights(3, alpha=0.1)
    with pytest.raises(ValueError, match="choose one of: ema, sma, weighted, wma"):
        get_method("median")
