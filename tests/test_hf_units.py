"""Pure pieces of the Hugging Face format: shard binning, the step-number rule, the safetensors
header reader and streaming writer, and the memory-mapping check."""
import errno
import os
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

import pmm_dist
from pmm_dist.errors import MergeError
from pmm_dist.io import output_file
from pmm_dist.plan.types import CheckpointRef
from pmm_dist.formats.common import number_in_name as iteration_from_name
from pmm_dist.formats.hf import HuggingFaceFormat, bin_tensors, shard_name
from pmm_dist.io.safetensors import MappedFiles, encode_header, read_header, tensor_bytes

from .hf_models import load_model_dir, make_run


@pytest.mark.parametrize("name, expected", [
    ("step_1000", 1000), ("step1000", 1000), ("global_step1000", 1000), ("step-0042", 42),
    ("stage1-step140000-tokens294B", 140000), ("checkpoint-2000", 2000), ("iter_0001000", 1000),
    ("ckpt1000", 1000), ("Step_7", 7), ("final", None), ("latest", None), ("model_v2a", None),
])
def test_iteration_from_name(name, expected):
    assert iteration_from_name(name) == expected


def test_shard_names_follow_transformers():
    assert shard_name(0, 1) == "model-00001-of-00001.safetensors"
    assert [shard_name(i, 3) for i in range(3)] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


@pytest.mark.parametrize("seed", range(20))
def test_bin_tensors_contiguous_bounded_and_enough_groups(seed):
    rng = random.Random(seed)
    sizes = [(f"t{i}", rng.choice([0, 1, 10, 1000, rng.randint(1, 5000)])) for i in range(rng.randint(1, 300))]
    max_bytes = rng.choice([1, 100, 5000, 10**6, 10**12])
    min_shards = rng.choice([1, 2, 7, 64, 4096])
    groups = bin_tensors(sizes, max_bytes, min_shards)
    size_of = dict(sizes)
    assert [n for g in groups for n in g] == [n for n, _ in sizes]  # every tensor once, order kept
    assert all(groups)
    assert len(groups) >= min(min_shards, len(sizes))
    for group in groups:
        assert sum(size_of[n] for n in group) <= max_bytes or len(group) == 1


def test_bin_tensors_balances_equal_tensors():
    sizes = [(f"t{i}", 100) for i in range(64)]
    assert [len(g) for g in bin_tensors(sizes, 10**9, 8)] == [8] * 8
    # The max size binds: ceil(6400 / 1000) = 7 groups, as even as the tensors allow.
    assert [len(g) for g in bin_tensors(sizes, 1000, 1)] == [9, 9, 9, 10, 9, 9, 9]
    huge = [("embed", 10**6)] + sizes  # one huge tensor: a group of its own, the rest still split
    assert [len(g) for g in bin_tensors(huge, 10**9, 4)] == [1, 16, 16, 32]
    assert bin_tensors([], 10, 4) == []


def test_streamed_file_is_byte_identical_to_safetensors_save():
    tensors = {
        "b.weight": torch.randn(3, 5).to(torch.bfloat16), "a.weight": torch.randn(4, 2), "f16": torch.randn(7).half(),
        "ids": torch.arange(5), "mask": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3), "i32": torch.arange(3, dtype=torch.int32), "u8": torch.arange(9, dtype=torch.uint8),
        "f64": torch.randn(2, dtype=torch.float64), "ünïcode.wéight": torch.randn(2),
    }
    names = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16", torch.int64: "I64",
             torch.bool: "BOOL", torch.int32: "I32", torch.uint8: "U8", torch.float64: "F64"}
    for metadata in ({"format": "pt"}, None):
        header, order = encode_header([(n, names[t.dtype], tuple(t.shape)) for n, t in tensors.items()], metadata)
        streamed = header + b"".join(bytes(tensor_bytes(tensors[name])) for name, _ in order)
        assert streamed == save(tensors, metadata=metadata)
        assert [n for n, _ in order][:2] == ["ids", "f64"]  # 8-byte dtypes first, as the library does


def test_read_header_of_a_library_file(tmp_path):
    path = str(tmp_path / "x.safetensors")
    save_file({"w": torch.zeros(2, 3, dtype=torch.bfloat16), "n": torch.zeros(4)}, path, metadata={"format": "pt"})
    header = read_header(path)
    assert header.metadata == {"format": "pt"}
    assert list(header.tensors) == ["n", "w"]  # storage order: F32 before BF16
    assert header.tensors["w"].dtype == "BF16" and header.tensors["w"].shape == (2, 3)
    assert header.tensors["w"].num_bytes == 12 and header.tensors["n"].begin == 0
    assert header.data_start + header.tensors["w"].end == os.path.getsize(path)


def test_mapped_check_tells_views_from_copies(tmp_path):
    path = str(tmp_path / "x.safetensors")
    save_file({"w": torch.randn(512, 1024), "e": torch.zeros(0)}, path)
    mapped = MappedFiles()
    with safe_open(path, framework="pt") as f:
        view = f.get_tensor("w")
        assert MappedFiles().is_mapped(path, view.clone()) is False  # anonymous memory: never drop its pages
        assert mapped.is_mapped(path, view) is True
        assert mapped.is_mapped(path, f.get_tensor("e")) is True
    assert MappedFiles().is_mapped(str(tmp_path / "other"), view) is False


def test_plan_at_large_world_size_gives_every_tensor_its_own_shard(tmp_path):
    dirs = make_run(str(tmp_path / "run"), [1, 2], num_shards=[1, 3])
    fmt = HuggingFaceFormat()
    refs = [CheckpointRef(i + 1, d) for i, d in enumerate(dirs)]
    units = fmt.plan_units(refs, "drop", 4096)
    assert len(units) == 21 and all(len(u.items) == 1 for u in units)
    assert [u.relpath for u in units] == [f"model-{i:05d}-of-00021.safetensors" for i in range(1, 22)]
    units = HuggingFaceFormat(max_shard_bytes=50_000).plan_units(refs, "drop", 1)
    total = sum(t.numel() * t.element_size() for t in load_model_dir(dirs[-1]).values())
    assert len(units) >= 4 and sum(u.num_bytes for u in units) == total
    assert all(u.num_bytes <= 50_000 for u in units)
    assert fmt.layout(refs) == {"tensors": 21, "files": 3, "dtypes": "BF16:16/F32:5"}


def test_a_write_failing_behind_the_merge_fails_the_merge_and_leaves_nothing(tmp_path, monkeypatch):
    """Tensors are written behind the next one's merge: a write that fails there (disk full)
    still fails the merge with the file's name, and nothing is committed or left half-written."""
    make_run(str(tmp_path / "run"), [1, 2, 3])
    written = {"bytes": 0}
    real_write = output_file.OutputFile.write

    def write(self, data):
        written["bytes"] += len(data)
        if written["bytes"] > 40_000:  # past the header and the first tensors
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)
    monkeypatch.setattr(output_file.OutputFile, "write", write)
    out = tmp_path / "out"
    with pytest.raises(MergeError, match=r"model-00001-of-00001\.safetensors: cannot write \(No space left on device\)"):
        pmm_dist.merge(sources=[str(tmp_path / "run")], out=str(out), format="hf", device="cpu", quiet=True)
    assert written["bytes"] > 40_000
    leftovers = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files if f.endswith(".safetensors")
                 or ".tmp." in f] if out.exists() else []
    assert not leftovers and not (out / "model.safetensors.index.json").exists()
