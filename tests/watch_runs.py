"""Runs that grow one checkpoint at a time, for the watcher's tests, in every format.

Each kind writes its checkpoints once into a "made" directory (with the generators the other
tests use: the synthetic Megatron run, DeepSpeed-shaped tag directories, a real FSDP2 run saved
with dcp.save, a real megatron-core GPTModel saved as torch_dist, Hugging Face save_pretrained
layouts) and then ``land``s them into a run directory the way the trainer would: every file but
the commit marker first, the marker last (then the tracker, where the format has one).
``tensors`` reads the float tensors of a checkpoint (source or merged) for the float64 reference.
"""
import os
import pickle
import shutil
import warnings
from typing import Callable, Dict, List, Sequence

import torch

from .conftest import REPO, run_python
from .helpers import trusted_load, zero3_padding


def _torchrun(script: str, *args) -> None:
    run_python([os.path.join(REPO, script), *args], nproc=2, check=f"{script} on 2 ranks", timeout=600)


class Kind:
    """One format's made checkpoints and how to land and read them."""
    name: str
    markers: Sequence[str] = ()     # files copied last, in this order
    tracker: str = ""               # written after the markers: its content is ``tracker_text(name)``
    merged_prefixes: Sequence[str] = ("",)

    def __init__(self, made: str):
        self.made = made
        self.names: List[str] = []

    def iteration(self, name: str) -> int:
        return int("".join(c for c in name if c.isdigit()))

    def tracker_text(self, name: str) -> str:
        return str(self.iteration(name))

    def land(self, run: str, name: str, *, marker: bool = True) -> None:
        """Copy checkpoint ``name`` into ``run``: without its commit marker, or (again) with it."""
        src, dst = os.path.join(self.made, name), os.path.join(run, name)
        if not os.path.isdir(dst):
            for directory, _, files in os.walk(src):
                target = os.path.join(dst, os.path.relpath(directory, src))
                os.makedirs(target, exist_ok=True)
                for f in sorted(files):
                    if f not in self.markers:
                        shutil.copy2(os.path.join(directory, f), os.path.join(target, f))
        if not marker:
            return
        for f in self.markers:
            if os.path.exists(os.path.join(src, f)):
                shutil.copy2(os.path.join(src, f), os.path.join(dst, f))
        if self.tracker:
            with open(os.path.join(run, self.tracker + ".tmp"), "w") as f:
                f.write(self.tracker_text(name))
            os.replace(os.path.join(run, self.tracker + ".tmp"), os.path.join(run, self.tracker))

    def tensors(self, ckpt: str) -> Dict[str, torch.Tensor]:
        raise NotImplementedError


class Megatron(Kind):
    name = "megatron"
    tracker = "latest_checkpointed_iteration.txt"

    def make(self, iterations=(100, 200, 300, 400, 500, 600)):
        from pmm_dist.testing.synthetic import generate_run
        generate_run(self.made, iterations=list(iterations), tp=2, pp=1, ep=1, num_layers=2, hidden_size=16,
                     ffn_hidden_size=32, num_experts=0, vocab_size=32)
        self.names = [f"iter_{it:07d}" for it in iterations]
        return self

    def tensors(self, ckpt):
        found = {}
        for shard in sorted(os.listdir(ckpt)):
            state = trusted_load(os.path.join(ckpt, shard, "model_optim_rng.pt"))
            for key, value in state["model"].items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    found[f"{shard}/{key}"] = value
        return found


class DeepSpeed(Kind):
    name = "deepspeed"
    tracker = "latest"

    def make(self, steps=(10, 20, 30, 40, 50), stage=3):
        from .test_deepspeed_format import make_checkpoint
        for step in steps:
            make_checkpoint(self.made, step, stage=stage, dp=2, num_experts=2)
        self.names = [f"global_step{s}" for s in steps]
        return self

    def tracker_text(self, name):
        return name

    def tensors(self, ckpt):
        found = {}
        for name in sorted(os.listdir(ckpt)):
            state = trusted_load(os.path.join(ckpt, name))
            if name.endswith("model_states.pt"):
                tree = state.get("module", state) if "module" in state else state
                found.update({f"{name}:{k}": v for k, v in tree.items() if v.is_floating_point()})
            elif "fp32_flat_groups" in state.get("optimizer_state_dict", {}):
                # the parameters' elements; the padding (NaN in the sources, zeros merged) is left out
                shapes = trusted_load(os.path.join(ckpt, "zero_pp_rank_0_mp_rank_00_model_states.pt"))["param_shapes"]
                [flat] = state["optimizer_state_dict"]["fp32_flat_groups"]
                held = torch.ones(flat.numel(), dtype=torch.bool)
                held[zero3_padding(shapes, 2, int(name.split("_")[3]))] = False
                found[f"{name}:flat0"] = flat[held]
        return found


def _dcp_tensors(ckpt: str, keep: Callable[[str], bool]) -> Dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    with open(os.path.join(ckpt, ".metadata"), "rb") as f:
        metadata = pickle.load(f)  # test side: our own files
    state = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in metadata.state_dict_metadata.items()
             if hasattr(v, "size") and v.properties.dtype.is_floating_point and keep(k)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=dcp.FileSystemReader(ckpt))
    return state


class Dcp(Kind):
    """A real FSDP2 run on 2 gloo ranks (tests/dcp_real/dcp_train.py): chunked tensors."""
    name = "dcp"
    markers = (".metadata",)

    def make(self, steps=(2, 4, 6, 8, 10)):
        _torchrun("tests/dcp_real/dcp_train.py", "train", self.made, "--steps", ",".join(map(str, steps)))
        self.names = [f"step-{s}" for s in steps]
        return self

    def tensors(self, ckpt):
        return _dcp_tensors(ckpt, lambda k: k.startswith("model."))


class TorchDist(Kind):
    """A real megatron-core GPTModel at TP=2 (tests/dcp_real/gpt_dist.py) saved as torch_dist."""
    name = "megatron-dist"
    markers = ("metadata.json",)
    tracker = "latest_checkpointed_iteration.txt"

    def make(self, iterations=(2, 4, 6, 8)):
        _torchrun("tests/dcp_real/gpt_dist.py", "train", self.made, "--iterations", ",".join(map(str, iterations)))
        os.remove(os.path.join(self.made, self.tracker))
        self.names = [f"iter_{it:07d}" for it in iterations]
        return self

    def tensors(self, ckpt):
        return _dcp_tensors(ckpt, lambda k: not k.startswith("optimizer."))


class HuggingFace(Kind):
    """save_pretrained layouts, sharded differently from one checkpoint to the next."""
    name = "hf"
    markers = ("model.safetensors.index.json", "model.safetensors")

    def make(self, steps=(10, 20, 30, 40, 50)):
        from . import hf_models
        hf_models.make_run(self.made, list(steps), num_shards=[1, 2, 1, 3, 2], extras=True)
        self.names = [f"step_{s}" for s in steps]
        return self

    def tensors(self, ckpt):
        from .hf_models import load_model_dir
        return {k: v for k, v in load_model_dir(ckpt).items() if v.is_floating_point()}


KINDS = {cls.name: cls for cls in (Megatron, DeepSpeed, Dcp, TorchDist, HuggingFace)}


def make_kind(name: str, made: str) -> Kind:
    return KINDS[name](made).make()
