"""Loading checkpoints without executing code from them.

``torch.load(weights_only=True)`` only rebuilds tensors, containers and primitive types; every
other class a checkpoint references must be on an explicit allow-list. Ours mirrors what
Megatron and DeepSpeed themselves allow (argparse Namespace, numpy RNG state, BytesIO extra
state, ...). Classes of the training frameworks (Megatron enums in saved args, DeepSpeed's
loss-scaler) are allowed only by their exact names and only when that framework is installed,
so the objects can be saved again under their own names (DeepSpeed's are read as stand-ins and
saved as its own: formats/deepspeed_classes).
"""
import argparse
import collections
import contextlib
import functools
import io
import os
import pathlib
import re
import signal
import threading
import types
import zipfile
from typing import Any, Callable, Dict, List, Optional

import torch

from ..errors import InputError
from .planning_reads import memoised

# module path prefix -> callable returning that framework's own allow-list; each format registers
# its framework's (register_framework_globals), and a list is loaded only when a file needs it.
_FRAMEWORK_SAFE_GLOBALS: Dict[str, Callable[[], List[Any]]] = {}
_loaded_frameworks: set = set()
_observers = threading.local()


def register_framework_globals(prefix: str, loader: Callable[[], List[Any]]) -> None:
    """Classes under the module path ``prefix`` are allowed by their exact names as ``loader()``
    lists them (imported only when a checkpoint references one, and only if installed)."""
    _FRAMEWORK_SAFE_GLOBALS[prefix] = loader
_LOAD_LOCK = threading.RLock()


def _numpy_safe_globals() -> List[Any]:
    import numpy as np
    allowed = [np.ndarray, np.dtype]
    try:  # numpy >= 2 moved the pickle reconstructor to numpy._core; old pickles use numpy.core
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    allowed += [_reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct")]
    allowed += [cls for cls in vars(np.dtypes).values() if isinstance(cls, type) and issubclass(cls, np.dtype)]
    return allowed


@functools.lru_cache(maxsize=None)
def base_safe_globals() -> tuple:
    return (argparse.Namespace, types.SimpleNamespace, io.BytesIO, pathlib.PosixPath, signal.Signals,
            collections.OrderedDict, *_numpy_safe_globals())


_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def safe_load(path, *, mmap: bool = True, map_location="cpu") -> Any:
    """``torch.load`` with ``weights_only=True`` and the allow-list; errors name the file.

    ``mmap=True`` maps tensor storages from the file instead of reading them: loading costs only
    the pickle, and tensor bytes are read when (and if) they are used. While the coordinator
    plans, a file is parsed once (io/planning_reads.py): treat what is returned as read-only.
    """
    loaded = memoised("safe_load", (os.path.abspath(path), mmap, str(map_location)),
                      lambda: _load(path, mmap, map_location))
    observer = getattr(_observers, "callback", None)
    if observer is not None:
        observer(path)
    return loaded


@contextlib.contextmanager
def loads_observed(callback: Callable[[str], None]):
    """While inside, ``callback(path)`` for every file ``safe_load`` returns on this thread (a
    unit's sources, whose records io.record_check checks)."""
    previous = getattr(_observers, "callback", None)
    _observers.callback = callback
    try:
        yield
    finally:
        _observers.callback = previous


def _load(path, mmap: bool, map_location) -> Any:
    for _ in range(len(_FRAMEWORK_SAFE_GLOBALS) + 1):
        try:
            # torch's safe_globals context swaps a process-wide list: one loader at a time (with
            # mmap=True a load only parses the pickle, so the lock is held briefly).
            with _LOAD_LOCK, torch.serialization.safe_globals([*base_safe_globals(), *_framework_globals()]):
                return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except FileNotFoundError:
            raise InputError(f"{path}: file not found") from None
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
            match = _UNSAFE_GLOBAL.search(str(exc))
            name = match.group(1) if match else None
            if name and _enable_framework(name):
                continue
            if name:
                raise InputError(f"{path}: refused: the checkpoint references {name}, which is not on "
                                 "pmm_dist's allow-list of safe classes (unpickling it could run code)") from None
            if "Weights only load failed" in str(exc):  # an opcode the safe unpickler does not take
                raise InputError(f"{path}: cannot read checkpoint: its pickle is corrupt or holds what only "
                                 f"unsafe unpickling would run ({_unpickler_reason(exc)}); nothing of it was "
                                 "executed") from None
            raise InputError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {_first_line(exc)}); "
                             "is the file truncated or corrupt?") from None
    raise InputError(f"{path}: cannot read checkpoint: unresolved classes")


def saved_file_problem(path: str) -> Optional[str]:
    """Why ``path`` is not a whole ``torch.save`` file, from cheap evidence (``inspect``): missing,
    empty, or without the zip directory that ends every such file (truncated, overwritten).
    None when it looks whole; its contents are checked when a merge reads it."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return f"{path}: missing"
    if size == 0:
        return f"{path}: empty"
    try:
        whole = zipfile.is_zipfile(path)
    except OSError as exc:
        return f"{path}: unreadable ({exc})"
    return None if whole else f"{path}: not a whole torch.save file (no zip directory at its end: truncated or corrupt?)"


def _framework_globals() -> List[Any]:
    allowed: List[Any] = []
    for prefix in _loaded_frameworks:
        allowed += _FRAMEWORK_SAFE_GLOBALS[prefix]()
    return allowed


def _enable_framework(global_name: str) -> bool:
    for prefix in _FRAMEWORK_SAFE_GLOBALS:
        if global_name.startswith(prefix) and prefix not in _loaded_frameworks:
            try:
                _FRAMEWORK_SAFE_GLOBALS[prefix]()
            except ImportError:
                return False
            _loaded_frameworks.add(prefix)
            return True
    return False


def _unpickler_reason(exc: Exception) -> str:
    """The safe unpickler's own words inside torch's long "Weights only load failed" text."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    reason = text.split(marker, 1)[1].strip().split("\n")[0] if marker in text else ""
    return reason or _first_line(exc)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
