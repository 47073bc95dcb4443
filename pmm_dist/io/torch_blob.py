"""Where a tensor's bytes lie inside a ``torch.save`` blob, without reading them.

A ``torch.save`` blob is an uncompressed zip: a small pickle (``<name>/data.pkl``) that rebuilds
the tensor from a storage record (``<name>/data/<key>``) holding the raw elements. A DCP
``.distcp`` item is such a blob; to read only part of a large stored chunk, we locate the raw
record and the tensor's layout (dtype, shape, strides, storage offset) from the zip directory
and the pickle alone, then read just the byte ranges needed.

The pickle is interpreted by a restricted unpickler that knows only the names a plain tensor
pickles to (``torch._utils._rebuild_tensor_v2``, the typed storage classes, ``OrderedDict``) and
builds nothing: anything else is ``UnsupportedBlob``, and the caller reads the blob whole with
``torch.load(weights_only=True)`` instead.
"""
import collections
import io
import pickle
import struct
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch

ReadAt = Callable[[int, int], bytes]   # (offset within the blob, length) -> bytes

_EOCD = b"PK\x05\x06"
_EOCD64 = b"PK\x06\x06"
_CENTRAL = b"PK\x01\x02"
_LOCAL = b"PK\x03\x04"
_TAIL_BYTES = 1024        # the directory of a one-tensor blob (seven records, ~650 bytes); more is read if needed
_MAX_PICKLE_BYTES = 1 << 20

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class UnsupportedBlob(Exception):
    """Not a blob whose tensor this module can locate (read it whole instead)."""


@dataclass(frozen=True)
class TensorLocation:
    """A tensor inside a blob: its elements start ``data_offset`` bytes into the blob (the
    element at ``storage_offset`` of the storage record), laid out by ``shape`` and ``stride``."""
    dtype: torch.dtype
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    data_offset: int
    record_bytes: int           # the elements available from data_offset to the record's end, in bytes

    def is_row_major(self) -> bool:
        step = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride)):
            if size > 1 and stride != step:
                return False
            step *= size
        return True


def locate_tensor(read_at: ReadAt, length: int) -> TensorLocation:
    """The tensor saved in the blob of ``length`` bytes that ``read_at`` reads from."""
    records = _directory(read_at, length)
    pickles = [name for name in records if name.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise UnsupportedBlob(f"{len(pickles)} pickles in the blob")
    prefix = pickles[0][: -len("data.pkl")]
    pickled = _record_bytes(read_at, records[pickles[0]], _MAX_PICKLE_BYTES)
    rebuilt = _TensorPickle(io.BytesIO(pickled)).load()
    if not isinstance(rebuilt, _Rebuilt):
        raise UnsupportedBlob(f"the blob holds {type(rebuilt).__name__}, not a tensor")
    record = records.get(f"{prefix}data/{rebuilt.storage_key}")
    if record is None:
        raise UnsupportedBlob(f"no storage record {rebuilt.storage_key!r}")
    local_offset, size, method = record
    if method != 0:
        raise UnsupportedBlob("compressed storage record")
    start = _data_start(read_at, local_offset)
    itemsize = rebuilt.dtype.itemsize
    skipped = rebuilt.storage_offset * itemsize
    if start + size > length or skipped > size:
        raise UnsupportedBlob("the storage record lies outside the blob")
    return TensorLocation(rebuilt.dtype, rebuilt.shape, rebuilt.stride, start + skipped, size - skipped)


def _directory(read_at: ReadAt, length: int) -> Dict[str, Tuple[int, int, int]]:
    """Record name -> (local header offset, size, compression method), from the central directory."""
    tail_start = max(0, length - _TAIL_BYTES)
    tail = read_at(tail_start, length - tail_start)
    at = tail.rfind(_EOCD)
    if at < 0 or at + 22 > len(tail):
        raise UnsupportedBlob("no zip directory")
    entries, directory_size, directory_offset = struct.unpack_from("<HII", tail, at + 10)
    if 0xFFFFFFFF in (directory_size, directory_offset) or entries == 0xFFFF:
        at64 = tail.rfind(_EOCD64, 0, at)
        if at64 < 0:
            raise UnsupportedBlob("zip64 directory not found")
        entries, directory_size, directory_offset = struct.unpack_from("<QQQ", tail, at64 + 32)
    if directory_offset + directory_size > length:
        raise UnsupportedBlob("zip directory outside the blob")
    if directory_offset >= tail_start:
        data = tail[directory_offset - tail_start: directory_offset - tail_start + directory_size]
    else:
        data = read_at(directory_offset, directory_size)
    records, pos = {}, 0
    for _ in range(entries):
        if data[pos:pos + 4] != _CENTRAL:
            raise UnsupportedBlob("corrupt zip directory")
        method, = struct.unpack_from("<H", data, pos + 10)
        _, size, name_len, extra_len, comment_len = struct.unpack_from("<IIHHH", data, pos + 20)
        local, = struct.unpack_from("<I", data, pos + 42)
        name = data[pos + 46: pos + 46 + name_len].decode("utf-8", "replace")
        extra = data[pos + 46 + name_len: pos + 46 + name_len + extra_len]
        size, local = _zip64_values(extra, size, local)
        records[name] = (local, size, method)
        pos += 46 + name_len + extra_len + comment_len
    return records


def _zip64_values(extra: bytes, size: int, local: int) -> Tuple[int, int]:
    """Sizes and offsets too large for 32 bits are in the zip64 extra field, in a fixed order."""
    if 0xFFFFFFFF not in (size, local):
        return size, local
    pos = 0
    while pos + 4 <= len(extra):
        tag, field_len = struct.unpack_from("<HH", extra, pos)
        if tag == 0x0001:
            values = list(struct.unpack_from(f"<{field_len // 8}Q", extra, pos + 4))
            # order: uncompressed size, compressed size, local header offset (each only if saturated)
            if size == 0xFFFFFFFF:
                size = values.pop(0)
                values.pop(0)  # compressed size == uncompressed size (stored)
            if local == 0xFFFFFFFF:
                local = values.pop(0)
            return size, local
        pos += 4 + field_len
    raise UnsupportedBlob("zip64 extra field missing")


def _data_start(read_at: ReadAt, local_offset: int) -> int:
    header = read_at(local_offset, 30)
    if header[:4] != _LOCAL:
        raise UnsupportedBlob("corrupt zip record header")
    name_len, extra_len = struct.unpack_from("<HH", header, 26)
    return local_offset + 30 + name_len + extra_len


def _record_bytes(read_at: ReadAt, record: Tuple[int, int, int], limit: int) -> bytes:
    local_offset, size, method = record
    if method != 0 or size > limit:
        raise UnsupportedBlob("compressed or oversized pickle")
    return read_at(_data_start(read_at, local_offset), size)


@dataclass(frozen=True)
class _Rebuilt:
    storage_key: str
    dtype: torch.dtype
    storage_offset: int
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]


@dataclass(frozen=True)
class _StorageClass:
    dtype: torch.dtype


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *rest):
    if not isinstance(storage, tuple) or not all(isinstance(x, int) for x in (storage_offset, *size, *stride)):
        raise UnsupportedBlob("unexpected tensor arguments")
    key, dtype = storage
    return _Rebuilt(key, dtype, storage_offset, tuple(size), tuple(stride))


class _TensorPickle(pickle.Unpickler):
    """Reads the pickle of one plain tensor into its layout; refuses every other global."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageClass(_STORAGE_DTYPES[name])
        raise UnsupportedBlob(f"pickle references {module}.{name}")

    def persistent_load(self, pid):
        # ('storage', storage class, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageClass)):
            raise UnsupportedBlob("unexpected storage reference")
        return (str(pid[2]), pid[1].dtype)
