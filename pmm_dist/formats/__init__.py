"""Registered checkpoint formats and format detection."""
from typing import Dict, List, Sequence, Type

from ..errors import MergeError
from .base import CheckpointFormat, CheckpointRef, MergeContext, UnitResult
from .dcp import DcpFormat
from .deepspeed import DeepSpeedFormat
from .hf import HuggingFaceFormat
from .megatron import MegatronLegacyFormat
from .megatron_dist import MegatronDistFormat

FORMATS: Dict[str, Type[CheckpointFormat]] = {
    # Before megatron: the legacy format claims any run directory with a tracker file, and a
    # torch_dist run has one too. megatron-dist itself needs metadata.json naming torch_dist.
    MegatronDistFormat.name: MegatronDistFormat,
    MegatronLegacyFormat.name: MegatronLegacyFormat,
    DcpFormat.name: DcpFormat,  # after megatron-dist: a torch_dist checkpoint is a DCP checkpoint too
    HuggingFaceFormat.name: HuggingFaceFormat,
    DeepSpeedFormat.name: DeepSpeedFormat,
}


def available_formats() -> List[str]:
    return list(FORMATS)


def resolve_format(name: str, sources: Sequence[str]) -> CheckpointFormat:
    """The named format, or with ``auto`` the one format that recognises every source."""
    if name != "auto":
        if name not in FORMATS:
            raise MergeError(f"unknown format {name!r}; choose one of: auto, {', '.join(FORMATS)}")
        return FORMATS[name]()
    for fmt in FORMATS.values():
        if all(fmt.recognizes(src) for src in sources):
            return fmt()
    raise MergeError(f"could not detect the checkpoint format of {', '.join(sources)}; tried: "
                     f"{', '.join(f'{n} ({f.description})' for n, f in FORMATS.items())}. "
                     "Pass --format explicitly, or check the path.")


__all__ = ["CheckpointFormat", "CheckpointRef", "MergeContext", "UnitResult", "FORMATS",
           "available_formats", "resolve_format"]
