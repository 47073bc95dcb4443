"""The merge engine, in steps with one job each: options, planning, execution, commit, manifest."""
from .manifest import MANIFEST, Manifest
from .options import MergeOptions
from .planning import MergePlan
from .run import MergeResult, merge

__all__ = ["MANIFEST", "Manifest", "MergeOptions", "MergePlan", "MergeResult", "merge"]
