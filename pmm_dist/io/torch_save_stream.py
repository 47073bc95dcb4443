"""Writing a ``torch.save`` file whose tensors are computed after its pickle is written.

``torch.save(obj, f)`` needs every tensor of ``obj`` in memory before it writes a byte. A merged
shard file is a small pickle (the newest source's structure) and many tensors merged one after
another; here the pickle goes first, from a *skeleton* of the object in which each tensor still
to be computed is a ``Placeholder`` (its shape, dtype and ``requires_grad``), and each tensor's
bytes are written when it is handed over (``put``), after which it can be freed: memory is the
tensors in flight, not the file.

The container is torch's own (``torch._C.PyTorchFileWriter``, which ``torch.save`` uses: zip64,
64-byte aligned records for ``torch.load(mmap=True)``, CRC-32, the version records), with the
records ``torch.save`` writes (torch 2.13's ``serialization._save``): ``data.pkl`` (pickle
protocol 2), ``.format_version``, ``.storage_alignment``, ``byteorder``, then ``data/<key>`` for
every storage, in key order. A placeholder pickles exactly as torch pickles a contiguous CPU
tensor (``_rebuild_tensor_v2`` over a persistent id ``('storage', <torch.XStorage>, key, 'cpu',
numel)``), and keys are numbered in pickling order as torch numbers them (tensors of the
skeleton that share a storage share its key), so the file is byte for byte the one
``torch.save`` writes for the finished object (tested), whatever order tensors come in.

Why key order although readers find records through the central directory: ``.format_version``
1 promises it, and ``torch.load`` under ``torch.utils.serialization.config.load
.calculate_storage_offsets`` (and for the offsets it records with ``map_location='meta'``)
computes each storage's offset from the previous one's instead of reading the directory: a
file with its records out of order loads wrong values there, silently. A tensor handed over
before those with lower keys therefore waits in memory for its turn (``put`` accepts any order).

With ``write_behind``, records are written in a background thread (io/write_behind) while the
caller computes the next tensor: writing one costs a CRC-32 (in torch's writer) and the
caller's SHA-256 of its bytes, ~1.5 s per GiB here, both letting other threads run, besides the
copy into the page cache: about what merging it costs. One tensor is written while another
waits; ``put`` blocks beyond that, so memory stays a few tensors.

A failure midway (a ``put`` that does not fit, a placeholder never handed over, a failing
write) leaves a file without its zip directory, which no reader opens; the caller removes it
(``io.atomic.write_atomically``).
"""
import collections
import copy
import functools
import io
import math
import pickle
import sys
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Union

import torch

from ..plan.regions import contiguous_strides
from .write_behind import WriteBehind

# What a placeholder's ``compute`` returns: its tensor, or the tensors of several placeholders
# computed together (a merged master and the model weight it rounds to).
Computed = Union[torch.Tensor, Mapping["Placeholder", torch.Tensor]]


class Placeholder:
    """A tensor of the skeleton still to be computed: what it will be, and optionally how
    (``compute``: see ``TorchSaveStream.fill``). Pickled only by a ``TorchSaveStream``; one
    object at several places of the skeleton is one tensor in the file (as with torch.save)."""

    __slots__ = ("shape", "dtype", "requires_grad", "compute", "_storage")

    def __init__(self, shape, dtype: torch.dtype, requires_grad: bool = False,
                 compute: Optional[Callable[[], Computed]] = None):
        self.shape = tuple(int(size) for size in shape)
        self.dtype = dtype
        self.requires_grad = bool(requires_grad)
        self.compute = compute
        self._storage = _PendingStorage(self)

    @classmethod
    def like(cls, tensor: torch.Tensor, compute: Optional[Callable[[], Computed]] = None) -> "Placeholder":
        return cls(tensor.shape, tensor.dtype, tensor.requires_grad, compute)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def describe(self) -> str:
        return f"shape {self.shape}, {self.dtype}" + (", requires_grad" if self.requires_grad else "")

    def __repr__(self) -> str:
        return f"Placeholder({self.describe()})"

    def __reduce_ex__(self, protocol):
        # The arguments torch gives a contiguous CPU tensor without hooks or metadata
        # (Tensor._reduce_ex_internal): storage, offset, size, stride, requires_grad, hooks; and
        # for the dtypes without a typed storage class (float8, uint16, ...) the dtype, rebuilt
        # by _rebuild_tensor_v3 from an untyped storage.
        args = (self._storage, 0, self.shape, contiguous_strides(self.shape), self.requires_grad,
                collections.OrderedDict())
        if _untyped(self.dtype):
            return (torch._utils._rebuild_tensor_v3, args + (self.dtype,))
        return (torch._utils._rebuild_tensor_v2, args)


class _PendingStorage:
    """The storage a placeholder's pickle refers to; the stream's pickler gives it its key."""

    __slots__ = ("placeholder",)

    def __init__(self, placeholder: Placeholder):
        self.placeholder = placeholder

    def __reduce__(self):
        raise TypeError("a Placeholder is pickled by TorchSaveStream only (torch.save would write no tensor)")


def _untyped(dtype: torch.dtype) -> bool:
    """A dtype torch pickles with an untyped storage (no torch.XStorage class of its own)."""
    return dtype in torch.storage._new_dtypes()


@functools.lru_cache(maxsize=None)
def _storage_class(dtype: torch.dtype):
    """torch.FloatStorage for float32, ...: the class torch names in a tensor's persistent id."""
    if _untyped(dtype):
        return torch.UntypedStorage
    return getattr(torch, torch.empty(0, dtype=dtype)._typed_storage()._pickle_storage_type())


class _Target:
    """The file object PyTorchFileWriter writes to. A write that fails is remembered and
    raised by the stream after the record (an exception raised into torch's writer is lost,
    or aborts the process where it is raised from the writer's destructor); once abandoned,
    writes are dropped, so finishing the writer (which it must be before the file closes) adds
    no zip directory."""

    def __init__(self, fileobj):
        self._fileobj = fileobj
        self.error: Optional[BaseException] = None
        self.abandoned = False

    def write(self, data) -> int:
        if not self.abandoned and self.error is None:
            try:
                self._fileobj.write(data)
            except BaseException as exc:  # noqa: B902 - re-raised by the stream
                self.error = exc
        return len(data)

    def flush(self) -> None:
        if not self.abandoned and self.error is None:
            self._fileobj.flush()


class TorchSaveStream:
    """``with TorchSaveStream(f, skeleton) as stream: stream.put(placeholder, tensor) ...``

    Writes the pickle of ``skeleton`` and the storages of its in-memory tensors on entry;
    each placeholder's bytes when it is handed over; the zip directory on leaving the block,
    after checking that every placeholder of the pickle was handed over (else ValueError,
    and the file has no directory). An exception leaving the block abandons the file."""

    def __init__(self, fileobj, skeleton, *, write_behind: bool = False):
        from torch.utils.serialization import config
        self._target = _Target(fileobj)
        self._writer = torch._C.PyTorchFileWriter(self._target, config.save.compute_crc32,
                                                  config.save.storage_alignment)
        self._behind = WriteBehind() if write_behind else None
        self._finished = False
        # key order: in-memory storages and placeholders as the pickle first refers to them
        self._records: List[Union[torch.UntypedStorage, Placeholder]] = []
        self._keys: Dict[Placeholder, int] = {}
        self._waiting: Dict[int, torch.UntypedStorage] = {}  # handed over before their turn
        self._received: set = set()
        self._next = 0                                       # the first key not written yet
        try:
            self._write_pickle(skeleton, config.save.storage_alignment)
            self._write_ready()
        except BaseException:
            self._abandon()
            raise

    # -- the pickle --------------------------------------------------------------------------
    def _write_pickle(self, skeleton, storage_alignment: int) -> None:
        keys: Dict[tuple, str] = {}
        dtypes: Dict[int, torch.dtype] = {}
        records, placeholders = self._records, self._keys

        def key_of(identity: tuple, record) -> str:
            if identity not in keys:
                keys[identity] = str(len(records))
                records.append(record)
                if isinstance(record, Placeholder):
                    placeholders[record] = len(records) - 1
            return keys[identity]

        def persistent_id(obj):
            if isinstance(obj, _PendingStorage):
                placeholder = obj.placeholder
                key = key_of(("placeholder", id(placeholder)), placeholder)
                # an untyped storage counts bytes, a typed one elements
                numel = placeholder.numel * (placeholder.dtype.itemsize if _untyped(placeholder.dtype) else 1)
                return ("storage", _storage_class(placeholder.dtype), key, "cpu", numel)
            if isinstance(obj, torch.storage.TypedStorage):
                storage, dtype, numel = obj._untyped_storage, obj.dtype, obj._size()
                storage_class = getattr(torch, obj._pickle_storage_type())
            elif torch.is_storage(obj):
                storage, dtype, numel = obj, torch.uint8, obj.nbytes()
                storage_class = torch.UntypedStorage
            else:
                return None
            # torch.load cannot give one storage two dtypes; torch.save refuses it too
            if storage.device.type != "meta" and storage.data_ptr() != 0:
                if dtypes.setdefault(storage.data_ptr(), dtype) != dtype:
                    raise ValueError("two tensors of the skeleton view the same data as different dtypes")
            key = key_of(("storage", storage._cdata), storage)
            return ("storage", storage_class, key, torch.serialization.location_tag(storage), numel)

        class Pickler(pickle.Pickler):
            def persistent_id(self, obj):
                return persistent_id(obj)

        buffer = io.BytesIO()
        Pickler(buffer, protocol=torch.serialization.DEFAULT_PROTOCOL).dump(skeleton)
        self._record("data.pkl", buffer.getvalue())
        self._record(".format_version", b"1")
        self._record(".storage_alignment", str(storage_alignment).encode())
        self._record("byteorder", sys.byteorder.encode())

    # -- the storages ------------------------------------------------------------------------
    @property
    def placeholders(self) -> List[Placeholder]:
        """The skeleton's placeholders, in the order their bytes go into the file."""
        return list(self._keys)

    def __contains__(self, placeholder) -> bool:
        return placeholder in self._keys

    def received(self, placeholder: Placeholder) -> bool:
        return placeholder in self._received

    def put(self, placeholder: Placeholder, tensor: torch.Tensor) -> None:
        """Hand over ``placeholder``'s tensor (of its shape, dtype and requires_grad); its bytes
        are written now if every tensor before it in the file is, else when they are."""
        if placeholder not in self._keys:
            raise ValueError(f"{placeholder!r} is not in this file's pickle")
        if placeholder in self._received:
            raise ValueError(f"{placeholder!r} was handed over twice")
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != placeholder.shape or \
                tensor.dtype != placeholder.dtype or tensor.requires_grad != placeholder.requires_grad:
            got = Placeholder.like(tensor).describe() if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"the tensor handed over for {placeholder!r} has {got}: the pickle already says "
                             f"{placeholder.describe()}")
        self._received.add(placeholder)
        self._waiting[self._keys[placeholder]] = _exact_storage(tensor)
        self._write_ready()

    def fill(self) -> None:
        """Compute every placeholder not handed over yet, in file order, by its ``compute()``
        (a tensor, or several placeholders' tensors: those not in this file are dropped), and
        hand each over: one placeholder's computation in memory at a time, beside what waits."""
        for placeholder in self.placeholders:
            if placeholder in self._received:
                continue
            values = _computed(placeholder)
            for other, tensor in values.items():
                if other in self._keys:
                    self.put(other, tensor)
            del values

    def _write_ready(self) -> None:
        """Write the records whose turn has come: in-memory storages, and tensors handed over
        (behind the caller, in order, where the stream writes behind)."""
        while self._next < len(self._records):
            record = self._records[self._next]
            if isinstance(record, Placeholder):
                storage = self._waiting.pop(self._next, None)
                if storage is None:
                    return
            else:
                storage = record if record.device.type == "cpu" else record.cpu()
            write = functools.partial(self._record, f"data/{self._next}", storage, storage.nbytes())
            del storage
            if self._behind is None:
                write()
            else:
                self._behind.submit(write)
            self._next += 1

    def _drain(self, failed: bool) -> None:
        """Wait for the writes behind (raising theirs); where ``failed``, cancel the waiting ones."""
        behind, self._behind = self._behind, None
        if behind is not None:
            behind.__exit__(*((RuntimeError, None, None) if failed else (None, None, None)))

    def _record(self, name: str, data, num_bytes: Optional[int] = None) -> None:
        self._writer.write_record(name, data, len(data) if num_bytes is None else num_bytes)
        if self._target.error is not None:
            raise self._target.error

    # -- the end -----------------------------------------------------------------------------
    def __enter__(self) -> "TorchSaveStream":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abandon()
        else:
            self.close()

    def missing(self) -> Iterator[Placeholder]:
        return (placeholder for placeholder in self._keys if placeholder not in self._received)

    def close(self) -> None:
        """Write the zip directory; ValueError (and no directory) if a placeholder is missing."""
        if self._finished:
            return
        missing = list(self.missing())
        if missing:
            self._abandon()
            raise ValueError(f"{len(missing)} placeholder(s) never handed over, the first {missing[0]!r} "
                             f"(record data/{self._keys[missing[0]]}); the file is incomplete")
        try:
            self._drain(failed=False)
        except BaseException:
            self._abandon()
            raise
        self._finished = True
        try:
            self._writer.write_end_of_file()
        except BaseException:
            self._target.abandoned = True
            raise
        if self._target.error is not None:
            raise self._target.error
        self._target.flush()

    def _abandon(self) -> None:
        """No directory: nothing can load the file. The writer is finished all the same (into
        nothing), since it would otherwise write its end from its destructor, maybe after the
        file object is closed (which aborts the process)."""
        if self._finished:
            return
        self._finished = True
        self._target.abandoned = True
        self._waiting.clear()
        try:
            self._drain(failed=True)
        finally:
            self._writer.write_end_of_file()


def _exact_storage(tensor: torch.Tensor) -> torch.UntypedStorage:
    """The bytes of ``tensor`` (CPU, row-major) as a storage of exactly its size: its own where
    it is the whole of it, a view of the part it covers, or a contiguous copy."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if not tensor.is_contiguous() or tensor.is_conj() or tensor.is_neg():
        tensor = tensor.resolve_conj().resolve_neg().contiguous()
    storage = tensor.untyped_storage()
    begin = tensor.storage_offset() * tensor.element_size()
    num_bytes = tensor.numel() * tensor.element_size()
    if begin == 0 and storage.nbytes() == num_bytes:
        return storage
    return storage[begin:begin + num_bytes]


def streaming_supported() -> bool:
    """Whether this torch has the writer internals the stream matches (the save config's
    storage alignment, which PyTorchFileWriter then takes, and the list of dtypes without a
    typed storage): recent torch has them, the oldest pmm_dist installs beside (2.6) may not."""
    from torch.utils.serialization import config
    return hasattr(config.save, "storage_alignment") and hasattr(torch.storage, "_new_dtypes")


def _computed(placeholder: Placeholder) -> Dict[Placeholder, torch.Tensor]:
    """What ``placeholder.compute()`` gives, as placeholder -> tensor (one, or several computed together)."""
    if placeholder.compute is None:
        raise ValueError(f"{placeholder!r} has no compute() and was not handed over")
    computed = placeholder.compute()
    return {placeholder: computed} if isinstance(computed, torch.Tensor) else dict(computed)


def save_streamed(fileobj, skeleton, *, write_behind: bool = True) -> None:
    """``torch.save`` of ``skeleton`` with each placeholder computed (``compute``) as the file
    reaches it, written behind the next one's computation: the same file as torch.save of the
    finished object. On a torch without the internals the stream needs, the finished object
    is built whole and saved by torch.save (the file in memory, as before streaming)."""
    if not streaming_supported():
        torch.save(finished(skeleton), fileobj)
        return
    with TorchSaveStream(fileobj, skeleton, write_behind=write_behind) as stream:
        stream.fill()


def finished(skeleton):
    """``skeleton`` with each placeholder replaced by its computed tensor (placeholders computed
    together counted once), through dicts, lists and tuples: where placeholders are put. One
    left elsewhere still refuses to pickle (``_PendingStorage``): never a file without it."""
    done: Dict[Placeholder, torch.Tensor] = {}

    def tensor_of(placeholder: Placeholder) -> torch.Tensor:
        if placeholder not in done:
            done.update(_computed(placeholder))
        return done[placeholder]

    def walk(value):
        if isinstance(value, Placeholder):
            return tensor_of(value)
        if isinstance(value, dict):
            rebuilt = copy.copy(value)  # the same mapping type (OrderedDict, ...), order kept
            for key, item in value.items():
                rebuilt[key] = walk(item)
            return rebuilt
        if type(value) in (list, tuple):
            return type(value)(walk(item) for item in value)
        return value
    return walk(skeleton)
