"""megatron-core's own optimizers on CPU (gloo, 2 processes), for tests/test_megatron_optimizer_real.py.

A tiny SwiGLU GPTModel in bf16 (Float16Module, as Megatron-LM wraps it), megatron-core's
DistributedDataParallel and ``get_megatron_optimizer`` (Adam), and its OptimizerParamScheduler:

- ``--optimizer fp16``: Float16OptimizerWithFloat16Params at TP=2 (DP=1);
- ``--optimizer dist``: the DistributedOptimizer at DP=2 (TP=1).

megatron-core 0.16.1 assumes CUDA in its optimizers; three patches make them run on CPU, all in
this file: ``torch.cuda.current_device``/``synchronize`` as for saving, tensor factories called
with ``device='cuda'`` get the CPU, and ``Tensor.type()`` reports CPU tensors under their CUDA
names (the optimizers sort parameters by ``param.type() == 'torch.cuda.BFloat16Tensor'``). A
fourth is a fix: without Apex or Transformer Engine (as here) the DistributedOptimizer runs
torch's Adam, which keeps a ``step`` per parameter; ``load_parameter_state`` then copies every
key of that state from distrib_optim.pt, which holds only ``param``, ``exp_avg`` and
``exp_avg_sq`` (the step comes from model_optim_rng.pt's param groups, ``load_state_dict``), and
fails with KeyError 'step' on any checkpoint, merged or not: the patch copies the keys the file has.

  train RUN --optimizer fp16|dist --iterations 2,4,6,8
      Trains on random tokens (different on each DP rank) and saves at each listed iteration as
      Megatron-LM's legacy ``save_checkpoint`` does: DP rank 0 of each TP rank writes
      RUN/iter_{it:07d}/mp_rank_{tp:02d}/model_optim_rng.pt (args, model, ``optimizer.state_dict()``,
      the scheduler's state, rng); with the distributed optimizer every DP rank takes part in
      ``optimizer.save_parameter_state(.../distrib_optim.pt)``; rank 0 writes the tracker last.

  load --optimizer fp16|dist --checkpoint CKPT_DIR:ITERATION:DUMP_DIR [...]
      For each: a FRESH model, optimizer and scheduler (another seed), loaded as Megatron-LM's
      ``load_checkpoint`` does without --finetune: ``model.load_state_dict(sd['model'])``,
      ``optimizer.load_state_dict(sd['optimizer'])`` (+ ``load_parameter_state(distrib_optim.pt)``),
      ``scheduler.load_state_dict``. DUMP_DIR/rank{r}.pt: the model's tensors, each parameter's
      fp32 master and Adam moments as the optimizer holds them (the DistributedOptimizer: this
      DP rank's shard and where it lies in the parameter), the step and the scheduler; then one
      training step: its loss, and whether it changed every weight and kept them finite.
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist

from tests.megatron_cpu import build_gpt, finish, on_cpu, rng_state  # also patches torch.cuda's sync calls

for _name in ("tensor", "zeros", "empty", "ones", "full", "zeros_like", "empty_like", "arange"):
    setattr(torch, _name, on_cpu(getattr(torch, _name)))
_cpu_type = torch.Tensor.type


def _cuda_type_names(self, *args, **kwargs):
    name = _cpu_type(self, *args, **kwargs)
    if args or kwargs or not isinstance(name, str) or name.startswith("torch.cuda."):
        return name
    return name.replace("torch.", "torch.cuda.", 1)


torch.Tensor.type = _cuda_type_names

def _patch_distributed_optimizer_load():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        for key, value in {"param": main_param, **self.optimizer.state[main_param]}.items():
            if key in tensors:
                value.copy_(tensors[key])

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


NUM_LAYERS, HIDDEN, HEADS, FFN_HIDDEN, VOCAB, SEQ, MICRO_BATCH = 2, 32, 4, 64, 64, 16, 2
SHAPE = dict(num_layers=NUM_LAYERS, hidden_size=HIDDEN, ffn_hidden_size=FFN_HIDDEN, num_attention_heads=HEADS,
             vocab_size=VOCAB, max_sequence_length=SEQ)
LR = 1e-2
TP = {"fp16": 2, "dist": 1}


def setup(kind):
    from megatron.core import parallel_state
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP[kind])
    return (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_world_size())


def build(kind, seed):
    """(Float16Module(GPTModel), DDP, optimizer, scheduler), initialised from ``seed``."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.module import Float16Module

    gpt = build_gpt(seed, TP[kind], **SHAPE)
    config = gpt.config
    model = Float16Module(config, gpt)
    distributed = kind == "dist"
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(use_distributed_optimizer=distributed,
                                                                        grad_reduce_in_fp32=True), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=LR, min_lr=1e-3, weight_decay=0.01, bf16=True,
                                                       use_distributed_optimizer=distributed), [ddp])
    scheduler = OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=LR, min_lr=1e-3, lr_warmup_steps=3,
                                        lr_decay_steps=100, lr_decay_style="cosine", start_wd=0.01, end_wd=0.01,
                                        wd_incr_steps=100, wd_incr_style="constant")
    return model, ddp, optimizer, scheduler


def megatron_args(kind, iteration, dp_size):
    from megatron.core.transformer.enums import AttnBackend
    return argparse.Namespace(
        tensor_model_parallel_size=TP[kind], pipeline_model_parallel_size=1, expert_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None, context_parallel_size=1, data_parallel_size=dp_size,
        world_size=TP[kind] * dp_size, num_layers=NUM_LAYERS, hidden_size=HIDDEN, ffn_hidden_size=FFN_HIDDEN,
        num_attention_heads=HEADS, seq_length=SEQ, max_position_embeddings=SEQ, padded_vocab_size=VOCAB,
        swiglu=True, position_embedding_type="rope", untie_embeddings_and_output_weights=True, bf16=True,
        fp16=False, params_dtype=torch.bfloat16, micro_batch_size=MICRO_BATCH, lr=LR, optimizer="adam",
        use_distributed_optimizer=kind == "dist", ckpt_format="torch", attention_backend=AttnBackend.auto,
        iteration=iteration, seed=1)


def train_step(model, ddp, optimizer, scheduler, generator):
    tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=generator)
    positions = torch.arange(SEQ).unsqueeze(0).expand(MICRO_BATCH, SEQ).contiguous()
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    loss = model(tokens[:, :-1].contiguous(), positions, None, labels=tokens[:, 1:].contiguous()).float().mean()
    loss.backward()
    ddp.finish_grad_sync()
    updated, _, _ = optimizer.step()
    scheduler.step(increment=1)
    assert updated
    return float(loss)


def _shard_dir(run, iteration, tp_rank):
    return os.path.join(run, f"iter_{iteration:07d}", f"mp_rank_{tp_rank:02d}")


def cmd_train(opts):
    tp_rank, dp_rank, dp_size = setup(opts.optimizer)
    model, ddp, optimizer, scheduler = build(opts.optimizer, seed=1)
    generator = torch.Generator().manual_seed(100 + dp_rank)  # TP ranks of one replica see the same data
    iterations = sorted(int(x) for x in opts.iterations.split(","))
    for iteration in range(1, iterations[-1] + 1):
        train_step(model, ddp, optimizer, scheduler, generator)
        if iteration not in iterations:
            continue
        shard = _shard_dir(opts.run, iteration, tp_rank)
        if dp_rank == 0:
            os.makedirs(shard, exist_ok=True)
        dist.barrier()
        state = {"args": megatron_args(opts.optimizer, iteration, dp_size), "checkpoint_version": 3.0,
                 "iteration": iteration, "model": model.state_dict_for_save_checkpoint(),
                 "optimizer": optimizer.state_dict(), "opt_param_scheduler": scheduler.state_dict(),
                 "rng_state": rng_state(),
                 "num_floating_point_operations_so_far": float(iteration)}
        if opts.optimizer == "dist":
            optimizer.save_parameter_state(os.path.join(shard, "distrib_optim.pt"))  # collective over DP
        if dp_rank == 0:
            torch.save(state, os.path.join(shard, "model_optim_rng.pt"))
        dist.barrier()
        if dist.get_rank() == 0:
            with open(os.path.join(opts.run, "latest_checkpointed_iteration.txt"), "w") as f:
                f.write(str(iteration))
    finish()


def _masters(ddp_optimizer, model, kind):
    """name -> {"param", "exp_avg", "exp_avg_sq", "start", "end"}: what the optimizer holds for
    each parameter (the DistributedOptimizer: this DP rank's shard, elements [start, end))."""
    optimizer = ddp_optimizer.chained_optimizers[0] if hasattr(ddp_optimizer, "chained_optimizers") else ddp_optimizer
    found = {}
    for name, param in model.named_parameters():
        name = name[len("module."):] if name.startswith("module.") else name
        if kind == "dist":
            if param not in optimizer.model_param_group_index_map:
                continue  # no element of it on this DP rank
            tensors = optimizer._get_main_param_and_optimizer_states(param)
            ranges = [maps["param_map"][param]["param"] for gbuf in optimizer.gbuf_ranges for buckets in gbuf.values()
                      for maps in buckets if param in maps["param_map"]]
            start, end = ranges[0].start, ranges[0].end
        else:
            main = param.main_param
            tensors = {"param": main, **optimizer.optimizer.state[main]}
            start, end = 0, param.numel()
        found[name] = {key: tensors[key].detach().clone().reshape(-1) for key in ("param", "exp_avg", "exp_avg_sq")}
        found[name].update(start=start, end=end)
    return found


def cmd_load(opts):
    from megatron.core.safe_globals import SAFE_GLOBALS
    tp_rank, dp_rank, _ = setup(opts.optimizer)
    _patch_distributed_optimizer_load()
    for spec in opts.checkpoint:
        ckpt_dir, iteration, dump_dir = spec.rsplit(":", 2)
        model, ddp, optimizer, scheduler = build(opts.optimizer, seed=777)
        shard = _shard_dir(ckpt_dir, int(iteration), tp_rank)
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            state = torch.load(os.path.join(shard, "model_optim_rng.pt"), map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        if opts.optimizer == "dist":
            optimizer.load_parameter_state(os.path.join(shard, "distrib_optim.pt"))
        scheduler.load_state_dict(state["opt_param_scheduler"])
        tensors = {k: v.detach().clone() for k, v in model.state_dict_for_save_checkpoint().items() if torch.is_tensor(v)}
        inner = optimizer.chained_optimizers[0].optimizer
        steps = sorted({float(s["step"]) for s in inner.state.values() if "step" in s} |
                       {float(g["step"]) for g in inner.param_groups if "step" in g})
        dump = {"tensors": tensors, "masters": _masters(optimizer, model, opts.optimizer), "steps": steps,
                "scheduler": scheduler.state_dict(), "lr": [g["lr"] for g in inner.param_groups]}
        before = {k: v.clone() for k, v in tensors.items()}
        loss = train_step(model, ddp, optimizer, scheduler, torch.Generator().manual_seed(5 + dp_rank))
        after = {k: v.detach() for k, v in model.state_dict_for_save_checkpoint().items() if torch.is_tensor(v)}
        dump["step"] = {"loss": loss, "finite": all(bool(torch.isfinite(v).all()) for v in after.values()),
                        "unchanged": sorted(k for k, v in after.items()
                                            if v.is_floating_point() and torch.equal(v, before[k]))}
        os.makedirs(dump_dir, exist_ok=True)
        torch.save(dump, os.path.join(dump_dir, f"rank{dist.get_rank()}.pt"))
        dist.barrier()
    finish()


def main(argv=None):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    train = sub.add_parser("train")
    train.add_argument("run")
    train.add_argument("--optimizer", choices=list(TP), required=True)
    train.add_argument("--iterations", default="2,4,6,8")
    load = sub.add_parser("load")
    load.add_argument("--optimizer", choices=list(TP), required=True)
    load.add_argument("--checkpoint", action="append", required=True, help="CKPT_DIR:ITERATION:DUMP_DIR")
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    {"train": cmd_train, "load": cmd_load}[opts.cmd](opts)


if __name__ == "__main__":
    sys.exit(main())
