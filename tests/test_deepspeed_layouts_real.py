"""DeepSpeed runs whose data-parallel size changed, merged, with the REAL engine (CPU, gloo).

tests/deepspeed_real/engines.py trains the dense model under ZeRO-2 and ZeRO-3 twice each, at
data-parallel size 2 and at 1 (the "_dp1" runs), saving global steps 2, 4, 6, 8. A run that
changed its DP size is made of both: steps 2 and 4 from one, 6 and 8 from the other, in both
orders. Nothing is synthesised.

Each is merged at world sizes 1 and 2 and loaded into a FRESH engine of the NEWEST checkpoint's
data-parallel size (``load_checkpoint(OUT, load_module_only=True, load_optimizer_states=False,
load_lr_scheduler_states=False)``); every parameter must be within one ulp of the float64
weighted sum of the sources' weights: the saved ``module`` (ZeRO-2) or, for ZeRO-3, the fp32
weights ``deepspeed.utils.zero_to_fp32`` rebuilds from each source at its own DP size.
ZeRO-3 + ``--optimizer latest`` keeps the newest's Adam moments next to merged fp32 partitions
in the newest's partitioning: a full resume (``load_checkpoint(OUT)``) works at that size.
"""
import json
import shutil

import pytest
import torch

import pmm_dist
from pmm_dist.cli.verify import verify_output
from pmm_dist.errors import MergeError

from .helpers import assert_merged_within_one_ulp, ema, sma, trusted_load, wma
from .conftest import run_python
from .test_deepspeed_real import HELPER, _cli_args, _zero_to_fp32

STEPS = [2, 4, 6, 8]
NEWEST_TAG = "global_step8"
# case -> (run of steps 2 and 4, run of steps 6 and 8, merge options, weights oldest first)
CASES = {
    "zero2_dp2_to_dp1": ("zero2_fp32", "zero2_fp32_dp1", {"method": "sma"}, sma(4)),
    "zero2_dp1_to_dp2": ("zero2_fp32_dp1", "zero2_fp32", {"method": "ema", "alpha": 0.3}, ema(4, 0.3)),
    "zero3_dp2_to_dp1": ("zero3_fp32", "zero3_fp32_dp1", {"method": "sma"}, sma(4)),
    "zero3_dp1_to_dp2": ("zero3_fp32_dp1", "zero3_fp32", {"method": "wma"}, wma(4)),
}
LATEST = {f"{case}_latest": case for case in CASES}

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


def _mixed_run(runs, base, case):
    """A run directory whose checkpoints were saved at two data-parallel sizes."""
    older, newer, _, _ = CASES[case]
    run = base / "mixed" / case
    run.mkdir(parents=True)
    for step in STEPS:
        shutil.copytree(runs / (older if step <= 4 else newer) / f"global_step{step}", run / f"global_step{step}")
    (run / "latest").write_text(NEWEST_TAG)
    return run


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    base = tmp_path_factory.mktemp("deepspeed_layouts")
    runs = base / "runs"
    names = sorted({run for older, newer, _, _ in CASES.values() for run in (older, newer)})
    run_python([HELPER, "train", runs, "--runs", ",".join(names)], nproc=2, check="training the DeepSpeed runs")
    mixed = {case: _mixed_run(runs, base, case) for case in CASES}
    ws1, ws2, dumps = base / "ws1", base / "ws2", base / "dumps"
    for case, (_, _, options, _) in CASES.items():
        pmm_dist.merge(sources=[str(mixed[case])], out=str(ws1 / case), device="cpu", quiet=True, **options)
    for latest, case in LATEST.items():
        pmm_dist.merge(sources=[str(mixed[case])], out=str(ws1 / latest), device="cpu", quiet=True,
                       optimizer="latest", **CASES[case][2])
    # a fresh engine of the newest checkpoint's DP size ("_dp1": 1, else 2) loads each merge
    loads = [{"run": newer, "checkpoint": str(ws2 / case), "dump": str(dumps / case)}
             for case, (_, newer, _, _) in CASES.items()]
    loads += [{"run": CASES[case][1], "checkpoint": str(ws1 / latest), "dump": str(dumps / latest), "full": True}
              for latest, case in LATEST.items() if case.startswith("zero3")]
    spec = {"merges": [_cli_args(mixed[case], ws2 / case, options) for case, (_, _, options, _) in CASES.items()],
            "loads": loads}
    (base / "spec.json").write_text(json.dumps(spec))
    run_python([HELPER, "load", base / "spec.json"], nproc=2, check="merging at world size 2 and loading")
    return {"runs": runs, "mixed": mixed, "ws1": ws1, "ws2": ws2, "dumps": dumps}


def _source_weights(work, case, step):
    """name -> tensor of what DeepSpeed saved at ``step`` (ZeRO-3: zero_to_fp32 at its own DP size)."""
    run = work["mixed"][case]
    if case.startswith("zero3"):
        return _zero_to_fp32(run, step)
    return dict(trusted_load(run / f"global_step{step}" / "mp_rank_00_model_states.pt")["module"])


def _newest_dp(case):
    return 1 if CASES[case][1].endswith("_dp1") else 2


@pytest.mark.parametrize("case", list(CASES))
def test_engine_of_the_newest_size_loads_merged_weights(work, case):
    weights = CASES[case][3]
    sources = [_source_weights(work, case, step) for step in STEPS]
    for rank in range(2):
        dump = torch.load(work["dumps"] / case / f"rank{rank}.pt", map_location="cpu", weights_only=False)
        assert NEWEST_TAG in dump["load_path"]
        assert dump["changed"] == sorted(dump["params"]), "the load left parameters of the fresh engine unchanged"
        assert set(dump["params"]) == {n for n in sources[-1] if n not in ("running_mean", "num_batches")}
        for name, value in dump["params"].items():
            assert_merged_within_one_ulp(value, [s[name] for s in sources], weights, f"{case} rank {rank} {name}")
        assert_merged_within_one_ulp(dump["buffers"]["running_mean"], [s["running_mean"] for s in sources],
                                     weights, f"{case} rank {rank} running_mean")
        assert torch.equal(dump["buffers"]["num_batches"], sources[-1]["num_batches"])


@pytest.mark.parametrize("case", list(CASES))
def test_output_takes_the_newest_layout(work, case):
    out, newest = work["ws1"] / case, work["mixed"][case] / NEWEST_TAG
    zero3 = case.startswith("zero3")
    files = sorted(p.name for p in (out / NEWEST_TAG).iterdir())
    expected = sorted(p.name for p in newest.iterdir() if zero3 or not p.name.endswith("optim_states.pt"))
    assert files == expected  # ZeRO-2 --optimizer drop: the model states only
    for name in files:
        merged, source = trusted_load(out / NEWEST_TAG / name), trusted_load(newest / name)
        if "module" in merged:
            assert merged["dp_world_size"] == source["dp_world_size"] == _newest_dp(case)
        else:
            optim, newest_optim = merged["optimizer_state_dict"], source["optimizer_state_dict"]
            assert optim["partition_count"] == newest_optim["partition_count"] == _newest_dp(case)
            assert [g.shape for g in optim["fp32_flat_groups"]] == [g.shape for g in newest_optim["fp32_flat_groups"]]
            assert "optimizer_state_dict" not in optim  # --optimizer drop: no moments
    manifest = json.loads((out / "pmm_manifest.json").read_text())
    assert [layout["dp"] for layout in manifest["source_layouts"]] == [3 - _newest_dp(case)] * 2 + [_newest_dp(case)] * 2
    assert manifest["layout"]["dp"] == _newest_dp(case)
    assert verify_output(str(out)) == []


def test_world_sizes_bitwise_identical(work):
    for case in CASES:
        one, two = work["ws1"] / case / NEWEST_TAG, work["ws2"] / case / NEWEST_TAG
        assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
        for path in one.iterdir():
            assert path.read_bytes() == (two / path.name).read_bytes(), f"{case}/{path.name}: world size 1 != 2"


@pytest.mark.parametrize("latest", [name for name, case in LATEST.items() if case.startswith("zero3")])
def test_zero3_optimizer_latest_resumes_at_the_newest_size(work, latest):
    """The newest's moments match the newest's partitioning, and so do the merged fp32
    partitions: kept together, a full resume (optimizer too) runs at the newest's DP size and
    holds the merged weights."""
    case = LATEST[latest]
    out, newest = work["ws1"] / latest / NEWEST_TAG, work["mixed"][case] / NEWEST_TAG
    for path in newest.glob("*optim_states.pt"):
        merged, source = trusted_load(out / path.name), trusted_load(path)
        moments, newest_moments = (s["optimizer_state_dict"]["optimizer_state_dict"] for s in (merged, source))
        for index, state in newest_moments["state"].items():
            for key, value in state.items():
                assert torch.equal(moments["state"][index][key], value), f"{path.name}: moment {key} changed"
    sources = [_source_weights(work, case, step) for step in STEPS]
    for rank in range(2):
        dump = torch.load(work["dumps"] / latest / f"rank{rank}.pt", map_location="cpu", weights_only=False)
        assert dump["changed"] == sorted(dump["params"])
        for name, value in dump["params"].items():
            assert_merged_within_one_ulp(value, [s[name] for s in sources], CASES[case][3], f"{latest} {name}")


@pytest.mark.parametrize("latest", [name for name, case in LATEST.items() if case.startswith("zero2")])
def test_zero2_optimizer_latest_remaps_the_masters_onto_the_newest_partitions(work, latest):
    """ZeRO-2 + --optimizer latest across DP sizes: each output rank's fp32 partition is its slice
    of the merged flat group (the sources' partitions concatenated; the group padding stripped),
    so DeepSpeed's zero_to_fp32 reads the merged masters; the moments are the newest's."""
    case = LATEST[latest]
    out, newest = work["ws1"] / latest / NEWEST_TAG, work["mixed"][case] / NEWEST_TAG
    optim_files = sorted(p.name for p in newest.glob("*optim_states.pt"))
    assert len(optim_files) == _newest_dp(case) and sorted(p.name for p in out.glob("*optim_states.pt")) == optim_files
    merged = _zero_to_fp32(work["ws1"] / latest, 8)
    sources = [_zero_to_fp32(work["mixed"][case], step) for step in STEPS]
    for name in sources[-1]:
        if name != "num_batches":
            assert_merged_within_one_ulp(merged[name], [s[name] for s in sources], CASES[case][3], f"{latest} {name}")
    for name in optim_files:
        optim, newest_optim = (trusted_load(d / name)["optimizer_state_dict"] for d in (out, newest))
        assert optim["partition_count"] == newest_optim["partition_count"]
        assert [t.shape for t in optim["single_partition_of_fp32_groups"]] == \
            [t.shape for t in newest_optim["single_partition_of_fp32_groups"]]
        assert torch.equal(optim["base_optimizer_state"]["state"][0]["exp_avg"],
                           newest_optim["base_optimizer_state"]["state"][0]["exp_avg"])


# -- bad input: one message, nothing written ----------------------------------------------------------
def _refused(tmp_path, sources, *needles, **options):
    out = tmp_path / "refused"
    with pytest.raises(MergeError) as info:
        pmm_dist.merge(sources=[str(s) for s in sources], out=str(out), device="cpu", quiet=True, **options)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in:\n{message}"
    assert not out.exists()
    return message


def test_a_zero_stage_change_is_refused_in_one_message(work, tmp_path):
    runs = work["runs"]
    message = _refused(tmp_path, [runs / "zero2_fp32_dp1" / "global_step4", runs / "zero3_fp32" / NEWEST_TAG],
                       "zero_stage=2, dp=1: " + str(runs / "zero2_fp32_dp1" / "global_step4"),
                       "zero_stage=3, dp=2: " + str(runs / "zero3_fp32" / NEWEST_TAG), "--iterations 8")
    assert "problems" not in message and len(message.splitlines()) == 4


def test_a_param_shapes_change_is_refused_in_one_message(work, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(work["mixed"]["zero3_dp2_to_dp1"], run)
    for dp in range(2):
        path = run / "global_step2" / f"zero_pp_rank_{dp}_mp_rank_00_model_states.pt"
        state = trusted_load(path)
        state["param_shapes"][0]["inp.weight"] = torch.Size([8, 15])  # another model: transposed
        torch.save(state, path)
    message = _refused(tmp_path, [run], str(run / "global_step2"), "param_shapes")
    assert "problems" not in message


def test_a_partition_of_the_wrong_size_is_refused_naming_file_and_key(work, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(work["mixed"]["zero3_dp2_to_dp1"], run)
    path = run / "global_step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    state = trusted_load(path)
    state["optimizer_state_dict"]["fp32_flat_groups"][0] = state["optimizer_state_dict"]["fp32_flat_groups"][0][:-2]
    torch.save(state, path)
    _refused(tmp_path, [run], str(path), "fp32_flat_groups", "holds 130 elements", "need 132")
