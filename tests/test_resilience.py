"""Failures anywhere leave nothing loadable; --resume finishes bitwise identically."""
import json
import os
import shutil
import subprocess

import pytest
import torch

import pmm_dist
from pmm_dist.testing.synthetic import generate_run

from .conftest import run_cli
from .helpers import trusted_load

TRACKER = "latest_checkpointed_iteration.txt"
ARGS = ["--method", "ema", "--alpha", "0.1", "--last", "3", "--quiet"]
# What a resumed run reports about itself: its own time, memory and work (bytes and tensors of the
# units done in this run; issue 15), not the output, which must be byte-identical.
VOLATILE = {"created_unix", "timings_s", "peak_rss_bytes_by_rank", "units_resumed", "metadata_bytes_exchanged",
            "world_size", "bytes_read", "bytes_written", "tensors_merged"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("run") / "run")
    generate_run(run, iterations=[1, 2, 3, 4], tp=2, pp=2, ep=1, num_layers=2, hidden_size=16,
                 ffn_hidden_size=32, num_experts=0, vocab_size=32)
    return run


@pytest.fixture(scope="module")
def reference(run_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "out")
    proc = run_cli(["merge", run_dir, "--out", out, *ARGS])
    assert proc.returncode == 0, proc.stderr
    return out


def output_digest(out):
    files = {}
    for directory, _, names in os.walk(out):
        for name in names:
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, out)
            if name == "pmm_manifest.json":
                manifest = json.load(open(path))
                files[rel] = {k: v for k, v in manifest.items() if k not in VOLATILE}
            else:
                files[rel] = open(path, "rb").read()
    return files


@pytest.mark.parametrize("fault,world_size", [
    ("unit:0@0=kill", 2), ("unit:1@1=kill", 2), ("validate@1=raise", 2), ("unit:2@0=raise", 1),
    ("commit:recorded@0=kill", 2), ("commit:moved@0=kill", 2), ("commit:manifest@0=kill", 1),
])
def test_killed_merge_resumes_bitwise_identical(run_dir, reference, tmp_path, fault, world_size):
    out = str(tmp_path / "out")
    proc = run_cli(["merge", run_dir, "--out", out, *ARGS], world_size=world_size, env={"PMM_DIST_FAULT": fault})
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert not os.path.exists(os.path.join(out, TRACKER)), "a failed merge must not be loadable"
    for name in ("pmm_manifest.json", TRACKER) if os.path.isdir(os.path.join(out, ".pmm_staging")) else ():
        with open(os.path.join(out, f"{name}.tmp.4242"), "w") as f:  # what a kill while writing them leaves
            f.write("{")
    resumed = run_cli(["merge", run_dir, "--out", out, *ARGS, "--resume"], world_size=world_size)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert output_digest(out) == output_digest(reference)
    assert not os.path.exists(os.path.join(out, ".pmm_staging"))


def test_overwrite_resumed_after_a_kill_mid_commit_keeps_the_new_output(run_dir, reference, tmp_path):
    out = tmp_path / "out"
    # A previous pmm_dist output (another window): the only kind of directory --overwrite replaces.
    assert run_cli(["merge", run_dir, "--out", str(out), "--quiet", "--last", "2"]).returncode == 0
    previous = json.load(open(out / "pmm_manifest.json"))["fingerprint"]
    args = ["merge", run_dir, "--out", str(out), *ARGS, "--overwrite"]
    assert run_cli(args, env={"PMM_DIST_FAULT": "commit:moved@0=kill"}).returncode != 0
    assert not (out / TRACKER).exists() and not (out / "pmm_manifest.json").exists()
    assert run_cli(args + ["--resume"]).returncode == 0
    assert output_digest(str(out)) == output_digest(reference)
    assert json.load(open(out / "pmm_manifest.json"))["fingerprint"] != previous


def test_resume_of_a_finished_merge_is_a_no_op(run_dir, reference, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(reference, out)
    before = output_digest(out)
    proc = run_cli(["merge", run_dir, "--out", out, *ARGS[:-1], "--resume"])
    assert proc.returncode == 0 and "nothing to do" in proc.stdout, proc.stderr
    assert output_digest(out) == before
    proc = run_cli(["merge", run_dir, "--out", out, "--method", "sma", "--quiet", "--resume"])
    assert proc.returncode == 1 and "already exists" in proc.stderr  # another merge: not a no-op


def test_resume_redoes_only_unfinished_units(run_dir, tmp_path):
    out = str(tmp_path / "out")
    assert run_cli(["merge", run_dir, "--out", out, *ARGS], env={"PMM_DIST_FAULT": "unit:1@0=kill"}).returncode != 0
    # markers written; a kill during the third's write leaves its temporary file, which is no marker
    done = [name for name in os.listdir(os.path.join(out, ".pmm_staging", "state", "done")) if name.endswith(".json")]
    assert 2 <= len(done) < 4  # the kill came after the second unit; the third may have been in flight
    assert run_cli(["merge", run_dir, "--out", out, *ARGS, "--resume"]).returncode == 0
    assert json.load(open(os.path.join(out, "pmm_manifest.json")))["units_resumed"] == len(done)


def test_resume_refuses_changed_options(run_dir, tmp_path):
    out = str(tmp_path / "out")
    assert run_cli(["merge", run_dir, "--out", out, *ARGS], env={"PMM_DIST_FAULT": "unit:0@0=raise"}).returncode
    proc = run_cli(["merge", run_dir, "--out", out, "--method", "sma", "--last", "3", "--quiet", "--resume"])
    assert proc.returncode == 1 and "refusing to --resume" in proc.stderr
    assert not os.path.exists(os.path.join(out, TRACKER))


def test_one_failing_rank_fails_every_rank(run_dir, tmp_path):
    # How fast every rank leaves is measured by benchmarks/timings.py, not asserted here
    # (wall-clock bounds fail on a busy machine); that no rank waits out the collective timeout
    # is tested in test_collective.py.
    out = str(tmp_path / "out")
    proc = run_cli(["merge", run_dir, "--out", out, *ARGS], world_size=2, env={"PMM_DIST_FAULT": "unit:0@1=raise"})
    assert proc.returncode != 0
    assert "[rank 1]" in proc.stderr and "injected fault at unit:0 on rank 1" in proc.stderr
    assert not os.path.exists(os.path.join(out, TRACKER))


def test_nonfinite_inputs(run_dir, tmp_path, fresh_copy):
    run = fresh_copy(run_dir)
    path = os.path.join(run, "iter_0000003", "mp_rank_00_001", "model_optim_rng.pt")
    state = trusted_load(path)
    key = "decoder.layers.0.self_attention.linear_proj.weight"
    state["model"][key][0, 0] = float("nan")
    torch.save(state, path)
    proc = run_cli(["merge", run, "--out", str(tmp_path / "a"), *ARGS])
    assert proc.returncode == 1 and key in proc.stderr and path in proc.stderr and "NaN" in proc.stderr
    assert not os.path.exists(tmp_path / "a" / TRACKER)
    proc = run_cli(["merge", run, "--out", str(tmp_path / "b"), *ARGS, "--on-nonfinite", "warn"])
    assert proc.returncode == 0 and "warning" in proc.stderr and key in proc.stderr
    proc = run_cli(["merge", run, "--out", str(tmp_path / "c"), *ARGS, "--on-nonfinite", "ignore"])
    assert proc.returncode == 0 and "NaN" not in proc.stderr


@pytest.mark.unit  # in this process
def test_input_modified_during_merge_is_detected(run_dir, tmp_path, monkeypatch, fresh_copy):
    run = fresh_copy(run_dir)
    victim = os.path.join(run, "iter_0000002", "mp_rank_01_001", "model_optim_rng.pt")
    import pmm_dist.engine.faults as faults

    def touch_during_merge(point, rank):
        if point == "unit:0":
            with open(victim, "ab") as f:
                f.write(b"\0")

    monkeypatch.setattr(faults, "inject", touch_during_merge)
    with pytest.raises(pmm_dist.MergeError, match="modified while the merge ran"):
        pmm_dist.merge(sources=[run], out=str(tmp_path / "out"), last=3, device="cpu", quiet=True)
    assert not os.path.exists(tmp_path / "out" / TRACKER)


def test_symlinked_input_is_refused(run_dir, tmp_path, fresh_copy):
    run = fresh_copy(run_dir)
    shard = os.path.join(run, "iter_0000004", "mp_rank_00_000")
    os.rename(shard, str(tmp_path / "elsewhere"))
    os.symlink(str(tmp_path / "elsewhere"), shard)
    proc = run_cli(["merge", run, "--out", str(tmp_path / "out"), *ARGS])
    assert proc.returncode == 1 and shard in proc.stderr and "symbolic link" in proc.stderr


@pytest.fixture
def small_filesystem(tmp_path):
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount_point)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root); disk-full path not exercised")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_disk_full_names_the_file_and_commits_nothing(run_dir, small_filesystem):
    out = str(small_filesystem / "out")
    proc = run_cli(["merge", run_dir, "--out", out, *ARGS])
    assert proc.returncode == 1, proc.stderr
    assert "No space left on device" in proc.stderr and f"{out}/" in proc.stderr  # names the file
    assert not os.path.exists(os.path.join(out, TRACKER))


def test_read_only_output_is_refused(run_dir, small_filesystem):
    subprocess.run(["mount", "-o", "remount,ro", str(small_filesystem)], check=True)
    out = str(small_filesystem / "out")
    proc = run_cli(["merge", run_dir, "--out", out, *ARGS])
    assert proc.returncode == 1 and "not writable" in proc.stderr
