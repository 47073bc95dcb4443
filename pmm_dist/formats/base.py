"""The format plug-in interface.

A format knows how to find the checkpoints of a run, which files make up one checkpoint,
how to check and merge one file, and how to mark an output as loadable (its tracker). The
engine calls these in this order and never branches on a format's name:

    (coordinator) discover -> plan_units          # metadata only
    (every rank)  check_unit for its own units    # verdicts gathered before anything is written
    (every rank)  merge_unit for its own units    # into the staging directory
    (coordinator) finalize                        # format metadata from all units' results
    (coordinator) write_tracker                   # last, after the staged output moved into place
                                                  # and the manifest
"""
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch

from ..kernel import Accumulator, weighted_sum
from ..planner import WorkUnit


@dataclass(frozen=True)
class CheckpointRef:
    """One source checkpoint: its iteration (the merge order) and its directory."""
    iteration: int
    path: str


@dataclass(frozen=True)
class MergeContext:
    """What a format needs to merge a unit, beyond the unit itself."""
    weights: Sequence[float]          # one per checkpoint, oldest first
    device: torch.device
    optimizer_policy: str             # "drop" | "latest"
    on_progress: Callable[[int], None] = field(default=lambda num_bytes: None)
    on_nonfinite: str = "error"       # "error" | "warn" | "ignore"

    def merge_tensor(self, sources: Sequence[torch.Tensor], what: str, source_names: Sequence[str],
                     *, sources_are_mapped: bool = True) -> torch.Tensor:
        """The weighted sum of one tensor's N sources (see kernel.weighted_sum), applying the
        non-finite policy; ``what`` and ``source_names`` name the tensor and files in errors."""
        return weighted_sum(sources, self.weights, self.device, sources_are_mapped=sources_are_mapped,
                            on_nonfinite=self.on_nonfinite, what=what, source_names=source_names)

    def accumulator(self, shape, what: str) -> Accumulator:
        """For sources read one whole chunk at a time: add ``(source, weights[i], name)`` in
        checkpoint order, then take ``result()`` (same numbers as ``merge_tensor``)."""
        return Accumulator(shape, self.device, on_nonfinite=self.on_nonfinite, what=what)


@dataclass(frozen=True)
class UnitResult:
    relpath: str                      # the written file, relative to the output checkpoint dir
    num_bytes_written: int
    num_bytes_read: int
    sha256: str
    num_tensors_merged: int
    details: Dict[str, object] = field(default_factory=dict)  # small, format-specific (for finalize)


class CheckpointFormat(ABC):
    name: ClassVar[str]
    description: ClassVar[str]

    @classmethod
    @abstractmethod
    def recognizes(cls, path: str) -> bool:
        """True if ``path`` (a run directory or one checkpoint directory) is in this format."""

    @abstractmethod
    def discover(self, sources: Sequence[str]) -> List[CheckpointRef]:
        """All usable checkpoints in ``sources``, oldest first (a run dir, or checkpoint dirs)."""

    @abstractmethod
    def plan_units(self, checkpoints: Sequence[CheckpointRef], optimizer_policy: str,
                   world_size: int) -> List[WorkUnit]:
        """Validate the file layout of every checkpoint against the newest and list the output
        files as work units. Raises InputError naming every missing or unexpected file.
        ``world_size`` lets chunked formats choose how many output files to write."""

    @abstractmethod
    def layout(self, checkpoints: Sequence[CheckpointRef]) -> Dict[str, object]:
        """A short description of the parallel layout (for plans, manifests, inspect)."""

    @abstractmethod
    def check_unit(self, unit: WorkUnit, checkpoints: Sequence[CheckpointRef]) -> List[str]:
        """Problems (each naming file and key) that would make merging ``unit`` wrong. Only
        ``merge`` units reach the format: the engine copies ``copy`` units itself."""

    @abstractmethod
    def merge_unit(self, unit: WorkUnit, checkpoints: Sequence[CheckpointRef], destination: str,
                   context: MergeContext) -> UnitResult:
        """Write the merged ``unit`` atomically to ``destination`` (a ``merge`` unit: the engine
        copies ``copy`` units byte for byte itself)."""

    def finalize(self, staged_dir: str, checkpoints: Sequence[CheckpointRef],
                 results: Sequence[UnitResult], optimizer_policy: str) -> List[UnitResult]:
        """Coordinator, after every unit is merged: write the format's own metadata files (an
        index, ``.metadata``) into ``staged_dir`` atomically; returns them as results."""
        return []

    @abstractmethod
    def output_dirname(self, newest: CheckpointRef) -> str:
        """Name of the output checkpoint directory relative to the output root, or "" when the
        output root itself is the checkpoint (then staged files move in one by one)."""

    @abstractmethod
    def write_tracker(self, out_root: str, newest: CheckpointRef) -> str:
        """Write the file that makes the output loadable (atomically); returns its relpath."""

    def tensor_inventory(self, checkpoint_dir: str) -> Optional[Dict[str, Tuple[tuple, str]]]:
        """Every float tensor of a checkpoint (source or merged output) as name -> (shape, dtype),
        read from metadata where the format allows; used by ``pmm-dist verify``. None if the
        format cannot list them."""
        return None

    @abstractmethod
    def tracker_relpath(self) -> str:
        """The tracker's path relative to the output root (removed first on --overwrite)."""
