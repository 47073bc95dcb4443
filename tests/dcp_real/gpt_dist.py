"""Real megatron-core GPTModel saved and loaded with ``dist_checkpointing`` (torch_dist), CPU/gloo.

For tests/test_megatron_dist_real.py and tests/test_megatron_dist_layouts.py. Launch with
torchrun; the tensor-parallel size is the number of processes divided by ``--pp`` (default 1).

  train RUN --iterations 2,4,6 [--seed S] [--pp P] [--resume CKPT]
      Trains a tiny SwiGLU GPTModel (bf16 weights, fp32 norms) with Adam at TP=2 and saves, at
      each listed iteration, a state dict shaped like Megatron-LM's ``save_checkpoint`` with
      ``--ckpt-format torch_dist`` through ``dist_checkpointing.save`` into RUN/iter_{it:07d}/
      ('model' sharded tensors, 'optimizer' as megatron-core ShardedTensors, 'rng_state' and a
      per-iteration ``_extra_state`` as ShardedObjects, args / iteration / scheduler as common
      state); rank 0 then writes RUN/latest_checkpointed_iteration.txt. ``--resume CKPT`` first
      loads the model weights of CKPT (saved at any TP/PP: Megatron reshards on load; the
      optimizer starts afresh, as with --no-load-optim) and continues after its iteration, as a
      run resumed at another layout does. With ``--pp 2`` the two stages are driven by hand
      (activations and their gradients sent between the stages), without Megatron's schedules.

  load --checkpoint CKPT_DIR:DUMP_FILE [--checkpoint ...] [--seed S]
      For each --checkpoint: builds a FRESH GPTModel (another seed) at TP = world size, loads
      CKPT_DIR with ``dist_checkpointing.load(model.sharded_state_dict())`` (Megatron reshards
      on load), ``load_state_dict(strict=True)``, and writes rank-local tensors to
      DUMP_FILE.rank{r}.pt together with the loaded common state and the ``_extra_state`` bytes.
"""
import argparse
import io
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.megatron_cpu import HIDDEN, MICRO_BATCH, NUM_LAYERS, SEQ, batch, build_gpt  # noqa: E402

EXTRA_STATE_KEY = "decoder.final_layernorm._extra_state"


def init_parallel(pp=1):
    from megatron.core import parallel_state

    dist.init_process_group("gloo")
    tp = dist.get_world_size() // pp
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    return tp, parallel_state.get_tensor_model_parallel_rank()


def build_model(seed, tp, pp=1):
    return build_gpt(seed, tp, pp)


def optimizer_sharded_state(optimizer, model_sharded):
    """What megatron-core's FP32Optimizer.sharded_state_dict produces for a torch Adam."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map, optim_state_to_sharding_state)

    state = optimizer.state_dict()
    id_map = get_param_id_to_sharded_param_map(
        model_sharded, (p for group in optimizer.param_groups for p in group["params"]))
    optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
    return state


def extra_state_object(payload: bytes, tp_rank, tp):
    """A ShardedObject like Transformer Engine's ``_extra_state`` (replicated across TP)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(EXTRA_STATE_KEY, io.BytesIO(payload), (1,), (0,), replica_id=tp_rank)


def train_step(model, optimizer, batch_tensors, pp):
    """One step: plain at PP=1; at PP=2 stage 0 sends its activations to stage 1, which returns
    their gradient (float32 over gloo)."""
    from megatron.core import parallel_state

    input_ids, position_ids, attention_mask, labels = batch_tensors
    optimizer.zero_grad(set_to_none=True)
    if pp == 1:
        loss = model(input_ids, position_ids, attention_mask, labels=labels).float().mean()
        loss.backward()
    elif parallel_state.is_pipeline_first_stage():
        hidden = model(input_ids, position_ids, attention_mask)
        dist.send(hidden.detach().float().contiguous(), dst=1)
        grad = torch.empty(hidden.shape, dtype=torch.float32)
        dist.recv(grad, src=1)
        hidden.backward(grad.to(hidden.dtype))
        loss = torch.zeros(())
    else:
        received = torch.empty((SEQ, MICRO_BATCH, HIDDEN), dtype=torch.float32)
        dist.recv(received, src=0)
        hidden = received.to(torch.bfloat16).requires_grad_()
        model.set_input_tensor(hidden)
        loss = model(None, position_ids, attention_mask, labels=labels).float().mean()
        loss.backward()
        dist.send(hidden.grad.float().contiguous(), dst=0)
    optimizer.step()
    return loss


def cmd_train(opts):
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    tp, tp_rank = init_parallel(opts.pp)
    pp, pp_rank = opts.pp, parallel_state.get_pipeline_model_parallel_rank()
    iterations = sorted(int(x) for x in opts.iterations.split(","))
    model = build_model(opts.seed, tp, pp)
    first = 1
    if opts.resume:
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, opts.resume)
        model.load_state_dict(loaded["model"], strict=True)
        first = int(torch.load(os.path.join(opts.resume, "common.pt"), weights_only=False)["iteration"]) + 1
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    generator = torch.Generator().manual_seed(1234)
    for it in range(1, iterations[-1] + 1):
        batch_tensors = batch(generator)  # the same stream when resumed
        if it < first:
            continue
        loss = train_step(model, optimizer, batch_tensors, pp)
        if it not in iterations:
            continue
        model_sharded = model.sharded_state_dict()
        if parallel_state.is_pipeline_last_stage():  # the final layernorm lives on the last stage
            model_sharded[EXTRA_STATE_KEY] = extra_state_object(f"te-{it}".encode(), tp_rank, tp)
        state = {
            "args": argparse.Namespace(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                       num_layers=NUM_LAYERS, ckpt_format="torch_dist"),
            "checkpoint_version": 3.0,
            "iteration": it,
            "model": model_sharded,
            "optimizer": optimizer_sharded_state(optimizer, model_sharded),
            "opt_param_scheduler": {"num_steps": it * MICRO_BATCH, "max_lr": 1e-2},
            "rng_state": ShardedObject("rng_state", [{"torch_rng_state": torch.get_rng_state(), "it": it}],
                                       (pp, tp), (pp_rank, tp_rank), replica_id=0),
            "num_floating_point_operations_so_far": float(it),
        }
        ckpt_dir = os.path.join(opts.run, f"iter_{it:07d}")
        if dist.get_rank() == 0:
            os.makedirs(ckpt_dir, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(state, ckpt_dir)
        dist.barrier()
        if dist.get_rank() == 0:
            with open(os.path.join(opts.run, "latest_checkpointed_iteration.txt"), "w") as f:
                f.write(str(it))
        if parallel_state.is_pipeline_last_stage() and tp_rank == 0:
            print(f"iteration {it}: loss {loss.item():.4f}, saved at TP={tp} PP={pp}", flush=True)
        dist.barrier()
    dist.destroy_process_group()


def cmd_load(opts):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    tp, tp_rank = init_parallel()
    for spec in opts.checkpoint:
        ckpt_dir, dump_file = spec.rsplit(":", 1)
        model = build_model(opts.seed, tp)
        before = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
        request = {"model": model.sharded_state_dict(),
                   "extra": ShardedObject(EXTRA_STATE_KEY, None, (1,), (0,), replica_id=tp_rank)}
        loaded = dist_checkpointing.load(request, ckpt_dir)
        model.load_state_dict(loaded["model"], strict=True)
        after = model.state_dict()
        torch.save({
            "tensors": {k: v.detach().clone() for k, v in after.items() if torch.is_tensor(v)},
            "changed_by_load": sorted(k for k, v in before.items() if not torch.equal(v, after[k])),
            "common_keys": sorted(k for k in loaded if k not in ("model", "extra")),
            "iteration": loaded.get("iteration"),
            "has_optimizer_common": "optimizer" in loaded,
            "extra_state": loaded["extra"].getvalue(),
        }, f"{dump_file}.rank{tp_rank}.pt")
        dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train")
    p.add_argument("run")
    p.add_argument("--iterations", default="2,4,6")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--resume")
    p = sub.add_parser("load")
    p.add_argument("--checkpoint", action="append", required=True, help="CKPT_DIR:DUMP_FILE")
    p.add_argument("--seed", type=int, default=777)
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    {"train": cmd_train, "load": cmd_load}[opts.cmd](opts)


if __name__ == "__main__":
    sys.exit(main())
