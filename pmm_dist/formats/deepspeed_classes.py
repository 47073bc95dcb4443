"""The DeepSpeed classes its checkpoints pickle, read without importing DeepSpeed.

Why: a DeepSpeed checkpoint pickles four small classes of DeepSpeed: the fp16 loss scalers
(``LossScaler``, ``DynamicLossScaler``), the ZeRO stage (``ZeroStageEnum``) and the bf16
optimizer's fragment addresses (``fragment_address``). Allowing them by importing them runs
``import deepspeed`` (its package imports 425 modules): 0.33 s here, for objects the merge never
looks into. A ZeRO-2 merge of four 3 GB checkpoints planned in 0.78 s with that import, in 0.14 s
without it.

Loading therefore resolves their names to the stand-ins below, which hold the same state. A
stand-in cannot be pickled (its ``__reduce_ex__`` refuses): ``with_deepspeed_objects`` replaces
each in an output file's skeleton by an object of DeepSpeed's own class with that state
(importing DeepSpeed then), which pickles exactly as the object DeepSpeed saved. Where DeepSpeed
is already imported (a training process), its own classes are allowed instead, as before.
"""
import copy
import enum
import functools
import importlib
import importlib.util
import sys
import threading
from dataclasses import dataclass
from typing import Any, List


class _StandIn:
    """The state of an object of DeepSpeed's class ``DEEPSPEED_NAME``, as unpickled."""

    DEEPSPEED_NAME = ""

    def deepspeed_object(self):
        cls = _deepspeed_class(self.DEEPSPEED_NAME)
        twin = cls.__new__(cls)
        twin.__dict__.update(self.__dict__)  # what unpickling the real one would have set
        return twin

    def __reduce_ex__(self, protocol):
        # Pickled as itself, it would name pmm_dist's class in an output file; pickled as
        # DeepSpeed's, pickle refuses an object whose __class__ is another.
        raise TypeError(f"a stand-in for {self.DEEPSPEED_NAME} is saved through with_deepspeed_objects() only")

    def __copy__(self):
        twin = type(self).__new__(type(self))
        twin.__dict__.update(self.__dict__)
        return twin

    def __deepcopy__(self, memo):
        twin = type(self).__new__(type(self))
        memo[id(self)] = twin
        twin.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return twin


class LossScaler(_StandIn):
    DEEPSPEED_NAME = "deepspeed.runtime.fp16.loss_scaler.LossScaler"


class DynamicLossScaler(_StandIn):
    DEEPSPEED_NAME = "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"


@dataclass
class FragmentAddress(_StandIn):  # a dataclass like DeepSpeed's: equal when its fields are
    numel: int
    start: int
    DEEPSPEED_NAME = "deepspeed.utils.tensor_fragment.fragment_address"


class ZeroStageEnum(int, enum.Enum):
    """DeepSpeed's members and values (deepspeed/runtime/zero/config.py); compares as the int."""
    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3
    max_stage = 3

    def deepspeed_object(self):
        return _deepspeed_class(self.DEEPSPEED_NAME)(self.value)

    def __reduce_ex__(self, protocol):
        raise TypeError("a stand-in for deepspeed's ZeroStageEnum is saved through with_deepspeed_objects() only")


ZeroStageEnum.DEEPSPEED_NAME = "deepspeed.runtime.zero.config.ZeroStageEnum"
STAND_INS = (LossScaler, DynamicLossScaler, ZeroStageEnum, FragmentAddress)


def _imported() -> bool:
    return "deepspeed" in sys.modules


@functools.lru_cache(maxsize=None)
def _installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def deepspeed_safe_globals() -> List[Any]:
    """The allow-list entries for DeepSpeed's pickled classes: the stand-ins under DeepSpeed's
    names, or DeepSpeed's own classes once it is imported. ImportError where it is not installed
    (such a checkpoint is then refused, as one of a framework that is not there)."""
    if _imported():
        return [_deepspeed_class(cls.DEEPSPEED_NAME) for cls in STAND_INS]
    if not _installed():
        raise ImportError("deepspeed is not installed")
    return [(cls, cls.DEEPSPEED_NAME) for cls in STAND_INS]


def with_deepspeed_objects(skeleton):
    """``skeleton`` with each stand-in (in its dicts, lists and tuples) replaced by DeepSpeed's
    own object; ``skeleton`` itself where it holds none (DeepSpeed is not imported then).

    Only the containers on the way to a stand-in are copied (``copy.copy``: their type and
    attributes kept), the rest is shared; an object at several places (a stand-in or a copied
    container) is replaced by one object, as pickle writes it once and then refers to it."""
    replaced = {}

    def swapped(value):
        if id(value) in replaced:
            return replaced[id(value)]
        if isinstance(value, STAND_INS):
            result = value.deepspeed_object()
        elif isinstance(value, dict):
            items = {key: swapped(item) for key, item in value.items()}
            if all(items[key] is item for key, item in value.items()):
                return value
            result = copy.copy(value)
            result.update(items)
        elif type(value) in (list, tuple):
            items = [swapped(item) for item in value]
            if all(new is old for new, old in zip(items, value)):
                return value
            result = type(value)(items)
        else:
            return value
        replaced[id(value)] = result
        return result
    return swapped(skeleton)


_IMPORT_LOCK = threading.Lock()


def _deepspeed_class(name: str):
    module, _, qualname = name.rpartition(".")
    # One thread at a time: units are written from several threads, and two of them importing
    # DeepSpeed's circular modules at once dead-lock in importlib (it raises _DeadlockError).
    with _IMPORT_LOCK:
        return getattr(importlib.import_module(module), qualname)
