"""Reading stored DCP chunks: whole blobs, or only the part of a chunk that one output chunk needs.

A source saved at another parallel layout stores a tensor in other chunks than the output; an
output chunk then takes a box from each overlapping stored chunk (``Piece``). When the box is
the whole stored chunk, its blob is read and loaded as always. Otherwise only the box's bytes
are read: the tensor's raw record is located inside the blob from its zip directory and pickle
(``io.torch_blob``), and the rows of the box (``plan.regions.read_span``) are read with pread,
as one slab or run by run. A stored chunk that spans several output chunks is so read by each
for its part only. Blobs this cannot locate (another serialisation) are read whole and sliced.

A chunk every source stores whole (the same layout: the common case) is not read at all:
``MappedChunks`` maps the ``.distcp`` files and views each source's raw elements in place, so
the N sources are summed block by block in one pass (``weighted_sum``), the pages read ahead
and dropped as they are added, with no pread, no copy and no unpickling.
"""
import collections
import io
import math
import mmap
import os
from typing import Dict, Optional, Tuple

import torch

from ..errors import InputError
from ..io.torch_blob import TensorLocation, UnsupportedBlob, locate_tensor
from ..plan.regions import contiguous_strides, read_span
from ..plan.types import Piece


class SourceFiles:
    """Open files of the sources, read by byte range (pread: no shared seek position); counts
    the bytes read."""

    def __init__(self):
        self._fds: Dict[str, int] = {}
        self.num_bytes_read = 0

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise InputError(f"{path}: file not found") from None
        return fd

    def pread(self, path: str, length: int, offset: int) -> bytes:
        data = os.pread(self._fd(path), length, offset)
        self.num_bytes_read += len(data)
        if len(data) != length:
            raise InputError(f"{path}: expected {length} bytes at offset {offset}, found {len(data)} "
                             "(truncated file?)")
        return data

    def read_into(self, path: str, buffer: memoryview, offset: int) -> None:
        num = os.preadv(self._fd(path), [buffer], offset)
        self.num_bytes_read += num
        if num != len(buffer):
            raise InputError(f"{path}: expected {len(buffer)} bytes at offset {offset}, found {num} "
                             "(truncated file?)")

    def read(self, ckpt_dir: str, info) -> bytes:
        """A stored item whole (``info``: its _StorageInfo)."""
        return self.pread(os.path.join(ckpt_dir, info.relative_path), info.length, info.offset)

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class MappedChunks:
    """Whole stored chunks as tensors viewing their files' pages (private, never-written
    mappings, as ``torch.load(mmap=True)`` makes: ``kernel.advise_pages`` may drop them)."""

    def __init__(self):
        self._maps: Dict[str, Optional[mmap.mmap]] = {}
        self.num_bytes_read = 0

    def _map(self, path: str) -> Optional[mmap.mmap]:
        if path not in self._maps:
            try:
                with open(path, "rb") as f:
                    self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except FileNotFoundError:
                raise InputError(f"{path}: file not found") from None
            except (OSError, ValueError):  # an empty file, or one that cannot be mapped: read it instead
                self._maps[path] = None
        return self._maps[path]

    def view(self, ckpt_dir: str, info, dtype: torch.dtype, sizes) -> Optional[torch.Tensor]:
        """The chunk stored at ``info`` (a _StorageInfo) as a tensor of ``sizes`` viewing the
        mapping, or None where it cannot be viewed (another serialisation, a short file, a
        layout other than the metadata's): the caller reads it as before, which names the problem."""
        path = os.path.join(ckpt_dir, info.relative_path)
        mapped = self._map(path)
        numel = math.prod(sizes)
        if mapped is None or numel == 0 or info.offset + info.length > len(mapped):
            return None
        base = info.offset

        def read_at(offset: int, length: int) -> bytes:
            if offset < 0 or offset + length > info.length:
                raise UnsupportedBlob("a read outside the blob")
            return mapped[base + offset: base + offset + length]
        try:
            location = locate_tensor(read_at, info.length)
        except Exception:  # noqa: BLE001 - not a blob we can look into
            return None
        if location.dtype != dtype or location.shape != tuple(sizes) or not location.is_row_major() \
                or location.record_bytes < numel * dtype.itemsize:
            return None
        self.num_bytes_read += info.length
        return torch.frombuffer(mapped, dtype=dtype, count=numel, offset=base + location.data_offset).view(sizes)

    def close(self) -> None:
        # The views may outlive the unit (a result holds none, but be safe): unmapping with views
        # alive raises BufferError, so the mappings are released by their last reference instead.
        self._maps.clear()


def read_object(ckpt_dir: str, info, fqn: str):
    """A small stored bytes entry (a ShardedObject, a DCP non-tensor value) as the object it
    holds, loaded with torch's weights-only unpickler: containers, numbers, strings, dtypes."""
    path = os.path.join(ckpt_dir, info.relative_path)
    files = SourceFiles()
    try:
        blob = files.read(ckpt_dir, info)
    finally:
        files.close()
    try:
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable object is an input problem
        raise InputError(f"{path}: key '{fqn}': stored object is not readable by torch's weights-only loader "
                         f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''})"
                         ) from None


def load_chunk(blob: bytes, path: str, fqn: str, offsets, dtype: torch.dtype, sizes) -> torch.Tensor:
    """A stored chunk's blob as a tensor, checked against what the metadata says it holds."""
    try:
        tensor = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable blob is an input problem
        raise InputError(f"{path}: key '{fqn}': stored chunk is not a readable torch.save tensor "
                         f"({type(exc).__name__}: {str(exc)[:160]})") from None
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(sizes) or tensor.dtype != dtype:
        found = f"{tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise InputError(f"{path}: key '{fqn}' chunk at {list(offsets)}: stored {found}, the metadata says "
                         f"{tuple(sizes)} {dtype}")
    return tensor


def piece_region(piece: Piece, chunk_offsets) -> Tuple[slice, ...]:
    """The piece's index box inside the output chunk at ``chunk_offsets``."""
    return tuple(slice(o - base, o - base + s) for o, s, base in zip(piece.offsets, piece.sizes, chunk_offsets))


def piece_is_whole(piece: Piece, stored_sizes) -> bool:
    return tuple(piece.offsets) == tuple(piece.stored) and tuple(piece.sizes) == tuple(stored_sizes)


# Stored chunks up to this size are read whole (and kept for the unit's other pieces of them):
# their blob is mostly zip and pickle headers, which locating the tensor would read anyway.
SMALL_BLOB_BYTES = 2048
_SMALL_CHUNKS_KEPT = 64


class PieceReader:
    """Reads pieces of stored chunks for one unit; remembers where each chunk's tensor lies in
    its blob (and small chunks whole), so a chunk split over several output chunks of this
    rank is located, or read, once."""

    def __init__(self, files: SourceFiles):
        self.files = files
        self._locations: Dict[Tuple[str, str, tuple], Optional[TensorLocation]] = {}
        self._small: "collections.OrderedDict[tuple, torch.Tensor]" = collections.OrderedDict()

    def read(self, ckpt_dir: str, info, fqn: str, dtype: torch.dtype, stored_sizes, piece: Piece) -> torch.Tensor:
        """The piece's elements, shaped as the piece (a view of a freshly read buffer)."""
        path = os.path.join(ckpt_dir, info.relative_path)
        if piece_is_whole(piece, stored_sizes):
            return load_chunk(self.files.read(ckpt_dir, info), path, fqn, piece.stored, dtype, stored_sizes)
        relative = [o - base for o, base in zip(piece.offsets, piece.stored)]
        box = tuple(slice(r, r + s) for r, s in zip(relative, piece.sizes))
        if info.length <= SMALL_BLOB_BYTES:
            return self._small_chunk(ckpt_dir, path, info, fqn, piece.stored, dtype, stored_sizes)[box]
        location = self._location(path, info, fqn, piece.stored)
        if location is None:  # a blob we cannot look into: whole, then the box
            return load_chunk(self.files.read(ckpt_dir, info), path, fqn, piece.stored, dtype, stored_sizes)[box]
        if location.dtype != dtype or location.shape != tuple(stored_sizes) or not location.is_row_major() \
                or location.record_bytes < math.prod(stored_sizes) * dtype.itemsize:
            raise InputError(f"{path}: key '{fqn}' chunk at {list(piece.stored)}: stored {location.shape} "
                             f"{location.dtype}{'' if location.is_row_major() else ' (not row-major)'}, the metadata "
                             f"says {tuple(stored_sizes)} {dtype}")
        span = read_span(stored_sizes, relative, piece.sizes)
        itemsize = dtype.itemsize
        start = info.offset + location.data_offset
        if span.reads_runs(itemsize):
            buffer = bytearray(span.numel * itemsize)
            view, run_bytes = memoryview(buffer), span.run * itemsize
            for k, first in enumerate(span.starts()):
                self.files.read_into(path, view[k * run_bytes:(k + 1) * run_bytes], start + first * itemsize)
            return torch.frombuffer(buffer, dtype=dtype).view(piece.sizes)
        buffer = bytearray(span.slab_numel * itemsize)
        self.files.read_into(path, memoryview(buffer), start + span.first * itemsize)
        # The slab starts at the box's first element: the box is a strided view of it.
        return torch.frombuffer(buffer, dtype=dtype).as_strided(piece.sizes, contiguous_strides(stored_sizes))

    def _small_chunk(self, ckpt_dir, path, info, fqn, stored, dtype, stored_sizes) -> torch.Tensor:
        key = (path, fqn, tuple(stored))
        chunk = self._small.pop(key, None)
        if chunk is None:
            chunk = load_chunk(self.files.read(ckpt_dir, info), path, fqn, stored, dtype, stored_sizes)
        self._small[key] = chunk
        if len(self._small) > _SMALL_CHUNKS_KEPT:
            self._small.popitem(last=False)
        return chunk

    def _location(self, path: str, info, fqn: str, stored) -> Optional[TensorLocation]:
        key = (path, fqn, tuple(stored))
        if key not in self._locations:
            def read_at(offset: int, length: int) -> bytes:
                if offset < 0 or offset + length > info.length:
                    raise UnsupportedBlob("a read outside the blob")
                return self.files.pread(path, length, info.offset + offset)
            try:
                self._locations[key] = locate_tensor(read_at, info.length)
            except InputError:  # the file itself is short: a real problem
                raise
            except Exception:  # noqa: BLE001 - not a blob we can look into: read it whole instead
                self._locations[key] = None
        return self._locations[key]

