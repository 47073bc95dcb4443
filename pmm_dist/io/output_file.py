"""The bytes of one output file, to disk and hashed: staged in aligned buffers, each full buffer
hashed on one thread and written on another, with O_DIRECT where the file system takes it.

Why O_DIRECT: a buffered write copies every byte into freshly allocated page-cache pages and
leaves the kernel to write them back, and on these machines that costs the writing thread
0.25-2.6 s of system CPU per GB (measured: the same 1 GB, 16 MiB writes, fsync), as much as the
merge's arithmetic on the same 2 cores. Written from page-aligned buffers with O_DIRECT, the
same GB took 0.43-0.47 s of wall time and 0.03-0.05 s of CPU, every time. (DeepSpeed's fast
checkpoint writer, deepspeed/io/fast_file_writer.py, writes with O_DIRECT too.)
``PMM_DIST_DIRECT_IO=0`` turns it off, for a file system whose direct writes are slow (NFS makes
each one synchronous).

Why staging at all: O_DIRECT needs aligned memory, offsets and lengths, which the bytes torch
hands over (memoryviews of its records) are not; the staging copy is the one copy a buffered
write makes too, and the checksum is taken from the staged buffer instead of reading the
written bytes back. A file smaller than one buffer (metadata, small shards) is written and
hashed in one buffered call at the end, without threads. Where O_DIRECT is refused (tmpfs,
some network file systems) the same threads write buffered, starting each range's writeback
as they go (sync_file_range) so the final fsync does not wait for the whole file.

Memory: at most BUFFERS buffers of BUFFER_BYTES per file being written, reused across files.
"""
import collections
import ctypes
import errno
import fcntl
import hashlib
import mmap
import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Deque, List, Optional, Tuple

CHECKSUM_ALGORITHM = "sha256"
# A multiple of any device's logical block (512 B or 4 KiB): O_DIRECT takes offsets and lengths
# in whole blocks, so every whole buffer, at every offset, may be written direct; the tail is not.
BUFFER_BYTES = 4 << 20
BUFFERS = 3  # in flight per file: one being filled, the others being hashed and written
# Why: the kernel starts writing dirty pages back only past a share of RAM (often gigabytes), so
# a file written buffered waits at its fsync for the whole write to disk after the merge is done.
# Starting the writeback every this many bytes overlaps the disk with the merge instead.
WRITEBACK_BYTES = 32 << 20

_O_DIRECT = getattr(os, "O_DIRECT", 0)
_free_buffers: List[mmap.mmap] = []  # of files already written: reused, not faulted in again
_buffers_lock = threading.Lock()


def _sync_file_range():
    """Linux's sync_file_range(2), to start writing a file's dirty pages back without waiting;
    None elsewhere (then the final fsync writes everything)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def direct_io_wanted() -> bool:
    return bool(_O_DIRECT) and os.environ.get("PMM_DIST_DIRECT_IO", "1") != "0"


def _take_buffer() -> mmap.mmap:
    with _buffers_lock:
        if _free_buffers:
            return _free_buffers.pop()
    return mmap.mmap(-1, BUFFER_BYTES)  # anonymous: page-aligned, as O_DIRECT needs


def _give_back(buffers) -> None:
    with _buffers_lock:
        _free_buffers.extend(b for b in buffers if len(b) == BUFFER_BYTES)
        del _free_buffers[BUFFERS:]  # one file's worth: a rank writes its files one at a time


class OutputFile:
    """A write-only file object over ``fd`` (opened for writing, empty) that hashes and counts
    the bytes written. ``finish()`` puts everything in the file and returns the checksum (the
    caller fsyncs); ``abandon()`` stops at once. Write errors are raised by a later ``write``
    or by ``finish``."""

    def __init__(self, fd: int):
        self._fd = fd
        self.hasher = hashlib.new(CHECKSUM_ALGORITHM)
        self.num_bytes = 0
        self._buffer: Optional[mmap.mmap] = None
        self._filled = 0
        self._handed = 0            # bytes handed to the writing thread (the file offset of the next)
        self._written_back = 0      # buffered writes: bytes whose writeback was started
        self._owned: List[mmap.mmap] = []
        self._idle: List[mmap.mmap] = []
        self._in_flight: Deque[Tuple[mmap.mmap, Future, Future]] = collections.deque()
        self._hashing = self._writing = None
        self._direct = False

    # -- what producers call -------------------------------------------------------------------
    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done, total = 0, view.nbytes
        while done < total:
            if self._buffer is None:
                self._buffer, self._filled = self._next_buffer(), 0
            take = min(total - done, BUFFER_BYTES - self._filled)
            self._buffer[self._filled:self._filled + take] = view[done:done + take]
            self._filled += take
            done += take
            if self._filled == BUFFER_BYTES:
                self._hand_over(self._buffer, BUFFER_BYTES)
                self._buffer = None
        self.num_bytes += total
        return total

    def flush(self) -> None:
        """Nothing to do: staged bytes reach the file in order, and ``finish`` writes the rest."""

    # -- the end ---------------------------------------------------------------------------------
    def finish(self) -> str:
        """Every byte written into the file, hashed: the checksum's hex digest."""
        try:
            while self._in_flight:
                self._retire(self._in_flight.popleft())
            if self._filled:  # the tail: hashed here, written buffered (O_DIRECT needs whole blocks)
                tail = memoryview(self._buffer)[:self._filled]
                self.hasher.update(tail)
                self._set_direct(False)
                _write_all(self._fd, tail, self._handed)
                self._handed += self._filled
                self._filled = 0
        except BaseException:
            self._stop(cancel=True)
            raise
        self._stop(cancel=False)
        return self.hasher.hexdigest()

    def abandon(self) -> None:
        self._stop(cancel=True)

    # -- staging -------------------------------------------------------------------------------
    def _next_buffer(self) -> mmap.mmap:
        while self._in_flight and self._in_flight[0][2].done():  # finished ones: errors surface early
            self._retire(self._in_flight.popleft())
        if self._idle:
            return self._idle.pop()
        if len(self._owned) < BUFFERS:
            buffer = _take_buffer()
            self._owned.append(buffer)
            return buffer
        oldest = self._in_flight.popleft()
        self._retire(oldest)
        return self._idle.pop()

    def _retire(self, entry) -> None:
        buffer, hashed, written = entry
        try:
            hashed.result()
            written.result()
        finally:
            self._idle.append(buffer)

    def _hand_over(self, buffer: mmap.mmap, length: int) -> None:
        if self._hashing is None:  # the first full buffer: a large file, written from threads
            self._hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pmm-hash")
            self._writing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pmm-disk")
            self._set_direct(direct_io_wanted())
        view, offset = memoryview(buffer)[:length], self._handed
        self._handed += length
        # single workers: the checksum takes the buffers in order; each write names its offset
        self._in_flight.append((buffer, self._hashing.submit(self.hasher.update, view),
                                self._writing.submit(self._write, view, offset)))

    def _write(self, view: memoryview, offset: int) -> None:
        if self._direct:
            try:
                _write_all(self._fd, view, offset)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._set_direct(False)  # accepted at open, refused at the write: buffered then
        _write_all(self._fd, view, offset)
        end = offset + len(view)
        if _SYNC_FILE_RANGE is not None and end - self._written_back >= WRITEBACK_BYTES:
            # asynchronous: returns once the writes are queued; errors show at the final fsync
            _SYNC_FILE_RANGE(self._fd, self._written_back, end - self._written_back, _SYNC_FILE_RANGE_WRITE)
            self._written_back = end

    def _set_direct(self, direct: bool) -> None:
        if direct == self._direct or not _O_DIRECT:
            return
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(self._fd, fcntl.F_SETFL, flags | _O_DIRECT if direct else flags & ~_O_DIRECT)
            self._direct = direct
        except OSError:  # the file system does not do direct I/O: buffered writes
            self._direct = False

    def _stop(self, cancel: bool) -> None:
        for pool in (self._hashing, self._writing):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=cancel)  # nothing writes once the file may go
        self._hashing = self._writing = None
        self._in_flight.clear()
        owned, self._owned, self._idle, self._buffer = self._owned, [], [], None
        _give_back(owned)


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
