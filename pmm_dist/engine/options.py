"""What a merge is asked to do: one keyword-only dataclass, validated on construction.

Each field carries its command-line help; ``pmm_dist.cli.merge`` builds ``pmm-dist merge``'s
flags from these fields, so the CLI and the Python API cannot drift apart. Method options
(``alpha``, ``weights``, ``normalize``) are passed through to the method, which owns their
meaning and defaults (see ``pmm_dist.merge.methods``).
"""
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional, Sequence

from ..errors import UsageError
from ..formats import available_formats
from ..merge.methods import DEFAULT_METHOD, available_methods, get_method
from ..plan.selection import TensorFilter
from ..plan.types import NonfinitePolicy, OptimizerPolicy

METHOD_OPTION = "method_option"


def option(default, help: str, **cli) -> Any:
    """A MergeOptions field: its default, its --help text, and argparse details (``cli``)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True, kw_only=True)
class MergeOptions:
    """Everything a merge needs; ``pmm-dist merge`` builds one of these from its flags."""
    sources: Sequence[str] = option((), "one run directory (tracker + checkpoint dirs) or several checkpoint "
                                        "directories", positional=True, metavar="SOURCE")
    out: str = option("", "output directory (refused if it exists, unless --overwrite)", required=True)
    method: str = option(DEFAULT_METHOD, f"merge method (default: {DEFAULT_METHOD})", choices=available_methods())
    alpha: Optional[float] = option(None, "the rate alpha, 0 < alpha <= 1", method_option=True)
    weights: Optional[Sequence[float]] = option(None, "explicit weights w1,w2,... oldest first", method_option=True,
                                                parse="floats")
    normalize: Optional[bool] = option(None, "use --weights as given instead of normalising them to sum 1",
                                       method_option=True, flag="--no-normalize", const=False)
    last: Optional[int] = option(None, "merge the newest N checkpoints")
    interval: Optional[int] = option(None, "iterations between merged checkpoints")
    iterations: Optional[Sequence[int]] = option(None, "exact iterations a,b,c to merge (or tags: global_step1000,...)",
                                                 parse="iterations")
    format: str = option("auto", "checkpoint format (default: detect)", choices=("auto", *available_formats()))
    device: Optional[str] = option(None, "cpu or cuda (default: cuda when available)")
    optimizer: OptimizerPolicy = option(OptimizerPolicy.DROP, "drop: weights only (default); latest: the newest "
                                        "checkpoint's optimizer moments, steps, scheduler and RNG, with the fp32 "
                                        "master weights merged; merge: the masters and every floating-point "
                                        "optimizer state (Adam moments) merged, steps, scheduler and RNG the newest's")
    on_nonfinite: NonfinitePolicy = option(NonfinitePolicy.ERROR, "a NaN/Inf in a merged tensor: fail naming tensor "
                                           "and checkpoint (default), warn, or ignore")
    include: Optional[Sequence[str]] = option(None, "merge only the tensors whose names match one of these glob "
                                              "patterns (comma-separated or repeated; e.g. 'model.decoder.*'); the "
                                              "others are the newest checkpoint's", parse="globs")
    exclude: Optional[Sequence[str]] = option(None, "do not merge the tensors whose names match one of these glob "
                                              "patterns; they are the newest checkpoint's", parse="globs")
    allow_mixed_runs: bool = option(False, "merge checkpoints even though what identifies their runs differs "
                                           "(as the format records it: saved args, model config)")
    dry_run: bool = option(False, "print the plan and write nothing")
    overwrite: bool = option(False, "replace an existing output directory")
    resume: bool = option(False, "finish an interrupted merge into the same --out (same inputs and options), "
                                 "redoing only the files not yet merged")
    quiet: bool = option(False, "no progress bar and no summary")
    backend: str = option("gloo", "process-group backend for the metadata exchange (default: gloo; no tensors "
                                  "cross ranks)", choices=("gloo", "nccl"))
    timeout_minutes: float = option(180.0, "how long a rank waits for the others at a collective step (default: 180)")

    def __post_init__(self):
        if isinstance(self.sources, (str, bytes, os.PathLike)):
            raise TypeError("sources must be a sequence of paths (a list), not a single path: "
                            f"use sources=[{str(self.sources)!r}]")
        if not self.sources:
            raise UsageError("no sources given: pass a run directory or checkpoint directories")
        if not self.out:
            raise UsageError("--out is required")
        object.__setattr__(self, "optimizer", _parse(OptimizerPolicy, self.optimizer, "--optimizer"))
        object.__setattr__(self, "on_nonfinite", _parse(NonfinitePolicy, self.on_nonfinite, "--on-nonfinite"))
        if self.device not in (None, "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise UsageError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device and self.device.startswith("cuda") and not _cuda_available():
            raise UsageError("--device cuda requested but no CUDA device is available")
        if self.format not in ("auto", *available_formats()):
            raise UsageError(f"unknown format {self.format!r}; choose one of: auto, {', '.join(available_formats())}")
        if self.backend not in ("gloo", "nccl"):
            raise UsageError(f"--backend must be gloo or nccl, got {self.backend!r}")
        for name in ("last", "interval"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name} must be at least 1, got {value}")
        if self.iterations and (self.last is not None or self.interval is not None):
            raise UsageError("--iterations selects exactly; do not combine it with --last or --interval")
        if not self.timeout_minutes > 0:
            raise UsageError(f"--timeout-minutes must be more than 0, got {self.timeout_minutes}")
        # The method checks its own options now (unknown ones, alpha's range), before any I/O.
        get_method(self.method).check(self.method_options())

    def tensor_filter(self) -> TensorFilter:
        return TensorFilter(tuple(self.include or ()), tuple(self.exclude or ()))

    def method_options(self) -> Dict[str, Any]:
        """The options meant for the merge method, as given (None: not given)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get(METHOD_OPTION)}


def _cuda_available() -> bool:
    import torch  # here, not at the top: the CLI builds its flags from this module without torch
    return torch.cuda.is_available()


def _parse(choice, value, flag: str):
    try:
        return choice.parse(value, flag)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
