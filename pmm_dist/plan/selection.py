"""Which checkpoints of a run take part in a merge: a pure function of the iterations found."""
import fnmatch
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple


@dataclass(frozen=True)
class TensorFilter:
    """--include / --exclude: which tensors are merged (glob patterns on tensor names as
    ``pmm-dist verify`` lists them, ``*`` matching dots too); the others come from the newest."""
    include: Tuple[str, ...] = ()
    exclude: Tuple[str, ...] = ()

    def selects(self, name: str) -> bool:
        if self.include and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)


def select_iterations(available: Sequence[int], *, last: Optional[int] = None,
                      interval: Optional[int] = None, iterations: Optional[Sequence[int]] = None,
                      where: str = "the sources") -> List[int]:
    """Return the selected iterations, oldest first.

    ``iterations``: exactly these. ``interval`` V: newest, newest-V, newest-2V, ... (``last`` of
    them, or back to the oldest available); a missing one is an error. ``last`` alone: the newest
    ``last`` available. Nothing: all available.
    """
    found = sorted(set(available))
    if not found:
        raise ValueError(f"no checkpoints found in {where}")
    if last is not None and last < 1:
        raise ValueError(f"--last must be at least 1, got {last}")
    if interval is not None and interval < 1:
        raise ValueError(f"--interval must be at least 1, got {interval}")
    if iterations:
        if last is not None or interval is not None:
            raise ValueError("--iterations selects exactly; do not combine it with --last or --interval")
        wanted = sorted(set(iterations))
        missing = [it for it in wanted if it not in found]
        if missing:
            raise ValueError(f"iteration(s) {', '.join(map(str, missing))} not found in {where} "
                             f"(available: {_short(found)})")
        return wanted
    newest = found[-1]
    if interval is not None:
        if last is not None:
            wanted = [newest - k * interval for k in range(last)]
        else:
            wanted = [it for it in range(newest, found[0] - 1, -interval)]
        missing = [it for it in wanted if it not in found]
        if missing:
            raise ValueError(f"--interval {interval} needs iteration(s) {', '.join(map(str, sorted(missing)))}, "
                             f"not found in {where} (available: {_short(found)})")
        return sorted(wanted)
    if last is not None:
        if last > len(found):
            raise ValueError(f"--last {last} asks for more checkpoints than the {len(found)} found in {where}")
        return found[-last:]
    return found


def _short(values: List[int]) -> str:
    return ", ".join(map(str, values)) if len(values) <= 12 else \
        ", ".join(map(str, values[:5])) + ", ..., " + ", ".join(map(str, values[-5:]))
