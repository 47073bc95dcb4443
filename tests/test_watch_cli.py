"""``pmm-dist watch`` from the outside: flags, --once, --backfill, --keep, --then, signals, exit codes."""
import json
import os
import signal
import subprocess
import time

import pytest

from .conftest import REPO, command, run_cli, subprocess_env
from .helpers import assert_merged_within_one_ulp, ema, sma
from .watch_runs import HuggingFace, Megatron

TRACKER = "latest_checkpointed_iteration.txt"


@pytest.fixture(scope="module")
def megatron(tmp_path_factory):
    return Megatron(str(tmp_path_factory.mktemp("megatron") / "made")).make()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return HuggingFace(str(tmp_path_factory.mktemp("hf") / "made")).make()


def _grown(kind, run, count):
    os.makedirs(run, exist_ok=True)
    for name in kind.names[:count]:
        kind.land(run, name)
    return run


def _history(out):
    return json.load(open(os.path.join(out, ".pmm_watch", "history.json")))


def _check(kind, merged_dir, window_names, weights):
    merged = kind.tensors(merged_dir)
    inputs = [kind.tensors(os.path.join(kind.made, n)) for n in window_names]
    assert merged
    for key, value in merged.items():
        assert_merged_within_one_ulp(value, [t[key] for t in inputs], weights, key)


def test_once_publishes_the_newest_only_then_nothing(megatron, tmp_path):
    run, out = _grown(megatron, str(tmp_path / "run"), 4), str(tmp_path / "out")
    proc = run_cli(["watch", run, "--out", out, "--method", "ema", "--alpha", "0.3", "--once"])
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == [".pmm_watch", "iter_0000400", TRACKER, "pmm_manifest.json"]
    assert open(os.path.join(out, TRACKER)).read().strip() == "400"
    assert [p["iteration"] for p in _history(out)["published"]] == [400]
    assert "published" in proc.stdout
    _check(megatron, os.path.join(out, "iter_0000400"), megatron.names[:4], ema(4, 0.3))
    again = run_cli(["watch", run, "--out", out, "--method", "ema", "--alpha", "0.3", "--once", "--quiet"])
    assert again.returncode == 0 and again.stdout == "", again.stdout + again.stderr
    assert [p["iteration"] for p in _history(out)["published"]] == [400]
    megatron.land(run, megatron.names[4])
    assert run_cli(["watch", run, "--out", out, "--method", "ema", "--alpha", "0.3", "--once", "--quiet"]).returncode == 0
    entry = _history(out)["published"][-1]
    assert entry["iteration"] == 500 and entry["incremental"] and entry["reads"] == [500]
    _check(megatron, os.path.join(out, "iter_0000500"), megatron.names[:5], ema(5, 0.3))


def test_backfill_keep_all_is_the_merged_curve(megatron, tmp_path):
    run, out = _grown(megatron, str(tmp_path / "run"), 6), str(tmp_path / "out")
    proc = run_cli(["watch", run, "--out", out, "--last", "3", "--backfill", "--keep", "0", "--once", "--quiet"])
    assert proc.returncode == 0, proc.stderr
    names = megatron.names
    assert sorted(e for e in os.listdir(out) if e.startswith("iter_")) == names
    assert open(os.path.join(out, TRACKER)).read().strip() == "600"
    history = _history(out)["published"]
    assert [p["iteration"] for p in history] == [100, 200, 300, 400, 500, 600]
    assert [p["incremental"] for p in history] == [False, True, True, True, True, True]
    assert [p["reads"] for p in history][3:] == [[100, 400], [200, 500], [300, 600]]
    for k, name in enumerate(names):
        window = names[max(0, k - 2): k + 1]
        _check(megatron, os.path.join(out, name), window, sma(len(window)))
        manifest = json.load(open(os.path.join(out, ".pmm_watch", "published", name, "pmm_manifest.json")))
        assert [s["iteration"] for s in manifest["sources"]] == [megatron.iteration(n) for n in window]
    assert json.load(open(os.path.join(out, "pmm_manifest.json")))["output_checkpoint"] == "iter_0000600"
    assert run_cli(["verify", out]).returncode == 0


def test_keep_two_with_an_index_and_then(hf, tmp_path):
    run, out = _grown(hf, str(tmp_path / "run"), 4), str(tmp_path / "out")
    log = tmp_path / "then.log"
    then = f'echo "$PMM_MERGED_PATH $PMM_ITERATION $PMM_METHOD" >> {log}; test "$PMM_ITERATION" != 20'
    proc = run_cli(["watch", run, "--out", out, "--method", "wma", "--backfill", "--keep", "2", "--once", "--quiet",
                    "--then", then])
    assert proc.returncode == 0, proc.stderr  # a failing --then is reported, not fatal
    assert "--then" in proc.stderr and "status 1" in proc.stderr and "step_20" in proc.stderr
    assert sorted(os.listdir(out)) == [".pmm_watch", "pmm_watch_index.json", "step_30", "step_40"]
    index = json.load(open(os.path.join(out, "pmm_watch_index.json")))
    assert index["latest"] == "step_40" and [m["path"] for m in index["merges"]] == ["step_30", "step_40"]
    assert log.read_text().splitlines() == [f"{os.path.join(out, n)} {n[5:]} wma" for n in hf.names[:4]]
    assert [p["then"] for p in _history(out)["published"]] == [0, 1, 0, 0]
    for name in ("step_30", "step_40"):
        assert run_cli(["verify", os.path.join(out, name)]).returncode == 0
    assert run_cli(["verify", out]).returncode == 0  # through the index: every kept merge
    _check(hf, os.path.join(out, "step_40"), hf.names[:4], [w for w in [0.1, 0.2, 0.3, 0.4]])


def test_continuous_watch_follows_the_run_and_stops_on_sigterm(megatron, tmp_path):
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    os.makedirs(run)
    cmd = command(["-m", "pmm_dist", "watch", run, "--out", out, "--method", "ema", "--alpha", "0.3",
                   "--last", "4", "--poll", "0.2", "--quiet"])
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        for k, name in enumerate(megatron.names[:5]):
            megatron.land(run, name)
            deadline = time.time() + 60
            while time.time() < deadline:
                try:
                    if open(os.path.join(out, TRACKER)).read().strip() == str(megatron.iteration(name)):
                        break
                except OSError:
                    pass
                time.sleep(0.1)
            else:
                pytest.fail(f"{name} was not published; stderr: {proc.stderr.read() if proc.poll() is not None else ''}")
            window = megatron.names[max(0, k - 3): k + 1]
            _check(megatron, os.path.join(out, name), window, ema(len(window), 0.3))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sorted(os.listdir(out)) == [".pmm_watch", "iter_0000500", TRACKER, "pmm_manifest.json"]


def test_usage_errors_exit_2(megatron, tmp_path):
    run, out = _grown(megatron, str(tmp_path / "run"), 2), str(tmp_path / "out")
    assert run_cli(["watch", run, "--out", out, "--keep", "-1", "--once"]).returncode == 2
    assert run_cli(["watch", run, "--out", out, "--iterations", "100", "--once"]).returncode == 2
    assert run_cli(["watch", run, "--out", run, "--once"]).returncode == 2
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    proc = run_cli(["watch", run, "--out", str(busy), "--once"])
    assert proc.returncode == 2 and "holds no watch" in proc.stderr
    assert run_cli(["watch", run, "--out", out, "--method", "sma", "--once", "--quiet"]).returncode == 0
    proc = run_cli(["watch", run, "--out", out, "--method", "ema", "--once", "--quiet"])
    assert proc.returncode == 2 and "other options" in proc.stderr and "method" in proc.stderr
    proc = run_cli(["watch", run, "--out", out, "--method", "weighted", "--weights", "1,2", "--last", "3", "--once"])
    assert proc.returncode == 2


def test_nothing_to_publish_yet_exits_0(tmp_path):
    empty = tmp_path / "run"
    empty.mkdir()
    proc = run_cli(["watch", str(empty), "--out", str(tmp_path / "out"), "--once"])
    assert proc.returncode == 0 and "waiting" in proc.stdout, proc.stdout + proc.stderr
    proc = run_cli(["watch", str(tmp_path / "missing"), "--out", str(tmp_path / "out2"), "--once", "--quiet"])
    assert proc.returncode == 0, proc.stderr


def test_a_failed_update_exits_1_and_keeps_the_last_merge(megatron, tmp_path):
    run, out = _grown(megatron, str(tmp_path / "run"), 3), str(tmp_path / "out")
    assert run_cli(["watch", run, "--out", out, "--once", "--quiet"]).returncode == 0
    megatron.land(run, megatron.names[3])
    broken = os.path.join(run, megatron.names[3], "mp_rank_00", "model_optim_rng.pt")
    with open(broken, "r+b") as f:
        f.truncate(100)
    proc = run_cli(["watch", run, "--out", out, "--once", "--quiet"])
    assert proc.returncode == 1 and broken in proc.stderr, proc.stderr
    assert open(os.path.join(out, TRACKER)).read().strip() == "300"
    assert sorted(os.listdir(out)) == [".pmm_watch", "iter_0000300", TRACKER, "pmm_manifest.json"]
    os.remove(broken)
    megatron.land(run, megatron.names[3])  # the trainer saves it again
    import shutil
    shutil.copy2(os.path.join(megatron.made, megatron.names[3], "mp_rank_00", "model_optim_rng.pt"), broken)
    assert run_cli(["watch", run, "--out", out, "--once", "--quiet"]).returncode == 0
    _check(megatron, os.path.join(out, "iter_0000400"), megatron.names[:4], sma(4))


def test_two_ranks_write_what_one_writes(megatron, tmp_path):
    run = _grown(megatron, str(tmp_path / "run"), 5)
    outs = {}
    for world_size in (1, 2):
        outs[world_size] = str(tmp_path / f"out{world_size}")
        proc = run_cli(["watch", run, "--out", outs[world_size], "--method", "ema", "--last", "3", "--backfill",
                        "--keep", "0", "--once", "--quiet", "--device", "cpu"], world_size=world_size)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _digest(outs[1]) == _digest(outs[2])


def _digest(out):
    found = {}
    for directory, _, names in os.walk(out):
        for name in names:
            if name != "pmm_manifest.json":
                path = os.path.join(directory, name)
                found[os.path.relpath(path, out)] = open(path, "rb").read()
    return found
