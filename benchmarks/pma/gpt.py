"""A tiny byte-level megatron-core GPTModel trained on CPU, saved in Megatron-LM's legacy layout.

Everything the PMA experiment and its smoke test need from a training framework:
- ``load_corpus``: the Python standard library's own ``.py`` files, byte-level, split into
  train / held-out by file (a file goes to held-out when crc32 of its relative path % 10 == 0);
- ``setup_megatron`` + ``build_model``: megatron-core ``GPTModel`` at TP=1 on a one-process gloo group;
- ``Trainer``: AdamW steps on deterministic batches (batch of step ``s`` depends only on the seed and
  ``s``, so a branch forked at step ``s`` sees the same data as the main run would have);
- ``save_checkpoint``: ``RUN/iter_{it:07d}/mp_rank_00/model_optim_rng.pt`` with the keys Megatron-LM's
  ``save_checkpoint`` (``--ckpt-format torch``) writes, then ``RUN/latest_checkpointed_iteration.txt`` last;
- ``held_out_loss``: mean next-byte cross-entropy (nats) on fixed held-out windows.

Import this module only under an ``if __name__ == "__main__":`` guard (megatron-core spawns
processes on some paths) and call ``setup_megatron`` once per process.
"""
import argparse
import dataclasses
import os
import random
import socket
import zlib

import numpy as np
import torch
import torch.distributed as dist

# megatron-core on CPU: these CUDA calls are made on the save / rng paths.
torch.cuda.synchronize = lambda *a, **k: None
torch.cuda.current_device = lambda: "cpu"

VOCAB = 256  # bytes


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the model and of one training step."""
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    ffn_hidden_size: int = 512
    seq_length: int = 128
    micro_batch_size: int = 16

    def tokens_per_step(self) -> int:
        return self.seq_length * self.micro_batch_size


# ----------------------------------------------------------------------------- corpus

def load_corpus(max_train_bytes: int = 64 << 20):
    """(train, held_out) uint8 tensors from the stdlib's .py files (site-packages excluded)."""
    root = os.path.dirname(os.__file__)
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in sorted(filenames):
            if name.endswith(".py"):
                files.append(os.path.join(dirpath, name))
    train, held = [], []
    num_train = 0
    for path in files:
        rel = os.path.relpath(path, root)
        with open(path, "rb") as f:
            data = f.read()
        if zlib.crc32(rel.encode()) % 10 == 0:
            held.append(data)
        elif num_train < max_train_bytes:
            train.append(data)
            num_train += len(data)
    join = lambda parts: torch.frombuffer(bytearray(b"\n".join(parts)), dtype=torch.uint8).clone()
    return join(train), join(held)


def held_out_windows(held: torch.Tensor, cfg: ModelConfig, num_windows: int) -> torch.Tensor:
    """num_windows fixed, evenly spaced windows of seq_length + 1 bytes."""
    span = cfg.seq_length + 1
    starts = torch.linspace(0, len(held) - span - 1, num_windows).long()
    return torch.stack([held[s:s + span] for s in starts.tolist()]).long()


def train_batch(train: torch.Tensor, cfg: ModelConfig, seed: int, step: int) -> torch.Tensor:
    """The batch of step ``step``: a function of (seed, step) only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    span = cfg.seq_length + 1
    starts = torch.randint(0, len(train) - span, (cfg.micro_batch_size,), generator=g)
    return torch.stack([train[s:s + span] for s in starts.tolist()]).long()


# ----------------------------------------------------------------------------- megatron-core

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_megatron(num_threads: int = 2) -> None:
    """One-process gloo group and TP=PP=1 model parallel state."""
    from megatron.core import parallel_state

    torch.set_num_threads(num_threads)
    if not dist.is_initialized():
        # a port of its own: worker processes inherit the parent's environment
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)


def seed_everything(seed: int) -> None:
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)


def build_model(cfg: ModelConfig, seed: int, dtype: torch.dtype = torch.float32):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    seed_everything(seed)
    config = TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=True,
        perform_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=VOCAB,
        max_sequence_length=cfg.seq_length,
        pre_process=True,
        post_process=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    )


_MASKS = {}


def _forward(model, tokens: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean next-byte loss, shape [batch]."""
    b, span = tokens.shape
    seq = span - 1
    if seq not in _MASKS:
        _MASKS[seq] = (torch.arange(seq).unsqueeze(0),
                       torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1))  # True = masked
    pos, mask = _MASKS[seq]
    loss = model(tokens[:, :-1].contiguous(), pos.expand(b, seq).contiguous(), mask,
                 labels=tokens[:, 1:].contiguous())
    return loss.float().mean(dim=1)


@torch.no_grad()
def held_out_loss(model, windows: torch.Tensor, batch: int = 64) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(windows), batch):
        total += _forward(model, windows[i:i + batch]).sum().item()
    model.train()
    return total / len(windows)


# ----------------------------------------------------------------------------- schedule

@dataclasses.dataclass(frozen=True)
class WSD:
    """Warmup-Stable-Decay: linear warmup to peak, constant, and (for a branch) a linear decay."""
    peak_lr: float
    warmup_steps: int
    decay_start: int = -1      # step at which the decay branch forks (-1: never decays)
    decay_steps: int = 0
    min_lr_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step <= self.warmup_steps:
            return self.peak_lr * step / max(1, self.warmup_steps)
        if self.decay_start < 0 or step <= self.decay_start:
            return self.peak_lr
        frac = min(1.0, (step - self.decay_start) / max(1, self.decay_steps))
        return self.peak_lr * (1.0 - (1.0 - self.min_lr_ratio) * frac)


def make_optimizer(model, lr: float):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8)


class Trainer:
    """AdamW on deterministic batches; ``step(s, lr)`` runs training step s (1-based)."""

    def __init__(self, model, train: torch.Tensor, cfg: ModelConfig, seed: int, optimizer=None,
                 clip_grad: float = 1.0):
        self.model = model
        self.train = train
        self.cfg = cfg
        self.seed = seed
        self.optimizer = optimizer or make_optimizer(model, 0.0)
        self.clip_grad = clip_grad
        self.flops = 0.0
        self.num_params = sum(p.numel() for p in model.parameters())

    def step(self, step: int, lr: float):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        tokens = train_batch(self.train, self.cfg, self.seed, step)
        self.optimizer.zero_grad(set_to_none=True)
        loss = _forward(self.model, tokens).mean()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad).item()
        self.optimizer.step()
        self.flops += 6.0 * tokens.numel() * self.num_params
        return loss.item(), grad_norm


# ----------------------------------------------------------------------------- Megatron-LM legacy checkpoints

def megatron_args(cfg: ModelConfig, iteration: int, schedule: WSD, save_dir: str) -> argparse.Namespace:
    """A subset of Megatron-LM's saved args (what a loader and pmm_dist read)."""
    return argparse.Namespace(
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        expert_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None,
        context_parallel_size=1,
        data_parallel_size=1,
        world_size=1,
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        seq_length=cfg.seq_length,
        max_position_embeddings=cfg.seq_length,
        padded_vocab_size=VOCAB,
        position_embedding_type="rope",
        untie_embeddings_and_output_weights=True,
        bf16=False,
        fp16=False,
        params_dtype=torch.float32,
        micro_batch_size=cfg.micro_batch_size,
        global_batch_size=cfg.micro_batch_size,
        lr=schedule.peak_lr,
        min_lr=schedule.peak_lr * schedule.min_lr_ratio,
        lr_warmup_iters=schedule.warmup_steps,
        lr_decay_style="WSD",
        optimizer="adam",
        weight_decay=0.1,
        adam_beta1=0.9,
        adam_beta2=0.95,
        clip_grad=1.0,
        use_distributed_optimizer=False,
        ckpt_format="torch",
        iteration=iteration,
        save=save_dir,
        load=None,
    )


def _rng_state():
    from megatron.core import tensor_parallel

    state = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state()}
    try:
        state["rng_tracker_states"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    except Exception:  # pragma: no cover - tracker without CPU state support
        pass
    return [state]


def checkpoint_path(run_dir: str, iteration: int) -> str:
    return os.path.join(run_dir, f"iter_{iteration:07d}", "mp_rank_00", "model_optim_rng.pt")


def save_checkpoint(run_dir: str, iteration: int, trainer: Trainer, cfg: ModelConfig, schedule: WSD) -> None:
    """As Megatron-LM's save_checkpoint with --ckpt-format torch, TP=PP=1: shard file, then tracker."""
    state = {
        "args": megatron_args(cfg, iteration, schedule, run_dir),
        "checkpoint_version": 3.0,
        "iteration": iteration,
        "model": trainer.model.state_dict_for_save_checkpoint(),
        "optimizer": trainer.optimizer.state_dict(),
        "opt_param_scheduler": {"max_lr": schedule.peak_lr, "min_lr": schedule.peak_lr * schedule.min_lr_ratio,
                                "lr_warmup_steps": schedule.warmup_steps * cfg.micro_batch_size,
                                "num_steps": iteration * cfg.micro_batch_size,
                                "lr_decay_style": "WSD", "wsd_decay_steps": schedule.decay_steps},
        "rng_state": _rng_state(),
        "num_floating_point_operations_so_far": trainer.flops,
    }
    path = checkpoint_path(run_dir, iteration)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    tracker = os.path.join(run_dir, "latest_checkpointed_iteration.txt")
    with open(tracker + ".tmp", "w") as f:
        f.write(str(iteration))
    os.replace(tracker + ".tmp", tracker)


def load_checkpoint(path: str) -> dict:
    """A legacy checkpoint file (trusted: this benchmark wrote it, or pmm_dist did)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def load_weights(model, path: str) -> dict:
    state = load_checkpoint(path)
    model.load_state_dict(state["model"], strict=True)
    return state


