"""Checking the bytes a merge reads against the CRC-32 that ``torch.save`` stored with them.

A ``torch.save`` file is an uncompressed zip archive: the pickle and one record per tensor
storage, each with the CRC-32 of its bytes in the zip directory. ``torch.load`` never checks
them (nor does a trainer), and a memory-mapped tensor is read only where it is used, so a flipped
bit inside a tensor's bytes would go into the merge unseen. Every source file a unit loads is
therefore read once more, on a thread beside the merge, and its records' checksums compared;
the unit fails, naming the file and the record, before it is marked done (and nothing is
committed). Reading into one reused buffer keeps this out of the rank's resident memory, and
with ``isal`` installed the checksum runs at several GB/s per core (zlib's: about a third).
"""
import os
import struct
import threading
import zipfile
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, List, Optional

from ..errors import InputError

try:  # ISA-L's CRC-32 (the zip polynomial), ~4x zlib's on the same core
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - depends on the installation
    _crc32 = zlib.crc32

_CHUNK = 8 << 20
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # signature ... file name length, extra field length
_LOCAL_SIGNATURE = b"PK\x03\x04"
_buffers = threading.local()


def checks_wanted() -> bool:
    """``PMM_DIST_CHECK_RECORDS=0`` skips the checks (storage that checksums what it stores)."""
    return os.environ.get("PMM_DIST_CHECK_RECORDS", "1") != "0"


def record_problems(path: str) -> List[str]:
    """Records of the zip archive ``path`` whose bytes do not match their stored CRC-32 (with
    the record's name); [] for a file that is not a zip archive (a legacy torch.save pickle,
    whose loader has already read it whole)."""
    try:
        with open(path, "rb", buffering=0) as f:
            try:
                infos = zipfile.ZipFile(f).infolist()
            except zipfile.BadZipFile:
                return []
            return [p for info in infos for p in [_record_problem(f, path, info)] if p]
    except OSError as exc:
        return [f"{path}: cannot be read again to check its records ({exc})"]


def _record_problem(f, path: str, info: zipfile.ZipInfo) -> Optional[str]:
    if info.compress_type != zipfile.ZIP_STORED:
        return None  # not written by torch.save: zipfile's own reader checks what it inflates
    header = os.pread(f.fileno(), _LOCAL_HEADER.size, info.header_offset)
    if len(header) < _LOCAL_HEADER.size or header[:4] != _LOCAL_SIGNATURE:
        return f"{path}: record '{info.filename}' has no local header where the zip directory says (corrupt file)"
    fields = _LOCAL_HEADER.unpack(header)
    start = info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
    buffer = _buffer()
    crc, done = 0, 0
    while done < info.file_size:
        view = memoryview(buffer)[:min(_CHUNK, info.file_size - done)]
        got = os.preadv(f.fileno(), [view], start + done)
        if got <= 0:
            return f"{path}: record '{info.filename}' is cut short ({done} of {info.file_size} bytes: truncated file)"
        crc = _crc32(view[:got], crc)
        done += got
    if crc != info.CRC:
        return (f"{path}: the bytes of record '{info.filename}' do not match their CRC-32 "
                f"({crc:08x}, stored {info.CRC:08x}): the file is corrupt")
    return None


def _buffer() -> bytearray:
    buffer = getattr(_buffers, "buffer", None)
    if buffer is None:
        buffer = _buffers.buffer = bytearray(_CHUNK)
    return buffer


class RecordChecker:
    """The checks of one unit's source files, run on a shared thread as the files are loaded
    (``submit``); ``result`` waits for them and raises InputError naming every bad record.

    A file is checked once per process while its size and modification time stay the same: units
    that read the same file (DeepSpeed's ZeRO optimizer files, for the model states' masters and
    for their own unit; Megatron's distrib_optim.pt) share the one check."""

    _pool: Optional[ThreadPoolExecutor] = None
    _pool_lock = threading.Lock()
    _checked: Dict[tuple, Future] = {}  # (path, size, mtime_ns) -> its check, in this process

    def __init__(self):
        self._checks: Dict[str, Future] = {}

    @classmethod
    def _executor_locked(cls) -> ThreadPoolExecutor:
        if cls._pool is None:
            cls._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pmm-crc")
        return cls._pool

    def submit(self, path: str) -> None:
        path = os.path.abspath(path)
        if path in self._checks or not checks_wanted():
            return
        try:
            stat = os.stat(path)
        except OSError:
            key = None  # the check names what is wrong
        else:
            key = (path, stat.st_size, stat.st_mtime_ns)
        with self._pool_lock:
            check = self._checked.get(key) if key else None
            if check is None or check.cancelled():
                check = self._executor_locked().submit(record_problems, path)
                if key:
                    self._checked[key] = check
        self._checks[path] = check

    def result(self) -> None:
        problems = [p for future in self._checks.values() for p in future.result()]
        if problems:
            raise InputError(problems)

    def cancel(self) -> None:
        """Checks not started yet are dropped (and made again if another unit asks for them)."""
        for future in self._checks.values():
            future.cancel()
