"""Durable, atomic file output: write to a temporary name, fsync, rename, fsync the directory.

A reader (a trainer, or ``pmm-dist verify``) never sees a partially written file under its
final name. Checksums are computed as the bytes are written: inline for small files, for large
ones on a thread that reads them back through the page cache behind the writer (_HashBehind).
"""
import ctypes
import hashlib
import json
import os
import shutil
import sys
import threading
from dataclasses import dataclass
from typing import Callable

from ..errors import MergeError

CHECKSUM_ALGORITHM = "sha256"
_COPY_CHUNK = 16 << 20


@dataclass(frozen=True)
class WrittenFile:
    relpath: str  # relative to the output root
    num_bytes: int
    sha256: str


def _sync_file_range():
    """Linux's sync_file_range(2), to start writing a file's dirty pages back without waiting;
    None elsewhere (then the final fsync writes everything, as before)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2
# Why: the kernel starts writing dirty pages back only past a share of RAM (often gigabytes), so
# a file written in full waits at its fsync for the whole write to disk after the merge is done.
# Starting the writeback every this many bytes overlaps the disk with the merge instead.
WRITEBACK_BYTES = 32 << 20


# Files past this many bytes are hashed on a thread of their own (_HashBehind); smaller ones,
# most of the metadata files, inline, without a thread each.
HASH_BEHIND_BYTES = 8 << 20
_HASH_CHUNK = 8 << 20


class _HashBehind:
    """The checksum of a file being written, computed on a thread of its own from the bytes that
    have reached the OS, read back through the page cache (where bytes just written are).

    Why: hashing inline costs the writing thread ~0.8 s per GB, as much as the merge's own
    arithmetic, and the writer was the slower of the two; the bytes handed to ``write`` (torch's
    memoryviews of a record) cannot be kept past the call without a copy. Reading them back
    costs one memory copy per byte, on the hashing thread."""

    def __init__(self, path: str, hasher, start: int):
        self._fd = os.open(path, os.O_RDONLY)
        self._hasher, self._hashed = hasher, start
        self._available, self._closing, self._abandoned, self._error = start, False, False, None
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="pmm-hash", daemon=True)
        self._thread.start()

    def advance(self, num_bytes: int) -> None:
        """Bytes [0, num_bytes) of the file are written (in the OS, not in a user-space buffer)."""
        with self._ready:
            self._available = num_bytes
            self._ready.notify()

    def _run(self) -> None:
        buffer = memoryview(bytearray(_HASH_CHUNK))
        try:
            while True:
                with self._ready:
                    while self._available == self._hashed and not self._closing:
                        self._ready.wait()
                    if self._abandoned or (self._closing and self._available == self._hashed):
                        return
                    target = self._available
                while self._hashed < target and not self._abandoned:
                    num_read = os.preadv(self._fd, [buffer[:min(_HASH_CHUNK, target - self._hashed)]], self._hashed)
                    if num_read <= 0:
                        raise OSError(f"the file ends at {self._hashed} bytes, {target} were written")
                    self._hasher.update(buffer[:num_read])
                    self._hashed += num_read
        except BaseException as exc:  # whatever stops the hashing fails the file, never a wrong digest
            self._error = exc

    def finish(self, abandon: bool = False) -> None:
        """Wait until everything written is hashed (``abandon``: stop at once); raises what
        reading the file back met."""
        with self._ready:
            self._closing, self._abandoned = True, abandon
            self._ready.notify()
        self._thread.join()
        os.close(self._fd)
        if self._error is not None and not abandon:
            raise self._error


class _HashingWriter:
    """A write-only file object that hashes and counts the bytes passing through (past
    HASH_BEHIND_BYTES on a thread of its own, see _HashBehind), and starts their writeback to
    disk as it goes (WRITEBACK_BYTES)."""

    def __init__(self, raw, path: str):
        self._raw, self._path = raw, path
        self.hasher = hashlib.new(CHECKSUM_ALGORITHM)
        self.num_bytes = 0
        self._written_back = 0
        self._behind = None

    def write(self, data) -> int:
        if self._behind is None and self.num_bytes + len(data) > HASH_BEHIND_BYTES:
            self._raw.flush()
            self._behind = _HashBehind(self._path, self.hasher, self.num_bytes)
        if self._behind is None:
            self.hasher.update(data)
        written = self._raw.write(data)
        self.num_bytes += len(data)
        if self._behind is not None:
            self._raw.flush()  # into the OS, where the hashing thread reads it
            self._behind.advance(self.num_bytes)
        if _SYNC_FILE_RANGE is not None and self.num_bytes - self._written_back >= WRITEBACK_BYTES:
            self._raw.flush()
            # asynchronous: returns once the writes are queued; errors show at the final fsync
            _SYNC_FILE_RANGE(self._raw.fileno(), self._written_back, self.num_bytes - self._written_back,
                             _SYNC_FILE_RANGE_WRITE)
            self._written_back = self.num_bytes
        return written

    def flush(self):
        self._raw.flush()

    def hexdigest(self) -> str:
        if self._behind is not None:
            self._behind, behind = None, self._behind
            behind.finish()
        return self.hasher.hexdigest()

    def abandon(self) -> None:
        if self._behind is not None:
            self._behind, behind = None, self._behind
            behind.finish(abandon=True)


def temporary_name(path: str) -> str:
    return f"{path}.tmp.{os.getpid()}"


def write_atomically(path: str, produce: Callable[[object], None]) -> tuple:
    """``produce(fileobj)`` writes the content; returns (num_bytes, sha256) of what was written."""
    tmp, writer = temporary_name(path), None
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb") as raw:
            writer = _HashingWriter(raw, tmp)
            produce(writer)
            raw.flush()
            os.fsync(raw.fileno())
            digest = writer.hexdigest()
        os.replace(tmp, path)
    except OSError as exc:  # disk full, read-only file system, quota: name the file
        _abandon(writer, tmp)
        raise MergeError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    except BaseException:
        _abandon(writer, tmp)
        raise
    fsync_directory(os.path.dirname(path) or ".")
    return writer.num_bytes, digest


def write_text_atomically(path: str, text: str) -> tuple:
    return write_atomically(path, lambda f: f.write(text.encode()))


def write_json_atomically(path: str, obj) -> tuple:
    return write_text_atomically(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _chunks(path: str):
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_COPY_CHUNK)
            if not chunk:
                return
            yield chunk


def copy_atomically(src: str, dst: str) -> tuple:
    """Byte-for-byte copy (no unpickling) with checksum; returns (num_bytes, sha256)."""
    def produce(writer):
        chunks = _chunks(src)
        while True:
            try:
                chunk = next(chunks, None)
            except OSError as exc:  # name the source: write_atomically would name the destination
                raise MergeError(f"{src}: cannot read ({exc.strerror or exc})") from exc
            if chunk is None:
                return
            writer.write(chunk)
    return write_atomically(dst, produce)


def fsync_directory(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_of_file(path: str) -> str:
    hasher = hashlib.new(CHECKSUM_ALGORITHM)
    for chunk in _chunks(path):
        hasher.update(chunk)
    return hasher.hexdigest()


def remove_tree_quietly(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _abandon(writer, tmp: str) -> None:
    if writer is not None:
        writer.abandon()
    _remove_quietly(tmp)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
