"""Writes to one output file in a background thread, in the order they were asked for.

Why: a chunked output file (a DCP ``.distcp``) is many merged tensors written one after the
other. Serialising, hashing and writing one costs about as much as merging the next; done in
turn, each waits for the other. Here the merge goes on while the previous result is written:
on the CPU each keeps a core busy (hashing and the write syscall release the GIL).

Memory: at most ``depth`` writes wait besides the one being written, each holding its tensor,
so a rank holds a bounded number of merged chunks, whatever the file's size.
"""
import collections
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Deque


class WriteBehind:
    """``submit(job)`` runs ``job()`` after every job submitted before it; a job's exception is
    raised by a later ``submit`` or by leaving the ``with`` block, which waits for every job."""

    def __init__(self, depth: int = 1):
        self._depth = depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pmm-write")
        self._pending: Deque[Future] = collections.deque()

    def submit(self, job: Callable[[], None]) -> None:
        while len(self._pending) > self._depth:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(job))

    def __enter__(self) -> "WriteBehind":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                while self._pending:
                    self._pending.popleft().result()
            else:  # the caller failed: the file is abandoned, the waiting writes are not needed
                for future in self._pending:
                    future.cancel()
        finally:
            self._pool.shutdown(wait=True)  # nothing may write once the caller removes the file
