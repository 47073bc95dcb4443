"""Runs of N checkpoints written by the training frameworks themselves, for benchmarks/formats.py.

    python -m benchmarks.formats_gen megatron-dist RUN_DIR N BYTES_PER_CHECKPOINT
    python -m benchmarks.formats_gen deepspeed RUN_DIR N BYTES_PER_CHECKPOINT

Each writes its first checkpoint with the framework (one process, a one-rank gloo group) and
copies it for the others, as benchmarks/formats.py's ``_copies`` does; the tracker file last.

- megatron-dist: a megatron-core GPTModel (TP=1, bf16, the shape of ``transformer_shape``) saved
  with ``dist_checkpointing.save`` in the state dict Megatron-LM's ``save_checkpoint`` builds
  for ``--ckpt-format torch_dist --no-save-optim`` (args, checkpoint_version, iteration, model),
  as RUN/iter_{it:07d}/ + latest_checkpointed_iteration.txt. Each copy's common.pt says its own
  iteration.
- deepspeed: ``deepspeed.initialize`` (bf16, ZeRO-2, a torch Adam) on a stack of bf16 Linear
  layers of that shape, ``engine.save_checkpoint`` as RUN/global_step{N}/ + latest. It saves
  before any step, so the optimizer file holds the fp32 masters (4 bytes per parameter: what the
  weights-only merge reads, memory-mapped) but not yet Adam's moments (8 more, created at the
  first step, which that merge does not touch): with them a model of 1 GB of weights would take
  an Adam step over 500M parameters and 7 GB per checkpoint, 28 GB on disk at N=4, for bytes the
  measurement never reads. The copies keep the first's ``global_steps`` (pmm_dist orders tags by
  their names).

Megatron-core spawns processes on its save path: everything runs under the ``__main__`` guard.
"""
import argparse
import logging
import os
import shutil

import torch
import torch.nn as nn

from benchmarks.formats import deepspeed_tags, megatron_dist_names, transformer_shape


def write_megatron_dist(run_dir: str, num: int, bytes_per_checkpoint: float) -> None:
    from benchmarks.pma import gpt  # patches torch.cuda for megatron-core on CPU
    from megatron.core import dist_checkpointing

    hidden, layers = transformer_shape(bytes_per_checkpoint)
    cfg = gpt.ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=hidden // 64,
                          ffn_hidden_size=4 * hidden)
    gpt.setup_megatron()
    model = gpt.build_model(cfg, seed=0, dtype=torch.bfloat16)
    names = megatron_dist_names(num)
    iterations = [int(name[len("iter_"):]) for name in names]
    first = os.path.join(run_dir, names[0])
    os.makedirs(first)
    dist_checkpointing.save({
        "args": argparse.Namespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, num_layers=layers,
                                   hidden_size=hidden, ckpt_format="torch_dist", bf16=True),
        "checkpoint_version": 3.0,
        "iteration": iterations[0],
        "model": model.sharded_state_dict(),
        "num_floating_point_operations_so_far": 0.0,
    }, first)
    for name, iteration in zip(names[1:], iterations[1:]):
        copy = os.path.join(run_dir, name)
        shutil.copytree(first, copy)
        common_path = os.path.join(copy, "common.pt")
        common = torch.load(common_path, weights_only=False)  # written just now, by this process
        common["iteration"] = iteration
        torch.save(common, common_path)
    with open(os.path.join(run_dir, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iterations[-1]))


class LinearStack(nn.Module):
    """Transformer-shaped bf16 Linear layers (attention and MLP matrices; no compute needed)."""

    def __init__(self, hidden: int, layers: int):
        super().__init__()
        linear = lambda n_in, n_out: nn.Linear(n_in, n_out, bias=False, dtype=torch.bfloat16)
        self.layers = nn.ModuleList(nn.ModuleDict({
            "qkv": linear(hidden, 3 * hidden), "proj": linear(hidden, hidden),
            "fc1": linear(hidden, 4 * hidden), "fc2": linear(4 * hidden, hidden)}) for _ in range(layers))


def write_deepspeed(run_dir: str, num: int, bytes_per_checkpoint: float) -> None:
    import torch.distributed as dist
    from tests.deepspeed_real.engines import _deepspeed

    deepspeed = _deepspeed()
    deepspeed.utils.logger.setLevel(logging.WARNING)
    # One rank, no launcher: an in-memory store, no port to pick; DeepSpeed adopts the group but
    # asks for the variable a launcher sets.
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    os.environ.setdefault("LOCAL_RANK", "0")
    model = LinearStack(*transformer_shape(bytes_per_checkpoint))
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
              "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-4),
                                           config=config)
    tags = deepspeed_tags(num)
    engine.global_steps = int(tags[0][len("global_step"):])
    engine.save_checkpoint(run_dir, tag=tags[0])
    for tag in tags[1:]:
        shutil.copytree(os.path.join(run_dir, tags[0]), os.path.join(run_dir, tag))
    with open(os.path.join(run_dir, "latest"), "w") as f:  # DeepSpeed's tracker: the newest tag
        f.write(tags[-1])
    dist.destroy_process_group()


WRITERS = {"megatron-dist": write_megatron_dist, "deepspeed": write_deepspeed}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("format", choices=sorted(WRITERS))
    parser.add_argument("run_dir")
    parser.add_argument("num", type=int)
    parser.add_argument("bytes_per_checkpoint", type=float)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    WRITERS[args.format](args.run_dir, args.num, args.bytes_per_checkpoint)


if __name__ == "__main__":
    main()
