"""DeepSpeed ZeRO-3 partition geometry: where every element of every parameter lives at a
given partition count, so that checkpoints saved at different data-parallel sizes line up.

The rules, from the installed DeepSpeed (0.19.8):

- ``runtime/zero/partition_parameters.py`` (``_partition_param``, ``_padding_size``): each
  parameter, flattened, is split into ``world_size`` partitions of ``ceil(numel / world_size)``
  elements; rank ``r`` holds elements ``[r*s, (r+1)*s)``, and partitions reaching past ``numel``
  are padded (with whatever the ``torch.empty`` buffer held, NaN at times: padding carries no
  weight, and a merge writes zeros there).
- ``runtime/zero/stage3.py`` (``_create_fp16_partitions_with_defragmentation``,
  ``_create_fp16_sub_groups``): a rank's flat buffers concatenate its partitions of the
  parameters in ``param_shapes`` order; sub-groups cut that stream at parameter boundaries
  (where depends on ``sub_group_size`` and the partition sizes, so on the world size too). The
  saved ``fp32_flat_groups`` are those sub-groups' fp32 copies, in order.
- ``utils/zero_to_fp32.py`` reads it back the same way: parameter ``p``'s partition starts at
  ``sum_{q<p} ceil(numel_q / world_size)`` in every rank's stream, and the streams' total must
  equal that sum over all parameters (no other padding).

So a rank's stream at one world size maps onto the streams at another by arithmetic alone;
``gather_pieces`` lists, for one output rank, which contiguous runs of which source rank's
stream fill which places of its own. Sub-group boundaries are not part of the mapping: both
sides are addressed as streams, and ``copy_pieces`` cuts the runs wherever either side's groups
end.
"""
from dataclasses import dataclass
from typing import Callable, Iterator, List, Sequence, Tuple

import torch


def partition_size(numel: int, world_size: int) -> int:
    """Elements per rank of one parameter of ``numel`` elements (the last ranks' padded)."""
    return -(-numel // world_size)


def stream_numel(numels: Sequence[int], world_size: int) -> int:
    """Elements of one rank's stream (its fp32 flat groups together) at ``world_size``."""
    return sum(partition_size(n, world_size) for n in numels)


@dataclass(frozen=True)
class Piece:
    """``length`` elements of source rank ``source_rank``'s stream from ``source_start`` go to
    the output rank's stream at ``start``."""
    source_rank: int
    source_start: int
    start: int
    length: int


def gather_pieces(numels: Sequence[int], world_size: int, rank: int, source_world_size: int) -> List[Piece]:
    """The runs that make up rank ``rank``'s stream at ``world_size`` from the streams of a
    checkpoint saved at ``source_world_size``: every real element of every parameter exactly
    once, in order; padding places are in no piece."""
    assert 0 <= rank < world_size and source_world_size >= 1
    pieces: List[Piece] = []
    start = source_offset = 0
    for numel in numels:
        size, source_size = partition_size(numel, world_size), partition_size(numel, source_world_size)
        begin, end = rank * size, min((rank + 1) * size, numel)  # this rank's elements of the parameter
        element = begin
        while element < end:
            source_rank = element // source_size
            stop = min(end, (source_rank + 1) * source_size)
            _append(pieces, Piece(source_rank, source_offset + element - source_rank * source_size,
                                  start + element - begin, stop - element))
            element = stop
        start += size
        source_offset += source_size
    return pieces


def _append(pieces: List[Piece], piece: Piece) -> None:
    """Adjacent runs of one source rank that stay adjacent in the output become one run (at
    equal world sizes a whole stream is one run)."""
    last = pieces[-1] if pieces else None
    if last and last.source_rank == piece.source_rank and last.source_start + last.length == piece.source_start \
            and last.start + last.length == piece.start:
        pieces[-1] = Piece(last.source_rank, last.source_start, last.start, last.length + piece.length)
    else:
        pieces.append(piece)


def group_offsets(groups: Sequence[torch.Tensor]) -> List[int]:
    """Where each flat group starts in its rank's stream, and the stream's end."""
    offsets = [0]
    for group in groups:
        offsets.append(offsets[-1] + group.numel())
    return offsets


def _spans(offsets: Sequence[int], start: int, length: int) -> Iterator[Tuple[int, int, int]]:
    """(group, offset in group, length) runs covering ``[start, start + length)`` of a stream."""
    group = 0
    while length > 0:
        while offsets[group + 1] <= start:
            group += 1
        take = min(length, offsets[group + 1] - start)
        yield group, start - offsets[group], take
        start += take
        length -= take


def value_runs(numels: Sequence[int], world_size: int, rank: int, group_sizes: Sequence[int]) -> \
        List[List[Tuple[int, int]]]:
    """Per flat group of rank ``rank``'s stream (``group_sizes``: its groups' lengths), the runs
    ``(begin, end)`` that hold parameters' elements; the rest is padding. DeepSpeed allocates a
    partition with ``torch.empty`` and copies only the parameter's elements into it, so the
    padding holds whatever the allocator's memory held, NaN included; it is trained on as
    zero (its gradients are zero-padded) and nothing ever reads it."""
    offsets = [0]
    for size in group_sizes:
        offsets.append(offsets[-1] + size)
    runs: List[List[Tuple[int, int]]] = [[] for _ in group_sizes]
    for piece in gather_pieces(numels, world_size, rank, world_size):
        for group, start, length in _spans(offsets, piece.start, piece.length):
            runs[group].append((start, start + length))
    return runs


def copy_pieces(pieces: Sequence[Piece], source_groups: Callable[[int], Sequence[torch.Tensor]],
                output: Sequence[torch.Tensor]) -> int:
    """Fill the output rank's flat groups ``output`` from the sources' (``source_groups(rank)``:
    that source rank's flat groups); returns the number of elements copied."""
    out_offsets = group_offsets(output)
    copied = 0
    for piece in pieces:
        groups = source_groups(piece.source_rank)
        src_offsets = group_offsets(groups)
        src_runs = _spans(src_offsets, piece.source_start, piece.length)
        out_runs = _spans(out_offsets, piece.start, piece.length)
        src, out = next(src_runs, None), next(out_runs, None)
        while src and out:  # walk both sides' group boundaries at once
            take = min(src[2], out[2])
            output[out[0]].view(-1)[out[1]:out[1] + take].copy_(groups[src[0]].view(-1)[src[1]:src[1] + take])
            copied += take
            src = (src[0], src[1] + take, src[2] - take) if src[2] > take else next(src_runs, None)
            out = (out[0], out[1] + take, out[2] - take) if out[2] > take else next(out_runs, None)
    return copied
