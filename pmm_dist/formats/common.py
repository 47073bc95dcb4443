"""Pieces several formats share: ordering checkpoints, comparing and merging state-dict leaves,
and the "one run directory with a tracker, or several checkpoint directories" discovery."""
import os
from typing import Callable, Dict, List, Sequence

import torch

from ..errors import InputError
from ..kernel import is_mergeable
from ..tree import dotted
from .base import CheckpointRef, MergeContext


def sorted_unique(refs: List[CheckpointRef]) -> List[CheckpointRef]:
    """Checkpoints oldest first; two with the same iteration are an error naming both."""
    refs = sorted(refs, key=lambda r: r.iteration)
    for a, b in zip(refs, refs[1:]):
        if a.iteration == b.iteration:
            raise InputError(f"{a.path} and {b.path} are both iteration {a.iteration}")
    return refs


def iteration_from_name(path: str, pattern, fallback: Callable[[], int]) -> int:
    """The iteration in a checkpoint directory's name (``pattern``'s first group), else ``fallback()``
    (which reads it from the checkpoint itself)."""
    match = pattern.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else fallback()


def discover_run_or_checkpoints(sources: Sequence[str], tracker: str, discover_run: Callable[[str], List[CheckpointRef]],
                                is_checkpoint: Callable[[str], bool], iteration_of: Callable[[str], int],
                                what: str) -> List[CheckpointRef]:
    """One run directory (it has ``tracker``): ``discover_run``. Otherwise every source must be a
    checkpoint directory (``what`` names the kind in errors), ordered by ``iteration_of``."""
    if len(sources) == 1 and os.path.isfile(os.path.join(sources[0], tracker)):
        return discover_run(sources[0])
    refs = []
    for src in sources:
        if os.path.isfile(os.path.join(src, tracker)):
            raise InputError(f"{src} is a run directory (it has '{tracker}'); give either one run directory "
                             f"or several checkpoint directories, not a mixture")
        if not is_checkpoint(src):
            raise InputError(f"{src}: not a {what}")
        refs.append(CheckpointRef(iteration_of(src), os.path.abspath(src)))
    return sorted_unique(refs)


def compare_leaves(path: str, leaves: Dict[tuple, object], newest_path: str,
                   reference: Dict[tuple, object]) -> List[str]:
    """Problems that make ``leaves`` (of ``path``) unmergeable with the newest checkpoint's:
    missing or unexpected keys, and for the tensors that are averaged, type, dtype and shape."""
    problems = []
    for key in sorted(map(dotted, reference.keys() - leaves.keys())):
        problems.append(f"{path}: key '{key}' missing (present in the newest checkpoint {newest_path})")
    for key in sorted(map(dotted, leaves.keys() - reference.keys())):
        problems.append(f"{path}: unexpected key '{key}' (absent from the newest checkpoint {newest_path})")
    for path_key in sorted(reference.keys() & leaves.keys(), key=dotted):
        ref, other, key = reference[path_key], leaves[path_key], dotted(path_key)
        if not is_mergeable(ref):
            continue  # taken from the newest checkpoint, never averaged
        if not isinstance(other, torch.Tensor):
            problems.append(f"{path}: key '{key}' is {type(other).__name__}, the newest checkpoint has a tensor")
        elif other.dtype != ref.dtype:
            problems.append(f"{path}: key '{key}' has dtype {other.dtype}, the newest checkpoint has {ref.dtype}")
        elif other.shape != ref.shape:
            problems.append(f"{path}: key '{key}' has shape {tuple(other.shape)}, "
                            f"the newest checkpoint has {tuple(ref.shape)}")
    return problems


class LeafMerger:
    """A ``map_leaves`` callback: each float leaf of the newest source becomes the weighted sum
    of the same leaf in every source (``flat_sources``: each source's leaves keyed by path);
    other leaves are the newest's. Counts tensors merged and bytes read."""

    def __init__(self, flat_sources: Sequence[Dict[tuple, object]], paths: Sequence[str], context: MergeContext):
        self.flat_sources, self.paths, self.context = flat_sources, paths, context
        self.num_bytes_read = 0
        self.num_tensors = 0

    def __call__(self, path: tuple, leaf):
        if not is_mergeable(leaf):
            return leaf
        stack = [flat[path] for flat in self.flat_sources]
        merged = self.context.merge_tensor(stack, f"key '{dotted(path)}'", self.paths)
        num_read = sum(t.numel() * t.element_size() for t in stack)
        self.num_bytes_read += num_read
        self.num_tensors += 1
        self.context.on_progress(num_read)
        return merged
