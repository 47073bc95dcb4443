"""Walking nested state dicts: leaves with their key paths, and rebuilding with new leaves.

A path is the tuple of dict keys / list indices leading to a leaf (exact even when keys
contain dots); ``dotted`` renders it for messages.
"""
import copy
from typing import Any, Callable, Dict, Iterator, Tuple

Path = Tuple[Any, ...]


def dotted(path: Path) -> str:
    return ".".join(map(str, path))


def iter_leaves(obj: Any, prefix: Path = ()) -> Iterator[Tuple[Path, Any]]:
    """(path, leaf) for every value that is not a dict, list or tuple."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from iter_leaves(value, prefix + (key,))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from iter_leaves(value, prefix + (index,))
    else:
        yield prefix, obj


def flatten(obj: Any, prefix: Path = ()) -> Dict[Path, Any]:
    return dict(iter_leaves(obj, prefix))


def map_leaves(obj: Any, fn: Callable[[Path, Any], Any], prefix: Path = ()) -> Any:
    """A copy of ``obj`` with the same container types, each leaf replaced by ``fn(path, leaf)``."""
    if isinstance(obj, dict):
        rebuilt = type(obj)() if type(obj) is not dict else {}
        for key, value in obj.items():
            rebuilt[key] = map_leaves(value, fn, prefix + (key,))
        if hasattr(obj, "_metadata"):  # nn.Module.state_dict() keeps per-module versions here
            rebuilt._metadata = obj._metadata
        return rebuilt
    if isinstance(obj, (list, tuple)):
        values = [map_leaves(v, fn, prefix + (i,)) for i, v in enumerate(obj)]
        return type(obj)(*values) if hasattr(obj, "_fields") else type(obj)(values)
    return fn(prefix, obj)


def get_path(obj: Any, path: Path) -> Any:
    """The value at ``path`` inside nested dicts, or None where the path does not exist."""
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def replace_subtree(obj: Any, path: Path, fn: Callable[[Any], Any]) -> Any:
    """A copy of ``obj`` (shallow along ``path`` only) whose subtree at ``path`` is ``fn(subtree)``;
    ``obj`` itself is left as it is. A path that does not exist is left alone."""
    if not path:
        return fn(obj)
    if not isinstance(obj, dict) or path[0] not in obj:
        return obj
    rebuilt = copy.copy(obj)  # keeps the dict type (OrderedDict) and state_dict _metadata
    rebuilt[path[0]] = replace_subtree(obj[path[0]], path[1:], fn)
    return rebuilt


def remove_subtree(obj: Any, path: Path) -> Any:
    """A copy of ``obj`` without the entry at ``path`` (``obj`` itself is left as it is)."""
    def without(parent):
        rebuilt = copy.copy(parent)
        rebuilt.pop(path[-1], None)
        return rebuilt
    return replace_subtree(obj, path[:-1], without) if isinstance(get_path(obj, path[:-1]), dict) else obj
