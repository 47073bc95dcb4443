"""Hugging Face inputs that must be refused, each with a message naming checkpoint (file) and key,
before anything is written."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

import pmm_dist
from pmm_dist.errors import MergeError

from .conftest import run_cli
from .hf_models import make_run

STEPS = [10, 20, 30]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("pristine") / "run")
    make_run(run, STEPS, num_shards=[2, 2, 2])
    return run


@pytest.fixture
def run(pristine, fresh_copy):
    """A fresh copy of a valid sharded run, to be damaged by one test."""
    return fresh_copy(pristine)


def merge_error(sources, tmp_path, **kwargs) -> str:
    out = str(tmp_path / "out")
    with pytest.raises(MergeError) as info:
        pmm_dist.merge(sources=sources, out=out, device="cpu", quiet=True, **kwargs)
    assert not os.path.exists(out) or os.listdir(out) == [], "nothing may be written for bad input"
    return str(info.value)


def rewrite(ckpt: str, change) -> None:
    """Load the checkpoint's tensors, let ``change`` edit the dict, save it single-file."""
    state = {}
    for entry in os.listdir(ckpt):
        if entry.endswith(".safetensors"):
            from safetensors.torch import load_file
            state.update(load_file(os.path.join(ckpt, entry)))
            os.remove(os.path.join(ckpt, entry))
    if os.path.exists(os.path.join(ckpt, "model.safetensors.index.json")):
        os.remove(os.path.join(ckpt, "model.safetensors.index.json"))
    change(state)
    save_file(state, os.path.join(ckpt, "model.safetensors"), metadata={"format": "pt"})


def test_shape_mismatch_names_checkpoint_and_key(run, tmp_path):
    key = "model.layers.1.mlp.up_proj.weight"
    rewrite(os.path.join(run, "step_10"), lambda s: s.__setitem__(key, s[key][:-1].clone()))
    message = merge_error([run], tmp_path)
    assert f"{run}/step_10/model.safetensors: tensor '{key}' has shape [127, 64], the newest checkpoint has " \
           f"[128, 64] ({run}/step_30/model-0000" in message


def test_dtype_mismatch_names_checkpoint_and_key(run, tmp_path):
    key = "model.norm.weight"
    rewrite(os.path.join(run, "step_20"), lambda s: s.__setitem__(key, s[key].to(torch.bfloat16)))
    message = merge_error([run], tmp_path)
    assert f"{run}/step_20/model.safetensors: tensor '{key}' has dtype BF16, the newest checkpoint has F32" in message


def test_missing_and_unexpected_tensors(run, tmp_path):
    def change(state):
        del state["lm_head.weight"]
        state["model.extra.weight"] = torch.zeros(2)
    rewrite(os.path.join(run, "step_10"), change)
    message = merge_error([run], tmp_path)
    assert "2 problems" in message
    assert f"{run}/step_10: tensor 'lm_head.weight' missing (present in the newest checkpoint {run}/step_30)" in message
    assert f"{run}/step_10: unexpected tensor 'model.extra.weight' (absent from the newest checkpoint" in message


def test_missing_shard_named_in_index(run, tmp_path):
    os.remove(os.path.join(run, "step_20", "model-00002-of-00002.safetensors"))
    message = merge_error([run], tmp_path)
    assert f"{run}/step_20/model-00002-of-00002.safetensors: missing shard (named in model.safetensors.index.json " \
           "for 10 tensors, e.g. 'model.layers.0.input_layernorm.weight')" in message


def test_index_that_is_not_json(run, tmp_path):
    index_path = os.path.join(run, "step_20", "model.safetensors.index.json")
    open(index_path, "w").write('{"weight_map": ')
    message = merge_error([run], tmp_path)
    assert f"{index_path}: not a valid index (expected a JSON object with a 'weight_map'" in message


def test_index_mapping_a_tensor_to_the_wrong_shard(run, tmp_path):
    index_path = os.path.join(run, "step_30", "model.safetensors.index.json")
    index = json.load(open(index_path))
    index["weight_map"]["lm_head.weight"] = "model-00002-of-00002.safetensors"
    json.dump(index, open(index_path, "w"))
    message = merge_error([run], tmp_path)
    assert f"{run}/step_30/model-00001-of-00002.safetensors: tensor 'lm_head.weight' is not mapped to this " \
           "file" in message
    assert f"{run}/step_30/model-00002-of-00002.safetensors: tensor 'lm_head.weight' missing (named in " in message


@pytest.mark.parametrize("damage, reason", [
    (lambda b: (10**12).to_bytes(8, "little") + b[8:], "header length 1000000000000 does not fit the file size"),
    (lambda b: b[:8] + b"[" + b[9:], "header is not JSON"),
    (lambda b: b[:-5], "the header describes 107008 data bytes, the file holds 107003 (truncated or trailing bytes)"),
    (lambda b: b[:5], "5 bytes, shorter than the 8-byte header length"),
])
def test_corrupt_file_names_the_file(run, tmp_path, damage, reason):
    path = os.path.join(run, "step_10", "model-00001-of-00002.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(damage(data))
    message = merge_error([run], tmp_path)
    assert f"{path}: not a valid safetensors file: {reason}" in message


def test_header_with_wrong_byte_count(run, tmp_path):
    path = os.path.join(run, "step_20", "model-00002-of-00002.safetensors")
    data = bytearray(open(path, "rb").read())
    text = data[8:8 + int.from_bytes(data[:8], "little")].decode()
    # Claim F16 where BF16 is stored: same size, so also change a shape to make the byte count wrong.
    data[8:8 + len(text)] = text.replace('"shape":[128,64]', '"shape":[128,65]', 1).encode()
    open(path, "wb").write(bytes(data))
    message = merge_error([run], tmp_path)
    assert f"{path}: not a valid safetensors file: tensor " in message and "needs" in message


def test_quantized_weights_are_refused(run, tmp_path):
    for step in STEPS:
        rewrite(os.path.join(run, f"step_{step}"),
                lambda s: s.__setitem__("model.norm.weight", s["model.norm.weight"].to(torch.float8_e4m3fn)))
    message = merge_error([run], tmp_path)
    assert f"{run}/step_30/model.safetensors: tensor 'model.norm.weight' has dtype F8_E4M3: quantized" in message


def test_directory_without_a_step_number(run, tmp_path):
    os.rename(os.path.join(run, "step_20"), os.path.join(run, "latest"))
    message = merge_error([os.path.join(run, "step_10"), os.path.join(run, "latest")], tmp_path)
    assert f"{run}/latest: cannot tell its iteration: the directory name has no step number" in message
    # ... unless the HF Trainer's trainer_state.json says it
    json.dump({"global_step": 20}, open(os.path.join(run, "latest", "trainer_state.json"), "w"))
    result = pmm_dist.merge(sources=[os.path.join(run, "step_10"), os.path.join(run, "latest")],
                            out=str(tmp_path / "out2"), dry_run=True, quiet=True)
    assert [c.iteration for c in result.plan.checkpoints] == [10, 20]


def test_two_directories_with_the_same_step(run, tmp_path):
    shutil.copytree(os.path.join(run, "step_20"), os.path.join(tmp_path, "checkpoint-20"))
    message = merge_error([os.path.join(run, "step_20"), os.path.join(tmp_path, "checkpoint-20")], tmp_path)
    assert "are both iteration 20" in message


def test_not_a_model_directory(tmp_path):
    os.makedirs(tmp_path / "step_5")
    torch.save({}, tmp_path / "step_5" / "pytorch_model.bin")
    message = merge_error([str(tmp_path / "step_5"), str(tmp_path / "step_5")], tmp_path, format="hf")
    assert f"{tmp_path}/step_5: not a Hugging Face model directory" in message and "pytorch_model.bin" in message


@pytest.mark.multiprocess  # the CLI in a subprocess
def test_cli_reports_the_problem_and_exits_1(run, tmp_path):
    key = "model.embed_tokens.weight"
    rewrite(os.path.join(run, "step_10"), lambda s: s.__setitem__(key, s[key].float()))
    out = str(tmp_path / "out")
    proc = run_cli(["merge", run, "--out", out, "--quiet"])
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("pmm-dist: error: ")
    assert f"step_10/model.safetensors: tensor '{key}' has dtype F32, the newest checkpoint has BF16" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(out) or not [e for e in os.listdir(out) if e.endswith(".safetensors")]


def test_library_refusal_in_check_unit_is_reported(pristine, tmp_path, monkeypatch):
    """check_unit (every rank, before writing) asks the safetensors library itself: a disagreement
    with the planned dtype is reported there, naming file and key."""
    from pmm_dist.formats import hf
    real = hf.read_header

    def lying_header(path):  # the plan believes step_10 stores lm_head in F16
        header = real(path)
        if "step_10" in path and "lm_head.weight" in header.tensors:
            info = header.tensors["lm_head.weight"]
            header.tensors["lm_head.weight"] = type(info)("F16", info.shape, info.begin, info.end)
        return header

    monkeypatch.setattr(hf, "read_header", lying_header)
    message = merge_error([pristine], tmp_path, iterations=[10])
    assert "step_10/model-00001-of-00002.safetensors: tensor 'lm_head.weight' reads as BF16 [128, 64], expected F16" \
        in message


def test_optimizer_merge_is_refused(pristine, tmp_path):
    """The Trainer's optimizer.pt is not merged: --optimizer merge says so (never drops it silently)."""
    message = merge_error([pristine], tmp_path, optimizer="merge")
    assert message.startswith("--optimizer merge is not implemented for hf checkpoints")
