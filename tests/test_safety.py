"""Safe by default and clear on day one (issue 15): each item as a new user meets it, by CLI,
exit code, the key parts of the message, and what is (not) deleted or committed."""
import json
import os
import shlex
import shutil

import pytest
import torch

import pmm_dist
from pmm_dist.errors import InputError
from pmm_dist.formats import resolve_format
from pmm_dist.testing.synthetic import generate_run
from .conftest import run_cli
from .helpers import trusted_load
from .hf_models import make_run as make_hf_run

TRACKER = "latest_checkpointed_iteration.txt"
ARGS = ["--last", "2", "--quiet"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("run") / "run")
    generate_run(run, iterations=[10, 20, 30], tp=2, pp=1, ep=1, num_layers=2, hidden_size=16,
                 ffn_hidden_size=32, num_experts=0, vocab_size=32)
    return run


@pytest.fixture
def run(pristine, tmp_path):
    copy = str(tmp_path / "run")
    shutil.copytree(pristine, copy)
    return copy


def tree(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


# -- data safety ---------------------------------------------------------------------------------
def test_overwrite_never_deletes_what_pmm_dist_did_not_write(run, tmp_path):
    victim = str(tmp_path / "copy_of_a_run")
    shutil.copytree(run, victim)
    before = tree(victim)
    proc = run_cli(["merge", run, "--out", victim, "--overwrite", *ARGS])
    assert proc.returncode == 1
    assert "refusing to --overwrite" in proc.stderr and "not a pmm_dist output" in proc.stderr
    assert "iter_0000010" in proc.stderr and "nothing was removed" in proc.stderr
    assert tree(victim) == before
    # A previous pmm_dist output with a stranger file beside it: refused too, naming the file.
    out = str(tmp_path / "out")
    assert run_cli(["merge", run, "--out", out, *ARGS]).returncode == 0
    open(os.path.join(out, "notes.txt"), "w").write("mine")
    proc = run_cli(["merge", run, "--out", out, "--overwrite", "--last", "3", "--quiet"])
    assert proc.returncode == 1 and "notes.txt" in proc.stderr
    assert open(os.path.join(out, "notes.txt")).read() == "mine"
    os.remove(os.path.join(out, "notes.txt"))
    assert run_cli(["merge", run, "--out", out, "--overwrite", "--last", "3", "--quiet"]).returncode == 0
    assert len(json.load(open(os.path.join(out, "pmm_manifest.json")))["sources"]) == 3


def _fake_torch_dist(ckpt, complete=True):
    os.makedirs(ckpt)
    open(os.path.join(ckpt, ".metadata"), "wb").write(b"")
    torch.save({"iteration": 1}, os.path.join(ckpt, "common.pt"))
    if complete:
        json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1},
                  open(os.path.join(ckpt, "metadata.json"), "w"))


def test_unfinished_torch_dist_checkpoint_is_never_merged_as_dcp(tmp_path):
    done, unfinished = str(tmp_path / "iter_0000010"), str(tmp_path / "iter_0000020")
    _fake_torch_dist(done)
    _fake_torch_dist(unfinished, complete=False)
    fmt = resolve_format("auto", [done, unfinished])
    assert fmt.name == "megatron-dist"
    with pytest.raises(InputError, match=f"{unfinished}: not a Megatron torch_dist checkpoint.*incomplete"):
        fmt.discover([done, unfinished])
    proc = run_cli(["merge", done, unfinished, "--out", str(tmp_path / "out")])
    assert proc.returncode == 1 and unfinished in proc.stderr and "incomplete" in proc.stderr
    assert not os.path.exists(tmp_path / "out")
    # Sources of two formats: one message naming each.
    plain = str(tmp_path / "step_30")
    os.makedirs(plain)
    open(os.path.join(plain, ".metadata"), "wb").write(b"")
    proc = run_cli(["merge", done, plain, "--out", str(tmp_path / "out")])
    assert proc.returncode == 1 and "not all of one format" in proc.stderr
    assert f"{done} is megatron-dist" in proc.stderr and f"{plain} is dcp" in proc.stderr


def test_hf_truncated_checkpoint_is_reported_by_inspect(tmp_path):
    run = str(tmp_path / "hf")
    dirs = make_hf_run(run, [10, 20, 30])
    weights = os.path.join(dirs[-1], "model.safetensors")
    os.truncate(weights, os.path.getsize(weights) - 100)
    proc = run_cli(["inspect", run])
    assert proc.returncode == 1, proc.stdout
    assert "PROBLEM" in proc.stdout and weights in proc.stdout and "truncated" in proc.stdout
    assert "incomplete or unreadable" in proc.stderr and dirs[-1] in proc.stderr
    info = json.loads(run_cli(["inspect", run, "--json"]).stdout)
    assert info["checkpoints"][-1]["problems"] and not info["checkpoints"][0]["problems"]


def test_hf_save_in_progress_is_skipped_in_a_run_directory(tmp_path):
    run = str(tmp_path / "hf")
    dirs = make_hf_run(run, [10, 20, 30])
    for ckpt in dirs[:2]:  # the Trainer writes trainer_state.json last: the newest has none yet
        json.dump({"global_step": int(ckpt[-2:])}, open(os.path.join(ckpt, "trainer_state.json"), "w"))
    result = pmm_dist.merge(sources=[run], out=str(tmp_path / "out"), dry_run=True, quiet=True)
    assert [c.iteration for c in result.plan.checkpoints] == [10, 20]


def test_checkpoints_of_two_runs_are_refused_unless_allowed(run, tmp_path):
    other = str(tmp_path / "other")
    generate_run(other, iterations=[40], tp=2, pp=1, ep=1, num_layers=2, hidden_size=16,
                 ffn_hidden_size=32, num_experts=0, vocab_size=32)
    for shard in os.listdir(os.path.join(other, "iter_0000040")):
        path = os.path.join(other, "iter_0000040", shard, "model_optim_rng.pt")
        state = trusted_load(path)
        state["args"].seed = 777
        torch.save(state, path)
    sources = [os.path.join(run, "iter_0000030"), os.path.join(other, "iter_0000040")]
    proc = run_cli(["merge", *sources, "--out", str(tmp_path / "out"), "--quiet"])
    assert proc.returncode == 1 and "different runs" in proc.stderr
    assert "seed=1234 (the newest has seed=777)" in proc.stderr and "--allow-mixed-runs" in proc.stderr
    assert not os.path.exists(tmp_path / "out")
    proc = run_cli(["merge", *sources, "--out", str(tmp_path / "out"), "--quiet", "--allow-mixed-runs"])
    assert proc.returncode == 0, proc.stderr


def test_hf_runs_with_different_configs_are_refused(tmp_path):
    a = make_hf_run(str(tmp_path / "a"), [10])[0]
    b = make_hf_run(str(tmp_path / "b"), [20])[0]
    config = json.load(open(os.path.join(b, "config.json")))
    config["rms_norm_eps"] = 1e-6
    json.dump(config, open(os.path.join(b, "config.json"), "w"))
    proc = run_cli(["merge", a, b, "--out", str(tmp_path / "out"), "--quiet"])
    assert proc.returncode == 1 and "different runs" in proc.stderr and "rms_norm_eps" in proc.stderr


# -- interrupts and resume -------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2])
def test_ctrl_c_ends_every_rank_with_one_line_and_the_resume_command(run, tmp_path, world_size):
    out = str(tmp_path / "out")
    proc = run_cli(["merge", run, "--out", out, *ARGS], world_size=world_size,
                   env={"PMM_DIST_FAULT": "unit:0@0=sigint"})
    assert proc.returncode == 130 or (world_size > 1 and proc.returncode != 0), proc.stderr
    # No traceback of ours (torchrun itself reports a failed child with its own).
    assert "KeyboardInterrupt" not in proc.stderr and "pmm_dist/" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("pmm-dist: interrupted")]
    assert len(lines) == 1 and ".pmm_staging" in lines[0] and "--resume" in lines[0]
    assert not os.path.exists(os.path.join(out, TRACKER))
    if world_size == 1:  # the printed command is the one to run
        command = shlex.split(lines[0].split("to continue: ", 1)[1])
        assert command[0] == "pmm-dist" and command[-1] == "--resume"
        assert run_cli(command[1:]).returncode == 0
        assert os.path.exists(os.path.join(out, TRACKER))


def test_rerun_without_resume_names_the_interrupted_merge(run, tmp_path):
    out = str(tmp_path / "out")
    assert run_cli(["merge", run, "--out", out, *ARGS], env={"PMM_DIST_FAULT": "unit:0@0=kill"}).returncode != 0
    staged = tree(os.path.join(out, ".pmm_staging"))
    proc = run_cli(["merge", run, "--out", out, *ARGS])
    assert proc.returncode == 1 and "interrupted merge" in proc.stderr
    assert "--resume" in proc.stderr and "--overwrite" in proc.stderr
    assert tree(os.path.join(out, ".pmm_staging")) == staged  # nothing discarded
    assert run_cli(["merge", run, "--out", out, *ARGS, "--resume"]).returncode == 0


def test_resume_with_other_options_names_what_differs_in_one_message(run, tmp_path):
    out = str(tmp_path / "out")
    assert run_cli(["merge", run, "--out", out, *ARGS], env={"PMM_DIST_FAULT": "unit:0@0=kill"}).returncode != 0
    proc = run_cli(["merge", run, "--out", out, "--method", "wma", "--last", "2", "--quiet", "--resume"])
    assert proc.returncode == 1 and "refusing to --resume" in proc.stderr and "weights" in proc.stderr
    assert "re-run the same command with --resume" not in proc.stderr
    assert "continue with" not in proc.stderr  # no contradictory resume hint
    assert "--overwrite" in proc.stderr


def test_nonfinite_error_suggests_a_way_out_not_resume(run, tmp_path):
    path = os.path.join(run, "iter_0000020", "mp_rank_00", "model_optim_rng.pt")
    state = trusted_load(path)
    key = next(k for k, v in state["model"].items() if torch.is_tensor(v) and v.is_floating_point())
    state["model"][key][0] = float("nan")
    torch.save(state, path)
    proc = run_cli(["merge", run, "--out", str(tmp_path / "out"), *ARGS])
    assert proc.returncode == 1 and "NaN" in proc.stderr
    assert "--on-nonfinite" in proc.stderr and "--iterations" in proc.stderr and "--resume" not in proc.stderr
    # nothing of the failed merge is left to refuse the way out it suggests
    proc = run_cli(["merge", run, "--out", str(tmp_path / "out"), *ARGS, "--on-nonfinite", "warn"])
    assert proc.returncode == 0 and "NaN" in proc.stderr, proc.stderr


def test_summary_after_resume_counts_only_this_runs_work(tmp_path):
    run = str(tmp_path / "run")  # 8 shard files: more than the units a rank has in flight
    generate_run(run, iterations=[10, 20], tp=4, pp=2, ep=1, num_layers=2, hidden_size=16,
                 ffn_hidden_size=32, num_experts=0, vocab_size=32)
    full = run_cli(["merge", run, "--out", str(tmp_path / "full")])
    out = str(tmp_path / "out")
    assert run_cli(["merge", run, "--out", out, "--quiet"], env={"PMM_DIST_FAULT": "unit:0@0=kill"}).returncode != 0
    resumed = run_cli(["merge", run, "--out", out, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    done = int(resumed.stdout.split("resuming: ", 1)[1].split(" ", 1)[0])
    assert 1 <= done < 8
    assert f"{done} files were finished by the interrupted run and are not counted below" in resumed.stdout
    manifest = json.load(open(os.path.join(out, "pmm_manifest.json")))
    complete = json.load(open(os.path.join(tmp_path / "full", "pmm_manifest.json")))
    assert manifest["units_resumed"] == done
    assert 0 < manifest["bytes_read"] < complete["bytes_read"]
    assert 0 < manifest["bytes_written"] < complete["bytes_written"]
    assert "files were finished" not in full.stdout


# -- clear contracts -------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, needle", [
    (["--last", "0"], "--last must be at least 1"),
    (["--interval", "0"], "--interval must be at least 1"),
    (["--method", "ema", "--alpha", "1.5"], "--alpha must be in (0, 1]"),
    (["--method", "weighted", "--weights", "1,2,3,4,5"], "5 values but 3 checkpoints"),
    (["--alpha", "0.3"], "--method ema"),
    (["--method", "weighted", "--weights", "1,nan,1"], "--weights must be finite"),
    (["--method", "weighted", "--weights", "1,inf,1", "--no-normalize"], "--weights must be finite"),
    (["--iterations", "100,300", "--last", "1"], "do not combine it with --last"),
    (["--timeout-minutes", "0"], "--timeout-minutes must be more than 0"),
])
def test_usage_errors_exit_2(run, tmp_path, flags, needle):
    proc = run_cli(["merge", run, "--out", str(tmp_path / "out"), "--quiet", *flags])
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert not os.path.exists(tmp_path / "out")


def test_a_wrong_path_exits_2(tmp_path):
    proc = run_cli(["merge", str(tmp_path / "no_such_run"), "--out", str(tmp_path / "out")])
    assert proc.returncode == 2 and "no such file or directory" in proc.stderr


def test_a_single_path_string_is_a_type_error(run, tmp_path):
    with pytest.raises(TypeError, match="not a single path"):
        pmm_dist.merge(sources=run, out=str(tmp_path / "out"))


def test_manifest_and_summary_count_every_file_and_tensors(run, tmp_path):
    out = str(tmp_path / "out")
    proc = run_cli(["merge", run, "--out", out, "--last", "2"])
    assert proc.returncode == 0
    manifest = json.load(open(os.path.join(out, "pmm_manifest.json")))
    written = tree(out)
    assert sorted(f["path"] for f in manifest["files"]) == sorted(w for w in written if w != "pmm_manifest.json")
    assert manifest["bytes_written"] == sum(f["bytes"] for f in manifest["files"])
    assert f"files written: {len(manifest['files'])} ({manifest['tensors_merged']} tensors merged)" in proc.stdout


def test_hf_iterations_by_directory_name(tmp_path):
    run = str(tmp_path / "hf")
    make_hf_run(run, [20, 40, 60], name="checkpoint-{}")
    from pmm_dist.cli import main
    result = main(["merge", run, "--out", str(tmp_path / "out"), "--dry-run", "--quiet",
                                "--iterations", "checkpoint-20,checkpoint-60"])
    assert result == 0
    proc = run_cli(["merge", run, "--out", str(tmp_path / "out"), "--dry-run", "--iterations",
                    "checkpoint-20,checkpoint-60"])
    assert proc.returncode == 0 and "checkpoint-40" not in proc.stdout and "checkpoint-60" in proc.stdout


def test_out_inside_the_run_directory(run):
    out = os.path.join(run, "merged")
    proc = run_cli(["merge", run, "--out", out, *ARGS])
    assert proc.returncode == 0, proc.stderr
    assert open(os.path.join(out, TRACKER)).read().strip() == "30"
    # The run still lists only its own checkpoints, and a name the run would take for one is refused.
    assert [c.iteration for c in resolve_format("auto", [run]).discover([run])] == [10, 20, 30]
    proc = run_cli(["merge", run, "--out", os.path.join(run, "iter_0000099"), *ARGS])
    assert proc.returncode == 1 and "overlaps the input" in proc.stderr


def test_verify_says_what_it_did_not_check(run, tmp_path):
    out = str(tmp_path / "out")
    assert run_cli(["merge", run, "--out", out, *ARGS]).returncode == 0
    shutil.rmtree(run)
    proc = run_cli(["verify", out])
    assert proc.returncode == 0 and "skipped" in proc.stdout and "no longer exists" in proc.stdout
    proc = run_cli(["verify", str(tmp_path / "nowhere")])
    assert proc.returncode == 1 and "no such directory" in proc.stderr


def test_include_and_exclude_merge_only_the_named_tensors(run, tmp_path):
    out = str(tmp_path / "out")
    proc = run_cli(["merge", run, "--out", out, *ARGS, "--include", "model.*", "--exclude", "*embedding*"])
    assert proc.returncode == 0, proc.stderr
    merged = trusted_load(os.path.join(out, "iter_0000030", "mp_rank_00", "model_optim_rng.pt"))["model"]
    newest = trusted_load(os.path.join(run, "iter_0000030", "mp_rank_00", "model_optim_rng.pt"))["model"]
    older = trusted_load(os.path.join(run, "iter_0000020", "mp_rank_00", "model_optim_rng.pt"))["model"]
    floats = [k for k, v in newest.items() if torch.is_tensor(v) and v.is_floating_point()]
    kept = [k for k in floats if "embedding" in k]
    assert kept and len(kept) < len(floats)
    for key in floats:
        if key in kept:
            assert torch.equal(merged[key], newest[key]), key
        else:
            expected = ((older[key].double() + newest[key].double()) / 2).to(newest[key].dtype)
            assert torch.equal(merged[key], expected) or not torch.equal(merged[key], newest[key]), key
    manifest = json.load(open(os.path.join(out, "pmm_manifest.json")))
    assert manifest["tensor_filter"] == {"include": ["model.*"], "exclude": ["*embedding*"]}


def test_pytorch_model_bin_names_the_limit(tmp_path):
    ckpt = tmp_path / "checkpoint-10"
    ckpt.mkdir()
    torch.save({"w": torch.ones(2)}, ckpt / "pytorch_model.bin")
    (ckpt / "config.json").write_text("{}")
    proc = run_cli(["merge", str(ckpt), str(ckpt), "--out", str(tmp_path / "out"), "--format", "hf"])
    assert proc.returncode == 1 and "pytorch_model.bin" in proc.stderr and "safetensors" in proc.stderr
