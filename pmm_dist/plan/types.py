"""The plan's vocabulary: small frozen types that travel from the coordinator to every rank.

Everything a rank needs to do its share is named here (which checkpoints, which output files,
which stored items go into each file, and what happens to each), so that a plan can be
checked, printed, fingerprinted and balanced without reading any tensor data.
"""
import enum
import operator
import os
from dataclasses import dataclass, field, fields as dataclass_fields
from typing import Dict, Iterator, NamedTuple, Optional, Tuple, Union


class Choice(str, enum.Enum):
    """A closed set of option values that reads and serialises as its plain string."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, value, option: str):
        """``value`` as a member; ValueError naming ``option`` and listing the valid values."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{option} must be one of {', '.join(m.value for m in cls)}, got {value!r}") from None

    @classmethod
    def values(cls) -> Tuple[str, ...]:
        return tuple(m.value for m in cls)


class Action(Choice):
    """What becomes of one stored item (or one whole file) in the output."""
    MERGE = "merge"   # the weighted sum over every source
    COPY = "copy"     # the newest source's bytes, unchanged


class OptimizerPolicy(Choice):
    """What the output keeps of the training state (optimizer, scheduler, RNG).

    Where a format keeps fp32 master weights apart from the model's low-precision copies, the
    masters are the weights: they are merged under LATEST and MERGE like the model, and the model
    files hold the merged masters rounded to the model's dtype (under every policy, where every
    source has them).
    """
    DROP = "drop"       # weights only
    LATEST = "latest"   # the newest checkpoint's moments, steps, scheduler and RNG; the masters merged
    MERGE = "merge"     # the masters and every floating-point optimizer state merged; steps, scheduler
                        # and RNG the newest's

    @property
    def keeps_training_state(self) -> bool:
        return self != OptimizerPolicy.DROP


class NonfinitePolicy(Choice):
    """What a NaN/Inf in a merged tensor does."""
    ERROR = "error"
    WARN = "warn"
    IGNORE = "ignore"


class OutputKind(Choice):
    """Where the merged checkpoint sits in --out."""
    RUN_DIRECTORY = "run-directory"      # OUT/<checkpoint dir>/... plus a tracker file beside it
    CHECKPOINT_ROOT = "checkpoint-root"  # OUT itself is the checkpoint; its commit marker is one of its files


@dataclass(frozen=True)
class CheckpointRef:
    """One source checkpoint: its iteration (the merge order) and its directory."""
    iteration: int
    path: str


@dataclass(frozen=True)
class OutputLayout:
    """The shape of a format's output, declared instead of inferred from sentinels.

    ``RUN_DIRECTORY``: the staged checkpoint is renamed into ``OUT/checkpoint_dirname`` in one
    step, then the format writes ``commit_marker`` (a tracker) at the root. ``CHECKPOINT_ROOT``:
    the staged files move into OUT one by one with ``commit_marker`` (staged like the others)
    moved last, so the checkpoint becomes loadable only when it is complete.
    """
    kind: OutputKind
    commit_marker: str
    checkpoint_dirname: str = ""

    def __post_init__(self):
        assert (self.kind == OutputKind.RUN_DIRECTORY) == bool(self.checkpoint_dirname), self

    def checkpoint_path(self, out: str) -> str:
        return os.path.join(out, self.checkpoint_dirname) if self.checkpoint_dirname else out

    def file_path(self, relpath: str) -> str:
        """A checkpoint file's path relative to OUT (the manifest's ``files[].path``)."""
        return f"{self.checkpoint_dirname}/{relpath}" if self.checkpoint_dirname else relpath


class Piece(NamedTuple):
    """The part of one stored chunk of a source that lies inside an output chunk (a tuple, so
    that plans of many chunks stay small when pickled)."""
    stored: Tuple[int, ...]    # offsets of the source's stored chunk: its storage key, with the item's key
    offsets: Tuple[int, ...]   # global offsets of the overlap
    sizes: Tuple[int, ...]     # sizes of the overlap
    stored_sizes: Tuple[int, ...]  # sizes of the stored chunk (its box, with ``stored``)


class StoredChunk(NamedTuple):
    """Where one stored item's bytes lie in its checkpoint (as the checkpoint's index says), so
    that a rank reads it without that index. The plan holds it as the plain tuple (pickled
    without a Python call or an allocation per tuple, which a million of them would cost the
    coordinator); ``ChunkItem.location`` gives it back with its names."""
    relative_path: str         # the file, relative to the checkpoint directory
    offset: int
    length: int


Location = Tuple[str, int, int]  # a StoredChunk as the plan holds it


class ChunkedKey(NamedTuple):
    """What merging any chunk of one merged key takes besides its chunks: one object per key,
    shared by the key's items (so a rank's share carries it once per key)."""
    dtype: object              # the output key's torch dtype
    read_dtype: object         # the dtype of the key read from the sources (the masters' for weights from masters)
    selected_as: str           # the name --include / --exclude judge it by (an optimizer state's parameter)


@dataclass(frozen=True, init=False)
class ChunkItem:
    """One stored item of a chunked checkpoint (a tensor chunk or a bytes entry) in an output file.

    ``key`` and ``offsets`` name it as the newest checkpoint's metadata does (``offsets`` is None
    for a bytes entry); ``num_bytes`` is its size in the output, the balance weight.
    ``sources``: for a merged chunk whose sources are chunked differently (saved at another
    parallel layout), one entry per source, oldest first: None where that source stores this
    very chunk, else the pieces of its stored chunks that cover this one exactly once. Empty
    when every source stores this very chunk (the common case: nothing to carry).
    ``source_key``: for a merged chunk computed from another key of the sources (model weights
    from the fp32 master weights of the optimizer state, same global shape), that key; its
    chunks are what ``sources`` describes. None: the item's own key.
    What a rank reads, so that no rank but the coordinator reads the sources' indexes (a
    ``.metadata`` of a million chunks is seconds and a gigabyte of objects to parse):
    ``sizes`` the output chunk's (None for a bytes entry); ``copied`` where the newest stores
    the output key's item (what a copy takes); ``stored``, for a merged item, per source
    oldest first, where its stored chunk lies, or (where ``sources`` lists pieces) one
    location per piece; ``spec`` the key's dtypes and selection name.
    """
    key: str
    offsets: Optional[Tuple[int, ...]]
    action: Action
    num_bytes: int
    sources: Tuple[Optional[Tuple[Piece, ...]], ...] = ()
    source_key: Optional[str] = None
    sizes: Optional[Tuple[int, ...]] = None
    copied: Optional[Location] = None
    stored: Tuple[Tuple[Location, ...], ...] = ()
    spec: Optional[ChunkedKey] = None

    def __init__(self, key: str, offsets: Optional[Tuple[int, ...]], action: Action, num_bytes: int,
                 sources: Tuple[Optional[Tuple[Piece, ...]], ...] = (), source_key: Optional[str] = None,
                 sizes: Optional[Tuple[int, ...]] = None, copied: Optional[Location] = None,
                 stored: Tuple[Tuple[Location, ...], ...] = (), spec: Optional[ChunkedKey] = None):
        # The coordinator builds a million of these at a million chunks: the generated frozen
        # __init__ (one object.__setattr__ per field) takes three times as long as filling the
        # instance dict. The fields, their order and defaults are the ones declared above
        # (tests/test_planner.py holds the two to each other).
        fields = self.__dict__
        fields["key"], fields["offsets"], fields["action"], fields["num_bytes"] = key, offsets, action, num_bytes
        fields["sources"], fields["source_key"], fields["sizes"] = sources, source_key, sizes
        fields["copied"], fields["stored"], fields["spec"] = copied, stored, spec

    def __reduce__(self):
        # Pickled as the constructor's arguments rather than as an instance dict (ten field
        # names per item): a million items at a million chunks travel in the plan step, and
        # measured there (benchmarks/scale.py --dcp-chunks 1000000) the largest share a rank
        # receives went from 42.5 to 35.4 KB.
        return ChunkItem, _chunk_item_fields(self)

    @property
    def storage_key(self) -> Tuple[str, Optional[Tuple[int, ...]]]:
        """The newest checkpoint's stored item of the output key (what a copy takes)."""
        return (self.key, self.offsets)

    @property
    def read_key(self) -> str:
        """The key a merge reads from every source."""
        return self.source_key or self.key

    @property
    def read_storage_key(self) -> Tuple[str, Optional[Tuple[int, ...]]]:
        """The stored item a merge reads whole from a source that stores this very chunk."""
        return (self.read_key, self.offsets)

    def pieces(self, source: int) -> Optional[Tuple[Piece, ...]]:
        """Source ``source``'s pieces, or None when it stores this very chunk (read it whole)."""
        return self.sources[source] if self.sources else None

    def location(self, source: Optional[int] = None, piece: int = 0) -> StoredChunk:
        """Where source ``source`` stores what a merge reads (its ``piece``-th piece where it has
        pieces); ``source`` None: the newest's item of the output key, what a copy takes."""
        return StoredChunk(*(self.copied if source is None else self.stored[source][piece]))

    def reads(self, source: int, newest: bool) -> Iterator[Tuple[Tuple[str, Optional[Tuple[int, ...]]], StoredChunk]]:
        """(storage key, location) of every stored item a merge of this item may read from source
        ``source`` (``newest``: the newest source): the newest's own item of a copied one (also
        of a merged one computed from another key, which --exclude may turn into a copy), and a
        merged item's stored chunk, or the stored chunks of its pieces, from every source."""
        if newest and (self.action != Action.MERGE or self.source_key is not None):
            yield self.storage_key, self.location()
        if self.action != Action.MERGE:
            return
        found = self.pieces(source)
        if found is None:
            yield self.read_storage_key, self.location(source)
        else:
            yield from (((self.read_key, p.stored), self.location(source, k)) for k, p in enumerate(found))

    def describe(self) -> str:
        """For messages: ``key 'name'``, with the chunk's offsets for a tensor chunk."""
        return f"key '{self.key}'" + ("" if self.offsets is None else f" (chunk at {list(self.offsets)})")


_chunk_item_fields = operator.attrgetter(*(f.name for f in dataclass_fields(ChunkItem)))


@dataclass(frozen=True)
class WorkUnit:
    """One output file, produced by exactly one rank.

    ``relpath`` is relative to the output checkpoint directory (and, for file-per-shard formats,
    the same in every source); ``action`` MERGE combines every source, COPY takes the newest
    source's file byte for byte; ``num_bytes`` is the output size, the balance weight. ``items``
    lists the stored items of a chunked format's output file, in write order.
    """
    relpath: str
    num_bytes: int
    action: Action = Action.MERGE
    items: Tuple[Union[ChunkItem, str], ...] = ()    # ChunkItems; an HF shard's tensor names
    optimizer: OptimizerPolicy = OptimizerPolicy.DROP   # the merge's --optimizer, for formats whose
                                                        # checks depend on it (what a file must hold)

    def __reduce__(self):
        # ChunkItems as tuples of their fields, taken in one C-speed pass: pickling each by its
        # own __reduce__ is a Python call per item, a million of them in the plan step at a
        # million chunks. The receiving rank rebuilds its own few hundred. (Other items, the
        # tensor names of an HF shard, pickle as they are.)
        if self.items and set(map(type, self.items)) == {ChunkItem}:
            return _work_unit, (self.relpath, self.num_bytes, self.action,
                                tuple(map(_chunk_item_fields, self.items)), self.optimizer)
        return WorkUnit, (self.relpath, self.num_bytes, self.action, self.items, self.optimizer)


def _work_unit(relpath: str, num_bytes: int, action: Action, item_fields: Tuple[tuple, ...],
               optimizer: OptimizerPolicy) -> WorkUnit:
    return WorkUnit(relpath, num_bytes, action, tuple(ChunkItem(*fields) for fields in item_fields), optimizer)


@dataclass(frozen=True)
class UnitResult:
    """What producing one output file did: gathered by the coordinator for the commit and manifest."""
    relpath: str                      # the written file, relative to the output checkpoint dir
    num_bytes_written: int
    num_bytes_read: int
    sha256: str
    num_tensors_merged: int
    details: Dict[str, object] = field(default_factory=dict)  # small, format-specific (for finalize)
    # Keys of ``details`` the engine reads (a format that writes model weights sets them):
    # MODEL_WEIGHTS_FROM, one of the WEIGHTS_FROM_* values, MODEL_WEIGHTS_NOTE, why not masters,
    # and MODEL_WEIGHTS_BY_OLDER, True where an older source decided it (see formats.masters).


MODEL_WEIGHTS_FROM = "model_weights_from"
MODEL_WEIGHTS_NOTE = "model_weights_note"
MODEL_WEIGHTS_BY_OLDER = "model_weights_by_older"
WEIGHTS_FROM_MASTERS = "fp32 masters"    # the merged fp32 master weights, rounded to the model's dtype
WEIGHTS_FROM_MODEL = "model copies"      # the merged tensors of the model files themselves
