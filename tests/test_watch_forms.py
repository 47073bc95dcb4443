"""The watcher's arithmetic without checkpoints: method forms, compensated sums, state files, windows.

- Every method form, composed over random histories (growth, slides, jumps of several checkpoints,
  restarts from older states), yields exactly the method's own weights for the window.
- The compensated state stays exact (SMA, integer coefficients) or within 2^-100 (EMA) of the
  real-number result over thousands of updates whose values cancel; a plain float64 state does not.
- The state file round-trips, leaves zero compensation out, and its bytes depend on values only.
"""
import math
import os
import random
from fractions import Fraction

import pytest
import torch

from pmm_dist.errors import InputError
from pmm_dist.merge import compensated
from pmm_dist.merge.incremental import CHECKPOINT, compose, expand_output
from pmm_dist.merge.methods import get_method
from pmm_dist.watcher.state import StateReader, StateWriter
from pmm_dist.watcher.window import due, window_for

FORMS = [("sma", {}), ("wma", {}), ("ema", {"alpha": 0.2}), ("ema", {"alpha": 0.37}), ("ema", {"alpha": 1.0})]


def _as_weights(update, window, previous_weights):
    """The merge's weights over ``window``, with the previous state's accumulators expanded."""
    weights = {it: 0.0 for it in window}
    for term, coef in expand_output(update).items():
        if term[0] == CHECKPOINT:
            weights[term[1]] = weights.get(term[1], 0.0) + coef
        else:
            for it, w in previous_weights[term[1]].items():
                weights[it] = weights.get(it, 0.0) + coef * w
    return weights


def _accumulator_weights(update, previous_weights):
    result = {}
    for name, expr in update.state.items():
        acc = {}
        for term, coef in expr.items():
            if term[0] == CHECKPOINT:
                acc[term[1]] = acc.get(term[1], 0.0) + coef
            else:
                for it, w in previous_weights[term[1]].items():
                    acc[it] = acc.get(it, 0.0) + coef * w
        result[name] = acc
    return result


@pytest.mark.parametrize("name,options", FORMS)
@pytest.mark.parametrize("last", [None, 1, 2, 4, 7])
def test_forms_give_the_methods_weights_on_any_path(name, options, last):
    method = get_method(name)
    form = method.incremental_form(options, bounded=last is not None)
    rng = random.Random(hash((name, last, tuple(options.items()))) % 1000)
    history, states = [], []   # states: (window, accumulator weights by iteration)
    for iteration in range(1, 60):
        history.append(iteration * 10)
        if rng.random() < 0.3:
            continue  # not published: the next update jumps over it
        window = history[-last:] if last else list(history)
        expected = method.weights(len(window), **options)
        start = rng.choice(states[-3:]) if states and rng.random() < 0.8 else None
        update = compose(form, window, start[0] if start else None)
        if update is None:  # unreachable (nothing shared): from scratch
            assert start is not None
            update, start = compose(form, window), None
        previous = start[1] if start else {}
        weights = _as_weights(update, window, previous)
        for it in window:
            assert weights[it] == pytest.approx(expected[window.index(it)], rel=1e-12, abs=1e-15), (window, it)
        assert all(abs(w) < 1e-12 for it, w in weights.items() if it not in window)
        states.append((window, _accumulator_weights(update, previous)))
        if start is not None:
            # the point of it all: each checkpoint appended costs at most two reads
            appended = len([it for it in window if it > start[0][-1]])
            assert len(update.reads) <= 2 * appended, (start[0], window, update.reads)


def test_reads_of_each_method():
    def reads(name, options, last, previous, window):
        form = get_method(name).incremental_form(options, bounded=last is not None)
        return compose(form, window, previous).reads
    assert reads("ema", {"alpha": 0.2}, None, [1, 2, 3], [1, 2, 3, 4]) == [4]          # the new one only
    assert reads("sma", {}, 3, [1, 2, 3], [2, 3, 4]) == [1, 4]                          # new and leaving
    assert reads("wma", {}, 3, [1, 2, 3], [2, 3, 4]) == [1, 4]
    assert reads("ema", {"alpha": 0.2}, 3, [1, 2, 3], [2, 3, 4]) == [2, 4]              # new and new oldest
    assert reads("sma", {}, 3, [1, 2, 3], [3, 4, 5]) == [1, 2, 4, 5]                    # a jump of two
    assert compose(get_method("ema").incremental_form({"alpha": 0.2}, False), [2, 3], [1, 2]) is None
    assert compose(get_method("sma").incremental_form({}, True), [5, 6], [1, 2]) is None  # nothing shared
    assert get_method("weighted").incremental_form({"weights": [1, 2]}, True) is None


def _exact(pair):
    hi, lo = pair
    values = [Fraction(float(h)) for h in hi]
    if lo is not None:
        values = [v + Fraction(float(l)) for v, l in zip(values, lo)]
    return values


def test_sliding_sum_stays_exact_where_a_float64_one_drifts():
    """Elements go +B, t, -B, t', ... (B near 1, t tiny, 24 significant bits each): a window of
    four holds B and -B, its sum is t + t' (1e-12), and B + t needs more than float64's 53 bits."""
    rng = random.Random(0)
    values = []
    big = 1.0
    for i in range(3000):
        if i % 4 == 0:
            big = 1.0 + rng.random() * 2 ** -10
        tiny = rng.random() * 1e-12
        phase = [big, tiny, -big, tiny][i % 4]
        values.append(torch.tensor([phase, -phase * 3, tiny], dtype=torch.float32))
    n = 4
    state = (torch.zeros(3, dtype=torch.float64), None)
    plain = torch.zeros(3, dtype=torch.float64)
    plain_worst = 0.0
    for i, x in enumerate(values):
        terms = [(1.0, state), (1.0, x)] + ([(-1.0, values[i - n])] if i >= n else [])
        state = compensated.combine(terms, x)
        plain = plain + x.double() - (values[i - n].double() if i >= n else 0)
        exact = [sum(Fraction(float(values[j][k])) for j in range(max(0, i - n + 1), i + 1)) for k in range(3)]
        assert _exact(state) == exact
        for k in range(3):  # the plain state's error, in ulps of float32 at the exact sum
            scale = abs(float(exact[k])) or 2.0 ** -149
            ulp32 = 2.0 ** (math.frexp(scale)[1] - 24)
            plain_worst = max(plain_worst, abs(float(Fraction(float(plain[k])) - exact[k])) / ulp32)
    assert plain_worst > 1, "the test must be hard enough to break a plain float64 state"


def test_ema_recursion_within_2_to_minus_100_over_a_long_run():
    """Relative to the magnitude of its terms (the values may cancel to anything)."""
    rng = random.Random(1)
    alpha = 0.2
    state, exact = None, None
    for i in range(1000):
        x = torch.tensor([rng.uniform(-1, 1), (-1) ** i * (1 + 1e-7 * rng.random()), rng.uniform(-1e-30, 1e-30)],
                         dtype=torch.float32)
        values = [abs(float(v)) for v in x]
        if state is None:
            state, exact, magnitude = (x.double(), None), [Fraction(float(v)) for v in x], values
        else:
            state = compensated.combine([(1 - alpha, state), (alpha, x)], x)
            exact = [Fraction(1 - alpha) * e + Fraction(alpha) * Fraction(float(v)) for e, v in zip(exact, x)]
            magnitude = [(1 - alpha) * m + alpha * v for m, v in zip(magnitude, values)]
        for got, want, size in zip(_exact(state), exact, magnitude):  # relative to sum_i w_i |x_i|
            assert abs(float(got - want)) <= size * 2.0 ** -100, (float(got - want), size)


def test_products_are_exact_for_every_source_dtype():
    rng = random.Random(2)
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        x = torch.tensor([rng.uniform(-3, 3) for _ in range(64)], dtype=torch.float64).to(dtype)
        for c in (0.2, 1 / 3, -0.8, 7.0, 1e-5):
            hi, lo = compensated.product(x, c)
            total = [Fraction(float(h)) + (Fraction(float(l)) if lo is not None else 0) for h, l in
                     zip(hi, lo if lo is not None else hi)]
            assert total == [Fraction(float(v)) * Fraction(c) for v in x.double()], (dtype, c)


def test_state_file_round_trip_and_zero_compensation_left_out(tmp_path):
    path = str(tmp_path / "unit.pt.pmmstate")
    writer = StateWriter(path)
    a = torch.arange(10, dtype=torch.float64) / 3
    entry = writer.begin("key 'w'", (2, 5), torch.bfloat16, ("sum",))
    writer.block(entry, {"sum": (a, torch.zeros(10, dtype=torch.float64))})
    entry = writer.begin("key 'b'", (3,), torch.float32, ("ramp", "sum"))
    writer.block(entry, {"ramp": (a[:3], a[:3] * 2 ** -60), "sum": (a[3:6], None)})
    size = writer.close()
    assert size == os.path.getsize(path)
    # 'w': no compensation stored (zero); its values a/3 need float64
    assert writer.num_bytes == 10 * 8 + (3 * 8 + 3 * 4) + 3 * 8
    reader = StateReader(str(tmp_path))
    (hi, lo), num_bytes = reader.read(reader.entries["key 'w'"], "sum", 0, 10)
    assert torch.equal(hi, a) and lo is None and num_bytes == 80
    (hi, lo), num_bytes = reader.read(reader.entries["key 'b'"], "ramp", 0, 3)
    assert torch.equal(hi, a[:3]) and torch.equal(lo, (a[:3] * 2 ** -60).float().double()) and num_bytes == 36
    assert reader.entries["key 'b'"].shape == (3,) and reader.entries["key 'b'"].dtype == torch.float32
    reader.close()
    # same values, same bytes
    again = str(tmp_path / "again" / "unit.pt.pmmstate")
    writer = StateWriter(again)
    entry = writer.begin("key 'w'", (2, 5), torch.bfloat16, ("sum",))
    writer.block(entry, {"sum": (a, torch.zeros(10, dtype=torch.float64))})
    entry = writer.begin("key 'b'", (3,), torch.float32, ("ramp", "sum"))
    writer.block(entry, {"ramp": (a[:3], a[:3] * 2 ** -60), "sum": (a[3:6], None)})
    writer.close()
    assert open(path, "rb").read() == open(again, "rb").read()
    # values exact in float32 take 4 bytes an element, and read back exactly
    exact = str(tmp_path / "exact" / "unit.pt.pmmstate")
    writer = StateWriter(exact)
    entry = writer.begin("key 'e'", (4,), torch.bfloat16, ("sum",))
    values = torch.tensor([1.5, -2.25, 3e-30, 0.0], dtype=torch.float32).double()
    writer.block(entry, {"sum": (values, None)})
    writer.close()
    assert writer.num_bytes == 16
    reader = StateReader(os.path.dirname(exact))
    (hi, lo), num_bytes = reader.read(reader.entries["key 'e'"], "sum", 0, 4)
    assert torch.equal(hi, values) and lo is None and num_bytes == 16
    reader.close()
    with open(again, "r+b") as f:
        f.truncate(20)
    with pytest.raises(InputError, match="not a pmm_dist state file"):
        StateReader(str(tmp_path / "again"))


def test_windows_and_due_merges():
    known = [100, 200, 300, 400, 500]
    assert window_for(300, known) == [100, 200, 300]
    assert window_for(500, known, last=3) == [300, 400, 500]
    assert window_for(200, known, last=3) == [100, 200]                  # fewer than N: all of them
    assert window_for(500, known, interval=200) == [100, 300, 500]
    assert window_for(400, known, last=3, interval=200) == [200, 400]
    with pytest.raises(InputError, match="needs iteration"):
        window_for(500, [100, 200, 500], last=3, interval=100)
    assert due([100, 200, 300], None, backfill=False) == [300]
    assert due([100, 200, 300], None, backfill=True) == [100, 200, 300]
    assert due([100, 200, 300, 400], 200, backfill=True) == [300, 400]
    assert due([100, 200], 200, backfill=True) == []
