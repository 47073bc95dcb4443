"""Memory for merged tensors, reused once nothing refers to it.

Why: a merged tensor is stored into memory allocated for it, and an allocation this large comes
from fresh pages (glibc gives anything over its mmap threshold, 128 KiB rising to 32 MiB at most,
a mapping of its own and unmaps it on free), which the OS faults in and zeroes page by page as
the kernel first stores to them.
Measured here: filling 32 fresh 32 MiB bf16 tensors took 0.32-0.41 s, filling one already
touched 32 times 0.02 s. The results of a file come in a few sizes (a model's layers repeat), so
the memory of one that has been written and dropped serves the next of its size. A DeepSpeed
ZeRO-2 merge of 4 x 2 GB fp32 masters into a 0.94 GiB model file, alternating runs: merge phase
median 2.66 -> 2.48 s, peak RSS 523 -> 499 MiB.

When memory is free: when torch's use count of its storage is 1, the pool's own reference. A
tensor, a view, a numpy array or a pending write of the result each hold the storage (so it
stays taken), and torch would free the memory at exactly that point: reusing it then is as safe
as the allocator reusing freed memory. Without that count (a torch that lacks it) nothing is reused.

Memory: the pool holds at most ``LIMIT_BYTES`` (taken or free); a result that does not fit is
allocated as before and freed when dropped, and free buffers of other sizes make room first.
"""
import threading
from typing import Dict, List

import torch

# Smaller results come from malloc's heap, whose pages stay mapped between allocations.
MIN_BYTES = 1 << 20
# Enough for the few sizes of a file's results, each a few times over (one merged, one written,
# one waiting: io/write_behind); well inside the 0.5 GiB a rank may hold beside its output file.
LIMIT_BYTES = 256 << 20

_use_count = getattr(torch._C, "_storage_Use_Count", None)


class ResultMemory:
    """``empty(numel, dtype)``: a 1-D CPU tensor like ``torch.empty``, in reused memory where
    a free buffer of exactly its size is held. Thread-safe."""

    def __init__(self, limit_bytes: int = LIMIT_BYTES, min_bytes: int = MIN_BYTES):
        self.limit_bytes, self.min_bytes = limit_bytes, min_bytes
        self._lock = threading.Lock()
        self._by_size: Dict[int, List[torch.UntypedStorage]] = {}
        self._held = 0

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        num_bytes = numel * dtype.itemsize
        if _use_count is None or num_bytes < self.min_bytes or num_bytes > self.limit_bytes:
            return torch.empty(numel, dtype=dtype)
        with self._lock:
            storage = next((s for s in self._by_size.get(num_bytes, ()) if _is_free(s)), None)
            if storage is None:
                storage = torch.empty(num_bytes, dtype=torch.uint8).untyped_storage()
                self._make_room(num_bytes)
                if self._held + num_bytes <= self.limit_bytes:
                    self._by_size.setdefault(num_bytes, []).append(storage)
                    self._held += num_bytes
            return torch.empty(0, dtype=dtype).set_(storage, 0, (numel,))

    def held_bytes(self) -> int:
        return self._held

    def _make_room(self, num_bytes: int) -> None:
        for size in list(self._by_size):
            if self._held + num_bytes <= self.limit_bytes:
                return
            kept = [s for s in self._by_size[size] if not _is_free(s)]
            self._held -= size * (len(self._by_size[size]) - len(kept))
            if kept:
                self._by_size[size] = kept
            else:
                del self._by_size[size]


def _is_free(storage: torch.UntypedStorage) -> bool:
    return _use_count(storage._cdata) == 1


# One per process: results of every file and thread draw on it.
RESULTS = ResultMemory()
