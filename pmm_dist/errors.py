"""User-facing error types.

Every error a user can cause is a ``MergeError`` whose message names the offending path and
key, so the CLI can print it and exit non-zero without a traceback: ``UsageError`` (a flag or
its value; exit 2) or ``InputError`` (the checkpoints themselves; exit 1). Internal invariants
use ``assert``.
"""
from dataclasses import dataclass
from typing import Dict, Optional


class MergeError(Exception):
    """A problem with the user's input or options; the message names path and key."""
    resumable = True
    """Whether re-running the same command with --resume can succeed (an I/O error, a kill),
    as opposed to a problem the same command meets again (bad input, bad flags)."""


class UsageError(MergeError, ValueError):
    """A flag or its value is wrong (also a ValueError, as torchtitan-style configs raise)."""
    resumable = False


class NotResumable(MergeError):
    """--resume asked for, but the staged merge is a different one."""
    resumable = False


class OutputError(MergeError):
    """--out cannot receive the merge (exists, is not ours, overlaps an input, holds another merge)."""
    resumable = False


class InputError(MergeError):
    """One or more source checkpoints are unusable (missing, corrupt, inconsistent)."""
    resumable = False

    def __init__(self, problems):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        shown = self.problems[:20]
        more = len(self.problems) - len(shown)
        text = "\n  ".join(shown) + (f"\n  ... and {more} more" if more > 0 else "")
        super().__init__(text if len(self.problems) == 1 else f"{len(self.problems)} problems:\n  {text}")


class Interrupted(MergeError):
    """A rank was interrupted (Ctrl-C, SIGTERM); every rank stops."""


class Terminated(KeyboardInterrupt):
    """SIGTERM turned into an exception, so a rank stops through the same path as Ctrl-C."""


@dataclass(frozen=True)
class RankError:
    """What one rank reports when its part of a collective step fails."""
    message: str
    kind: str                      # the exception's class name
    usage: bool = False            # a UsageError: the CLI exits 2
    interrupted: bool = False      # KeyboardInterrupt / SystemExit / SIGTERM
    resumable: bool = True         # see MergeError.resumable
    traceback: Optional[str] = None  # for errors that are not MergeErrors: a bug, shown in full


class RankFailure(MergeError):
    """One or more ranks failed at a named step; holds every failing rank's error."""

    def __init__(self, step: str, errors_by_rank: Dict[int, RankError]):
        self.step = step
        self.errors_by_rank = dict(errors_by_rank)
        ranks = sorted(self.errors_by_rank)
        if ranks == [0]:
            text = self.errors_by_rank[0].message
        else:
            text = "\n".join(f"[rank {r}] {self.errors_by_rank[r].message}" for r in ranks)
        super().__init__(text)

    @property
    def usage(self) -> bool:
        return all(error.usage for error in self.errors_by_rank.values())

    @property
    def resumable(self) -> bool:
        return all(error.resumable for error in self.errors_by_rank.values())

    @property
    def interrupted(self) -> bool:
        return any(error.interrupted for error in self.errors_by_rank.values())

    @property
    def tracebacks(self) -> Dict[int, str]:
        return {rank: e.traceback for rank, e in self.errors_by_rank.items() if e.traceback}
