"""``pmm_manifest.json``: what a merge wrote and from what, as one versioned dataclass.

Written by the commit (atomically, before the output is marked loadable) and read by
``--resume``, ``verify`` and ``inspect``. JSON, never pickle: it is our own metadata and must
be readable by anything.
"""
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..io.atomic import write_json_atomically
from ..plan.types import MODEL_WEIGHTS_FROM, MODEL_WEIGHTS_NOTE, WEIGHTS_FROM_MASTERS, WEIGHTS_FROM_MODEL, UnitResult

MANIFEST = "pmm_manifest.json"
MANIFEST_FORMAT_VERSION = 1


@dataclass
class Manifest:
    format: str
    method: str
    method_options: Dict[str, Any]
    weights: List[float]
    sources: List[Dict[str, Any]]           # [{"iteration", "path"}], oldest first
    optimizer: str
    layout: Dict[str, Any]                  # the output's (the newest source's) parallel layout
    output_checkpoint: str                  # the checkpoint directory relative to OUT ("" = OUT itself)
    tracker: str                            # the commit marker relative to OUT
    files: List[Dict[str, Any]]             # [{"path", "bytes", "sha256"}], every file written
    fingerprint: str
    tensor_filter: Dict[str, List[str]] = field(default_factory=dict)   # --include / --exclude, if given
    world_size: int = 1
    device: str = "cpu"
    bytes_read: int = 0
    bytes_read_by_source: List[int] = field(default_factory=list)  # planned, one per source, oldest first
    bytes_written: int = 0
    tensors_merged: int = 0
    units_resumed: int = 0
    metadata_bytes_exchanged: int = 0
    peak_rss_bytes_by_rank: List[int] = field(default_factory=list)
    timings_s: Dict[str, float] = field(default_factory=dict)
    source_layouts: List[Dict[str, Any]] = field(default_factory=list)  # each source's layout, as `sources`
    # Where the model files' merged weights came from: "fp32 masters" (the merged fp32 master
    # weights rounded to the model dtype), "model copies" (the model files' own tensors merged), or
    # both with the files of each; the notes say why a file's weights are not the masters'.
    model_weights_from: str = ""
    model_weights_notes: List[str] = field(default_factory=list)
    created_unix: float = 0.0
    pmm_dist_version: str = ""
    format_version: int = MANIFEST_FORMAT_VERSION

    def write(self, out: str) -> str:
        path = os.path.join(out, MANIFEST)
        write_json_atomically(path, dataclasses.asdict(self))
        return path

    @classmethod
    def read(cls, out: str) -> "Manifest":
        """The manifest of the output ``out``; OSError / ValueError when missing or unreadable."""
        with open(os.path.join(out, MANIFEST)) as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{os.path.join(out, MANIFEST)}: not a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:  # a required entry is missing
            raise ValueError(f"{os.path.join(out, MANIFEST)}: {exc}") from None

    @classmethod
    def read_if_present(cls, out: str) -> Optional["Manifest"]:
        try:
            return cls.read(out)
        except (OSError, ValueError):
            return None


def model_weights_summary(results: Sequence[UnitResult], default: str = "") -> Tuple[str, List[str]]:
    """(``model_weights_from``, ``model_weights_notes``) from the units' details. Units that
    write no model weights say nothing; if none says anything, ``default`` (what the format
    declared at planning), else the weights are the model's own."""
    sources = {}
    for result in results:
        if MODEL_WEIGHTS_FROM in result.details:
            sources.setdefault(str(result.details[MODEL_WEIGHTS_FROM]), []).append(result.relpath)
    notes = sorted({f"{r.relpath}: {r.details[MODEL_WEIGHTS_NOTE]}" for r in results if r.details.get(MODEL_WEIGHTS_NOTE)})
    if len(sources) <= 1:
        return (next(iter(sources), default or WEIGHTS_FROM_MODEL)), notes
    order = [WEIGHTS_FROM_MASTERS, WEIGHTS_FROM_MODEL] + sorted(set(sources) - {WEIGHTS_FROM_MASTERS, WEIGHTS_FROM_MODEL})
    return "; ".join(f"{name} ({len(sources[name])} files)" for name in order if name in sources), notes
