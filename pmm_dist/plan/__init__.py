"""Planning: the plan's types, the selection of checkpoints, and the assignment of work to ranks."""
from .assign import assign_units, balance, work_cost
from .selection import TensorFilter, select_iterations
from .types import (Action, CheckpointRef, ChunkItem, NonfinitePolicy, OptimizerPolicy, OutputKind, OutputLayout, Piece,
                    StoredChunk, WorkUnit)

__all__ = ["Action", "CheckpointRef", "ChunkItem", "NonfinitePolicy", "OptimizerPolicy", "OutputKind", "OutputLayout",
           "Piece", "StoredChunk", "TensorFilter", "WorkUnit", "assign_units", "balance", "select_iterations", "work_cost"]
