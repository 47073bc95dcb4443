"""Durable, atomic file output: write to a temporary name, fsync, rename, fsync the directory.

A reader (a trainer, or ``pmm-dist verify``) never sees a partially written file under its
final name. Checksums are computed from the bytes as they are written, never by re-reading.
"""
import ctypes
import hashlib
import json
import os
import shutil
import sys
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


class _HashingWriter:
    """A write-only file object that hashes and counts the bytes passing through, and starts
    their writeback to disk as it goes (WRITEBACK_BYTES)."""

    def __init__(self, raw):
        self._raw = raw
        self.hasher = hashlib.new(CHECKSUM_ALGORITHM)
        self.num_bytes = 0
        self._written_back = 0

    def write(self, data) -> int:
        self.hasher.update(data)
        self.num_bytes += len(data)
        written = self._raw.write(data)
        if _SYNC_FILE_RANGE is not None and self.num_bytes - self._written_back >= WRITEBACK_BYTES:
            self._raw.flush()
            # asynchronous: returns once the writes are queued; errors show at the final fsync
            _SYNC_FILE_RANGE(self._raw.fileno(), self._written_back, self.num_bytes - self._written_back,
                             _SYNC_FILE_RANGE_WRITE)
            self._written_back = self.num_bytes
        return written

    def flush(self):
        self._raw.flush()


def temporary_name(path: str) -> str:
    return f"{path}.tmp.{os.getpid()}"


def write_atomically(path: str, produce: Callable[[object], None]) -> tuple:
    """``produce(fileobj)`` writes the content; returns (num_bytes, sha256) of what was written."""
    tmp = temporary_name(path)
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb") as raw:
            writer = _HashingWriter(raw)
            produce(writer)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # disk full, read-only file system, quota: name the file
        _remove_quietly(tmp)
        raise MergeError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    except BaseException:
        _remove_quietly(tmp)
        raise
    fsync_directory(os.path.dirname(path) or ".")
    return writer.num_bytes, writer.hasher.hexdigest()


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


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
