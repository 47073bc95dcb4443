"""Megatron-LM legacy shard geometry: which global layer and expert a shard's local key is.

A legacy checkpoint's keys are local: ``decoder.layers.{i}`` counts from 0 in every model
chunk (``model``, or ``model0``, ``model1``... with virtual pipeline stages), and
``mlp.experts.local_experts.{j}`` (grouped GEMM: ``mlp.experts.linear_fc1.weight{j}``) counts
an EP rank's own experts. Both follow from the saved ``args``:

- global layer = the chunk's layer offset + local index. Megatron assigns layers to model
  chunks in chunk-major order: virtual stage 0 of pipeline ranks 0..PP-1, then virtual stage 1,
  ... each chunk taking its count of layers next. The counts (megatron/core/transformer/
  transformer_block.py ``get_num_layers_to_build``): num_layers / PP per stage, or with
  ``decoder_first/last_pipeline_num_layers`` those on the first/last stage and the rest evenly
  on the others; each stage's divided evenly over its VP chunks; with
  ``account_for_embedding/loss_in_pipeline_split`` one more layer in the split, taken off the
  first (last) chunk. The offsets of ``get_transformer_layer_offset`` (transformer_layer.py)
  are these counts' running sums; tests/test_megatron_layouts.py checks both against the
  installed megatron-core.
- global expert = EP rank x (num_experts / EP) + local index.

A custom ``pipeline_model_parallel_layout`` is not modelled: such checkpoints merge only with
checkpoints of their own layout.
"""
import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

from ..errors import InputError

_LAYER_KEY = re.compile(r"^(?P<prefix>decoder\.layers\.)(?P<layer>\d+)(?P<rest>\..*)$")
_LOCAL_EXPERT = re.compile(r"^(?P<prefix>\.mlp\.experts\.local_experts\.)(?P<expert>\d+)(?P<rest>\..*)$")
_GROUPED_EXPERT = re.compile(r"^(?P<prefix>\.mlp\.experts\.linear_fc[12]\.(?:weight|bias))(?P<expert>\d+)(?P<rest>)$")
# Legacy GroupedMLP: all of a rank's experts in one tensor, which an EP change would have to split.
_STACKED_EXPERTS = re.compile(r"^\.mlp\.experts\.weight[12]$")


@dataclass(frozen=True)
class ShardLayout:
    """A legacy checkpoint's parallel layout and where its layers and experts are."""
    tp: int
    pp: int
    ep: int
    vp: int
    chunks: Tuple[Tuple[int, int], ...]  # (first global layer, layer count) per (chunk, pp rank), chunk-major
    num_local_experts: Optional[int]

    def chunk_range(self, pp_rank: int, chunk: int) -> Tuple[int, int]:
        return self.chunks[chunk * self.pp + pp_rank]

    def locate_layer(self, layer: int) -> Optional[Tuple[int, int, int]]:
        """(pp rank, chunk, local index) of global layer ``layer``; None if there is none."""
        for index, (first, count) in enumerate(self.chunks):
            if first <= layer < first + count:
                return index % self.pp, index // self.pp, layer - first
        return None

    def model_key(self, chunk: int) -> str:
        return f"model{chunk}" if self.vp > 1 else "model"

    def rank_of(self, shard_dir: str) -> Tuple[int, int, int]:
        """(tp, pp, ep) rank of a shard directory ``mp_rank_TT[_PPP][_EEE]`` of this layout."""
        parts = [int(p) for p in shard_dir[len("mp_rank_"):].split("_")]
        tp = parts.pop(0)
        pp = parts.pop(0) if self.pp > 1 else 0
        ep = parts.pop(0) if self.ep > 1 else 0
        return tp, pp, ep

    # -- key renaming ----------------------------------------------------------------------------
    def global_key(self, key: str, pp_rank: int, chunk: int, ep_rank: int) -> str:
        """A local key of the shard (pp_rank, ep_rank), chunk ``chunk``, under its global name."""
        match = _LAYER_KEY.match(key)
        if not match:
            return key  # not a decoder layer: the same name everywhere
        layer = self.chunk_range(pp_rank, chunk)[0] + int(match["layer"])
        return f"{match['prefix']}{layer}{self._expert(match['rest'], lambda j: ep_rank * self.num_local_experts + j)}"

    def local_key(self, global_key: str, prefer_ep: int) -> Optional[Tuple[int, int, int, str]]:
        """(pp rank, chunk, ep rank, local key) that hold ``global_key`` in this layout: None
        for a key outside the decoder layers (found by name, see MegatronLegacyFormat); a layer
        this layout does not have gives pp rank -1. Experts are on their EP rank; everything
        else of a layer is replicated over EP and taken from ``prefer_ep`` (or EP rank 0)."""
        match = _LAYER_KEY.match(global_key)
        if not match:
            return None
        where = self.locate_layer(int(match["layer"]))
        if where is None:
            return -1, 0, 0, global_key
        pp_rank, chunk, local = where
        ep_rank = prefer_ep if prefer_ep < self.ep else 0
        expert = self._expert_of(match["rest"])
        if expert is not None and self.num_local_experts:
            ep_rank = expert // self.num_local_experts
            if ep_rank >= self.ep:  # an expert this layout does not have
                return -1, 0, 0, global_key
        rest = self._expert(match["rest"], lambda j: j - ep_rank * self.num_local_experts)
        return pp_rank, chunk, ep_rank, f"{match['prefix']}{local}{rest}"

    def _expert(self, rest: str, renumber) -> str:
        for pattern in (_LOCAL_EXPERT, _GROUPED_EXPERT):
            match = pattern.match(rest)
            if match and self.num_local_experts:
                return f"{match['prefix']}{renumber(int(match['expert']))}{match['rest']}"
        return rest

    def _expert_of(self, rest: str) -> Optional[int]:
        for pattern in (_LOCAL_EXPERT, _GROUPED_EXPERT):
            match = pattern.match(rest)
            if match:
                return int(match["expert"])
        return None

    @staticmethod
    def stacks_experts(key: str) -> bool:
        """A legacy GroupedMLP tensor holding all of a rank's experts."""
        match = _LAYER_KEY.match(key)
        return bool(match and _STACKED_EXPERTS.match(match["rest"]))


def _arg(args, *names):
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            return value
    return None


def shard_layout(args, where: str) -> ShardLayout:
    """The layout a checkpoint's saved ``args`` describe; InputError (naming ``where``, the
    file the args came from) for a configuration whose layer placement is not modelled."""
    tp, pp, ep = (int(_arg(args, name) or 1) for name in
                  ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"))
    vp = int(_arg(args, "virtual_pipeline_model_parallel_size") or 1)
    if _arg(args, "pipeline_model_parallel_layout"):
        raise InputError(f"{where}: args.pipeline_model_parallel_layout is set; layer placement by a custom "
                         "layout is not modelled, so this checkpoint merges only with checkpoints of its own layout")
    num_layers = _arg(args, "num_layers")
    if not isinstance(num_layers, int):
        raise InputError(f"{where}: args.num_layers missing; cannot place the layers")
    counts = _chunk_layer_counts(num_layers, pp, vp, _arg(args, "decoder_first_pipeline_num_layers",
                                                          "num_layers_in_first_pipeline_stage"),
                                 _arg(args, "decoder_last_pipeline_num_layers", "num_layers_in_last_pipeline_stage"),
                                 bool(_arg(args, "account_for_embedding_in_pipeline_split")),
                                 bool(_arg(args, "account_for_loss_in_pipeline_split")), where)
    chunks, first = [], 0
    for count in counts:
        chunks.append((first, count))
        first += count
    num_experts = _arg(args, "num_experts")
    if num_experts and int(num_experts) % ep:
        raise InputError(f"{where}: args.num_experts {num_experts} does not divide by EP {ep}")
    return ShardLayout(tp, pp, ep, vp, tuple(chunks), int(num_experts) // ep if num_experts else None)


def _chunk_layer_counts(num_layers: int, pp: int, vp: int, first: Optional[int], last: Optional[int],
                        embedding: bool, loss: bool, where: str) -> List[int]:
    """Layers per model chunk, chunk-major ((chunk 0, pp 0), (chunk 0, pp 1), ...)."""
    def refuse(why):
        raise InputError(f"{where}: {why}; cannot place the layers")

    if pp > 1 and (first is not None or last is not None):
        if embedding or loss:
            refuse("uneven first/last pipeline stages together with account_for_embedding/loss_in_pipeline_split")
        middle_stages = pp - (first is not None) - (last is not None)
        middle_layers = num_layers - (first or 0) - (last or 0)
        if middle_stages and middle_layers % middle_stages or (not middle_stages and middle_layers):
            refuse(f"{middle_layers} layers do not divide over {middle_stages} middle pipeline stages")
        middle = middle_layers // middle_stages if middle_stages else 0
        per_stage = [middle] * pp
        if first is not None:
            per_stage[0] = first
        if last is not None:
            per_stage[-1] = last
    else:
        total = num_layers + embedding + loss  # the embedding (loss) counts as a layer of the split
        if total % pp:
            refuse(f"{total} layers do not divide by PP {pp}")
        per_stage = [total // pp] * pp
    if any(n % vp for n in per_stage):
        refuse(f"layers per pipeline stage {per_stage} do not divide by VP {vp}")
    counts = [per_stage[p] // vp for _ in range(vp) for p in range(pp)]
    if embedding:
        counts[0] -= 1
    if loss:
        counts[-1] -= 1
    if min(counts) < 0:
        refuse("a model chunk would have fewer than no layers")
    return counts
