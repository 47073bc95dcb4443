"""User-facing error types.

Every error a user can cause (bad input, bad options, an output that already exists) is a
``MergeError`` whose message names the offending path and key, so the CLI can print it and
exit non-zero without a traceback. Internal invariants use ``assert``.
"""


class MergeError(Exception):
    """A problem with the user's input or options; the message names path and key."""


class InputError(MergeError):
    """One or more source checkpoints are unusable (missing, corrupt, inconsistent)."""

    def __init__(self, problems):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        shown = self.problems[:20]
        more = len(self.problems) - len(shown)
        text = "\n  ".join(shown) + (f"\n  ... and {more} more" if more > 0 else "")
        super().__init__(text if len(self.problems) == 1 else f"{len(self.problems)} problems:\n  {text}")


class RankFailure(MergeError):
    """One or more ranks failed; holds every failing rank's message."""

    def __init__(self, errors_by_rank):
        self.errors_by_rank = dict(errors_by_rank)
        ranks = sorted(self.errors_by_rank)
        if len(ranks) == 1 and ranks[0] == 0 and len(self.errors_by_rank) == 1:
            super().__init__(self.errors_by_rank[0])
        else:
            lines = [f"[rank {r}] {self.errors_by_rank[r]}" for r in ranks]
            super().__init__("\n".join(lines))
