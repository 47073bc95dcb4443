"""Real megatron-core GPTModel at TP=2 on gloo (CPU), for tests/test_megatron_core_real.py.

Launch with torchrun, 2 processes (one per tensor-parallel rank):

  train RUN --iterations 10,20,30,40 [--seed S]
      Trains a tiny SwiGLU GPTModel with Adam on random tokens and, at each listed iteration,
      saves every TP rank's state exactly like Megatron-LM's ``save_checkpoint`` with
      ``--ckpt-format torch``: RUN/iter_{it:07d}/mp_rank_{tp:02d}/model_optim_rng.pt, then rank 0
      writes RUN/latest_checkpointed_iteration.txt last.

  load --checkpoint CKPT_DIR:ITERATION:DUMP_DIR [--checkpoint ...] [--seed S]
      For each --checkpoint: builds a FRESH GPTModel (different seed, so different weights),
      loads CKPT_DIR/iter_{ITERATION:07d}/mp_rank_{tp:02d}/model_optim_rng.pt with
      ``torch.load(weights_only=True)`` and megatron-core's allow-list, calls
      ``model.load_state_dict(sd['model'], strict=True)`` and writes the model's tensors to
      DUMP_DIR/rank{tp}.pt (plus the key list and the keys/iteration found in the file).
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist

from tests.megatron_cpu import (FFN_HIDDEN, HEADS, HIDDEN, MICRO_BATCH, NUM_LAYERS, SEQ, VOCAB, batch, build_gpt,
                                finish, rng_state)

TP = 2


def init_parallel():
    from megatron.core import parallel_state

    dist.init_process_group("gloo")
    if dist.get_world_size() != TP:
        raise SystemExit(f"run with exactly {TP} processes (got {dist.get_world_size()})")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP)
    return parallel_state.get_tensor_model_parallel_rank()


def build_model(seed):
    return build_gpt(seed, TP)


def megatron_args(iteration):
    """An argparse.Namespace shaped like (a subset of) Megatron-LM's saved args."""
    from megatron.core.transformer.enums import AttnBackend

    return argparse.Namespace(
        tensor_model_parallel_size=TP,
        pipeline_model_parallel_size=1,
        expert_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None,
        context_parallel_size=1,
        data_parallel_size=1,
        world_size=TP,
        num_layers=NUM_LAYERS,
        hidden_size=HIDDEN,
        ffn_hidden_size=FFN_HIDDEN,
        num_attention_heads=HEADS,
        seq_length=SEQ,
        max_position_embeddings=SEQ,
        padded_vocab_size=VOCAB,
        swiglu=True,
        position_embedding_type="rope",
        untie_embeddings_and_output_weights=True,
        bf16=True,
        fp16=False,
        params_dtype=torch.bfloat16,
        micro_batch_size=MICRO_BATCH,
        global_batch_size=MICRO_BATCH,
        lr=1e-2,
        optimizer="adam",
        use_distributed_optimizer=False,
        ckpt_format="torch",
        attention_backend=AttnBackend.auto,
        iteration=iteration,
        save="RUN",
        load=None,
    )


def cmd_train(opts):
    tp_rank = init_parallel()
    iterations = sorted(int(x) for x in opts.iterations.split(","))
    model = build_model(opts.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    # Same data on both TP ranks (they form one model replica).
    generator = torch.Generator().manual_seed(1234)
    flops = 0.0
    for it in range(1, iterations[-1] + 1):
        input_ids, position_ids, attention_mask, labels = batch(generator)
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids, position_ids, attention_mask, labels=labels).float().mean()
        loss.backward()
        optimizer.step()
        flops += 6.0 * MICRO_BATCH * SEQ * sum(p.numel() for p in model.parameters())
        if it in iterations:
            state = {
                "args": megatron_args(it),
                "checkpoint_version": 3.0,
                "iteration": it,
                "model": model.state_dict_for_save_checkpoint(),
                "optimizer": optimizer.state_dict(),
                "opt_param_scheduler": {"max_lr": 1e-2, "min_lr": 0.0, "num_steps": it * MICRO_BATCH,
                                        "warmup_steps": 0, "decay_steps": 1000, "decay_style": "constant"},
                "rng_state": rng_state(),
                "num_floating_point_operations_so_far": flops,
            }
            path = os.path.join(opts.run, f"iter_{it:07d}", f"mp_rank_{tp_rank:02d}", "model_optim_rng.pt")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(state, path)
            dist.barrier()
            if dist.get_rank() == 0:
                with open(os.path.join(opts.run, "latest_checkpointed_iteration.txt"), "w") as f:
                    f.write(str(it))
            dist.barrier()
            if dist.get_rank() == 0:
                print(f"iteration {it}: loss {loss.item():.4f}, saved", flush=True)
    finish()


def cmd_load(opts):
    from megatron.core.safe_globals import SAFE_GLOBALS

    tp_rank = init_parallel()
    for spec in opts.checkpoint:
        ckpt_dir, iteration, dump_dir = spec.rsplit(":", 2)
        iteration = int(iteration)
        model = build_model(opts.seed)
        before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
        path = os.path.join(ckpt_dir, f"iter_{iteration:07d}", f"mp_rank_{tp_rank:02d}", "model_optim_rng.pt")
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            sd = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(sd["model"], strict=True)
        after = model.state_dict()
        changed = sum(1 for k, v in before.items() if not torch.equal(v, after[k]))
        os.makedirs(dump_dir, exist_ok=True)
        torch.save({
            "tensors": {k: v.detach().clone() for k, v in after.items() if torch.is_tensor(v)},
            "keys": sorted(after.keys()),
            "file_keys": sorted(sd.keys()),
            "changed_by_load": changed,
            "path": path,
        }, os.path.join(dump_dir, f"rank{tp_rank}.pt"))
        dist.barrier()
        if dist.get_rank() == 0:
            print(f"loaded {ckpt_dir} iteration {iteration} strictly; {changed} tensors changed", flush=True)
    finish()


def main(argv=None):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train")
    p.add_argument("run")
    p.add_argument("--iterations", default="10,20,30,40")
    p.add_argument("--seed", type=int, default=1)
    p = sub.add_parser("load")
    p.add_argument("--checkpoint", action="append", required=True, help="CKPT_DIR:ITERATION:DUMP_DIR")
    p.add_argument("--seed", type=int, default=777)
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    {"train": cmd_train, "load": cmd_load}[opts.cmd](opts)


if __name__ == "__main__":
    sys.exit(main())
