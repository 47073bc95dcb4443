"""The format plug-in interface.

A format knows how to find the checkpoints of a run, which files make up one checkpoint,
how to check and merge one file, and how its output is shaped and marked loadable. The
engine calls these in this order and never branches on a format's name:

    (coordinator) discover -> plan_units          # metadata only
    (every rank)  check_unit for its own units    # verdicts gathered before anything is written
    (every rank)  merge_unit for its own units    # into the staging directory
    (coordinator) finalize                        # format metadata from all units' results, staged
    (coordinator) commit, by output_layout():     # RUN_DIRECTORY: rename the checkpoint directory,
                                                  #   manifest, then the tracker (tracker_text)
                                                  # CHECKPOINT_ROOT: move the files, manifest, then
                                                  #   the staged commit marker last
"""
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Dict, List, Optional, Sequence, Tuple, TypeVar

import torch

from ..merge.kernel import Accumulator, weighted_sum
from ..plan.selection import TensorFilter
from ..plan.types import Action, CheckpointRef, NonfinitePolicy, OptimizerPolicy, OutputLayout, UnitResult, WorkUnit


T = TypeVar("T")

@dataclass(frozen=True)
class MergeContext:
    """What a format needs to merge a unit, beyond the unit itself."""
    weights: Sequence[float]          # one per checkpoint, oldest first
    device: torch.device
    optimizer_policy: OptimizerPolicy
    on_progress: Callable[[int], None] = field(default=lambda num_bytes: None)
    on_nonfinite: NonfinitePolicy = NonfinitePolicy.ERROR
    tensor_filter: TensorFilter = TensorFilter()

    def selects(self, name: str) -> bool:
        """Whether the tensor ``name`` is merged (else the newest checkpoint's is kept)."""
        return self.tensor_filter.selects(name)

    def merge_tensor(self, sources: Sequence[torch.Tensor], what: str, source_names: Sequence[str],
                     *, sources_are_mapped: bool = True, rounded_to: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weighted sum of one tensor's N sources (see kernel.weighted_sum), applying the
        non-finite policy; ``what`` and ``source_names`` name the tensor and files in errors.
        ``what`` also identifies the tensor within its unit, the same in every merge: the
        watcher keys its running state by ``CheckpointFormat.state_key(unit, what)``.
        ``rounded_to``: the merged masters as the model holds them (see kernel.weighted_sum)."""
        return weighted_sum(sources, self.weights, self.device, sources_are_mapped=sources_are_mapped,
                            on_nonfinite=self.on_nonfinite, what=what, source_names=source_names,
                            rounded_to=rounded_to)

    def accumulator(self, shape, what: str) -> Accumulator:
        """For sources read one whole chunk at a time: add ``(source, weights[i], name)`` in
        checkpoint order, then take ``result()`` (same numbers as ``merge_tensor``)."""
        return Accumulator(shape, self.device, on_nonfinite=self.on_nonfinite, what=what, weights=self.weights)


class CheckpointFormat(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    # The --optimizer policies the format implements; planning refuses the others in one message.
    optimizer_policies: ClassVar[Tuple[OptimizerPolicy, ...]] = (OptimizerPolicy.DROP, OptimizerPolicy.LATEST)

    @classmethod
    @abstractmethod
    def recognizes(cls, path: str) -> bool:
        """True if ``path`` (a run directory or one checkpoint directory) is in this format."""

    @classmethod
    def being_written(cls, run_dir: str) -> bool:
        """True if ``run_dir`` holds a checkpoint of this format whose commit marker is not there
        yet. The watcher asks before it settles on a format: a torch_dist checkpoint before its
        metadata.json is a complete-looking plain DCP one, and must not make the run a DCP run."""
        return False

    @abstractmethod
    def discover(self, sources: Sequence[str]) -> List[CheckpointRef]:
        """All usable checkpoints in ``sources``, oldest first (a run dir, or checkpoint dirs)."""

    @abstractmethod
    def plan_units(self, checkpoints: Sequence[CheckpointRef], optimizer_policy: OptimizerPolicy,
                   world_size: int) -> List[WorkUnit]:
        """Validate the file layout of every checkpoint against the newest and list the output
        files as work units. Raises InputError naming every missing or unexpected file.
        ``world_size`` lets chunked formats choose how many output files to write."""

    @abstractmethod
    def layout(self, checkpoints: Sequence[CheckpointRef]) -> Dict[str, object]:
        """A short description of the parallel layout (for plans, manifests, inspect): the
        newest checkpoint's, which is the output's."""

    def checkpoint_layout(self, ckpt: CheckpointRef) -> Dict[str, object]:
        """The parallel layout one checkpoint was saved at, in the same terms as ``layout``
        (inspect shows it per checkpoint, --dry-run and the manifest per source, and a refused
        layout change lists it; see ``common.layout_change_refusal``)."""
        return self.layout([ckpt])

    def describe_layout(self, layout: Dict[str, object]) -> str:
        """A ``checkpoint_layout`` in the words the format's users know (for messages)."""
        return ", ".join(f"{k}={v}" for k, v in layout.items())

    def bytes_read_by_source(self, units: Sequence[WorkUnit], checkpoints: Sequence[CheckpointRef]) -> List[int]:
        """What merging ``units`` reads from each checkpoint (oldest first), from the plan alone
        (for --dry-run and the manifest). By default a merged file is read once from every source,
        at about its output size, and a copied one from the newest."""
        totals = [0] * len(checkpoints)
        for unit in units:
            for position in (range(len(checkpoints)) if unit.action == Action.MERGE else [len(checkpoints) - 1]):
                totals[position] += unit.num_bytes
        return totals

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
                 results: Sequence[UnitResult], optimizer_policy: OptimizerPolicy) -> List[UnitResult]:
        """Coordinator, after every unit is merged: write the format's own metadata files (an
        index, ``.metadata``) into ``staged_dir`` atomically; returns them as results."""
        return []

    @abstractmethod
    def output_layout(self, newest: CheckpointRef) -> OutputLayout:
        """How the output sits in --out (see OutputLayout); a CHECKPOINT_ROOT format stages its
        commit marker in ``finalize``, and the engine moves it into place last."""

    def tracker_text(self, newest: CheckpointRef) -> str:
        """RUN_DIRECTORY formats: the content of the tracker that makes the output loadable (the
        engine lists it in the manifest, then writes it atomically, last)."""
        raise NotImplementedError(f"{type(self).__name__} has no tracker")

    def memo(self, what: str, key: str, compute: Callable[[], T]) -> T:
        """``compute()`` once per (what, key) for this format instance (one job, or one watcher
        round): what planning and checking read from a checkpoint's metadata is read once."""
        cache = self.__dict__.setdefault("_memo", {})
        if (what, key) not in cache:
            cache[(what, key)] = compute()
        return cache[(what, key)]

    def names_checkpoint(self, name: str) -> bool:
        """Whether a directory called ``name`` inside a run directory would be taken for one of
        the run's checkpoints (then --out may not be there). Conservative default: yes."""
        return True

    def model_weights_source(self, checkpoints: Sequence[CheckpointRef], optimizer_policy: OptimizerPolicy) -> str:
        """Where the merged model weights come from, for the manifest: "fp32 masters" when the
        format computes them from the merged fp32 master weights of the optimizer state (the
        weights the trainer updates, rounded to the model dtype), "model copies" when it merges
        the model tensors themselves."""
        return "model copies"

    def run_identity(self, ckpt: CheckpointRef) -> Dict[str, object]:
        """What identifies the training run a checkpoint belongs to (architecture, seed, ...), as
        far as the format records it; checkpoints of one merge must agree unless --allow-mixed-runs."""
        return {}

    def checkpoint_problems(self, ckpt: CheckpointRef) -> List[str]:
        """Why a discovered checkpoint is incomplete or unreadable, from cheap evidence (headers,
        commit markers); ``inspect`` reports these. Default: nothing known."""
        return []

    def state_key(self, unit: WorkUnit, what: str) -> str:
        """The name of a merged tensor (``what``, as the format passes it to ``merge_tensor`` or
        ``accumulator``) in a watcher's running state, the same from one merge of a run to the
        next: here the unit's file and the tensor. Formats whose units are output bins of
        globally named items (which may be binned differently next time) name the item alone."""
        return f"{unit.relpath}: {what}"

    def tensor_inventory(self, checkpoint_dir: str) -> Optional[Dict[str, Tuple[tuple, str]]]:
        """Every float tensor of a checkpoint (source or merged output) as name -> (shape, dtype),
        read from metadata where the format allows; used by ``pmm-dist verify``. None if the
        format cannot list them."""
        return None
