"""torch_dist optimizer-aware merges with REAL megatron-core optimizers (CPU, gloo, DP=2).

tests/dcp_real/gpt_optim.py trains one tiny bf16 GPTModel three times, identically, with the
optimizer megatron-core's get_megatron_optimizer builds for bf16 Adam, saving iterations 2, 4, 6
as its sharded_state_dict produces them: the DistributedOptimizer's default ``dp_reshardable``
buckets, its ``fully_reshardable`` model-space state, and the non-distributed
Float16OptimizerWithFloat16Params (``optimizer.state.fp32_param.*``). pmm_dist merges each run
(EMA) with --optimizer drop, latest and merge. Then:

- the merged fp32 masters equal the float64 reference of the sources' masters (one fp32 ulp);
  the moments too under merge, and are the newest's bytes under latest; the model weights are
  the merged masters rounded to bf16 (model-space masters) or the merged bf16 copies (buckets);
- megatron-core loads each output into a fresh model and optimizer (dist_checkpointing.load,
  load_state_dict) and saves what it then holds with its own sharded_state_dict: the bytes are
  the output's (the bucket state, re-saved in model space, equals the fully_reshardable run's
  merge bit for bit: the same elementwise sums); one training step then runs.
"""
import json
import pathlib
import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

import pmm_dist

from .conftest import REPO, run_cli, run_python
from .helpers import assert_merged_within_one_ulp, ema

HELPER = pathlib.Path(REPO) / "tests" / "dcp_real" / "gpt_optim.py"
SHARDINGS = ("dp_reshardable", "fully_reshardable", "nondist")
POLICIES = ("drop", "latest", "merge")
ITERATIONS = [2, 4, 6]
ALPHA = 0.3
WEIGHTS = ema(len(ITERATIONS), ALPHA)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _ckpt(root, iteration=ITERATIONS[-1]):
    return pathlib.Path(root) / f"iter_{iteration:07d}"


def _entries(ckpt):
    with open(pathlib.Path(ckpt) / ".metadata", "rb") as f:  # test side: our own test files
        return pickle.load(f).state_dict_metadata


def _load(ckpt, prefix=""):
    """Every tensor (whose key starts with ``prefix``) through torch.distributed.checkpoint.load."""
    entries = _entries(ckpt)
    state = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in entries.items()
             if hasattr(v, "size") and k.startswith(prefix)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(ckpt)))
    return state


def _same_bytes(a, b):
    """Bit for bit (the buckets' padding is uninitialised memory, which may hold NaNs)."""
    as_int = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(as_int), b.view(as_int))


def _kind(key):
    """megatron-core's naming, read independently of pmm_dist: master, moment or model."""
    if not key.startswith("optimizer."):
        return "model"
    name = key.split(".")[2] if key.startswith("optimizer.state.") else key.rsplit(".", 1)[1]
    return "master" if name in ("param", "fp32_param") else "moment"


def _master_of(key, entries):
    for prefix in ("optimizer.state.param.", "optimizer.state.fp32_param."):
        if prefix + key in entries:
            return prefix + key
    return None


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    base = tmp_path_factory.mktemp("megatron_optim")
    runs = base / "runs"
    run_python([HELPER, "train", runs, *[a for s in SHARDINGS for a in ("--sharding", s)],
                "--iterations", ",".join(map(str, ITERATIONS))], nproc=2,
               check="training a GPTModel with megatron-core's bf16 optimizers (DP=2) and torch_dist checkpoints")
    outs = {}
    for sharding in SHARDINGS:
        for policy in POLICIES:
            outs[(sharding, policy)] = base / f"out_{sharding}_{policy}"
            pmm_dist.merge(sources=[str(runs / sharding)], out=str(outs[(sharding, policy)]), method="ema",
                           alpha=ALPHA, optimizer=policy, device="cpu", quiet=True)
    ws2 = base / "out_dp_reshardable_merge_ws2"
    run_cli(["merge", runs / "dp_reshardable", "--out", ws2, "--method", "ema", "--alpha", ALPHA,
             "--optimizer", "merge", "--device", "cpu"], world_size=2, check="pmm_dist merge at world size 2")
    loads = {}
    for sharding in SHARDINGS:
        args = ["load", "--sharding", sharding, "--resave-as",
                "fully_reshardable" if sharding == "dp_reshardable" else sharding]
        for policy in POLICIES[1:]:
            loads[(sharding, policy)] = (base / f"resaved_{sharding}_{policy}", base / f"dump_{sharding}_{policy}.pt")
            args += ["--checkpoint", ":".join(map(str, (_ckpt(outs[(sharding, policy)]), *loads[(sharding, policy)])))]
        run_python([HELPER, *args], nproc=2, check=f"megatron-core loading the {sharding} merges and one step")
    return {"runs": runs, "outs": outs, "ws2": ws2, "loads": loads}


def test_sources_hold_megatron_cores_optimizer_state(workdir):
    runs = workdir["runs"]
    keys = {s: set(_entries(_ckpt(runs / s))) for s in SHARDINGS}
    assert any(k.endswith(".bucket_idx_0.param") for k in keys["dp_reshardable"])
    assert any(k.startswith("optimizer.distributed.dp_group_idx_0.per_bucket_numel/") for k in keys["dp_reshardable"])
    assert "optimizer.state.param.output_layer.weight" in keys["fully_reshardable"]
    assert "optimizer.state.fp32_param.output_layer.weight" in keys["nondist"]
    bucket = next(k for k in keys["dp_reshardable"] if k.endswith(".param"))
    assert len(_entries(_ckpt(runs / "dp_reshardable"))[bucket].chunks) > 2  # per parameter, over 2 DP ranks
    common = torch.load(_ckpt(runs / "dp_reshardable") / "common.pt", weights_only=False)
    assert common["content_metadata"]["distrib_optim_sharding_type"] == "dp_reshardable"
    # The three runs trained alike: same model weights at every iteration.
    for it in ITERATIONS:
        models = [_load(_ckpt(runs / s, it), prefix="") for s in SHARDINGS]
        for key in (k for k in models[0] if not k.startswith("optimizer")):
            assert torch.equal(models[0][key], models[1][key]) and torch.equal(models[0][key], models[2][key]), key


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("sharding", SHARDINGS)
def test_merged_state_matches_the_float64_reference(workdir, sharding, policy):
    run, out = workdir["runs"] / sharding, _ckpt(workdir["outs"][(sharding, policy)])
    sources = [_load(_ckpt(run, it)) for it in ITERATIONS]
    merged = _load(out)
    entries = _entries(_ckpt(run))
    counts = {"master": 0, "moment": 0}
    for key, value in merged.items():
        kind = _kind(key)
        if kind == "model":
            master = _master_of(key, entries)
            reference = [s[master] if master else s[key] for s in sources]
            assert_merged_within_one_ulp(value, reference, WEIGHTS, f"{sharding} {policy} {key}")
            if master:  # the fp32 masters merged, rounded to bf16 as megatron rounds them
                exact = sum(w * r.double() for w, r in zip(WEIGHTS, reference))
                assert torch.equal(value, exact.float().to(value.dtype)), key
            continue
        counts[kind] += 1
        if kind == "master" or policy == "merge":
            assert_merged_within_one_ulp(value, [s[key] for s in sources], WEIGHTS, f"{sharding} {policy} {key}")
            assert not _same_bytes(value, sources[-1][key]), key
        else:
            assert _same_bytes(value, sources[-1][key]), key
    assert (counts["master"] > 0 and counts["moment"] > 0) == (policy != "drop"), counts
    common, newest = (torch.load(c / "common.pt", weights_only=False) for c in (out, _ckpt(run)))
    assert ("optimizer" in common) == (policy != "drop")
    if policy != "drop":
        assert common["optimizer"] == newest["optimizer"]  # param groups and step: the newest's
    manifest = json.loads((workdir["outs"][(sharding, policy)] / "pmm_manifest.json").read_text())
    assert manifest["model_weights_from"] == ("model copies" if sharding == "dp_reshardable" else "fp32 masters")


@pytest.mark.parametrize("policy", POLICIES[1:])
@pytest.mark.parametrize("sharding", SHARDINGS)
def test_megatron_loads_the_merge_and_trains_on(workdir, sharding, policy):
    resaved_dir, dump_file = workdir["loads"][(sharding, policy)]
    resaved = _load(resaved_dir)
    # What megatron-core holds after loading, in model space: for the bucket state, the
    # fully_reshardable run's merge (the same training, the same elementwise sums).
    expected = _load(_ckpt(workdir["outs"][("fully_reshardable" if sharding == "dp_reshardable" else sharding,
                                            policy)]), prefix="optimizer.")
    expected.update({k: v for k, v in _load(_ckpt(workdir["outs"][(sharding, policy)])).items()
                     if not k.startswith("optimizer.")})
    assert set(resaved) == set(expected)
    for key, value in resaved.items():
        assert _same_bytes(value, expected[key]), f"{sharding} {policy} {key}"
    dump = torch.load(dump_file, weights_only=False)
    assert torch.isfinite(torch.tensor(dump["loss"])), dump["loss"]
    changed = [k for k in dump["before"] if not torch.equal(dump["before"][k], dump["after"][k])]
    assert len(changed) == len(dump["before"]), "every parameter moves in the step after loading"


def test_merge_world_sizes_agree_bitwise(workdir):
    one, two = _load(_ckpt(workdir["outs"][("dp_reshardable", "merge")])), _load(_ckpt(workdir["ws2"]))
    assert set(one) == set(two) and all(_same_bytes(one[k], two[k]) for k in one)
