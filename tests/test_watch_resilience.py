"""The watcher under kills, retention, rewritten and bad checkpoints.

- SIGKILL at the engine's and the watcher's fault points (any update, any rank) and at random
  moments, then the same command again: OUT (merges, tracker, index and the watcher's own state)
  is byte for byte what an uninterrupted watcher writes, and the tracker never names a missing or
  partial merge in between.
- A checkpoint the update needs deleted by retention: a full merge of the window when it still
  exists, else a failure naming the checkpoint with the last published merge kept.
- A checkpoint rewritten under the same iteration, NaNs, --interval chains, explicit weights.
"""
import json
import os
import random
import shutil
import subprocess
import time

import pytest
import torch

import pmm_dist
from pmm_dist.io.atomic import sha256_of_file

from .conftest import REPO, command, run_cli, subprocess_env
from .helpers import assert_merged_within_one_ulp, ema, sma, trusted_load
from .watch_runs import HuggingFace, Megatron

TRACKER = "latest_checkpointed_iteration.txt"
ARGS = ["--method", "ema", "--alpha", "0.3", "--last", "3", "--backfill", "--keep", "2", "--once", "--quiet",
        "--device", "cpu"]
_SECONDS = {}  # how long the uninterrupted reference watcher took
# What a run reports about itself (its time, memory, and the work done by this run: a resumed
# update counts only the bytes it read itself, issue 15), not what it published.
VOLATILE = {"created_unix", "timings_s", "peak_rss_bytes_by_rank", "units_resumed", "metadata_bytes_exchanged",
            "world_size", "bytes_read", "bytes_written", "tensors_merged"}


def _without_volatile(value):
    if isinstance(value, dict):
        return {k: _without_volatile(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_without_volatile(v) for v in value]
    return value


@pytest.fixture(scope="module")
def megatron(tmp_path_factory):
    return Megatron(str(tmp_path_factory.mktemp("megatron") / "made")).make()


@pytest.fixture(scope="module")
def megatron_run(megatron, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("megatron_run") / "run")
    os.makedirs(run)
    for name in megatron.names:
        megatron.land(run, name)
    return run


@pytest.fixture(scope="module")
def reference(megatron_run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("reference") / "out")
    started = time.perf_counter()
    proc = run_cli(["watch", megatron_run, "--out", out, *ARGS])
    assert proc.returncode == 0, proc.stderr
    _SECONDS["reference"] = time.perf_counter() - started
    return digest(out)


def digest(out):
    """Every file under OUT (the watcher's state included); manifests without their volatile fields."""
    files = {}
    for directory, _, names in os.walk(out):
        for name in names:
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, out)
            if name in ("pmm_manifest.json", "history.json"):
                files[rel] = _without_volatile(json.load(open(path)))
            else:
                files[rel] = open(path, "rb").read()
    return files


def assert_tracker_names_a_complete_merge(out):
    """Whatever the moment of a kill: the merge the tracker names has every file its manifest
    lists, with the right sizes and checksums (and loads)."""
    tracker = os.path.join(out, TRACKER)
    if not os.path.exists(tracker):
        return
    dirname = f"iter_{int(open(tracker).read()):07d}"
    manifest = json.load(open(os.path.join(out, "pmm_manifest.json")))
    if manifest["output_checkpoint"] != dirname:  # killed between the manifest and the tracker
        manifest = json.load(open(os.path.join(out, ".pmm_watch", "published", dirname, "pmm_manifest.json")))
    assert manifest["output_checkpoint"] == dirname
    for entry in manifest["files"]:
        path = os.path.join(out, entry["path"])
        assert os.path.getsize(path) == entry["bytes"] and sha256_of_file(path) == entry["sha256"], path
        if entry["path"] != TRACKER:  # the manifest lists every file written, the tracker too
            trusted_load(path)


@pytest.mark.parametrize("fault", ["unit:0#3@0=kill", "unit:1#5@0=kill", "commit:recorded#4@0=kill",
                                   "commit:moved#2@0=kill", "commit:manifest#5@0=kill", "watch:recorded#3@0=kill",
                                   "watch:index#4@0=kill", "validate#6@0=kill"])
def test_killed_at_a_fault_point_restarts_byte_identical(megatron_run, reference, tmp_path, fault):
    out = str(tmp_path / "out")
    proc = run_cli(["watch", megatron_run, "--out", out, *ARGS], env={"PMM_DIST_FAULT": fault})
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert_tracker_names_a_complete_merge(out)
    for name in ("pmm_manifest.json", TRACKER) if os.path.isdir(os.path.join(out, ".pmm_staging")) else ():
        with open(os.path.join(out, f"{name}.tmp.4242"), "w") as f:  # what a kill while writing them leaves
            f.write("{")
    proc = run_cli(["watch", megatron_run, "--out", out, *ARGS])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert digest(out) == reference


@pytest.mark.parametrize("fault", ["commit:moved#2@0=kill", "unit:1#3@0=kill", "commit:manifest#3@0=kill"])
def test_killed_whole_window_merges_restart_byte_identical(megatron_run, tmp_path, fault):
    """Explicit weights have no running state: every update merges its window, resumed as merge resumes."""
    args = ["--method", "weighted", "--weights", "1,2,3", "--backfill", "--keep", "2", "--once", "--quiet"]
    clean, out = str(tmp_path / "clean"), str(tmp_path / "out")
    assert run_cli(["watch", megatron_run, "--out", clean, *args]).returncode == 0
    assert run_cli(["watch", megatron_run, "--out", out, *args], env={"PMM_DIST_FAULT": fault}).returncode != 0
    assert_tracker_names_a_complete_merge(out)
    proc = run_cli(["watch", megatron_run, "--out", out, *args])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_tracker_names_a_complete_merge(out)
    assert digest(out) == digest(clean)


def test_a_killed_rank_of_two(megatron_run, tmp_path):
    outs = {}
    for name, fault in (("clean", None), ("killed", "unit:0#3@1=kill")):
        outs[name] = str(tmp_path / name)
        proc = run_cli(["watch", megatron_run, "--out", outs[name], *ARGS], world_size=2,
                       env={"PMM_DIST_FAULT": fault} if fault else None)
        assert (proc.returncode != 0) == bool(fault), proc.stdout + proc.stderr
    assert_tracker_names_a_complete_merge(outs["killed"])
    proc = run_cli(["watch", megatron_run, "--out", outs["killed"], *ARGS], world_size=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert digest(outs["killed"]) == digest(outs["clean"])


def test_sigkill_at_random_moments(megatron_run, reference, tmp_path):
    """Three watchers, each SIGKILLed at random moments of its run (as long as an uninterrupted
    one takes) and started again until it finishes: each ends byte-identical."""
    rng = random.Random(7)
    env = subprocess_env()
    duration = reference_seconds()
    kills = 0
    for trial in range(3):
        out = str(tmp_path / f"out{trial}")
        cmd = command(["-m", "pmm_dist", "watch", megatron_run, "--out", out, *ARGS])
        for attempt in range(10):
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True)
            try:
                code = proc.wait(timeout=rng.uniform(0.3, 0.95) * duration if attempt < 6 else 300)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                kills += 1
                assert_tracker_names_a_complete_merge(out)
                continue
            assert code == 0, proc.stderr.read()
            break
        assert digest(out) == reference, f"trial {trial}"
    assert kills >= 3, "the kills must have hit something"


def reference_seconds() -> float:
    return _SECONDS.get("reference", 5.0)


def test_killed_checkpoint_root_watch_restarts_byte_identical(tmp_path):
    hf = HuggingFace(str(tmp_path / "made")).make()
    run = str(tmp_path / "run")
    os.makedirs(run)
    for name in hf.names:
        hf.land(run, name)
    args = ["--method", "sma", "--last", "3", "--backfill", "--keep", "2", "--once", "--quiet"]
    clean = str(tmp_path / "clean")
    assert run_cli(["watch", run, "--out", clean, *args]).returncode == 0
    for fault in ("commit:moved#4@0=kill", "watch:index#2@0=kill"):
        out = str(tmp_path / fault.split("#")[0].replace(":", "_"))
        assert run_cli(["watch", run, "--out", out, *args], env={"PMM_DIST_FAULT": fault}).returncode != 0
        index = json.load(open(os.path.join(out, "pmm_watch_index.json"))) if \
            os.path.exists(os.path.join(out, "pmm_watch_index.json")) else None
        if index:  # the index names complete merges only
            for merge in index["merges"]:
                assert run_cli(["verify", os.path.join(out, merge["path"]), "--no-sources"]).returncode == 0
        assert run_cli(["watch", run, "--out", out, *args]).returncode == 0
        assert digest(out) == digest(clean), fault


# -- retention ---------------------------------------------------------------------------------
def _watch(run, out, **options):
    result = pmm_dist.watch_once(run, out=out, device="cpu", quiet=True, **options)
    return result


def _check(kind, merged_dir, window, weights, sources=None):
    sources = sources or {}
    merged = kind.tensors(merged_dir)
    inputs = [sources.get(n) or kind.tensors(os.path.join(kind.made, n)) for n in window]
    for key, value in merged.items():
        assert_merged_within_one_ulp(value, [t[key] for t in inputs], weights, key)


def test_leaving_checkpoint_deleted_falls_back_to_the_window(megatron, tmp_path):
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    os.makedirs(run)
    names = megatron.names
    for name in names[:4]:
        megatron.land(run, name)
        assert _watch(run, out, last=3).ok
    megatron.land(run, names[4])
    shutil.rmtree(os.path.join(run, names[1]))  # retention keeps 3: iteration 200 leaves the window at 500
    [published] = _watch(run, out, last=3).published
    assert not published.incremental and published.reads == [300, 400, 500]
    _check(megatron, published.path, names[2:5], sma(3))
    megatron.land(run, names[5])
    shutil.rmtree(os.path.join(run, names[2]))
    shutil.rmtree(os.path.join(run, names[3]))  # retention keeps 2: the window [400, 500, 600] is gone too
    result = _watch(run, out, last=3)
    assert not result.published and len(result.failures) == 1
    assert "400" in result.failures[0] and names[3] in result.failures[0] and "iter_0000500" in result.failures[0]
    assert open(os.path.join(out, TRACKER)).read().strip() == "500"
    assert sorted(os.listdir(out)) == [".pmm_watch", "iter_0000500", TRACKER, "pmm_manifest.json"]


def test_ema_needs_no_old_checkpoint(megatron, tmp_path):
    """Unbounded EMA reads the new checkpoint only, windowed EMA the window's new oldest: retention
    that keeps just the newest (or the window) never forces a full merge."""
    for last, keep_in_run in ((None, 1), (3, 3)):
        run, out = str(tmp_path / f"run{last}"), str(tmp_path / f"out{last}")
        os.makedirs(run)
        for k, name in enumerate(megatron.names):
            megatron.land(run, name)
            for old in megatron.names[: max(0, k + 1 - keep_in_run)]:
                shutil.rmtree(os.path.join(run, old), ignore_errors=True)
            [published] = _watch(run, out, method="ema", alpha=0.3, last=last).published
            assert published.incremental == (k >= (1 if last is None else 2)), published
            window = megatron.names[: k + 1][-last:] if last else megatron.names[: k + 1]
            _check(megatron, published.path, window, ema(len(window), 0.3))


def test_rewritten_checkpoint_is_not_taken_out_of_a_stale_state(megatron, tmp_path):
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    os.makedirs(run)
    names = megatron.names
    for name in names[:4]:
        megatron.land(run, name)
        assert _watch(run, out, last=3).ok
    # The trainer restarted from 200 and saved 300 again, with other weights (those of 600 here).
    shutil.rmtree(os.path.join(run, names[2]))
    shutil.copytree(os.path.join(megatron.made, names[5]), os.path.join(run, names[2]))
    time.sleep(0.01)
    megatron.land(run, names[4])
    [published] = _watch(run, out, last=3).published
    assert not published.incremental, published
    rewritten = megatron.tensors(os.path.join(run, names[2]))
    _check(megatron, published.path, names[2:5], sma(3), {names[2]: rewritten})


def test_nan_in_a_checkpoint(megatron, tmp_path):
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    made = str(tmp_path / "made")
    shutil.copytree(megatron.made, made)
    nan_file = os.path.join(made, megatron.names[1], "mp_rank_00", "model_optim_rng.pt")
    state = trusted_load(nan_file)
    key = next(k for k, v in state["model"].items() if isinstance(v, torch.Tensor) and v.is_floating_point())
    state["model"][key] = state["model"][key].clone()
    state["model"][key].view(-1)[0] = float("nan")
    torch.save(state, nan_file)
    kind = Megatron(made)
    kind.names = megatron.names
    os.makedirs(run)
    kind.land(run, kind.names[0])
    assert _watch(run, out, last=2, method="wma").ok
    kind.land(run, kind.names[1])
    result = _watch(run, out, last=2, method="wma")
    in_run = os.path.join(run, megatron.names[1], "mp_rank_00", "model_optim_rng.pt")
    assert not result.published and key in result.failures[0] and in_run in result.failures[0]
    result = _watch(run, out, last=2, method="wma", on_nonfinite="warn")
    [published] = result.published
    assert torch.isnan(kind.tensors(published.path)[f"mp_rank_00/{key}"]).any()
    history = json.load(open(os.path.join(out, ".pmm_watch", "history.json")))
    assert history["published"][-1]["state"] is False  # a NaN state is never updated again
    kind.land(run, kind.names[2])  # the NaN checkpoint is still in the window
    [published] = _watch(run, out, last=2, method="wma", on_nonfinite="warn").published
    assert torch.isnan(kind.tensors(published.path)[f"mp_rank_00/{key}"]).any()
    kind.land(run, kind.names[3])  # it has left: a clean merge, not one taken out of a NaN state
    [published] = _watch(run, out, last=2, method="wma", on_nonfinite="warn").published
    _check(kind, published.path, kind.names[2:4], [1 / 3, 2 / 3])


def test_interval_chains_keep_a_state_each(megatron, megatron_run, tmp_path):
    out = str(tmp_path / "out")
    result = _watch(megatron_run, out, method="sma", last=3, interval=200, backfill=True, keep=0)
    assert result.ok, result.failures
    windows = {p.iteration: p.window for p in result.published}
    assert windows == {100: [100], 200: [200], 300: [100, 300], 400: [200, 400], 500: [100, 300, 500],
                       600: [200, 400, 600]}
    reads = {p.iteration: (p.reads, p.incremental) for p in result.published}
    assert reads[500] == ([500], True) and reads[600] == ([600], True)  # each from its own chain's state
    for p in result.published:
        _check(megatron, p.path, [f"iter_{it:07d}" for it in p.window], sma(len(p.window)))
    assert sorted(os.listdir(os.path.join(out, ".pmm_watch", "states"))) == ["500", "600"]


def test_explicit_weights_wait_for_their_window(megatron, megatron_run, tmp_path):
    out = str(tmp_path / "out")
    result = _watch(megatron_run, out, method="weighted", weights=[1, 2, 3], backfill=True, keep=0)
    assert result.ok, result.failures
    assert [p.iteration for p in result.published] == [300, 400, 500, 600]
    assert not any(p.incremental for p in result.published)
    for p in result.published:
        _check(megatron, p.path, [f"iter_{it:07d}" for it in p.window], [1 / 6, 2 / 6, 3 / 6])
