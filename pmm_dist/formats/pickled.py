"""The skeleton shared by formats whose shard files are ``torch.save`` dicts (Megatron legacy,
DeepSpeed): every file is a unit, merged leaf by leaf inside the subtrees the format names.

A format says, per file: which subtrees hold the merged tensors (``merged_subtrees``), what
makes a file unusable beyond its leaves (``file_problem``), what ``--optimizer drop`` removes
(``without_training_state``), and, for sources saved at another layout than the newest,
where each of the output file's leaves is in that source (``source_leaves``). Checking,
merging, writing and the tensor inventory are the same for both.
"""
import os
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import InputError
from ..io.atomic import write_atomically
from ..io.safe_load import safe_load
from ..io.tree import dotted, flatten, get_path, map_leaves, replace_subtree
from ..merge.kernel import is_mergeable
from ..plan.types import CheckpointRef, OptimizerPolicy, UnitResult, WorkUnit
from .base import CheckpointFormat, MergeContext
from .common import LeafMerger, compare_entries, leaf_specs


@dataclass
class SourceLeaves:
    """One source's leaves for one output file, keyed by the output's leaf paths."""
    name: str                                   # names the source in messages: its file, or its checkpoint
    leaves: Dict[tuple, object]
    where: Dict[tuple, str] = field(default_factory=dict)  # the file holding a leaf, where not ``name``


class PickledFileFormat(CheckpointFormat):

    @abstractmethod
    def merged_subtrees(self, state: dict, relpath: str) -> List[tuple]:
        """Paths (from the file's root) of the subtrees whose float tensors are merged; () is all."""

    def file_problem(self, path: str, state, relpath: str, newest_path: Optional[str] = None,
                     newest: Optional[dict] = None) -> Optional[str]:
        """Why ``state`` (read from ``path``) cannot be merged, beyond its leaves; ``newest`` is
        None while the newest file itself is checked."""
        if not isinstance(state, dict):
            return f"{path}: expected a dict, found {type(state).__name__}"
        return None

    @abstractmethod
    def without_training_state(self, state: dict, relpath: str) -> dict:
        """``state`` as ``--optimizer drop`` writes it (a copy; ``state`` is left as it is)."""

    @abstractmethod
    def weight_files(self, checkpoint_dir: str) -> List[str]:
        """The files of a checkpoint whose merged tensors carry weights (for ``verify``)."""

    # -- shared mechanics ------------------------------------------------------------------------
    def merged_leaves(self, state, relpath: str) -> Dict[tuple, object]:
        leaves: Dict[tuple, object] = {}
        for subtree in self.merged_subtrees(state, relpath):
            value = get_path(state, subtree)
            if value is not None:
                leaves.update(flatten(value, subtree))
        return leaves

    def source_leaves(self, relpath: str, checkpoints: Sequence[CheckpointRef], index: int,
                      newest: dict) -> "SourceLeaves":
        """The leaves of ``checkpoints[index]`` (an older source) that go into the output file
        ``relpath``, keyed by the output's leaf paths. By default the source's file of the same
        name; a format whose sources may be laid out differently (other PP/EP, other ZeRO-3
        partition count) finds each leaf where that source keeps it. Raises InputError (naming
        file and key) for a source that cannot supply them."""
        newest_path = os.path.join(checkpoints[-1].path, relpath)
        path = os.path.join(checkpoints[index].path, relpath)
        state = safe_load(path)
        problem = self.file_problem(path, state, relpath, newest_path, newest)
        if problem:
            raise InputError(problem)
        return SourceLeaves(path, self.merged_leaves(state, relpath))

    def check_unit(self, unit: WorkUnit, checkpoints: Sequence[CheckpointRef]) -> List[str]:
        newest_path = os.path.join(checkpoints[-1].path, unit.relpath)
        try:
            newest = safe_load(newest_path)
        except InputError as exc:
            return [str(exc)]
        problem = self.file_problem(newest_path, newest, unit.relpath)
        if problem:
            return [problem]
        reference = leaf_specs(self.merged_leaves(newest, unit.relpath))
        problems: List[str] = []
        for index in range(len(checkpoints) - 1):
            try:
                source = self.source_leaves(unit.relpath, checkpoints, index, newest)
            except InputError as exc:
                problems += exc.problems
                continue
            problems += compare_entries(source.name, leaf_specs(source.leaves, source.where), newest_path, reference)
        return problems

    def merge_unit(self, unit: WorkUnit, checkpoints: Sequence[CheckpointRef], destination: str,
                   context: MergeContext) -> UnitResult:
        newest_path = os.path.join(checkpoints[-1].path, unit.relpath)
        output = safe_load(newest_path)
        sources = [self.source_leaves(unit.relpath, checkpoints, index, output) for index in range(len(checkpoints) - 1)]
        sources.append(SourceLeaves(newest_path, self.merged_leaves(output, unit.relpath)))
        merge = LeafMerger([source.leaves for source in sources], [source.name for source in sources], context)
        for subtree in self.merged_subtrees(output, unit.relpath):
            output = replace_subtree(output, subtree, lambda value, at=subtree: map_leaves(value, merge, at))
        if context.optimizer_policy == OptimizerPolicy.DROP:
            output = self.without_training_state(output, unit.relpath)
        num_bytes, sha = write_atomically(os.path.join(destination, unit.relpath), lambda f: torch.save(output, f))
        return UnitResult(unit.relpath, num_bytes, merge.num_bytes_read, sha, merge.num_tensors)

    def tensor_inventory(self, checkpoint_dir: str) -> Dict[str, Tuple[tuple, str]]:
        inventory = {}
        for relpath in self.weight_files(checkpoint_dir):
            for path, leaf in self.merged_leaves(safe_load(os.path.join(checkpoint_dir, relpath)), relpath).items():
                if is_mergeable(leaf):
                    inventory[f"{relpath}/{dotted(path)}"] = (tuple(leaf.shape), str(leaf.dtype))
        return inventory
