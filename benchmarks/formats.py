"""The formats that ``python -m benchmarks.run`` measures side by side: one entry each.

An entry says how to write a run of N checkpoints of about a given size in that format and
what pmm_dist is given; run.py measures every entry the same way (its own read + write
roofline on its own files, then ``pmm-dist merge`` at 1 rank, warm page cache), so adding a
format is adding an entry. A format without a generator here yet is listed in ``NOT_YET`` with
what one needs, and reported as not measured.
"""
import os
import shutil
from dataclasses import dataclass, field
from typing import Callable, List, Sequence

import torch

GB = 1e9


@dataclass(frozen=True)
class FormatCase:
    name: str                                   # pmm-dist --format
    description: str
    make: Callable[[str, int, float], List[str]]  # (run directory, N, bytes per checkpoint) -> sources
    files: Callable[[str], List[str]]           # every input file of one checkpoint directory
    merge_args: Sequence[str] = field(default=())


def _all_files(directory: str) -> List[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs)


def _copies(run_dir: str, names: Sequence[str], make_first: Callable[[str], None]) -> None:
    """The first checkpoint written, the others copies of it (the arithmetic does not depend on
    the values, and copying is fast)."""
    first = os.path.join(run_dir, names[0])
    make_first(first)
    for name in names[1:]:
        shutil.copytree(first, os.path.join(run_dir, name))


def _weights(bytes_per_checkpoint: float, seed: int = 0) -> dict:
    """A transformer-shaped state dict of bf16 matrices (and fp32 norms) of about that size."""
    hidden = 2048 if bytes_per_checkpoint >= 0.5 * GB else 512
    per_layer = 2 * 12 * hidden * hidden
    layers = max(1, round(bytes_per_checkpoint / per_layer))
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(layers):
        p = f"layers.{i}."
        state[p + "attn.qkv.weight"] = torch.randn(3 * hidden, hidden, generator=gen).bfloat16()
        state[p + "attn.proj.weight"] = torch.randn(hidden, hidden, generator=gen).bfloat16()
        state[p + "mlp.fc1.weight"] = torch.randn(4 * hidden, hidden, generator=gen).bfloat16()
        state[p + "mlp.fc2.weight"] = torch.randn(hidden, 4 * hidden, generator=gen).bfloat16()
        state[p + "norm.weight"] = torch.ones(hidden)
    return state


def make_megatron(run_dir: str, num: int, bytes_per_checkpoint: float) -> List[str]:
    from benchmarks.run import make_run
    make_run(run_dir, num, bytes_per_checkpoint)
    return [run_dir]


def make_hf(run_dir: str, num: int, bytes_per_checkpoint: float) -> List[str]:
    from tests.hf_models import llama_config, save_checkpoint
    names = [f"checkpoint-{1000 * (i + 1)}" for i in range(num)]
    if not all(os.path.isfile(os.path.join(run_dir, n, "config.json")) for n in names):
        shutil.rmtree(run_dir, ignore_errors=True)
        _copies(run_dir, names, lambda d: save_checkpoint(d, _weights(bytes_per_checkpoint), llama_config(),
                                                           num_shards=2))
    return [os.path.join(run_dir, n) for n in names]


def make_dcp(run_dir: str, num: int, bytes_per_checkpoint: float) -> List[str]:
    import torch.distributed.checkpoint as dcp
    names = [f"step-{100 * (i + 1)}" for i in range(num)]
    if not all(os.path.isfile(os.path.join(run_dir, n, ".metadata")) for n in names):
        shutil.rmtree(run_dir, ignore_errors=True)
        _copies(run_dir, names, lambda d: dcp.save({"model": _weights(bytes_per_checkpoint)}, checkpoint_id=d))
    return [run_dir]


CASES = {case.name: case for case in (
    FormatCase("megatron", "Megatron-LM legacy (TP=2, PP=2, bf16)", make_megatron,
               lambda d: [f for f in _all_files(d) if f.endswith(".pt")]),
    FormatCase("hf", "Hugging Face safetensors (2 shards + index)", make_hf, _all_files),
    FormatCase("dcp", "PyTorch DCP (one process's torch.distributed.checkpoint.save)", make_dcp, _all_files),
)}

NOT_YET = {
    "megatron-dist": "torch_dist checkpoints are written by megatron-core's dist_checkpointing in a torchrun "
                     "world (tests/megatron_real/ has the harness); no generator here yet",
    "deepspeed": "written by a DeepSpeed engine (tests/deepspeed_real/ has the harness); no generator here yet",
}
