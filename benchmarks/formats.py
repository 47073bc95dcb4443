"""The formats that ``python -m benchmarks.run`` measures side by side: one entry each.

An entry says how to write a run of N checkpoints of about a given size in that format and
what pmm_dist is given; run.py measures every entry the same way (its own read + write
roofline on its own files, then ``pmm-dist merge`` at 1 rank, warm page cache), so adding a
format is adding an entry. A format without a generator here yet is listed in ``NOT_YET`` with
what one needs, and reported as not measured.
"""
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

GB = 1e9
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class FormatCase:
    name: str                                   # pmm-dist --format
    description: str
    make: Callable[[str, int, float], List[str]]  # (run directory, N, bytes per checkpoint) -> sources
    files: Callable[[str], List[str]]           # every input file of one checkpoint directory
    merge_args: Sequence[str] = field(default=())
    # the files of one checkpoint that the merge writes again (the roofline's output bytes); default: ``files``
    outputs: Optional[Callable[[str], List[str]]] = None

    def output_files(self, checkpoint_dir: str) -> List[str]:
        return (self.outputs or self.files)(checkpoint_dir)


def _all_files(directory: str) -> List[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs)


def _copies(run_dir: str, names: Sequence[str], make_first: Callable[[str], None]) -> None:
    """The first checkpoint written, the others copies of it (the arithmetic does not depend on
    the values, and copying is fast)."""
    first = os.path.join(run_dir, names[0])
    make_first(first)
    for name in names[1:]:
        shutil.copytree(first, os.path.join(run_dir, name))


def transformer_shape(bytes_per_checkpoint: float) -> tuple:
    """(hidden, layers) of a transformer whose bf16 layers (12 hidden^2 parameters each) add up
    to about that many bytes."""
    hidden = 2048 if bytes_per_checkpoint >= 0.5 * GB else 512
    per_layer = 2 * 12 * hidden * hidden
    return hidden, max(1, round(bytes_per_checkpoint / per_layer))


def _weights(bytes_per_checkpoint: float, seed: int = 0) -> dict:
    """A transformer-shaped state dict of bf16 matrices (and fp32 norms) of about that size."""
    hidden, layers = transformer_shape(bytes_per_checkpoint)
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


# Megatron-LM's and DeepSpeed's own names: iter_0001000/ and global_step1000/.
def megatron_dist_names(num: int) -> List[str]:
    return [f"iter_{1000 * (i + 1):07d}" for i in range(num)]


def deepspeed_tags(num: int) -> List[str]:
    return [f"global_step{1000 * (i + 1)}" for i in range(num)]


def _framework_written(fmt: str, run_dir: str, num: int, bytes_per_checkpoint: float, names: Sequence[str],
                       marker: str, tracker: str) -> List[str]:
    """A run written by the framework itself, in a process of its own (benchmarks/formats_gen.py:
    megatron-core spawns processes, both set up a process group); cached like the others: the
    tracker is written last, so a run that has it and every checkpoint's marker is complete."""
    complete = os.path.isfile(os.path.join(run_dir, tracker)) and \
        all(os.path.isfile(os.path.join(run_dir, n, marker)) for n in names)
    if not complete:
        shutil.rmtree(run_dir, ignore_errors=True)
        proc = subprocess.run([sys.executable, "-m", "benchmarks.formats_gen", fmt, run_dir, str(num),
                               str(bytes_per_checkpoint)], capture_output=True, text=True, cwd=REPO,
                              env=dict(os.environ, PYTHONPATH=REPO))
        if proc.returncode != 0:
            raise RuntimeError(f"writing the {fmt} run failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return [run_dir]


def make_megatron_dist(run_dir: str, num: int, bytes_per_checkpoint: float) -> List[str]:
    return _framework_written("megatron-dist", run_dir, num, bytes_per_checkpoint, megatron_dist_names(num),
                              "metadata.json", "latest_checkpointed_iteration.txt")


def make_deepspeed(run_dir: str, num: int, bytes_per_checkpoint: float) -> List[str]:
    return _framework_written("deepspeed", run_dir, num, bytes_per_checkpoint, deepspeed_tags(num),
                              "mp_rank_00_model_states.pt", "latest")


CASES = {case.name: case for case in (
    FormatCase("megatron", "Megatron-LM legacy (TP=2, PP=2, bf16)", make_megatron,
               lambda d: [f for f in _all_files(d) if f.endswith(".pt")]),
    FormatCase("hf", "Hugging Face safetensors (2 shards + index)", make_hf, _all_files),
    FormatCase("dcp", "PyTorch DCP (one process's torch.distributed.checkpoint.save)", make_dcp, _all_files),
    FormatCase("megatron-dist", "Megatron-core torch_dist (GPTModel, TP=1, bf16, dist_checkpointing.save)",
               make_megatron_dist, _all_files),
    # The weights-only merge of ZeRO-1/2 cuts the module from the fp32 masters in the optimizer
    # files and writes the model states: it reads the masters (the model states' tensors, mapped,
    # are not touched). benchmarks/formats_gen.py says why these files hold no Adam moments.
    FormatCase("deepspeed", "DeepSpeed ZeRO-2 bf16 engine.save_checkpoint (fp32 masters in, bf16 model states out)",
               make_deepspeed, lambda d: [f for f in _all_files(d) if f.endswith("optim_states.pt")],
               outputs=lambda d: [f for f in _all_files(d) if f.endswith("model_states.pt")]),
)}

NOT_YET: dict = {}
