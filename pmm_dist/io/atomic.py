"""Durable, atomic file output: write to a temporary name, fsync, rename, fsync the directory.

A reader (a trainer, or ``pmm-dist verify``) never sees a partially written file under its
final name. Checksums are computed as the bytes are written (``output_file``: how the bytes
reach the disk).
"""
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from typing import Callable

from ..errors import MergeError
from .output_file import CHECKSUM_ALGORITHM, OutputFile

_COPY_CHUNK = 16 << 20


@dataclass(frozen=True)
class WrittenFile:
    relpath: str  # relative to the output root
    num_bytes: int
    sha256: str


def temporary_name(path: str) -> str:
    return f"{path}.tmp.{os.getpid()}"


def remove_temporaries_of(path: str) -> None:
    """Remove the ``temporary_name``s of ``path`` that killed writers (of any process) left: for
    the few files written at the output's root, before writing them again (the files inside a
    staging directory go with it)."""
    directory, name = os.path.split(path)
    prefix = f"{name}.tmp."
    try:
        entries = os.listdir(directory or ".")
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.startswith(prefix) and entry[len(prefix):].isdigit():
            _remove_quietly(os.path.join(directory, entry))


def write_atomically(path: str, produce: Callable[[object], None]) -> tuple:
    """``produce(fileobj)`` writes the content; returns (num_bytes, sha256) of what was written."""
    tmp, writer = temporary_name(path), None
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            writer = OutputFile(fd)
            try:
                produce(writer)
                digest = writer.finish()
            except BaseException:
                writer.abandon()  # its threads stop before the descriptor closes
                raise
            os.fsync(fd)
        finally:
            os.close(fd)
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
