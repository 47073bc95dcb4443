"""Pieces several formats share: ordering checkpoints, numbers in names, listing directories,
comparing entries with the newest checkpoint's, and merging state-dict leaves."""
import importlib
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Pattern, Sequence, Tuple

import torch

from ..errors import InputError
from ..io.planning_reads import scan_directory
from ..io.torch_save_stream import Placeholder
from ..io.tree import dotted
from ..merge.kernel import is_mergeable, merged_requires_grad
from ..plan.types import CheckpointRef
from .base import MergeContext

# "step_1000", "global_step1000", "stage1-step1000-tokens4B": the number after "step"; else a
# trailing number ("checkpoint-1000", "iter_0001000", "ckpt1000").
STEP_OR_TRAILING_NUMBER = re.compile(r"step[-_.]?(\d+)|(\d+)$", re.IGNORECASE)


def number_in_name(path: str, pattern: Pattern = STEP_OR_TRAILING_NUMBER) -> Optional[int]:
    """The iteration a checkpoint directory's name carries: the first matching group of
    ``pattern`` searched in its base name (a format's own naming, e.g. ``^iter_(\\d+)$``), else None."""
    match = pattern.search(os.path.basename(os.path.normpath(path)))
    if not match:
        return None
    return int(next(group for group in match.groups() if group is not None))


def layout_text(layout: Dict[str, object], keys: Optional[Sequence[str]] = None) -> str:
    """``tp=2, pp=1`` (every entry, or those of ``keys`` in their order)."""
    return ", ".join(f"{k}={layout.get(k)}" for k in (keys if keys is not None else layout))


def layout_change_refusal(checkpoints: Sequence[CheckpointRef], layouts: Sequence[Dict[str, object]],
                          keys: Sequence[str], *, reason: str, hint: str = "", show: Sequence[str] = (),
                          heading: str = "the selected checkpoints were saved at different layouts") -> Optional[str]:
    """ONE message refusing a merge whose checkpoints differ in the layout entries ``keys``
    (``layouts``: one ``checkpoint_layout`` per checkpoint, oldest first), or None if they agree.

    It groups the checkpoints by layout (the entries of ``keys`` that differ, and those of
    ``show``), so a run that changed layout once reads as two lines however many keys and files
    are affected, and suggests the newest's same-layout window (the trailing checkpoints that
    share its layout) as ``--iterations``; ``hint`` adds what else would work."""
    def of(layout):
        return tuple(layout.get(k) for k in keys)

    if all(of(layout) == of(layouts[-1]) for layout in layouts):
        return None
    differing = {k for k in keys if len({repr(layout.get(k)) for layout in layouts}) > 1}
    shown = [k for k in layouts[-1] if k in differing or k in show] + \
        [k for k in (*keys, *show) if k not in layouts[-1] and (k in differing or k in show)]
    groups: Dict[str, List[CheckpointRef]] = {}
    for ckpt, layout in zip(checkpoints, layouts):
        groups.setdefault(layout_text(layout, shown), []).append(ckpt)
    window = []
    for ckpt, layout in zip(reversed(checkpoints), reversed(layouts)):
        if of(layout) != of(layouts[-1]):
            break
        window.insert(0, ckpt)
    parents = {os.path.dirname(os.path.normpath(c.path)) for c in checkpoints}
    where = f" (in {parents.pop()})" if len(parents) == 1 else ""
    lines = [f"{heading}{where}: {reason}"]
    lines += [f"    {text}: {_checkpoint_names(ckpts, bool(where))}" for text, ckpts in groups.items()]
    lines.append(f"  merge one layout at a time, e.g. the newest's: --iterations "
                 f"{','.join(str(c.iteration) for c in window)}" + (f"; {hint}" if hint else ""))
    return "\n".join(lines)


def _checkpoint_names(ckpts: Sequence[CheckpointRef], short: bool, most: int = 6) -> str:
    names = [os.path.basename(os.path.normpath(c.path)) if short else c.path for c in ckpts]
    if len(names) > most:
        names = names[:3] + [f"... ({len(names) - 5} more)"] + names[-2:]
    return ", ".join(names)


def iteration_of(ckpt_dir: str, pattern: Pattern, recorded: Callable[[], Tuple[str, object]], key: str,
                 hint: str = "") -> int:
    """A checkpoint's iteration: the number in its directory's name (``pattern``), else the
    integer ``key`` of the state ``recorded()`` reads, as (path, state); missing: an error naming
    the file (and ``hint``)."""
    named = number_in_name(ckpt_dir, pattern)
    if named is not None:
        return named
    path, state = recorded()
    value = state.get(key) if isinstance(state, dict) else None
    if not isinstance(value, int):
        raise InputError(f"{path}: key '{key}' missing; cannot order this checkpoint{hint}")
    return value


def listdir(path: str) -> List[str]:
    """Sorted entries of ``path``; [] if it is missing, not a directory or unreadable (listed
    once per planning pass: io/planning_reads.py)."""
    return [name for name, _ in scan_directory(path)]


def sorted_unique(refs: List[CheckpointRef]) -> List[CheckpointRef]:
    """Checkpoints oldest first; two with the same iteration are an error naming both."""
    refs = sorted(refs, key=lambda r: r.iteration)
    for a, b in zip(refs, refs[1:]):
        if a.iteration == b.iteration:
            raise InputError(f"{a.path} and {b.path} are both iteration {a.iteration}")
    return refs


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


@dataclass(frozen=True)
class EntrySpec:
    """What must agree between a source's entry and the newest checkpoint's for a merge.

    Values are as the format shows them in messages (dtype names, shapes as tuples or lists);
    ``checked`` False: only presence matters (an entry taken from the newest, never merged);
    ``layout``: a format's further description (e.g. chunking) compared after the rest."""
    kind: str
    dtype: object = None
    shape: object = None
    checked: bool = True
    layout: object = None
    where: Optional[str] = None   # the file holding it, when not the checkpoint itself


def compare_entries(path: str, entries: Dict[str, EntrySpec], newest_path: str, reference: Dict[str, EntrySpec],
                    *, noun: str = "key", shape_word: str = "shape", ignored: Callable[[str], bool] = lambda k: False,
                    layout_problem: Callable[[str, EntrySpec, EntrySpec], str] = None) -> List[str]:
    """Problems (each naming file and entry) that make ``entries`` of the source at ``path``
    unmergeable with the newest checkpoint's ``reference``: missing or unexpected entries, and
    for checked ones kind, dtype, shape and layout. The one comparer of every format."""
    problems = [f"{path}: {noun} '{name}' missing (present in the newest checkpoint {newest_path})"
                for name in reference if name not in entries]
    problems += [f"{path}: unexpected {noun} '{name}' (absent from the newest checkpoint {newest_path})"
                 for name in entries if name not in reference and not ignored(name)]
    for name, ref in reference.items():
        other = entries.get(name)
        if other is None or not ref.checked:
            continue
        where = other.where or path
        newest_where = f" ({ref.where})" if ref.where else ""
        if other.kind != ref.kind:
            problems.append(f"{where}: {noun} '{name}' is {other.kind}, the newest checkpoint has {ref.kind}")
        elif other.dtype != ref.dtype:
            problems.append(f"{where}: {noun} '{name}' has dtype {other.dtype}, the newest checkpoint has "
                            f"{ref.dtype}{newest_where}")
        elif other.shape != ref.shape:
            problems.append(f"{where}: {noun} '{name}' has {shape_word} {other.shape}, the newest checkpoint has "
                            f"{ref.shape}{newest_where}")
        elif other.layout != ref.layout and layout_problem is not None:
            problems.append(layout_problem(name, other, ref))
    return problems


def leaf_specs(leaves: Dict[tuple, object], where: Optional[Dict[tuple, str]] = None) -> Dict[str, EntrySpec]:
    """State-dict leaves (path -> value) as entries: float tensors are checked, the rest (taken
    from the newest) only need to be present; ``where``: the file of a leaf, for messages."""
    specs = {}
    where = where or {}
    for path, leaf in leaves.items():
        if isinstance(leaf, torch.Tensor):
            specs[dotted(path)] = EntrySpec("a tensor", leaf.dtype, tuple(leaf.shape), checked=is_mergeable(leaf),
                                            where=where.get(path))
        else:
            specs[dotted(path)] = EntrySpec(type(leaf).__name__, checked=False, where=where.get(path))
    return specs


class LeafMerger:
    """A ``map_leaves`` callback that turns the newest source's file into the output's skeleton
    (see io/torch_save_stream): each float leaf becomes a placeholder whose ``compute()`` is
    the weighted sum of the same leaf in every source (``flat_sources``: each source's leaves
    keyed by path), merged when the writer reaches it; other leaves are the newest's. Counts
    tensors merged and bytes read."""

    def __init__(self, flat_sources: Sequence[Dict[tuple, object]], paths: Sequence[str], context: MergeContext):
        self.flat_sources, self.paths, self.context = flat_sources, paths, context
        self.num_bytes_read = 0
        self.num_tensors = 0
        # path -> the output's leaf, computed otherwise (a model weight that is a merged master)
        self.overrides: Dict[tuple, object] = {}
        # path -> the runs of its flattened elements that hold values (see PickledFileFormat.real_runs)
        self.real_runs: Dict[tuple, List[Tuple[int, int]]] = {}

    def __call__(self, path: tuple, leaf):
        if path in self.overrides:
            return self.overrides[path]
        # Leaves the newest's merged set leaves out (step counters, moments under --optimizer
        # latest) stay the newest's.
        if not is_mergeable(leaf) or path not in self.flat_sources[-1] or not self.context.selects(dotted(path)):
            return leaf
        stack = [flat[path] for flat in self.flat_sources]
        return Placeholder(stack[-1].shape, stack[-1].dtype, merged_requires_grad(stack),
                           compute=lambda: self._merge(path, stack))

    def _merge(self, path: tuple, stack: Sequence[torch.Tensor]) -> torch.Tensor:
        what = f"key '{dotted(path)}'"
        runs = self.real_runs.get(path)
        if runs is None or runs == [(0, stack[-1].numel())]:
            merged = self.context.merge_tensor(stack, what, self.paths)
            num_read = sum(t.numel() * t.element_size() for t in stack)
        else:  # padding between the runs: zeros, whatever the sources hold there
            merged = torch.zeros(stack[-1].shape, dtype=stack[-1].dtype)
            flat, flat_stack = merged.view(-1), [t.reshape(-1) for t in stack]
            for begin, end in runs:
                flat[begin:end] = self.context.merge_tensor([t[begin:end] for t in flat_stack],
                                                            f"{what} [{begin}:{end}]", self.paths)
            num_read = sum(end - begin for begin, end in runs) * stack[-1].element_size() * len(stack)
        self.num_bytes_read += num_read
        self.num_tensors += 1
        self.context.on_progress(num_read)
        return merged


class LazyModule:
    """A module imported at its first attribute access. Why: ``torch.distributed.checkpoint``
    imports DTensor, torch.fx and sympy (~0.6 s); format detection imports every format class,
    so the DCP modules use it this way and only a DCP or torch_dist merge pays for it."""

    def __init__(self, name: str):
        self._name = name
        self._module = None

    def __getattr__(self, attr: str):
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)

