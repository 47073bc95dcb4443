"""``--optimizer latest|merge`` with the REAL DeepSpeed engine (CPU, gloo, 2 processes).

tests/deepspeed_real/engines.py trains the dense model under ZeRO-1, 2 and 3, in fp32 and bf16,
with a torch Adam and a WarmupLR scheduler, saving global steps 2, 4, 6, 8 (and the bf16 ZeRO-2
and ZeRO-3 models once more at data-parallel size 1). Each run is merged with ``latest`` and
``merge``; a run that changed its DP size (steps 2, 4 at DP 1; 6, 8 at DP 2) with ``merge``.

References, all independent of pmm_dist:
- the fp32 masters: ``deepspeed.utils.zero_to_fp32`` of every source, averaged in float64; the
  output's own ``zero_to_fp32`` must be within one fp32 ulp of that;
- the moments: every SOURCE loaded into an engine of its own DP size with a full
  ``load_checkpoint``, read through ``safe_get_full_optimizer_state``.
Every output is loaded with a full ``load_checkpoint`` (optimizer and scheduler): the engine's
masters (``safe_get_full_fp32_param``) are the output's zero_to_fp32 exactly, the module's
weights are those masters rounded to its dtype, the moments are the average of the sources'
(merge; within one ulp) or the newest's (latest; exactly), the scheduler and step are the
newest's, and a training step runs. Bad input: each validation rule on a damaged copy.
"""
import json
import pathlib
import shutil

import pytest
import torch

import pmm_dist
from pmm_dist.errors import MergeError

from .conftest import run_python
from .deepspeed_real.engines import RUNS
from .helpers import assert_merged_within_one_ulp, ema, sma, trusted_load, wma, zero3_padding
from .test_deepspeed_real import HELPER, _zero_to_fp32

STEPS = [2, 4, 6, 8]
NEWEST_TAG = "global_step8"
# case -> (run directory (or "dp-change run" of two runs), policy, merge options, weights oldest first)
CASES = {}
for _stage in (1, 2, 3):
    for _dtype in ("fp32", "bf16"):
        _run = f"opt_zero{_stage}_{_dtype}"
        CASES[f"zero{_stage}_{_dtype}_merge"] = (_run, "merge", {"method": "wma"}, wma(4))
        CASES[f"zero{_stage}_{_dtype}_latest"] = (_run, "latest", {"method": "ema", "alpha": 0.3}, ema(4, 0.3))
# steps 2 and 4 of the first run (DP 1), 6 and 8 of the second (DP 2)
DP_CHANGE = {"zero2_bf16_dp_change_merge": ("opt_zero2_bf16_dp1", "opt_zero2_bf16"),
             "zero3_bf16_dp_change_merge": ("opt_zero3_bf16_dp1", "opt_zero3_bf16")}
for _case, (_older, _newer) in DP_CHANGE.items():
    CASES[_case] = (_case, "merge", {"method": "sma"}, sma(4))

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


def _source_run(case, step):
    """The trained run that holds ``case``'s checkpoint at ``step``."""
    run = CASES[case][0]
    if run in DP_CHANGE:
        return DP_CHANGE[run][0] if step <= 4 else DP_CHANGE[run][1]
    return run


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    base = tmp_path_factory.mktemp("deepspeed_optimizer")
    runs = base / "runs"
    names = sorted({_source_run(case, step) for case in CASES for step in STEPS})
    run_python([HELPER, "train", runs, "--runs", ",".join(names)], nproc=2, check="training the DeepSpeed runs")
    for case, (older, newer) in DP_CHANGE.items():
        for step in STEPS:
            shutil.copytree(runs / (older if step <= 4 else newer) / f"global_step{step}", runs / case / f"global_step{step}")
        (runs / case / "latest").write_text(NEWEST_TAG)
    out, dumps = base / "out", base / "dumps"
    for case, (run, policy, options, _) in CASES.items():
        pmm_dist.merge(sources=[str(runs / run)], out=str(out / case), optimizer=policy, device="cpu", quiet=True,
                       **options)
    # every output, and every source it was merged from, loaded in full by an engine of its DP size
    loads = [{"run": _source_run(case, STEPS[-1]), "checkpoint": str(out / case), "dump": str(dumps / case),
              "probe": True} for case in CASES]
    sources = sorted({(_source_run(case, step), step) for case in CASES for step in STEPS})
    loads += [{"run": run, "checkpoint": str(runs / run), "tag": f"global_step{step}", "probe": True,
               "dump": str(dumps / "sources" / f"{run}_{step}")} for run, step in sources]
    (base / "spec.json").write_text(json.dumps({"merges": [], "loads": loads}))
    run_python([HELPER, "load", base / "spec.json"], nproc=2, check="loading the outputs and sources in full")
    return {"runs": runs, "out": out, "dumps": dumps}


def _dump(path, rank=0):
    return torch.load(pathlib.Path(path) / f"rank{rank}.pt", map_location="cpu", weights_only=False)


def _source_probe(work, case, step):
    return _dump(work["dumps"] / "sources" / f"{_source_run(case, step)}_{step}")


def _dtype(case):
    return torch.bfloat16 if RUNS[_source_run(case, 8)][2] == "bf16" else torch.float32


@pytest.mark.parametrize("case", list(CASES))
def test_zero_to_fp32_reads_the_merged_masters(work, case):
    """DeepSpeed's own reconstruction of the output's fp32 weights: the float64 weighted sum of
    the sources' (each rebuilt by zero_to_fp32 at its own DP size), within one fp32 ulp."""
    run, _, _, weights = CASES[case]
    sources = [_zero_to_fp32(work["runs"] / run, step) for step in STEPS]
    merged = _zero_to_fp32(work["out"] / case, STEPS[-1])
    params = [name for name in sources[-1] if name not in ("running_mean", "num_batches")]
    assert len(params) == 6
    for name in params:
        assert merged[name].dtype == torch.float32
        assert_merged_within_one_ulp(merged[name], [s[name] for s in sources], weights, f"{case} master {name}")
    manifest = json.loads((work["out"] / case / "pmm_manifest.json").read_text())
    assert manifest["optimizer"] == CASES[case][1]
    assert manifest["model_weights_from"] == "fp32 masters" and manifest["model_weights_notes"] == []


@pytest.mark.parametrize("case", list(CASES))
def test_full_resume_holds_the_merged_masters_and_the_policy_s_moments(work, case):
    run, policy, _, weights = CASES[case]
    masters = _zero_to_fp32(work["out"] / case, STEPS[-1])
    sources = [_source_probe(work, case, step) for step in STEPS]
    newest = sources[-1]
    for rank in range(2):
        dump = _dump(work["dumps"] / case, rank)
        assert dump["load_path"] and NEWEST_TAG in dump["load_path"]
        for name, value in dump["masters"].items():
            # the optimizer continues from the merged masters; the module holds them rounded
            assert torch.equal(value, masters[name]), f"{case} rank {rank}: master {name}"
            assert dump["params"][name].dtype == _dtype(case)
            assert torch.equal(dump["params"][name], masters[name].to(_dtype(case))), f"{case}: module {name}"
            for key in ("exp_avg", "exp_avg_sq"):
                moment = dump["moments"][name][key]
                if policy == "merge":
                    assert_merged_within_one_ulp(moment, [s["moments"][name][key] for s in sources], weights,
                                                 f"{case} rank {rank} {key} of {name}")
                else:
                    assert torch.equal(moment, newest["moments"][name][key]), f"{case}: {key} of {name} not the newest's"
        # steps, scheduler and learning rate: the newest's
        assert dump["global_steps"] == newest["global_steps"] == STEPS[-1]
        assert dump["lr_scheduler"] == newest["lr_scheduler"] and dump["lr_scheduler"]["last_batch_iteration"] == 7
        assert dump["lr"] == newest["lr"]
        step = dump["step"]
        assert step["finite"] and step["global_steps"] == STEPS[-1] + 1 and step["loss"] == step["loss"]
        assert step["changed"] == sorted(dump["params"]), f"{case}: the training step left weights unchanged"


def test_setup_is_not_trivial(work):
    """The sources' moments and masters differ from step to step, so a merge is not the newest."""
    for case in ("zero2_bf16_merge", "zero3_fp32_merge"):
        first, last = _source_probe(work, case, 2), _source_probe(work, case, 8)
        for name in last["moments"]:
            assert not torch.equal(first["moments"][name]["exp_avg"], last["moments"][name]["exp_avg"])
            assert not torch.equal(first["masters"][name], last["masters"][name])


def test_merged_optimizer_files_keep_the_newest_s_other_state(work):
    """ZeRO-2 bf16 under merge: every rank file keeps the newest's loss scaler, partitioning and
    steps; the fp32 partitions and moments are merged; the model states' non-tensor entries
    (scheduler, global steps, client state) are the newest's."""
    run_dir, out = work["runs"] / "opt_zero2_bf16", work["out"] / "zero2_bf16_merge" / NEWEST_TAG
    for rank in range(2):
        name = f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        merged = trusted_load(out / name)["optimizer_state_dict"]
        newest = trusted_load(run_dir / NEWEST_TAG / name)["optimizer_state_dict"]
        for key in ("partition_count", "group_paddings", "param_alignment_paddings", "zero_stage", "clip_grad"):
            assert merged[key] == newest[key], key
        assert torch.equal(merged["base_optimizer_state"]["state"][0]["step"],
                           newest["base_optimizer_state"]["state"][0]["step"])
        assert merged["base_optimizer_state"]["param_groups"] == newest["base_optimizer_state"]["param_groups"]
        assert not torch.equal(merged["single_partition_of_fp32_groups"][0], newest["single_partition_of_fp32_groups"][0])
    model, newest_model = (trusted_load(d / "mp_rank_00_model_states.pt") for d in (out, run_dir / NEWEST_TAG))
    assert model["lr_scheduler"] == newest_model["lr_scheduler"] and model["global_steps"] == 8
    assert model["step_seen"] == 8 and list(model) == list(newest_model)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_zero3_padding_of_any_bits_merges_as_zeros(work, tmp_path, fresh_copy, dtype):
    """DeepSpeed allocates ZeRO-3 partitions with torch.empty and copies only the parameter's
    elements in: the padding holds whatever memory held, NaN included (a clean-clone run of this
    suite once saw all four fp32 checkpoints refused for it). A run whose padding is NaN, Inf and
    huge values, in the flat groups and the moments, merges to the same bytes as the run itself,
    whose output padding is zeros."""
    case = f"zero3_{dtype}_merge"
    run, policy, options, _ = CASES[case]
    copy = fresh_copy(work["runs"] / run)
    prefix = "bf16_" if dtype == "bf16" else ""
    shapes = trusted_load(copy / NEWEST_TAG / "zero_pp_rank_0_mp_rank_00_model_states.pt")["param_shapes"]
    garbage = torch.tensor([float("nan"), float("inf"), -3e38, float("-inf")])
    padded = 0
    for step in STEPS:
        for rank in range(2):
            path = copy / f"global_step{step}" / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
            state = trusted_load(path)
            optim = state["optimizer_state_dict"]
            places = torch.tensor(zero3_padding(shapes, 2, rank), dtype=torch.long)
            stream = torch.cat(optim["fp32_flat_groups"])
            moments = optim["optimizer_state_dict"]["state"]
            assert len(optim["fp32_flat_groups"]) == 1 and list(moments) == [0]
            for tensor in (optim["fp32_flat_groups"][0], moments[0]["exp_avg"], moments[0]["exp_avg_sq"]):
                assert tensor.numel() == stream.numel()
                with torch.no_grad():  # the flat groups are saved as parameters
                    tensor[places] = garbage.repeat(len(places))[:len(places)].to(tensor.dtype)
            padded += len(places)
            torch.save(state, path)
    assert padded, "the test model has no padding"
    out = tmp_path / "out"
    pmm_dist.merge(sources=[str(copy)], out=str(out), optimizer=policy, device="cpu", quiet=True, **options)
    expected = work["out"] / case / NEWEST_TAG
    names = sorted(p.name for p in expected.iterdir())
    assert names == sorted(p.name for p in (out / NEWEST_TAG).iterdir())
    for name in names:
        assert (out / NEWEST_TAG / name).read_bytes() == (expected / name).read_bytes(), name
    for rank in range(2):
        optim = trusted_load(expected / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
        places = zero3_padding(shapes, 2, rank)
        assert torch.all(torch.cat(optim["fp32_flat_groups"])[places] == 0)


# -- bad input: one clear error naming the file, nothing written ----------------------------------------
def _refused(tmp_path, sources, *needles, **options):
    out = tmp_path / "refused"
    with pytest.raises(MergeError) as info:
        pmm_dist.merge(sources=[str(s) for s in sources], out=str(out), device="cpu", quiet=True, **options)
    message = str(info.value)
    for needle in needles:
        assert str(needle) in message, f"{needle!r} not in:\n{message}"
    assert not out.exists(), f"something was written: {list(out.iterdir())}"
    return message


@pytest.mark.parametrize("policy", ["latest", "merge"])
def test_a_checkpoint_without_optimizer_files_is_refused(work, tmp_path, fresh_copy, policy):
    run = fresh_copy(work["runs"] / "opt_zero2_bf16")
    pruned = run / "global_step4" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    pruned.unlink()
    _refused(tmp_path, [run], pruned, "missing file", optimizer=policy)


def test_without_optimizer_files_drop_merges_the_model_copies_and_says_so(work, tmp_path, fresh_copy):
    run = fresh_copy(work["runs"] / "opt_zero2_bf16")
    for path in (run / "global_step4").glob("*optim_states.pt"):
        path.unlink()
    out = tmp_path / "out"
    pmm_dist.merge(sources=[str(run)], out=str(out), device="cpu", quiet=True)
    manifest = json.loads((out / "pmm_manifest.json").read_text())
    assert manifest["model_weights_from"] == "model copies"
    assert "global_step4 has no optimizer files" in manifest["model_weights_notes"][0]
    merged = trusted_load(out / NEWEST_TAG / "mp_rank_00_model_states.pt")["module"]
    sources = [trusted_load(run / f"global_step{s}" / "mp_rank_00_model_states.pt")["module"] for s in STEPS]
    assert_merged_within_one_ulp(merged["inp.weight"], [s["inp.weight"] for s in sources], sma(4), "inp.weight")


@pytest.mark.parametrize("run", ["opt_zero2_bf16", "opt_zero3_fp32"])
def test_merge_refuses_a_source_without_moments(work, tmp_path, fresh_copy, run):
    copy = fresh_copy(work["runs"] / run)
    name = ("bf16_" if "bf16" in run else "") + "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    path = copy / "global_step4" / name
    state = trusted_load(path)
    optim = state["optimizer_state_dict"]
    key = "optimizer_state_dict" if "fp32_flat_groups" in optim else "base_optimizer_state"
    optim[key] = {"state": {}, "param_groups": optim[key]["param_groups"]}  # as zero_to_fp32's helpers leave it
    torch.save(state, path)
    _refused(tmp_path, [copy], path, "no optimizer moments", "--optimizer merge", optimizer="merge")
    out = tmp_path / "latest_out"  # latest reads only the newest's moments: fine
    pmm_dist.merge(sources=[str(copy)], out=str(out), optimizer="latest", device="cpu", quiet=True)


@pytest.mark.parametrize("key,value", [("partition_count", [1]), ("param_alignment_paddings", [[0, 0, 0, 0, 0, 2]]),
                                       ("group_paddings", [5])])
def test_another_optimizer_partitioning_is_refused_naming_source_and_entry(work, tmp_path, fresh_copy, key, value):
    run = fresh_copy(work["runs"] / "opt_zero1_fp32")
    path = run / "global_step6" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    state = trusted_load(path)
    state["optimizer_state_dict"][key] = value
    torch.save(state, path)
    _refused(tmp_path, [run], path, key, "differs from the newest checkpoint's", optimizer="latest")


def test_other_param_groups_are_refused(work, tmp_path, fresh_copy):
    run = fresh_copy(work["runs"] / "opt_zero2_fp32")
    path = run / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    state = trusted_load(path)
    base = state["optimizer_state_dict"]["base_optimizer_state"]
    base["param_groups"].append(dict(base["param_groups"][0], params=[1]))
    torch.save(state, path)
    _refused(tmp_path, [run], path, "param groups", optimizer="merge")


def test_a_moment_of_another_shape_is_refused_naming_file_and_key(work, tmp_path, fresh_copy):
    run = fresh_copy(work["runs"] / "opt_zero2_fp32")
    path = run / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    state = trusted_load(path)
    moments = state["optimizer_state_dict"]["base_optimizer_state"]["state"][0]
    moments["exp_avg"] = moments["exp_avg"][:-1].clone()
    torch.save(state, path)
    _refused(tmp_path, [run], path, "base_optimizer_state.state.0.exp_avg", "shape", optimizer="merge")


def test_a_tensor_filter_is_refused_where_masters_are_flat(work, tmp_path):
    """Found while merging (a filter is no input problem the checks see): nothing is committed, and
    the staging area goes too (a --resume would meet the same refusal)."""
    refused = tmp_path / "refused"
    with pytest.raises(MergeError, match="--include/--exclude select tensors by name.*flat partitions"):
        pmm_dist.merge(sources=[str(work["runs"] / "opt_zero2_bf16")], out=str(refused), optimizer="merge",
                       include=["module.inp.*"], device="cpu", quiet=True)
    assert list(refused.iterdir()) == []  # bad input: nothing half-written, not even a staging area
    out = tmp_path / "drop"  # drop: the module's selected tensors are the merged masters, the rest the newest's
    pmm_dist.merge(sources=[str(work["runs"] / "opt_zero2_bf16")], out=str(out), include=["module.inp.*"],
                   device="cpu", quiet=True)
    merged = trusted_load(out / NEWEST_TAG / "mp_rank_00_model_states.pt")["module"]
    newest = trusted_load(work["runs"] / "opt_zero2_bf16" / NEWEST_TAG / "mp_rank_00_model_states.pt")["module"]
    masters = [_zero_to_fp32(work["runs"] / "opt_zero2_bf16", step) for step in STEPS]
    assert_merged_within_one_ulp(merged["inp.weight"], [m["inp.weight"] for m in masters], sma(4), "inp.weight")
    assert torch.equal(merged["out.weight"], newest["out.weight"])
