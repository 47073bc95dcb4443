"""Tiny Hugging Face checkpoints in ``save_pretrained`` layout, written with safetensors directly.

A Llama-shaped state dict (bf16 matrices, fp32 norms, optionally int64/bool buffers) whose
values drift from one checkpoint to the next, so the weighted sums are not trivial and some
elements cross zero. Saved either as one ``model.safetensors`` or as shards named like
transformers' own (``model-00001-of-00003.safetensors``) with ``model.safetensors.index.json``.
"""
import json
import os
from typing import Dict, List, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

CONFIG_FILES = {
    "generation_config.json": {"bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.57.0"},
    "tokenizer_config.json": {"model_max_length": 128, "tokenizer_class": "PreTrainedTokenizerFast"},
    "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>"},
}


def llama_config(num_layers: int = 2, hidden: int = 64, ffn: int = 128, vocab: int = 128) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": ffn, "num_hidden_layers": num_layers, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": vocab, "max_position_embeddings": 128,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def llama_state(step: int, config: dict, *, extras: bool = False) -> Dict[str, torch.Tensor]:
    """The weights at ``step``: a fixed base plus a step-dependent drift (bf16 matrices, fp32 norms)."""
    hidden, ffn, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = hidden * config["num_key_value_heads"] // config["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                       p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                       p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
                       p + "mlp.down_proj.weight": (hidden, ffn)})
    state = {}
    for index, (name, shape) in enumerate(shapes.items()):
        base = torch.randn(shape, generator=torch.Generator().manual_seed(index), dtype=torch.float64)
        drift = torch.randn(shape, generator=torch.Generator().manual_seed(10_000 * step + index), dtype=torch.float64)
        value = base + 0.3 * drift
        state[name] = value.to(torch.float32 if len(shape) == 1 else torch.bfloat16)
    if extras:  # buffers some models save: never averaged, the newest checkpoint's values are kept
        state["model.rotary_emb.position_ids"] = torch.arange(16, dtype=torch.int64) + step
        mask = torch.rand(4, 4, generator=torch.Generator().manual_seed(step)) > 0.5
        state["model.layers.0.self_attn.causal_mask"] = mask
    return state


def save_checkpoint(ckpt_dir: str, state: Dict[str, torch.Tensor], config: dict, *,
                    num_shards: int = 1, metadata: Optional[dict] = None, training_state: bool = False) -> None:
    """``save_pretrained``-compatible layout: config files, weights in one file or ``num_shards``."""
    os.makedirs(ckpt_dir, exist_ok=True)
    metadata = {"format": "pt"} if metadata is None else metadata
    names = list(state)
    if num_shards == 1:
        save_file(state, os.path.join(ckpt_dir, "model.safetensors"), metadata=metadata)
    else:
        weight_map = {}
        for k in range(num_shards):
            shard = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
            part = {n: state[n] for n in names[k::num_shards]}
            save_file(part, os.path.join(ckpt_dir, shard), metadata=metadata)
            weight_map.update({n: shard for n in part})
        total = sum(t.numel() * t.element_size() for t in state.values())
        write_json(os.path.join(ckpt_dir, "model.safetensors.index.json"),
                   {"metadata": {"total_size": total, "total_parameters": sum(t.numel() for t in state.values())},
                    "weight_map": dict(sorted(weight_map.items()))})
    write_json(os.path.join(ckpt_dir, "config.json"), config)
    for name, content in CONFIG_FILES.items():
        write_json(os.path.join(ckpt_dir, name), dict(content, step=os.path.basename(ckpt_dir)))
    with open(os.path.join(ckpt_dir, "tokenizer.json"), "w") as f:
        f.write('{"version": "1.0", "model": {"type": "BPE"}}\n')
    if training_state:  # as the HF Trainer leaves it next to the weights
        torch.save({"state": {}, "param_groups": []}, os.path.join(ckpt_dir, "optimizer.pt"))
        torch.save({"last_epoch": 3}, os.path.join(ckpt_dir, "scheduler.pt"))
        write_json(os.path.join(ckpt_dir, "trainer_state.json"), {"global_step": 1})
        torch.save({}, os.path.join(ckpt_dir, "pytorch_model.bin"))  # stale other-format weights


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def load_model_dir(model_dir: str) -> Dict[str, torch.Tensor]:
    """Every tensor of a model directory, through its index if it has one (else model.safetensors)."""
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        return load_file(single)
    index = json.load(open(os.path.join(model_dir, "model.safetensors.index.json")))
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(os.path.join(model_dir, shard)))
    assert set(state) == set(index["weight_map"]), "index and shards disagree"
    return state


def make_run(run_dir: str, steps: Sequence[int], *, name: str = "step_{}", num_shards: Sequence[int] = (),
             extras: bool = False, config: Optional[dict] = None, training_state: bool = False) -> List[str]:
    """One checkpoint directory per step; ``num_shards[i]`` shards for the i-th (default 1)."""
    config = config or llama_config()
    dirs = []
    for i, step in enumerate(steps):
        ckpt = os.path.join(run_dir, name.format(step))
        save_checkpoint(ckpt, llama_state(step, config, extras=extras), config,
                        num_shards=num_shards[i] if i < len(num_shards) else 1,
                        training_state=training_state and i == len(steps) - 1)
        dirs.append(ckpt)
    return dirs
