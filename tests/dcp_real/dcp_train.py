"""A plain PyTorch DCP run for tests/test_dcp_merge.py: FSDP2 (fully_shard) on CPU/gloo, 2 ranks.

  train RUN --steps 10,20,30 [--resume CKPT] [--vocab V --ffn F]
      Trains a tiny MLP (fp32 and bf16 parameters, an integer buffer) with AdamW, sharded over
      the launched ranks with ``fully_shard``, and at each listed step saves
      {"model", "optimizer" (torch.distributed.checkpoint.state_dict), "lr_scheduler" (bytes),
      "train_state" (bytes)} with ``torch.distributed.checkpoint.save`` into RUN/step-{N}/.
      ``--resume CKPT`` first loads model, optimizer and scheduler from CKPT (saved at any world
      size: DCP reshards) and continues after its step, as a job resumed on other ranks does.
      ``--vocab``/``--ffn`` not divisible by the world size give uneven shards.

  load CKPT DUMP [CKPT DUMP ...] [--vocab V --ffn F]
      For each pair: builds the same model (another seed), sharded over the launched ranks,
      loads the model part of CKPT with ``torch.distributed.checkpoint.load`` (resharding as
      needed), and writes the full (gathered) parameters and buffers plus the loaded
      train_state to DUMP (rank 0).

  resume CKPT DUMP [CKPT DUMP ...] [--vocab V --ffn F]
      For each pair: builds the model (another seed) with AdamW and its scheduler, sharded over
      the launched ranks, loads model, optimizer, scheduler and train_state from CKPT with
      ``dcp.load`` and ``set_state_dict`` (a full resume), and runs one training step. DUMP
      (rank 0): the optimizer state right after the load (full tensors, by parameter FQN), the
      loss of the step, the optimizer's step counters after it and the scheduler's last_epoch.
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor


class TinyNet(nn.Module):
    def __init__(self, vocab=64, ffn=48):
        super().__init__()
        self.embed = nn.Embedding(vocab, 32)
        self.fc1 = nn.Linear(32, ffn)
        self.fc2 = nn.Linear(ffn, 32).to(torch.bfloat16)
        self.head = nn.Linear(32, vocab, bias=False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))

    def forward(self, tokens):
        hidden = torch.relu(self.fc1(self.embed(tokens)))
        hidden = self.fc2(hidden.to(torch.bfloat16)).float()
        return self.head(hidden)


def build(seed, opts):
    torch.manual_seed(seed)
    model = TinyNet(opts.vocab, opts.ffn)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for module in (model.fc1, model.fc2, model.head):
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full(value):
    return value.full_tensor() if isinstance(value, DTensor) else value


def cmd_train(opts):
    steps = sorted(int(s) for s in opts.steps.split(","))
    model = build(seed=0, opts=opts)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
    generator = torch.Generator().manual_seed(4321)
    first = 1
    if opts.resume:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd, "lr_scheduler": scheduler.state_dict(),
                 "train_state": {"step": -1, "tag": ""}}
        dcp.load(state, checkpoint_id=opts.resume)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        scheduler.load_state_dict(state["lr_scheduler"])
        first = state["train_state"]["step"] + 1
    vocab = opts.vocab
    for step in range(1, steps[-1] + 1):
        tokens = torch.randint(0, vocab, (8, 12), generator=generator)  # the same stream when resumed
        if step < first:
            continue
        loss = nn.functional.cross_entropy(model(tokens[:, :-1]).reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        model.num_updates += 1
        if step in steps:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optimizer": optim_sd, "lr_scheduler": scheduler.state_dict(),
                     "train_state": {"step": step, "tag": f"step-{step}"}}
            dcp.save(state, checkpoint_id=os.path.join(opts.run, f"step-{step}"))
            if dist.get_rank() == 0:
                print(f"step {step}: loss {loss.item():.4f}, saved at world size {dist.get_world_size()}", flush=True)


def cmd_load(opts):
    if len(opts.pairs) % 2:
        raise SystemExit("load: give CKPT DUMP pairs")
    for ckpt, dump in zip(opts.pairs[::2], opts.pairs[1::2]):
        model = build(seed=99, opts=opts)
        state = {"model": get_model_state_dict(model), "train_state": {"step": -1, "tag": ""}}
        dcp.load(state, checkpoint_id=ckpt)
        set_model_state_dict(model, state["model"])
        tensors = {name: full(value).detach().clone() for name, value in model.state_dict().items()}
        if dist.get_rank() == 0:
            torch.save({"tensors": tensors, "train_state": state["train_state"]}, dump)


def cmd_resume(opts):
    if len(opts.pairs) % 2:
        raise SystemExit("resume: give CKPT DUMP pairs")
    for ckpt, dump in zip(opts.pairs[::2], opts.pairs[1::2]):
        model = build(seed=99, opts=opts)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd, "lr_scheduler": scheduler.state_dict(),
                 "train_state": {"step": -1, "tag": ""}}
        dcp.load(state, checkpoint_id=ckpt)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        scheduler.load_state_dict(state["lr_scheduler"])
        _, loaded = get_state_dict(model, optimizer)
        moments = {fqn: {name: full(value).detach().clone() for name, value in entries.items()}
                   for fqn, entries in loaded["state"].items()}
        tokens = torch.randint(0, opts.vocab, (8, 12), generator=torch.Generator().manual_seed(7))
        loss = nn.functional.cross_entropy(model(tokens[:, :-1]).reshape(-1, opts.vocab), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        _, stepped = get_state_dict(model, optimizer)
        steps = {fqn: float(full(entries["step"])) for fqn, entries in stepped["state"].items()}
        if dist.get_rank() == 0:
            torch.save({"loaded": moments, "loss": loss.item(), "steps_after": steps,
                        "last_epoch": scheduler.last_epoch, "train_state": state["train_state"]}, dump)


def main(argv=None):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train")
    p.add_argument("run")
    p.add_argument("--steps", default="10,20,30")
    p.add_argument("--resume")
    p = sub.add_parser("load")
    p.add_argument("pairs", nargs="+", metavar="CKPT DUMP")
    p = sub.add_parser("resume")
    p.add_argument("pairs", nargs="+", metavar="CKPT DUMP")
    for p in sub.choices.values():
        p.add_argument("--vocab", type=int, default=64)
        p.add_argument("--ffn", type=int, default=48)
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    {"train": cmd_train, "load": cmd_load, "resume": cmd_resume}[opts.cmd](opts)
    dist.barrier()  # no rank tears gloo down while another still has a collective in flight
    dist.destroy_process_group()
    # About one run in 15 aborted here at interpreter exit ("terminate called without an active
    # exception": a C++ thread of the FSDP2/gloo stack still joinable during static destruction),
    # after all work was done. Everything is written and closed by now: skip that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
