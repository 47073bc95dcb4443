"""Generate a synthetic Megatron-LM legacy training run, for demos, tests and benchmarks.

The files have what real Megatron-LM checkpoints (--ckpt-format torch) have: TP/PP/EP shard
directories named as Megatron names them, virtual-pipeline chunks (model0, model1, ...) with
stage-local layer and EP-local expert numbers (the same model generated at another PP/EP/VP
layout holds the same weights under other local names),
SwiGLU fc1 holding [gate; up] per TP rank, MoE local experts, an fp32 router next to bf16
weights, Transformer Engine ``_extra_state`` entries, the argparse ``args``, optimizer and
scheduler state and an RNG state holding numpy arrays. Weights drift slowly between
checkpoints as in a real run, so the checkpoints of one run are close to one another.

With ``fp32_masters`` the optimizer state is shaped as megatron-core saves it and consistent
with the model, as in a mixed-precision run: the fp32 masters are the unrounded weights and the
model's bf16/fp16 tensors their rounding; Float16Optimizer's ``fp32_from_fp16_params`` per param
group (weights with weight decay, then biases and norms), without names, and moments per
parameter index; or, with ``distrib_optim``, distrib_optim.pt's coalesced buffers (one per model
chunk and dtype, parameters in reverse order at 64-element alignment; a chained pair of states,
dense then expert, where the model has experts) with masters and moments.

    python -m pmm_dist.synthetic RUN --tp 2 --pp 2 --ep 2 --iterations 100,200,300,400
"""
import argparse
import io
import os
import random
import re
import zlib
from typing import Dict, List, Sequence

import numpy as np
import torch

from ..formats.megatron import MODEL_FILE, TRACKER, shard_dirname


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def _tensor(shape, dtype, *parts, scale=0.02) -> torch.Tensor:
    gen = torch.Generator().manual_seed(_seed(*parts))
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * scale).to(dtype)


def layer_tensors(cfg, tp_rank: int, ep_rank: int) -> Dict[str, tuple]:
    """name -> (shape, dtype) of one transformer layer's parameters on one TP/EP rank."""
    h, tp, ffn, dtype = cfg.hidden_size, cfg.tp, cfg.ffn_hidden_size, cfg.dtype
    spec = {
        "self_attention.linear_qkv.layer_norm_weight": ((h,), dtype),
        "self_attention.linear_qkv.weight": ((3 * h // tp, h), dtype),  # column-parallel: dim 0
        "self_attention.linear_qkv.bias": ((3 * h // tp,), dtype),
        "self_attention.linear_proj.weight": ((h, h // tp), dtype),  # row-parallel: dim 1
        "self_attention.linear_proj.bias": ((h,), dtype),
        "pre_mlp_layernorm.weight": ((h,), dtype),
    }
    if cfg.num_experts:
        spec["mlp.router.weight"] = ((cfg.num_experts, h), torch.float32)  # replicated, kept in fp32
        for j in range(cfg.num_experts // cfg.ep):
            spec[f"mlp.experts.local_experts.{j}.linear_fc1.weight"] = ((2 * ffn // tp, h), dtype)  # [gate; up]
            spec[f"mlp.experts.local_experts.{j}.linear_fc2.weight"] = ((h, ffn // tp), dtype)
    else:
        spec["mlp.linear_fc1.weight"] = ((2 * ffn // tp, h), dtype)
        spec["mlp.linear_fc2.weight"] = ((h, ffn // tp), dtype)
    return spec


def model_chunk(cfg, iteration: int, tp_rank: int, pp_rank: int, ep_rank: int, chunk: int,
                masters: Dict[str, torch.Tensor] = None) -> Dict[str, object]:
    """The state dict of one virtual-pipeline chunk of one shard at one iteration (``masters``,
    if given, receives the fp32 value of every tensor before its rounding to the model dtype)."""
    layers_per_chunk = cfg.num_layers // (cfg.pp * cfg.vp)
    first_layer = (chunk * cfg.pp + pp_rank) * layers_per_chunk  # Megatron's interleaved assignment
    is_first = pp_rank == 0 and chunk == 0
    is_last = pp_rank == cfg.pp - 1 and chunk == cfg.vp - 1
    state: Dict[str, object] = {}

    def put(name, shape, dtype, global_name, *owner):
        # Seeded by the GLOBAL name (global layer and expert): the same model saved at another
        # PP/EP/VP layout holds the same weights under other local names, as a resumed run would.
        base = _tensor(shape, torch.float32, "base", global_name, *owner)
        drift = _tensor(shape, torch.float32, "drift", global_name, *owner, scale=0.002)
        noise = _tensor(shape, torch.float32, "noise", global_name, *owner, iteration, scale=0.0005)
        value = base + drift * (iteration / cfg.interval) + noise
        state[name] = value.to(dtype)
        if masters is not None:
            masters[name] = value

    vocab = cfg.padded_vocab_size
    if is_first:
        name = "embedding.word_embeddings.weight"
        put(name, (vocab // cfg.tp, cfg.hidden_size), cfg.dtype, name, tp_rank)
    local_experts = cfg.num_experts // cfg.ep if cfg.num_experts else 0
    for local in range(layers_per_chunk):
        global_layer = first_layer + local
        for name, (shape, dtype) in layer_tensors(cfg, tp_rank, ep_rank).items():
            global_name = re.sub(r"local_experts\.(\d+)\.",
                                 lambda m: f"local_experts.{ep_rank * local_experts + int(m.group(1))}.", name)
            put(f"decoder.layers.{local}.{name}", shape, dtype, f"decoder.layers.{global_layer}.{global_name}", tp_rank)
        for module in ("self_attention.linear_qkv", "self_attention.linear_proj"):
            # TE keeps FP8 metadata as an opaque extra state: never a weight, never averaged.
            state[f"decoder.layers.{local}.{module}._extra_state"] = io.BytesIO(f"te-{iteration}".encode())
        state[f"decoder.layers.{local}.self_attention.core_attention._extra_state"] = None
    if is_last:
        put("decoder.final_layernorm.weight", (cfg.hidden_size,), cfg.dtype, "decoder.final_layernorm.weight")
        put("output_layer.weight", (vocab // cfg.tp, cfg.hidden_size), cfg.dtype, "output_layer.weight", tp_rank)
    state["rotary_pos_emb.inv_freq_step"] = torch.tensor([iteration], dtype=torch.int64)  # integer: newest wins
    return state


def saved_args(cfg) -> argparse.Namespace:
    return argparse.Namespace(
        tensor_model_parallel_size=cfg.tp, pipeline_model_parallel_size=cfg.pp,
        expert_model_parallel_size=cfg.ep, virtual_pipeline_model_parallel_size=cfg.vp if cfg.vp > 1 else None,
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=4, num_experts=cfg.num_experts or None, swiglu=True, bf16=cfg.dtype == torch.bfloat16,
        padded_vocab_size=cfg.padded_vocab_size, save_interval=cfg.interval, ckpt_format="torch",
        use_distributed_optimizer=cfg.distrib_optim, seed=1234)


def _params(models: Dict[str, dict]) -> List[tuple]:
    """(chunk key, key, tensor) of every float tensor of the model chunks, in state-dict order."""
    return [(chunk, key, value) for chunk, state in models.items() for key, value in state.items()
            if isinstance(value, torch.Tensor) and value.is_floating_point()]


def _moments(master: torch.Tensor, *parts) -> Dict[str, torch.Tensor]:
    return {"exp_avg": master * 0.1 + _tensor(master.shape, torch.float32, "m", *parts, scale=1e-4),
            "exp_avg_sq": master * master + _tensor(master.shape, torch.float32, "v", *parts, scale=1e-6).abs()}


def float16_optimizer_state(models, masters, iteration: int, where: tuple) -> dict:
    """Float16OptimizerWithFloat16Params.state_dict() of a shard: two param groups (weight decay
    for matrices, none for biases and norms), moments per parameter index, and per group the fp32
    masters of its low-precision parameters (fp32 parameters, like the router, have none)."""
    params = _params(models)
    groups = [[p for p in params if p[2].dim() > 1], [p for p in params if p[2].dim() <= 1]]
    index, state, param_groups, fp32_from_fp16 = 0, {}, [], []
    for wd_mult, group in zip((1.0, 0.0), groups):
        param_groups.append({"lr": 3e-4, "wd_mult": wd_mult, "lr_mult": 1.0, "params": list(range(index, index + len(group)))})
        fp32_from_fp16.append([masters[chunk][key].clone() for chunk, key, value in group if value.dtype != torch.float32])
        for chunk, key, value in group:
            master = masters[chunk][key] if value.dtype != torch.float32 else value
            state[index] = {"step": torch.tensor(float(iteration)), **_moments(master, *where, chunk, key, iteration)}
            index += 1
    return {"optimizer": {"state": state, "param_groups": param_groups},
            "grad_scaler": {"scale": 1.0}, "fp32_from_fp16_params": fp32_from_fp16}


def distrib_optim_state(models, masters, iteration: int, where: tuple):
    """distrib_optim.pt of a shard (get_parameter_state_dp_zero's coalesced format): per model
    chunk and parameter dtype one buffer, its parameters in reverse order, each at a multiple of
    64 elements; dense and expert parameters in two chained states where there are experts."""
    params = _params(models)
    kinds = [[p for p in params if ".experts." not in p[1]], [p for p in params if ".experts." in p[1]]]
    states = []
    for kind in (k for k in kinds if k):
        state, gbuf = {"buckets_coalesced": True}, 0
        for chunk in models:
            dtypes = list(dict.fromkeys(p[2].dtype for p in kind if p[0] == chunk))
            for dtype in dtypes:
                members = [p for p in kind if p[0] == chunk and p[2].dtype == dtype]
                starts, end = [], 0
                for _, _, value in reversed(members):
                    end = -(-end // 64) * 64
                    starts.append(end)
                    end += value.numel()
                buffer = {key: torch.zeros(end) for key in ("param", "exp_avg", "exp_avg_sq")}
                for start, (c, key, value) in zip(starts, reversed(members)):
                    master = masters[c][key] if value.dtype != torch.float32 else value
                    for name, tensor in {"param": master, **_moments(master, *where, c, key, iteration)}.items():
                        buffer[name][start:start + value.numel()] = tensor.reshape(-1)
                state[gbuf] = {(dtype, torch.float32): dict(buffer, numel_unpadded=end)}
                gbuf += 1
        states.append(state)
    return states[0] if len(states) == 1 else states


def shard_state(cfg, iteration: int, tp_rank: int, pp_rank: int, ep_rank: int) -> Dict[str, object]:
    masters = {}
    models = {}
    for c in range(cfg.vp):
        key = f"model{c}" if cfg.vp > 1 else "model"
        models[key] = model_chunk(cfg, iteration, tp_rank, pp_rank, ep_rank, c, masters.setdefault(key, {}))
    if not cfg.optimizer_state:  # as saved with --no-save-optim --no-save-rng
        return {"args": saved_args(cfg), "checkpoint_version": 3.0, "iteration": iteration, **models}
    optimizer = None
    if cfg.fp32_masters:
        optimizer = {"optimizer": {"param_groups": [{"lr": 3e-4, "wd_mult": 1.0, "lr_mult": 1.0, "step": iteration}]},
                     "grad_scaler": {"scale": 1.0}} if cfg.distrib_optim else \
            float16_optimizer_state(models, masters, iteration, (tp_rank, pp_rank, ep_rank))
    fp32_params = [t.float() for m in models.values() for t in m.values()
                   if isinstance(t, torch.Tensor) and t.is_floating_point()]
    rng = random.Random(iteration)
    np_state = np.random.RandomState(iteration).get_state()
    return {
        "args": saved_args(cfg),
        "checkpoint_version": 3.0,
        "iteration": iteration,
        **models,
        "optimizer": optimizer if cfg.fp32_masters else {
            "optimizer": {"state": {i: {"exp_avg": p * 0.1, "exp_avg_sq": p * p, "step": torch.tensor(float(iteration))}
                                    for i, p in enumerate(fp32_params)},
                          "param_groups": [{"lr": 3e-4, "params": list(range(len(fp32_params)))}]},
            "fp32_from_fp16_params": [fp32_params],
        } if not cfg.distrib_optim else {"param_groups": [{"lr": 3e-4}]},
        "opt_param_scheduler": {"max_lr": 3e-4, "num_steps": iteration * 8, "decay_style": "constant"},
        "rng_state": [{"random_rng_state": rng.getstate(), "np_rng_state": np_state,
                       "torch_rng_state": torch.manual_seed(iteration).get_state(), "rng_tracker_states": {}}],
        "num_floating_point_operations_so_far": float(iteration) * 1e12,
    }


def generate_run(run_dir: str, *, iterations: Sequence[int], tp: int = 2, pp: int = 2, ep: int = 2, vp: int = 1,
                 num_layers: int = 4, hidden_size: int = 64, ffn_hidden_size: int = 128, num_experts: int = 4,
                 vocab_size: int = 256, dtype: torch.dtype = torch.bfloat16, distrib_optim: bool = False,
                 optimizer_state: bool = True, fp32_masters: bool = False) -> List[str]:
    """Write a run directory with one checkpoint per iteration; returns the checkpoint dirs.
    ``fp32_masters``: optimizer state as megatron-core saves it (see the module docstring)."""
    if num_layers % (pp * vp):
        raise ValueError(f"num_layers {num_layers} must divide by PP*VP = {pp * vp}")
    if num_experts and num_experts % ep:
        raise ValueError(f"num_experts {num_experts} must divide by EP {ep}")
    iterations = sorted(iterations)
    cfg = argparse.Namespace(tp=tp, pp=pp, ep=ep, vp=vp, num_layers=num_layers, hidden_size=hidden_size,
                             ffn_hidden_size=ffn_hidden_size, num_experts=num_experts, dtype=dtype,
                             padded_vocab_size=vocab_size, distrib_optim=distrib_optim,
                             optimizer_state=optimizer_state, fp32_masters=fp32_masters,
                             interval=(iterations[1] - iterations[0]) if len(iterations) > 1 else 1)
    ckpt_dirs = []
    for iteration in iterations:
        ckpt_dir = os.path.join(run_dir, f"iter_{iteration:07d}")
        for t in range(tp):
            for p in range(pp):
                for e in range(ep):
                    shard = os.path.join(ckpt_dir, shard_dirname(t, p, e, pp, ep))
                    os.makedirs(shard, exist_ok=True)
                    torch.save(shard_state(cfg, iteration, t, p, e), os.path.join(shard, MODEL_FILE))
                    if distrib_optim and fp32_masters:
                        masters = {}
                        models = {f"model{c}" if vp > 1 else "model": model_chunk(
                            cfg, iteration, t, p, e, c, masters.setdefault(f"model{c}" if vp > 1 else "model", {}))
                            for c in range(vp)}
                        torch.save(distrib_optim_state(models, masters, iteration, (t, p, e)),
                                   os.path.join(shard, "distrib_optim.pt"))
                    elif distrib_optim:
                        torch.save({"buckets_coalesced": True, 0: {(torch.bfloat16, torch.float32): {
                            "param": _tensor((1024,), torch.float32, "dopt", iteration, t, p, e),
                            "numel_unpadded": 1000}}}, os.path.join(shard, "distrib_optim.pt"))
        ckpt_dirs.append(ckpt_dir)
    with open(os.path.join(run_dir, TRACKER), "w") as f:  # last, as Megatron does
        f.write(str(iterations[-1]))
    return ckpt_dirs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pmm_dist.synthetic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--iterations", default="1000,2000,3000,4000,5000,6000",
                        help="checkpoint iterations, comma separated")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--vp", type=int, default=1, help="virtual pipeline chunks per stage (model0, model1, ...)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--ffn", type=int, default=128)
    parser.add_argument("--experts", type=int, default=4, help="0 for a dense MLP")
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--distrib-optim", action="store_true", help="also write distrib_optim.pt files")
    parser.add_argument("--no-optimizer", action="store_true",
                        help="weights only, as saved with --no-save-optim --no-save-rng")
    parser.add_argument("--fp32-masters", action="store_true",
                        help="optimizer state as megatron-core saves it: fp32 masters whose rounding the model holds")
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    dirs = generate_run(args.run_dir, iterations=[int(x) for x in args.iterations.split(",")], tp=args.tp,
                        pp=args.pp, ep=args.ep, vp=args.vp, num_layers=args.layers, hidden_size=args.hidden,
                        ffn_hidden_size=args.ffn, num_experts=args.experts, vocab_size=args.vocab, dtype=dtype,
                        distrib_optim=args.distrib_optim, optimizer_state=not args.no_optimizer,
                        fp32_masters=args.fp32_masters)
    size = sum(os.path.getsize(os.path.join(d, f)) for c in dirs for d, _, fs in os.walk(c) for f in fs)
    print(f"wrote {len(dirs)} checkpoints (TP={args.tp} PP={args.pp} EP={args.ep} VP={args.vp}) "
          f"to {args.run_dir}, {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
