"""The merge engine, in steps with one job each: options, planning, execution, commit, manifest.

Its names are imported when first used (PEP 562): ``pmm_dist.engine.options`` is needed to build
the command line without the rest (torch, the formats' base).
"""
import importlib

_NAMES = {"MANIFEST": "manifest", "Manifest": "manifest", "MergeOptions": "options", "MergePlan": "planning",
          "MergeResult": "run", "merge": "run"}

__all__ = list(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
