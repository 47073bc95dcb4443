"""The skeleton shared by formats whose shard files are ``torch.save`` dicts (Megatron legacy,
DeepSpeed): every file is a unit, merged leaf by leaf inside the subtrees the format names.

A format says, per file: which subtrees hold the merged tensors (``merged_subtrees``), what
makes a file unusable beyond its leaves (``file_problem``), what ``--optimizer drop`` removes
(``without_training_state``), and, for sources saved at another layout than the newest,
where each of the output file's leaves is in that source (``source_leaves``). Checking,
merging, writing and the tensor inventory are the same for both.

The output file is written as a stream (io/torch_save_stream): its pickle first, from the
newest's file with a placeholder for each leaf to merge, then each leaf merged in the order
the file holds them and written as soon as it is: memory is the leaf in flight, not the file,
and its write overlaps the next merge's reads.

Optimizer state (see masters.py): ``training_subtrees`` says where a file keeps it and
``training_leaf_kind`` which of its leaves are fp32 masters or moments; those are merged (and
checked against the newest's) as the policy says. ``training_problems`` checks what the leaves do
not show (partitioning, param groups), and ``master_weights`` gives the model leaves that are the
merged masters rounded (read from this file or from the format's other files), with the unit's
details saying where its weights came from.
"""
import os
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import InputError
from ..io.atomic import write_atomically
from ..io.safe_load import safe_load
from ..io.torch_save_stream import save_streamed
from ..io.tree import dotted, flatten, get_path, map_leaves, replace_subtree
from ..merge.kernel import is_mergeable
from ..plan.types import CheckpointRef, OptimizerPolicy, UnitResult, WorkUnit
from .base import CheckpointFormat, MergeContext
from .common import LeafMerger, compare_entries, leaf_specs
from .masters import MasterWeights, is_counter, merges


@dataclass
class SourceLeaves:
    """One source's leaves for one output file, keyed by the output's leaf paths."""
    name: str                                   # names the source in messages: its file, or its checkpoint
    leaves: Dict[tuple, object]
    where: Dict[tuple, str] = field(default_factory=dict)  # the file holding a leaf, where not ``name``
    state: Optional[dict] = None                # the source's file of the same name, where the leaves are its


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

    def as_saved(self, skeleton):
        """The object pickled for an output file's ``skeleton`` (default: itself)."""
        return skeleton

    def training_subtrees(self, state: dict, relpath: str) -> List[tuple]:
        """Paths of the subtrees that hold optimizer state in this file (default: none)."""
        return []

    def training_leaf_kind(self, relpath: str, path: tuple) -> Optional[str]:
        """MASTER, MOMENT or None (kept from the newest) for a leaf under ``training_subtrees``."""
        return None

    def training_problems(self, relpath: str, checkpoints: Sequence[CheckpointRef], newest: dict,
                          policy: OptimizerPolicy) -> List[str]:
        """Why the sources' optimizer states cannot be merged under ``policy`` beyond their
        leaves (another partitioning, other param groups; a source without one), each naming
        the source file and what differs. Default: nothing."""
        return []

    def master_weights(self, relpath: str, checkpoints: Sequence[CheckpointRef], output: dict,
                       sources: Sequence["SourceLeaves"], context: MergeContext) -> MasterWeights:
        """Leaves of the output file computed from the fp32 masters (the model weights they
        round to, and the merged masters themselves where the file holds them), by path; and
        the unit's details. ``output`` is the newest's file, ``sources`` every source's leaves
        (``state``: its file, where it is one). Default: none."""
        return MasterWeights()

    def real_runs(self, relpath: str, checkpoints: Sequence[CheckpointRef], newest: dict) -> \
            Dict[tuple, List[Tuple[int, int]]]:
        """Leaves of the file ``relpath`` (``newest``: the newest's) whose flattened elements
        are partly padding that the framework leaves uninitialized: for each, the runs ``(begin,
        end)`` that hold values. Only those are merged (and checked for NaN/Inf); the padding is
        written as zeros. Default: none."""
        return {}

    # -- shared mechanics ------------------------------------------------------------------------
    def merged_leaves(self, state, relpath: str, policy: OptimizerPolicy = OptimizerPolicy.DROP) -> Dict[tuple, object]:
        """The leaves merged in the file ``relpath``: its weights, and its optimizer state's
        masters and moments as ``policy`` says (counters excluded: they are the newest's)."""
        leaves: Dict[tuple, object] = {}
        for subtree in self.merged_subtrees(state, relpath):
            value = get_path(state, subtree)
            if value is not None:
                leaves.update(flatten(value, subtree))
        if policy.keeps_training_state:
            for subtree in self.training_subtrees(state, relpath):
                value = get_path(state, subtree)
                if value is not None:
                    leaves.update((path, leaf) for path, leaf in flatten(value, subtree).items()
                                  if not is_counter(path) and merges(self.training_leaf_kind(relpath, path), policy))
        return leaves

    def source_leaves(self, relpath: str, checkpoints: Sequence[CheckpointRef], index: int,
                      newest: dict, policy: OptimizerPolicy = OptimizerPolicy.DROP) -> "SourceLeaves":
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
        return SourceLeaves(path, self.merged_leaves(state, relpath, policy), state=state)

    def check_unit(self, unit: WorkUnit, checkpoints: Sequence[CheckpointRef]) -> List[str]:
        newest_path = os.path.join(checkpoints[-1].path, unit.relpath)
        try:
            newest = safe_load(newest_path)
        except InputError as exc:
            return [str(exc)]
        problem = self.file_problem(newest_path, newest, unit.relpath)
        if problem:
            return [problem]
        policy = unit.optimizer
        problems = self.training_problems(unit.relpath, checkpoints, newest, policy)
        reference = leaf_specs(self.merged_leaves(newest, unit.relpath, policy))
        for index in range(len(checkpoints) - 1):
            try:
                source = self.source_leaves(unit.relpath, checkpoints, index, newest, policy)
            except InputError as exc:
                problems += exc.problems
                continue
            problems += compare_entries(source.name, leaf_specs(source.leaves, source.where), newest_path, reference)
        return problems

    def merge_unit(self, unit: WorkUnit, checkpoints: Sequence[CheckpointRef], destination: str,
                   context: MergeContext) -> UnitResult:
        newest_path = os.path.join(checkpoints[-1].path, unit.relpath)
        output = safe_load(newest_path)
        policy = context.optimizer_policy
        sources = [self.source_leaves(unit.relpath, checkpoints, index, output, policy)
                   for index in range(len(checkpoints) - 1)]
        sources.append(SourceLeaves(newest_path, self.merged_leaves(output, unit.relpath, policy), state=output))
        merge = LeafMerger([source.leaves for source in sources], [source.name for source in sources], context)
        # The masters first: they may give the model's weights (rounded) and their own leaves.
        masters = self.master_weights(unit.relpath, checkpoints, output, sources, context)
        merge.overrides = masters.weights
        merge.real_runs = self.real_runs(unit.relpath, checkpoints, output)
        subtrees = self.merged_subtrees(output, unit.relpath) + \
            (self.training_subtrees(output, unit.relpath) if policy.keeps_training_state else [])
        # The skeleton: the newest's file with a placeholder for every leaf merged; the leaves
        # are merged as the writer reaches them, and each is written (and freed) at once.
        for subtree in subtrees:
            output = replace_subtree(output, subtree, lambda value, at=subtree: map_leaves(value, merge, at))
        if policy == OptimizerPolicy.DROP:
            output = self.without_training_state(output, unit.relpath)
        output = self.as_saved(output)
        num_bytes, sha = write_atomically(os.path.join(destination, unit.relpath), lambda f: save_streamed(f, output))
        return UnitResult(unit.relpath, num_bytes, merge.num_bytes_read + masters.num_bytes_read, sha,
                          merge.num_tensors + len(masters.weights), details=masters.details)

    def tensor_inventory(self, checkpoint_dir: str) -> Dict[str, Tuple[tuple, str]]:
        inventory = {}
        for relpath in self.weight_files(checkpoint_dir):
            for path, leaf in self.merged_leaves(safe_load(os.path.join(checkpoint_dir, relpath)), relpath).items():
                if is_mergeable(leaf):
                    inventory[f"{relpath}/{dotted(path)}"] = (tuple(leaf.shape), str(leaf.dtype))
        return inventory
