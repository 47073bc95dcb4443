"""Real megatron-core optimizers on CPU (gloo), saved and loaded with ``dist_checkpointing`` (torch_dist).

For tests/test_megatron_dist_optimizer_real.py. Launch with torchrun; TP=1 and DP = the number of
processes. The tiny SwiGLU GPTModel of gpt_dist.py, cast to bf16 throughout (as Megatron-LM's
Float16Module does), wrapped in megatron-core's DistributedDataParallel and trained with the
optimizer ``get_megatron_optimizer`` builds for ``bf16=True``, Adam:

  dp_reshardable     DistributedOptimizer, saved as optimizer.distributed.*...bucket_idx_*.{param,
                     exp_avg,exp_avg_sq} (the default sharding type), DP-sharded buckets
  fully_reshardable  DistributedOptimizer, saved as optimizer.state.{param,exp_avg,exp_avg_sq}.<key>
  nondist            Float16OptimizerWithFloat16Params (no distributed optimizer), saved as
                     optimizer.state.fp32_param.<key> plus optimizer.state.{exp_avg,exp_avg_sq}.<key>

  train ROOT --sharding S [--sharding S2 ...] --iterations 2,4,6
      For each S: trains and saves each listed iteration like Megatron-LM's save_checkpoint with
      --ckpt-format torch_dist: {'model', 'optimizer': optimizer.sharded_state_dict(model's,
      metadata={'distrib_optim_sharding_type': S}), 'iteration', 'args', 'opt_param_scheduler',
      'rng_state'} through ``dist_checkpointing.save(..., content_metadata=...)`` into
      ROOT/S/iter_{it:07d}/, then the tracker.
  load --sharding S [--resave-as S2] --checkpoint CKPT:RESAVED:DUMP [--checkpoint ...]
      For each: builds a FRESH model and optimizer (another seed), loads model and optimizer from
      CKPT with ``dist_checkpointing.load`` and their load_state_dict (Megatron-LM's load path),
      saves them again with megatron-core's own sharded_state_dict into RESAVED, as S2 (default
      S; a DistributedOptimizer can save what it loaded from dp_reshardable buckets as
      fully_reshardable, model-space tensors without the buckets' uninitialised padding): what
      megatron holds after the load, for the test to compare. Then runs one training step and
      writes DUMP (rank 0): the loss and the model tensors before and after the step.

megatron-core 0.16.1 builds these optimizers for CUDA only. On CPU two things are faked, nothing
of the optimizers' logic: tensors that megatron-core allocates with ``device='cuda'`` (flags,
scales) are made on the CPU, and Parameter.type() reports the CUDA type names its dtype checks
compare against ('torch.cuda.BFloat16Tensor' for a CPU bf16 parameter). The fully_reshardable
state is gathered with megatron-core's gloo path (distrib_optim_fully_reshardable_mem_efficient),
since its default path moves tensors to CUDA. The deprecated fully_sharded_model_space format
cannot be saved by megatron-core 0.16.1 at all (ShardedTensor.flattened_range is refused).
Two defects of megatron-core 0.16.1 with torch's Adam (no Apex / Transformer Engine) are worked
around for loading, see cmd_load and keep_torch_adam_step.
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpt_dist  # noqa: E402  (also patches torch.cuda.synchronize / current_device)
from tests.megatron_cpu import on_cpu  # noqa: E402

SHARDINGS = ("dp_reshardable", "fully_reshardable", "nondist")


def patch_for_cpu():
    for name in ("tensor", "zeros", "ones", "empty", "full"):
        setattr(torch, name, on_cpu(getattr(torch, name)))
    tensor_type = torch.Tensor.type

    def cuda_type_name(self, *args, **kwargs):
        if args or kwargs or self.is_cuda:
            return tensor_type(self, *args, **kwargs)
        return tensor_type(self).replace("torch.", "torch.cuda.", 1)
    torch.nn.Parameter.type = cuda_type_name


def keep_torch_adam_step():
    """megatron-core 0.16.1 loads fully_reshardable state into torch's Adam by copying every key
    of the parameter's optimizer state from the loaded tensors, which skip 'step' (it comes from
    the param groups): a KeyError. The step already set from the param groups is kept."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        step = self.optimizer.state[main_param].get("step")
        if "step" not in tensors and step is not None:
            tensors = {**tensors, "step": step}
        return original(self, model_param, tensors)
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def init():
    from megatron.core import parallel_state
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)


def build(seed, sharding):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    distributed = sharding != "nondist"
    model = gpt_dist.build_model(seed, tp=1).to(torch.bfloat16)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        use_distributed_optimizer=distributed, grad_reduce_in_fp32=True), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-2, bf16=True, use_distributed_optimizer=distributed, clip_grad=0.0), [ddp])
    return model, ddp, optimizer


def sharding_metadata(sharding):
    if sharding == "nondist":
        return {}
    return {"distrib_optim_sharding_type": sharding, "distrib_optim_fully_reshardable_mem_efficient": True}


def step(model, ddp, optimizer, batch_tensors):
    input_ids, position_ids, attention_mask, labels = batch_tensors
    optimizer.zero_grad()
    ddp.zero_grad_buffer()
    loss = model(input_ids, position_ids, attention_mask, labels=labels).float().mean()
    loss.backward()
    ddp.finish_grad_sync()
    optimizer.step()
    return loss


def state_dict(model, optimizer, sharding, iteration, is_loading=False):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    model_sharded = model.sharded_state_dict()
    meta = sharding_metadata(sharding)
    return {
        "model": model_sharded,
        "optimizer": optimizer.sharded_state_dict(model_sharded, is_loading=is_loading, metadata=meta),
        "iteration": iteration,
        "checkpoint_version": 3.0,
        "args": argparse.Namespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                   num_layers=gpt_dist.NUM_LAYERS, ckpt_format="torch_dist"),
        "opt_param_scheduler": {"num_steps": iteration * gpt_dist.MICRO_BATCH, "max_lr": 1e-2},
        "rng_state": ShardedObject("rng_state", [{"torch_rng_state": torch.get_rng_state(), "it": iteration}],
                                   (1, dist.get_world_size()), (0, dist.get_rank()), replica_id=0),
    }, meta


def save(state, meta, ckpt_dir):
    from megatron.core import dist_checkpointing

    if dist.get_rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(state, ckpt_dir, content_metadata=meta)
    dist.barrier()


def cmd_train(opts):
    iterations = sorted(int(x) for x in opts.iterations.split(","))
    for sharding in opts.sharding:
        run = os.path.join(opts.root, sharding)
        model, ddp, optimizer = build(opts.seed, sharding)
        generator = torch.Generator().manual_seed(1234)
        for it in range(1, iterations[-1] + 1):
            loss = step(model, ddp, optimizer, gpt_dist.batch(generator))
            if it not in iterations:
                continue
            save(*state_dict(model, optimizer, sharding, it), os.path.join(run, f"iter_{it:07d}"))
            if dist.get_rank() == 0:
                with open(os.path.join(run, "latest_checkpointed_iteration.txt"), "w") as f:
                    f.write(str(it))
                print(f"{sharding} iteration {it}: loss {loss.item():.4f}", flush=True)


def cmd_load(opts):
    from megatron.core import dist_checkpointing

    keep_torch_adam_step()
    (sharding,) = opts.sharding
    for spec in opts.checkpoint:
        ckpt, resaved, dump = spec.split(":")
        model, ddp, optimizer = build(opts.seed, sharding)
        # Without Apex/TE, megatron-core 0.16.1 cannot build the loading state dict of an
        # optimizer that never stepped (its state_dict asserts a 'step' in the torch state):
        # one step first, whose weights and state the load then replaces.
        step(model, ddp, optimizer, gpt_dist.batch(torch.Generator().manual_seed(5)))
        iteration = int(torch.load(os.path.join(ckpt, "common.pt"), weights_only=False)["iteration"])
        request, _ = state_dict(model, optimizer, sharding, iteration, is_loading=True)
        loaded = dist_checkpointing.load({"model": request["model"], "optimizer": request["optimizer"]}, ckpt)
        model.load_state_dict(loaded["model"], strict=True)
        optimizer.load_state_dict(loaded["optimizer"])
        before = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
        # What megatron-core now holds, saved by its own code: the test compares it with CKPT.
        save(*state_dict(model, optimizer, opts.resave_as or sharding, iteration), resaved)
        loss = step(model, ddp, optimizer, gpt_dist.batch(torch.Generator().manual_seed(99)))
        after = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
        if dist.get_rank() == 0:
            torch.save({"loss": loss.item(), "before": before, "after": after}, dump)


def main(argv=None):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train")
    p.add_argument("root")
    p.add_argument("--iterations", default="2,4,6")
    p.add_argument("--seed", type=int, default=1)
    p = sub.add_parser("load")
    p.add_argument("--checkpoint", action="append", required=True, help="CKPT:RESAVED:DUMP")
    p.add_argument("--seed", type=int, default=777)
    p.add_argument("--resave-as", choices=SHARDINGS)
    for p in sub.choices.values():
        p.add_argument("--sharding", choices=SHARDINGS, action="append", required=True)
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    patch_for_cpu()
    init()
    {"train": cmd_train, "load": cmd_load}[opts.cmd](opts)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
