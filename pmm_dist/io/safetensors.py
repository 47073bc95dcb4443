"""safetensors files by their headers: parsing, a streaming writer, and memory-mapping checks.

    [8 bytes: header length N, little-endian] [N bytes: JSON header] [data buffer]
    header = {"__metadata__": {str: str}, NAME: {"dtype": "BF16", "shape": [..],
              "data_offsets": [begin, end]}, ...}   offsets relative to the data buffer

Planning reads only headers (names, dtypes, shapes, byte ranges), never tensor data. The writer
streams a file tensor by tensor: its header is known before any tensor is computed, so at most
one merged tensor is ever in memory. It lays tensors out exactly as ``safetensors.torch.save``
does (dtype order, then name; compact JSON; header padded with spaces to 8 bytes), so a file
with one metadata entry is byte-identical to the library's own (tested).
"""
import json
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ..errors import InputError

# Bytes per element, in safetensors' own dtype order, largest first: ``safetensors.torch.save``
# sorts tensors by this order, then by name, which keeps every tensor naturally aligned.
DTYPE_ITEMSIZE = {
    "U64": 8, "I64": 8, "F64": 8, "F32": 4, "U32": 4, "I32": 4, "BF16": 2, "F16": 2, "U16": 2, "I16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}
_DTYPE_ORDER = {name: rank for rank, name in enumerate(DTYPE_ITEMSIZE)}
FLOAT_DTYPES = ("F64", "F32", "BF16", "F16")      # averaged
QUANTIZED_DTYPES = ("F8_E4M3", "F8_E5M2")         # refused: values are meaningless without their scales
_MAX_HEADER_BYTES = 100 << 20                     # the library's own limit
_ALIGNMENT = 8


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: Tuple[int, ...]
    begin: int          # data offsets, relative to the data buffer
    end: int

    @property
    def num_bytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    path: str
    metadata: Optional[Dict[str, str]]
    tensors: Dict[str, TensorInfo]   # in storage (offset) order
    data_start: int                  # file offset of the data buffer


def read_header(path: str) -> Header:
    """Parse and validate the header of ``path``; raises InputError naming the file."""
    def bad(reason: str) -> InputError:
        return InputError(f"{path}: not a valid safetensors file: {reason}")

    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise bad(f"{file_size} bytes, shorter than the 8-byte header length")
            header_len = int.from_bytes(prefix, "little")
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > file_size:
                raise bad(f"header length {header_len} does not fit the file size {file_size} (corrupt header?)")
            raw = f.read(header_len)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"header is not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise bad("header is not a JSON object")
    metadata = obj.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and
                                     all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise bad("__metadata__ must map strings to strings")
    tensors: Dict[str, TensorInfo] = {}
    for name, entry in obj.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise bad(f"tensor {name!r}: expected dtype, shape and data_offsets [begin, end]") from None
        if dtype not in DTYPE_ITEMSIZE:
            raise bad(f"tensor {name!r}: dtype {dtype!r} is not supported (supported: {', '.join(DTYPE_ITEMSIZE)})")
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not all(
                isinstance(o, int) for o in (begin, end)) or not 0 <= begin <= end:
            raise bad(f"tensor {name!r}: bad shape {list(shape)} or data_offsets {[begin, end]}")
        if end - begin != _numel(shape) * DTYPE_ITEMSIZE[dtype]:
            raise bad(f"tensor {name!r}: data_offsets {[begin, end]} hold {end - begin} bytes, but "
                      f"{dtype} {list(shape)} needs {_numel(shape) * DTYPE_ITEMSIZE[dtype]}")
        tensors[name] = TensorInfo(dtype, shape, begin, end)
    ordered = sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end))
    position = 0
    for name, info in ordered:  # the data buffer is covered exactly, without holes or overlaps
        if info.begin != position:
            raise bad(f"tensor {name!r}: data_offsets start at {info.begin}, expected {position}")
        position = info.end
    if 8 + header_len + position != file_size:
        raise bad(f"the header describes {position} data bytes, the file holds {file_size - 8 - header_len} "
                  "(truncated or trailing bytes)")
    return Header(path, metadata, dict(ordered), 8 + header_len)


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def layout_order(entries: Iterable[Tuple[str, str]]) -> List[str]:
    """Names of (name, dtype) entries in the order ``safetensors.torch.save`` stores them."""
    return [name for name, dtype in sorted(entries, key=lambda e: (_DTYPE_ORDER[e[1]], e[0]))]


def encode_header(entries: Sequence[Tuple[str, str, Tuple[int, ...]]],
                  metadata: Optional[Dict[str, str]]) -> Tuple[bytes, List[Tuple[str, int]]]:
    """The header bytes (length prefix included) for (name, dtype, shape) entries, and the
    names with their byte counts in the order their data must follow."""
    by_name = {name: (dtype, tuple(shape)) for name, dtype, shape in entries}
    assert len(by_name) == len(entries), "duplicate tensor names"
    header: Dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    order: List[Tuple[str, int]] = []
    position = 0
    for name in layout_order((name, dtype) for name, (dtype, _) in by_name.items()):
        dtype, shape = by_name[name]
        num_bytes = _numel(shape) * DTYPE_ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + num_bytes]}
        order.append((name, num_bytes))
        position += num_bytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % _ALIGNMENT)
    return len(text).to_bytes(8, "little") + text, order


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor (little-endian hosts), without a copy."""
    assert tensor.device.type == "cpu" and tensor.is_contiguous()
    if tensor.numel() == 0:
        return memoryview(b"")
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


class MappedFiles:
    """Which tensors returned by ``safe_open(...).get_tensor`` are views of a file mapping.

    safetensors >= 0.6 maps the file privately and returns views into it; the kernel may then
    drop each block's pages once read (keeping memory flat in N). Older versions (or other
    platforms) return copies, on which dropping pages would zero the data, so every source file
    is checked once against /proc/self/maps before its tensors are treated as mapped.
    """

    def __init__(self):
        self._verdicts: Dict[str, bool] = {}

    def is_mapped(self, path: str, tensor: torch.Tensor) -> bool:
        if tensor.numel() == 0 or tensor.device.type != "cpu":
            return tensor.numel() == 0
        if path not in self._verdicts:
            self._verdicts[path] = _inside_file_mapping(tensor, path)
        return self._verdicts[path]


def _inside_file_mapping(tensor: torch.Tensor, path: str) -> bool:
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    try:
        stat = os.stat(path)
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) < 6:
                    continue
                low, high = (int(x, 16) for x in fields[0].split("-"))
                if low <= start and end <= high:
                    # A private ("p") read mapping of this very file (same inode): pages come from the file.
                    return fields[1][3] == "p" and int(fields[4]) == stat.st_ino and \
                        os.path.realpath(fields[5].strip()) == os.path.realpath(path)
    except (OSError, ValueError, IndexError):
        pass
    return False

