"""Registered checkpoint formats and format detection.

Formats are imported when first used, not with the package: ``pmm-dist --help`` and a merge
of one format never pay for the others' imports (torch.distributed.checkpoint, safetensors);
the base classes too (they import torch), so the registry's names cost nothing.
"""
import importlib
from typing import TYPE_CHECKING, Dict, List, Sequence, Tuple, Type

from ..errors import InputError, UsageError

if TYPE_CHECKING:
    from .base import CheckpointFormat, MergeContext

# Detection order matters: megatron-dist before megatron (a torch_dist run has the legacy tracker
# too) and before dcp (a torch_dist checkpoint is a DCP checkpoint too).
# name -> (module, class, how to load a merged output: shown by --help without importing the format)
_REGISTRY: Dict[str, Tuple[str, str, str]] = {
    "megatron-dist": ("pmm_dist.formats.megatron_dist", "MegatronDistFormat",
                      "Megatron-LM --ckpt-format torch_dist --load OUT --finetune --no-load-optim --no-load-rng"),
    "megatron": ("pmm_dist.formats.megatron", "MegatronLegacyFormat",
                 "Megatron-LM --ckpt-format torch --load OUT --finetune --no-load-optim --no-load-rng "
                 "(same TP/PP/EP as the newest source)"),
    "dcp": ("pmm_dist.formats.dcp", "DcpFormat", "dcp.load(state_dict, checkpoint_id=OUT)"),
    "hf": ("pmm_dist.formats.hf", "HuggingFaceFormat", "AutoModelForCausalLM.from_pretrained(OUT)"),
    "deepspeed": ("pmm_dist.formats.deepspeed", "DeepSpeedFormat",
                  "engine.load_checkpoint(OUT, load_module_only=True, load_optimizer_states=False, "
                  "load_lr_scheduler_states=False)"),
}


def available_formats() -> List[str]:
    return list(_REGISTRY)


def loading_hints() -> Dict[str, str]:
    """How each format's merged output is loaded, by format name (no format is imported)."""
    return {name: hint for name, (_, _, hint) in _REGISTRY.items()}


def __getattr__(name):
    if name in ("CheckpointFormat", "MergeContext"):
        from . import base
        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def format_class(name: str) -> "Type[CheckpointFormat]":
    try:
        module, attr, _ = _REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown format {name!r}; choose one of: auto, {', '.join(_REGISTRY)}") from None
    return getattr(importlib.import_module(module), attr)


def resolve_format(name: str, sources: Sequence[str]) -> "CheckpointFormat":
    """The named format, or with ``auto`` the one format that recognises every source."""
    if name != "auto":
        return format_class(name)()
    classes = [format_class(n) for n in _REGISTRY]
    # Each source's own format (the first, most specific, that claims it): all must agree, so
    # an unfinished torch_dist checkpoint is never merged as plain DCP beside finished ones.
    detected = {src: next((f for f in classes if f.recognizes(src)), None) for src in sources}
    unknown = [src for src, fmt in detected.items() if fmt is None]
    if unknown:
        raise InputError(f"could not detect the checkpoint format of {', '.join(unknown)}; tried: "
                         f"{', '.join(f'{f.name} ({f.description})' for f in classes)}. "
                         "Pass --format explicitly, or check the path.")
    kinds = {fmt for fmt in detected.values()}
    if len(kinds) > 1:
        raise InputError("the sources are not all of one format: " +
                         "; ".join(f"{src} is {fmt.name}" for src, fmt in detected.items()) +
                         ". Give checkpoints of one format (an unfinished save? pass --format to force one)")
    return kinds.pop()()


__all__ = ["CheckpointFormat", "MergeContext", "available_formats", "format_class", "resolve_format"]
