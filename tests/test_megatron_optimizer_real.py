"""``--optimizer drop|latest|merge`` on Megatron-LM legacy checkpoints written by megatron-core's OWN
optimizers (CPU, gloo, 2 processes; see tests/megatron_real/optim_gpt.py for the CPU patches).

Two runs of a tiny bf16 GPTModel, saved at iterations 2, 4, 6, 8 as Megatron-LM's legacy
``save_checkpoint`` does: Float16OptimizerWithFloat16Params at TP=2 (the masters in
``optimizer.fp32_from_fp16_params``, per param group, without names) and the DistributedOptimizer
at DP=2 (the masters and moments in distrib_optim.pt's coalesced buffers). Every merge is loaded
back by megatron-core (model, ``optimizer.load_state_dict``, ``load_parameter_state``, the
scheduler), and so is every source: the reference is what megatron-core itself holds for each
parameter after loading a source (its fp32 master and Adam moments), averaged in float64.
"""
import json
import pathlib

import pytest
import torch

import pmm_dist
from pmm_dist.errors import MergeError

from .conftest import REPO, run_python
from .helpers import assert_merged_within_one_ulp, ema, sma, trusted_load, wma

HELPER = pathlib.Path(REPO) / "tests" / "megatron_real" / "optim_gpt.py"
ITERATIONS = [2, 4, 6, 8]
KINDS = ("fp16", "dist")
POLICIES = {"drop": ({"method": "sma"}, sma(4)), "latest": ({"method": "ema", "alpha": 0.3}, ema(4, 0.3)),
            "merge": ({"method": "wma"}, wma(4))}
SHARDS = {"fp16": ["mp_rank_00", "mp_rank_01"], "dist": ["mp_rank_00"]}

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    base = tmp_path_factory.mktemp("megatron_optimizer")
    runs, out, dumps = base / "runs", base / "out", base / "dumps"
    for kind in KINDS:
        run_python([HELPER, "train", runs / kind, "--optimizer", kind], nproc=2, check=f"training the {kind} run")
        for policy, (options, _) in POLICIES.items():
            pmm_dist.merge(sources=[str(runs / kind)], out=str(out / f"{kind}_{policy}"), optimizer=policy,
                           device="cpu", quiet=True, **options)
        checkpoints = [f"{out / f'{kind}_{policy}'}:8:{dumps / f'{kind}_{policy}'}" for policy in ("latest", "merge")]
        checkpoints += [f"{runs / kind}:{it}:{dumps / f'{kind}_source{it}'}" for it in ITERATIONS]
        run_python([HELPER, "load", "--optimizer", kind, *[a for c in checkpoints for a in ("--checkpoint", c)]],
                   nproc=2, check=f"loading the {kind} merges and sources with megatron-core")
    return {"runs": runs, "out": out, "dumps": dumps}


def _held(work, kind, name):
    """(tp rank, parameter) -> {"param", "exp_avg", "exp_avg_sq"}: what megatron-core's optimizer
    holds after loading ``name``, whole (the DistributedOptimizer's DP shards put together)."""
    dumps = [torch.load(work["dumps"] / name / f"rank{r}.pt", map_location="cpu", weights_only=False) for r in range(2)]
    held = {}
    for rank, dump in enumerate(dumps):
        tp = rank if kind == "fp16" else 0
        for param, shard in dump["masters"].items():
            numel = dump["tensors"][param].numel()
            whole = held.setdefault((tp, param), {key: torch.full((numel,), float("nan")) for key in
                                                  ("param", "exp_avg", "exp_avg_sq")})
            for key in whole:
                whole[key][shard["start"]:shard["end"]] = shard[key]
    for (tp, param), whole in held.items():
        assert not any(torch.isnan(v).any() for v in whole.values()), f"{name}: {param} not covered by the DP shards"
    return held, dumps


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("policy", ["latest", "merge"])
def test_megatron_core_resumes_from_the_merged_masters(work, kind, policy):
    weights = POLICIES[policy][1]
    sources = [_held(work, kind, f"{kind}_source{it}")[0] for it in ITERATIONS]
    merged, dumps = _held(work, kind, f"{kind}_{policy}")
    newest_dumps = _held(work, kind, f"{kind}_source8")[1]
    assert set(merged) == set(sources[-1]) and len(merged) >= 10 * len(SHARDS[kind])
    for (tp, param), held in merged.items():
        what = f"{kind} {policy} tp{tp} {param}"
        assert_merged_within_one_ulp(held["param"], [s[(tp, param)]["param"] for s in sources], weights, f"{what} master")
        # the model's tensor (as loaded from the file) is exactly the merged master, rounded
        model = dumps[tp if kind == "fp16" else 0]["tensors"][param]
        assert torch.equal(model.reshape(-1), held["param"].to(model.dtype)), f"{what}: model != master rounded"
        for key in ("exp_avg", "exp_avg_sq"):
            if policy == "merge":
                assert_merged_within_one_ulp(held[key], [s[(tp, param)][key] for s in sources], weights, f"{what} {key}")
            else:
                assert torch.equal(held[key], sources[-1][(tp, param)][key]), f"{what}: {key} is not the newest's"
    for dump, newest in zip(dumps, newest_dumps):
        assert dump["steps"] == newest["steps"] == [8.0] and dump["lr"] == newest["lr"]
        assert dump["scheduler"] == newest["scheduler"] and dump["scheduler"]["num_steps"] == 8
        step = dump["step"]
        assert step["finite"] and step["loss"] == step["loss"] and step["unchanged"] == [], step
    manifest = json.loads((work["out"] / f"{kind}_{policy}" / "pmm_manifest.json").read_text())
    assert manifest["model_weights_from"] == "fp32 masters" and manifest["model_weights_notes"] == []


@pytest.mark.parametrize("kind", KINDS)
def test_drop_writes_the_merged_masters_rounded_and_no_training_state(work, kind):
    sources = [_held(work, kind, f"{kind}_source{it}")[0] for it in ITERATIONS]
    checked = 0
    for tp, shard in enumerate(SHARDS[kind]):
        merged = trusted_load(work["out"] / f"{kind}_drop" / "iter_0000008" / shard / "model_optim_rng.pt")
        assert not {"optimizer", "opt_param_scheduler", "rng_state"} & set(merged)
        for (source_tp, param), _ in sources[-1].items():
            if source_tp == tp:
                value = merged["model"][param]
                assert value.dtype == torch.bfloat16
                assert_merged_within_one_ulp(value.reshape(-1), [s[(tp, param)]["param"] for s in sources],
                                             POLICIES["drop"][1], f"{kind} drop {param}")
                checked += 1
    assert checked >= 10
    assert not (work["out"] / f"{kind}_drop" / "iter_0000008" / "mp_rank_00" / "distrib_optim.pt").exists()


def test_masters_are_not_the_model_copies_averaged(work):
    """Guard the test: merging the masters differs from merging the bf16 copies somewhere."""
    sources = [trusted_load(work["runs"] / "dist" / f"iter_{it:07d}" / "mp_rank_00" / "model_optim_rng.pt")["model"]
               for it in ITERATIONS]
    merged = trusted_load(work["out"] / "dist_drop" / "iter_0000008" / "mp_rank_00" / "model_optim_rng.pt")["model"]
    differ = 0
    for key, value in merged.items():
        if torch.is_tensor(value) and value.is_floating_point():
            copies = sum(0.25 * s[key].double() for s in sources).to(value.dtype)
            differ += int((copies != value).sum())
    assert differ > 0


# -- bad input: one error naming the file and what differs; nothing written --------------------------
def _refused(tmp_path, run, *needles, **options):
    out = tmp_path / "refused"
    with pytest.raises(MergeError) as info:
        pmm_dist.merge(sources=[str(run)], out=str(out), device="cpu", quiet=True, **options)
    for needle in needles:
        assert str(needle) in str(info.value), f"{needle!r} not in:\n{info.value}"
    assert not out.exists()
    return str(info.value)


def _edit(path, change):
    state = trusted_load(path)
    change(state)
    torch.save(state, path)


@pytest.mark.parametrize("policy", ["latest", "merge"])
def test_a_checkpoint_without_optimizer_state_is_refused(work, tmp_path, fresh_copy, policy):
    run = fresh_copy(work["runs"] / "fp16")
    path = run / "iter_0000004" / "mp_rank_01" / "model_optim_rng.pt"
    _edit(path, lambda state: state.pop("optimizer"))
    _refused(tmp_path, run, path, "no optimizer state", optimizer=policy)
    out = tmp_path / "drop"  # drop: the model copies are merged, and the manifest says why
    pmm_dist.merge(sources=[str(run)], out=str(out), device="cpu", quiet=True)
    manifest = json.loads((out / "pmm_manifest.json").read_text())
    assert manifest["model_weights_from"] == "fp32 masters (1 files); model copies (1 files)"
    assert "mp_rank_01/model_optim_rng.pt" in manifest["model_weights_notes"][0]
    assert "no optimizer state" in manifest["model_weights_notes"][0]


def test_another_optimizer_structure_is_refused(work, tmp_path, fresh_copy):
    run = fresh_copy(work["runs"] / "fp16")
    path = run / "iter_0000006" / "mp_rank_00" / "model_optim_rng.pt"
    _edit(path, lambda state: state["optimizer"]["fp32_from_fp16_params"][1].pop())
    _refused(tmp_path, run, path, "optimizer structure", "differs from the newest", optimizer="merge")


def test_a_moment_of_another_shape_is_refused_naming_file_and_key(work, tmp_path, fresh_copy):
    run = fresh_copy(work["runs"] / "fp16")
    path = run / "iter_0000002" / "mp_rank_01" / "model_optim_rng.pt"

    def shorten(state):
        moments = state["optimizer"]["optimizer"]["state"][3]
        moments["exp_avg"] = moments["exp_avg"].reshape(-1)[1:].clone()
    _edit(path, shorten)
    _refused(tmp_path, run, path, "optimizer.optimizer.state.3.exp_avg", "shape", optimizer="merge")


def test_distrib_optim_of_another_layout_or_missing_is_refused(work, tmp_path, fresh_copy):
    run = fresh_copy(work["runs"] / "dist")
    path = run / "iter_0000004" / "mp_rank_00" / "distrib_optim.pt"

    def other_numel(state):
        buffer = next(iter(state[0].values()))
        buffer["numel_unpadded"] -= 64
    _edit(path, other_numel)
    _refused(tmp_path, run, path, "numel_unpadded", "differ from the newest", optimizer="latest")
    path.unlink()
    _refused(tmp_path, run, path, "missing file", optimizer="merge")


def test_distrib_masters_that_do_not_match_the_model_fall_back_to_the_copies(work, tmp_path, fresh_copy):
    """The buffers are exact but their masters do not round to the model's tensors (here: the
    newest's masters shifted): the merge goes on with the model copies and the manifest says why."""
    run = fresh_copy(work["runs"] / "dist")
    path = run / "iter_0000008" / "mp_rank_00" / "distrib_optim.pt"
    _edit(path, lambda state: next(iter(state[0].values()))["param"].mul_(1.5))
    out = tmp_path / "out"
    pmm_dist.merge(sources=[str(run)], out=str(out), optimizer="merge", device="cpu", quiet=True)
    manifest = json.loads((out / "pmm_manifest.json").read_text())
    assert manifest["model_weights_from"] == "model copies"
    assert "do not follow the model's parameters" in manifest["model_weights_notes"][0]
