import json
import os
import shutil

import pytest
import torch

from pmm_dist.testing.synthetic import generate_run

from .conftest import run_cli
from .helpers import trusted_load


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    base = tmp_path_factory.mktemp("v")
    run, out = str(base / "run"), str(base / "out")
    generate_run(run, iterations=[5, 10, 15], tp=2, pp=1, ep=2, num_layers=2, hidden_size=16, ffn_hidden_size=32,
                 num_experts=2, vocab_size=32)
    proc = run_cli(["merge", run, "--out", out, "--quiet"])
    assert proc.returncode == 0, proc.stderr
    return run, out


@pytest.fixture
def copy(merged, tmp_path):
    run, out = merged
    target = str(tmp_path / "out")
    shutil.copytree(out, target)
    return run, target


def test_verify_accepts_a_good_output(merged):
    proc = run_cli(["verify", merged[1]])
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr


def test_verify_detects_a_flipped_byte(copy):
    _, out = copy
    path = os.path.join(out, "iter_0000015", "mp_rank_01_001", "model_optim_rng.pt")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    proc = run_cli(["verify", out])
    assert proc.returncode == 1 and path in proc.stderr and "sha256" in proc.stderr


def test_verify_detects_missing_file_tracker_and_extra_file(copy):
    _, out = copy
    os.remove(os.path.join(out, "iter_0000015", "mp_rank_00_000", "model_optim_rng.pt"))
    os.remove(os.path.join(out, "latest_checkpointed_iteration.txt"))
    open(os.path.join(out, "iter_0000015", "stray.pt"), "wb").write(b"x")
    proc = run_cli(["verify", out])
    assert proc.returncode == 1
    assert "missing" in proc.stderr and "tracker missing" in proc.stderr and "stray.pt" in proc.stderr


def test_verify_compares_tensors_with_the_source(copy):
    run, out = copy
    path = os.path.join(out, "iter_0000015", "mp_rank_00_001", "model_optim_rng.pt")
    state = trusted_load(path)
    state["model"]["decoder.final_layernorm.weight"] = torch.zeros(3, dtype=torch.bfloat16)
    torch.save(state, path)
    manifest_path = os.path.join(out, "pmm_manifest.json")
    manifest = json.load(open(manifest_path))
    import hashlib
    for entry in manifest["files"]:  # re-sign so only the tensor comparison can catch it
        if entry["path"].endswith("mp_rank_00_001/model_optim_rng.pt"):
            entry["bytes"] = os.path.getsize(path)
            entry["sha256"] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    json.dump(manifest, open(manifest_path, "w"))
    proc = run_cli(["verify", out])
    assert proc.returncode == 1 and "decoder.final_layernorm.weight" in proc.stderr and "(3,)" in proc.stderr
    assert run_cli(["verify", out, "--no-sources"]).returncode == 0


def test_inspect_lists_checkpoints_and_layout(merged):
    run, _ = merged
    proc = run_cli(["inspect", run])
    assert proc.returncode == 0, proc.stderr
    assert "format: megatron" in proc.stdout and "tp=2, pp=1, ep=2" in proc.stdout
    proc = run_cli(["inspect", run, "--json"])
    info = json.loads(proc.stdout)
    assert [c["iteration"] for c in info["checkpoints"]] == [5, 10, 15]
    assert all(c["files"] == 4 and c["bytes"] > 0 for c in info["checkpoints"])
    assert run_cli(["inspect", "/nonexistent/run"]).returncode == 1


@pytest.mark.parametrize("damage", ["truncate", "empty", "delete_file", "delete_shard"])
def test_inspect_reports_a_broken_shard_and_exits_1(merged, tmp_path, damage):
    run = str(tmp_path / "run")
    shutil.copytree(merged[0], run)
    shard = os.path.join(run, "iter_0000010", "mp_rank_01_001")
    path = os.path.join(shard, "model_optim_rng.pt")
    if damage == "truncate":
        os.truncate(path, os.path.getsize(path) // 2)
    elif damage == "empty":
        os.truncate(path, 0)
    elif damage == "delete_file":
        os.remove(path)
    else:
        shutil.rmtree(shard)
    proc = run_cli(["inspect", run, "--json"])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = {c["iteration"]: c["problems"] for c in json.loads(proc.stdout)["checkpoints"]}
    assert rows[5] == rows[15] == [] and len(rows[10]) == 1, rows
    assert ("mp_rank_01_001" in rows[10][0]) and (damage != "delete_shard" or "1 of the 4 shard directories" in rows[10][0])
