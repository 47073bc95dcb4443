"""Methods as running sums: what a watcher keeps between merges, and how it changes.

Every method is linear, so the merge of a window of checkpoints is a fixed linear function of
them. A method that can be updated incrementally describes that function through a few
*accumulators*, each itself a weighted sum over the window, and four rules over window
positions (0 = oldest):

    initial(m)  the accumulators' weights over a window of m checkpoints, from scratch
    append(m)   a window of m gains one checkpoint (at position m)
    drop(m)     a window of m loses its oldest (position 0; the others move down one)
    output(m)   the merge of a window of m, from its accumulators and a few of its checkpoints

A rule is ``{accumulator: ({old accumulator: coefficient}, {position: coefficient})}``.
``compose`` chains rules from the window a saved state describes to the window wanted and
returns one ``LinearUpdate``: the new accumulators and the merge, each as coefficients of the
old accumulators and of checkpoints named by iteration. The watcher reads exactly the
checkpoints with a non-zero coefficient, whatever the method; a method without a form
(``weighted``: arbitrary weights) is merged from its whole window every time.

The rules are exact in real arithmetic (tests/test_watch_forms.py derives every method's
weights from them); rounding is the business of ``merge.compensated``.
"""
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

Rule = Dict[str, Tuple[Dict[str, float], Dict[int, float]]]
Output = Tuple[Dict[str, float], Dict[int, float]]
# A term of an update: ("state", accumulator) of the state read, ("new", accumulator) of the
# state being computed (the merge is read off those), or ("checkpoint", iteration).
Term = Tuple[str, object]
STATE, NEW, CHECKPOINT = "state", "new", "checkpoint"


class IncrementalForm(ABC):
    """A method's merge as accumulators and the rules that keep them (see the module docstring)."""
    accumulators: Tuple[str, ...]
    can_drop: bool = True

    @abstractmethod
    def initial(self, m: int) -> Dict[str, List[float]]:
        """Each accumulator's weights over a window of ``m`` checkpoints, oldest first."""

    @abstractmethod
    def append(self, m: int) -> Rule:
        """A window of ``m`` (possibly 0) checkpoints gains one, at position ``m``."""

    def drop(self, m: int) -> Rule:
        """A window of ``m`` >= 2 checkpoints loses its oldest, position 0."""
        raise NotImplementedError(f"{type(self).__name__} keeps every checkpoint (unbounded window)")

    @abstractmethod
    def output(self, m: int) -> Output:
        """The merge of a window of ``m`` from its accumulators and some of its positions."""

    def describe(self) -> Dict[str, object]:
        """What makes two states interchangeable (recorded with every state)."""
        return {"form": type(self).__name__, "accumulators": list(self.accumulators)}


class SumForm(IncrementalForm):
    """SMA: the plain sum of the window; the merge is sum / m."""
    accumulators = ("sum",)

    def initial(self, m):
        return {"sum": [1.0] * m}

    def append(self, m):
        return {"sum": ({"sum": 1.0}, {m: 1.0})}

    def drop(self, m):
        return {"sum": ({"sum": 1.0}, {0: -1.0})}

    def output(self, m):
        return {"sum": 1.0 / m}, {}


class RampForm(IncrementalForm):
    """WMA: ``ramp`` = sum of i * x_i (i = 1..m); the merge is ramp / (m(m+1)/2). Dropping the
    oldest lowers every position by one, i.e. subtracts the plain sum: a window that can drop
    keeps ``sum`` too."""

    def __init__(self, bounded: bool):
        self.can_drop = bounded
        self.accumulators = ("ramp", "sum") if bounded else ("ramp",)

    def initial(self, m):
        weights = {"ramp": [float(i + 1) for i in range(m)]}
        if self.can_drop:
            weights["sum"] = [1.0] * m
        return weights

    def append(self, m):
        rule = {"ramp": ({"ramp": 1.0}, {m: float(m + 1)})}
        if self.can_drop:
            rule["sum"] = ({"sum": 1.0}, {m: 1.0})
        return rule

    def drop(self, m):
        if not self.can_drop:
            return super().drop(m)
        return {"ramp": ({"ramp": 1.0, "sum": -1.0}, {}), "sum": ({"sum": 1.0}, {0: -1.0})}

    def output(self, m):
        return {"ramp": 1.0 / (m * (m + 1) / 2)}, {}


class RecursionForm(IncrementalForm):
    """EMA over every checkpoint so far: the recursion itself, E = (1-alpha) E + alpha x."""
    accumulators = ("ema",)
    can_drop = False

    def __init__(self, alpha: float):
        self.alpha = alpha

    def initial(self, m):
        a = self.alpha
        return {"ema": [(1 - a) ** (m - 1)] + [a * (1 - a) ** (m - i) for i in range(2, m + 1)]}

    def append(self, m):
        if m == 0:  # E_1 = M_1: the recursion starts from the first checkpoint, not from zero
            return {"ema": ({}, {0: 1.0})}
        return {"ema": ({"ema": 1 - self.alpha}, {m: self.alpha})}

    def output(self, m):
        return {"ema": 1.0}, {}

    def describe(self):
        return dict(super().describe(), alpha=self.alpha)


class TailForm(IncrementalForm):
    """EMA over a window that moves: ``tail`` = sum over positions i >= 1 of (1-a)^(m-1-i) x_i;
    the merge is (1-a)^(m-1) x_0 + a * tail. When the oldest leaves, the next one's weight jumps
    from a(1-a)^(m-2) to (1-a)^(m-2): it leaves the tail and is read as the new oldest. So an
    update reads the new checkpoint and the window's new oldest (not the one leaving)."""
    accumulators = ("tail",)

    def __init__(self, alpha: float):
        self.alpha = alpha

    def initial(self, m):
        b = 1 - self.alpha
        return {"tail": [0.0] + [b ** (m - 1 - i) for i in range(1, m)]} if m else {"tail": []}

    def append(self, m):
        if m == 0:  # a window of one: the tail is empty
            return {"tail": ({}, {})}
        return {"tail": ({"tail": 1 - self.alpha}, {m: 1.0})}

    def drop(self, m):
        return {"tail": ({"tail": 1.0}, {1: -((1 - self.alpha) ** (m - 2))})}

    def output(self, m):
        return {"tail": self.alpha}, {0: (1 - self.alpha) ** (m - 1)}

    def describe(self):
        return dict(super().describe(), alpha=self.alpha)


@dataclass(frozen=True)
class LinearUpdate:
    """One update as coefficients: ``state[a]`` (each new accumulator, from old accumulators and
    checkpoints) and ``output`` (the merge, from new accumulators and checkpoints)."""
    accumulators: Tuple[str, ...]
    state: Dict[str, Dict[Term, float]]
    output: Dict[Term, float]

    @property
    def reads(self) -> List[int]:
        """The iterations the update reads (a non-zero coefficient anywhere), oldest first."""
        found = {term[1] for expr in (*self.state.values(), self.output) for term in expr if term[0] == CHECKPOINT}
        return sorted(found)

    @property
    def uses_state(self) -> bool:
        return any(term[0] == STATE for expr in (*self.state.values(), self.output) for term in expr)


def compose(form: IncrementalForm, window: Sequence[int], previous: Optional[Sequence[int]] = None
            ) -> Optional[LinearUpdate]:
    """The update to the accumulators of ``window`` (iterations, oldest first) from a state of
    ``previous`` (None: from scratch). None when ``previous`` cannot reach ``window`` by
    appending newer checkpoints and dropping its oldest ones."""
    window = list(window)
    if previous is None:
        weights = form.initial(len(window))
        exprs = {a: _clean({(CHECKPOINT, it): w for it, w in zip(window, weights[a])}) for a in form.accumulators}
        return _with_output(form, exprs, window)
    previous = list(previous)
    drops = _drops_to_reach(previous, window)
    if drops is None or (drops and not form.can_drop):
        return None
    exprs: Dict[str, Dict[Term, float]] = {a: {(STATE, a): 1.0} for a in form.accumulators}
    current = list(previous)
    for iteration in window[len(previous) - drops:]:
        current.append(iteration)
        exprs = _apply(form.append(len(current) - 1), exprs, current)
    for _ in range(drops):
        exprs = _apply(form.drop(len(current)), exprs, current)
        current.pop(0)
    assert current == window, (current, window)
    return _with_output(form, exprs, window)


def _drops_to_reach(previous: List[int], window: List[int]) -> Optional[int]:
    """How many of ``previous``'s oldest to drop so that the rest starts ``window``; None if none
    does (one element at least must remain: a state of nothing is no help)."""
    for drops in range(len(previous)):
        kept = previous[drops:]
        if window[:len(kept)] == kept:
            return drops
    return None


def _apply(rule: Rule, exprs: Dict[str, Dict[Term, float]], positions: List[int]) -> Dict[str, Dict[Term, float]]:
    updated = {}
    for name, (scales, coefs) in rule.items():
        expr: Dict[Term, float] = {}
        for old, scale in scales.items():
            for term, value in exprs[old].items():
                expr[term] = expr.get(term, 0.0) + scale * value
        for position, coef in coefs.items():
            term = (CHECKPOINT, positions[position])
            expr[term] = expr.get(term, 0.0) + coef
        updated[name] = _clean(expr)
    return updated


def _with_output(form: IncrementalForm, exprs: Dict[str, Dict[Term, float]], window: List[int]) -> LinearUpdate:
    scales, coefs = form.output(len(window))
    output: Dict[Term, float] = {}
    # The merge reads the NEW accumulators (computed first), not the terms they are made of.
    for name, scale in scales.items():
        output[(NEW, name)] = scale
    for position, coef in coefs.items():
        term = (CHECKPOINT, window[position])
        output[term] = output.get(term, 0.0) + coef
    return LinearUpdate(tuple(form.accumulators), exprs, _clean(output))


def _clean(expr: Dict[Term, float]) -> Dict[Term, float]:
    """Exact zeros (a coefficient that cancelled) are no terms at all: nothing to read."""
    return {term: value for term, value in expr.items() if value != 0.0}


def expand_output(update: LinearUpdate) -> Dict[Term, float]:
    """The merge as coefficients of old accumulators and checkpoints only (for tests and costs)."""
    expanded: Dict[Term, float] = {}
    for term, coef in update.output.items():
        if term[0] == NEW:
            for inner, value in update.state[term[1]].items():
                expanded[inner] = expanded.get(inner, 0.0) + coef * value
        else:
            expanded[term] = expanded.get(term, 0.0) + coef
    return _clean(expanded)
