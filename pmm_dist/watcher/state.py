"""The running state on disk: one ``.pmmstate`` file per output unit, streamed and read by range.

    OUT/.pmm_watch/states/<iteration>/<unit relpath>.pmmstate
    OUT/.pmm_watch/states/<iteration>/state.json      which window, method form, checkpoints

A file holds, for every merged tensor (chunk) of its unit and every accumulator of the method,
the accumulator's value as compensated pairs, block by block (``BLOCK_ELEMENTS`` elements):

    [planes ...][JSON header][8 bytes: header length, little-endian][8 bytes: b"PMMSTAT1"]
    header = {"format_version": 1, "block_elements": B,
              "entries": {key: {"shape", "dtype", "lo_dtype",
                                "planes": {accumulator: [[hi_offset, lo_offset | null, hi_bytes] per block]}}}}

``hi`` is float64; ``lo`` (the compensation, |lo| <= ulp(hi)/2) is stored as float32, which
keeps about 77 significant bits in all (float64 for float64 tensors), and is left out for a
block where it is zero, as it is for sums of bf16 values that never needed rounding. A block
whose values are exact float32 numbers and need no compensation (sums and ramps of bf16 and fp16
weights, as a rule) is stored as float32, losslessly. Size on disk per accumulator per element:
4 bytes (exact in float32), 8 (float64), or 12 with the compensation (16 for float64 tensors).
Written by the rank that merges the unit, tensor by tensor (nothing held beyond one block),
atomically (temporary name, fsync, rename); the bytes depend only on the values, so an update
redone after a kill writes the same file.
"""
import json
import os
import threading
from typing import Dict, List, Optional, Tuple

import torch

from ..errors import InputError
from ..io.atomic import fsync_directory, temporary_name
from ..merge.compensated import Pair
from ..merge.kernel import BLOCK_ELEMENTS

MAGIC = b"PMMSTAT1"
SUFFIX = ".pmmstate"
FORMAT_VERSION = 1
_FOOTER = 16
_DTYPES = {str(d): d for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16)}


def state_file(directory: str, unit_relpath: str) -> str:
    return os.path.join(directory, unit_relpath + SUFFIX)


def lo_dtype_for(stored: torch.dtype) -> torch.dtype:
    return torch.float64 if stored == torch.float64 else torch.float32


def block_ranges(numel: int, block: int = BLOCK_ELEMENTS) -> List[Tuple[int, int]]:
    return [(begin, min(begin + block, numel)) for begin in range(0, numel, block)] or [(0, 0)]


class StateWriter:
    """One unit's state file, written entry by entry, block by block."""

    def __init__(self, path: str):
        self.path = path
        self.tmp = temporary_name(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._file = open(self.tmp, "wb")
        self._entries: Dict[str, dict] = {}
        self.num_bytes = 0

    def begin(self, key: str, shape, dtype: torch.dtype, accumulators) -> dict:
        if key in self._entries:
            raise InputError(f"{self.path}: tensor {key} merged twice in one unit (duplicate name?)")
        entry = {"shape": list(shape), "dtype": str(dtype), "lo_dtype": str(lo_dtype_for(dtype)),
                 "planes": {name: [] for name in accumulators}}
        self._entries[key] = entry
        return entry

    def block(self, entry: dict, values: Dict[str, Pair]) -> None:
        """The next block of every accumulator of ``entry``."""
        lo_dtype = _DTYPES[entry["lo_dtype"]]
        for name, (hi, lo) in values.items():
            hi = hi.to(torch.float64)
            low = None if lo is None else lo.to(lo_dtype)
            if low is not None and not bool(low.ne(0).any()):
                low = None  # all zero: an exact block, nothing to store
            narrow = hi.to(torch.float32) if low is None else None
            if narrow is not None and torch.equal(narrow.to(torch.float64), hi):
                hi_offset, hi_bytes = self._write(narrow), 4  # float32 holds it exactly
            else:
                hi_offset, hi_bytes = self._write(hi), 8
            lo_offset = None if low is None else self._write(low)
            entry["planes"][name].append([hi_offset, lo_offset, hi_bytes])

    def _write(self, tensor: torch.Tensor) -> int:
        offset = self.num_bytes
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self.num_bytes += data.nbytes
        return offset

    def close(self) -> int:
        """Header and footer, fsync, rename into place; returns the file's size."""
        header = json.dumps({"format_version": FORMAT_VERSION, "block_elements": BLOCK_ELEMENTS,
                             "entries": self._entries}, separators=(",", ":")).encode()
        self._file.write(header)
        self._file.write(len(header).to_bytes(8, "little") + MAGIC)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        fsync_directory(os.path.dirname(self.path))
        return self.num_bytes + len(header) + _FOOTER

    def abort(self) -> None:
        try:
            self._file.close()
            os.remove(self.tmp)
        except OSError:
            pass


class StateEntry:
    def __init__(self, path: str, key: str, meta: dict, block_elements: int):
        self.path, self.key, self.meta, self.block_elements = path, key, meta, block_elements
        self.shape = tuple(meta["shape"])
        self.dtype = _DTYPES.get(meta["dtype"])
        self.lo_dtype = _DTYPES[meta["lo_dtype"]]
        self.accumulators = tuple(meta["planes"])


class StateReader:
    """Every entry of one state directory (all units, all ranks' files), read by byte range.
    Counts the bytes it reads (the manifest's bytes_read includes them)."""

    def __init__(self, directory: str):
        self.directory = directory
        self.entries: Dict[str, StateEntry] = {}
        self.num_bytes_read = 0
        self._fds: Dict[str, int] = {}
        self._lock = threading.Lock()
        for root, _, names in os.walk(directory):
            for name in sorted(names):
                if name.endswith(SUFFIX):
                    self._index(os.path.join(root, name))

    def _index(self, path: str) -> None:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if size < _FOOTER:
                raise InputError(f"{path}: not a pmm_dist state file (too short)")
            f.seek(size - _FOOTER)
            footer = f.read(_FOOTER)
            length = int.from_bytes(footer[:8], "little")
            if footer[8:] != MAGIC or length > size - _FOOTER:
                raise InputError(f"{path}: not a pmm_dist state file (bad footer)")
            f.seek(size - _FOOTER - length)
            header = json.loads(f.read(length))
        if header.get("format_version") != FORMAT_VERSION:
            raise InputError(f"{path}: state format version {header.get('format_version')}, expected {FORMAT_VERSION}")
        for key, meta in header["entries"].items():
            if key in self.entries:
                raise InputError(f"{path}: tensor {key} also in {self.entries[key].path}")
            self.entries[key] = StateEntry(path, key, meta, header["block_elements"])

    def read(self, entry: StateEntry, accumulator: str, block: int, numel: int) -> Tuple[Pair, int]:
        """One block of one accumulator, and the number of bytes that took."""
        hi_offset, lo_offset, hi_bytes = entry.meta["planes"][accumulator][block]
        stored = self._read(entry.path, hi_offset, numel, torch.float32 if hi_bytes == 4 else torch.float64)
        hi, num_bytes = stored.to(torch.float64), numel * hi_bytes
        if lo_offset is None:
            return (hi, None), num_bytes
        lo = self._read(entry.path, lo_offset, numel, entry.lo_dtype)
        return (hi, lo.to(torch.float64)), num_bytes + lo.numel() * lo.element_size()

    def _read(self, path: str, offset: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        num_bytes = numel * dtype.itemsize
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
        data = os.pread(fd, num_bytes, offset)
        if len(data) != num_bytes:
            raise InputError(f"{path}: expected {num_bytes} bytes at offset {offset}, found {len(data)} (truncated "
                             "state file?)")
        with self._lock:
            self.num_bytes_read += num_bytes
        return torch.frombuffer(bytearray(data), dtype=dtype) if num_bytes else torch.empty(0, dtype=dtype)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def state_bytes(directory: str) -> int:
    """The size of a state's files on disk."""
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(directory)
               for name in names if name.endswith(SUFFIX))


def read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
