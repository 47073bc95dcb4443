"""Merge methods: plug-ins that turn a checkpoint count into per-checkpoint weights.

Every PMA method is linear and elementwise (``M = sum_i w_i * M_i``), so a method is fully
described by its weight vector, oldest checkpoint first; the engine does all the I/O. A new
method is one decorated function: its keyword-only parameters are the method's options.
"""
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..errors import UsageError
from .incremental import IncrementalForm, RampForm, RecursionForm, SumForm, TailForm

_REGISTRY: Dict[str, "MergeMethod"] = {}


@dataclass(frozen=True)
class MergeMethod:
    name: str
    compute: Callable[..., List[float]]
    defaults: Dict[str, Any]  # the keyword-only options the method accepts, with their defaults
    summary: str
    # (effective options, bounded window) -> the method as running sums, for the watcher; None:
    # the method has no such form and every update merges its whole window.
    incremental: Optional[Callable[[Dict[str, Any], bool], IncrementalForm]] = None

    @property
    def parameters(self) -> tuple:
        return tuple(self.defaults)

    def options(self, given: Dict[str, Any]) -> Dict[str, Any]:
        """The method's effective options: ``given`` (None = not given) over its defaults.
        An option the method does not take is a UsageError naming the methods that do."""
        unknown = sorted(k for k, v in given.items() if v is not None and k not in self.defaults)
        if unknown:
            takers = {k: [m.name for m in _REGISTRY.values() if k in m.defaults] for k in unknown}
            hints = "; ".join(f"{k} is an option of --method {' or '.join(t)}" for k, t in takers.items() if t)
            raise UsageError(f"method {self.name!r} takes no option {', '.join(unknown)} "
                             f"(it takes: {', '.join(self.parameters) or 'none'})" + (f"; {hints}" if hints else ""))
        return {k: given[k] if given.get(k) is not None else default for k, default in self.defaults.items()}

    def fixed_count(self, given: Dict[str, Any]) -> Optional[int]:
        """The number of checkpoints ``given`` options merge, when they fix it (explicit
        weights), else None (any number)."""
        explicit = self.options(given).get("weights")
        return len(explicit) if explicit else None

    def check(self, given: Dict[str, Any]) -> None:
        """Validate ``given`` before any I/O, by computing the weights for the one checkpoint
        count they allow (the number of explicit weights, else 1)."""
        explicit = self.options(given).get("weights")
        self.weights(len(explicit) if explicit else 1, **given)

    def incremental_form(self, given: Dict[str, Any], bounded: bool) -> Optional[IncrementalForm]:
        """The method as accumulators a watcher updates (see merge.incremental), or None.
        ``bounded``: the window has a fixed length, so checkpoints leave it."""
        if self.incremental is None:
            return None
        return self.incremental(self.options(given), bounded)

    def weights(self, num_checkpoints: int, **given) -> List[float]:
        if num_checkpoints < 1:
            raise UsageError("at least one checkpoint is needed")
        options = {k: v for k, v in self.options(given).items() if v is not None}
        return [float(w) for w in self.compute(num_checkpoints, **options)]


def register(name: str, incremental: Optional[Callable[[Dict[str, Any], bool], IncrementalForm]] = None):
    """Register ``fn(num_checkpoints, *, option=default, ...) -> weights`` as method ``name``;
    ``incremental(options, bounded)`` gives its running-sum form (merge.incremental), if any."""

    def wrap(fn):
        defaults = {p.name: (None if p.default is inspect.Parameter.empty else p.default)
                    for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        _REGISTRY[name] = MergeMethod(name, fn, defaults, summary, incremental)
        return fn

    return wrap


def get_method(name: str) -> MergeMethod:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown merge method {name!r}; choose one of: {', '.join(available_methods())}") from None


def available_methods() -> List[str]:
    return sorted(_REGISTRY)


DEFAULT_METHOD = "sma"  # the PMA paper's default


@register("sma", incremental=lambda options, bounded: SumForm())
def simple_moving_average(num_checkpoints: int) -> List[float]:
    """w_i = 1/N"""
    return [1.0 / num_checkpoints] * num_checkpoints


@register("wma", incremental=lambda options, bounded: RampForm(bounded))
def weighted_moving_average(num_checkpoints: int) -> List[float]:
    """w_i = i / (N(N+1)/2): later checkpoints weigh more"""
    total = num_checkpoints * (num_checkpoints + 1) / 2
    return [i / total for i in range(1, num_checkpoints + 1)]


@register("ema", incremental=lambda options, bounded: TailForm(options["alpha"]) if bounded
          else RecursionForm(options["alpha"]))
def exponential_moving_average(num_checkpoints: int, *, alpha: float = 0.2) -> List[float]:
    """w_1 = (1-alpha)^(N-1), w_i = alpha (1-alpha)^(N-i) for i >= 2 (E_1 = M_1, E_i = alpha M_i + (1-alpha) E_{i-1}; sums to 1)"""
    if not 0.0 < alpha <= 1.0:
        raise UsageError(f"--alpha must be in (0, 1], got {alpha}")
    # The recursion starts from M_1, not from zero: w_1 = (1-alpha)^(N-1). The closed form
    # alpha*(1-alpha)^(N-i) for every i would sum to 1-(1-alpha)^N and shrink the model.
    n = num_checkpoints
    return [(1 - alpha) ** (n - 1)] + [alpha * (1 - alpha) ** (n - i) for i in range(2, n + 1)]


@register("weighted")
def explicit_weights(num_checkpoints: int, *, weights: Optional[Sequence[float]] = None,
                     normalize: bool = True) -> List[float]:
    """w_i from --weights (oldest first), normalised to sum 1 unless --no-normalize"""
    if weights is None:
        raise UsageError("method 'weighted' needs --weights w1,w2,... (oldest checkpoint first)")
    if not all(math.isfinite(w) for w in weights):
        raise UsageError(f"--weights must be finite numbers, got {','.join(map(str, weights))}")
    if len(weights) != num_checkpoints:
        raise UsageError(f"--weights has {len(weights)} values but {num_checkpoints} checkpoints are selected")
    if not normalize:
        return list(weights)
    total = sum(weights)
    if total == 0:
        raise UsageError("--weights sum to 0 and cannot be normalised (use --no-normalize to keep them)")
    return [w / total for w in weights]
