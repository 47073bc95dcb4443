"""End to end with a REAL megatron-core GPTModel (TP=2 on gloo, CPU).

tests/megatron_real/gpt_tp2.py trains a tiny SwiGLU GPTModel (bf16 weights, fp32 norms) and saves
each TP rank's state in Megatron-LM's legacy ``--ckpt-format torch`` layout at iterations
10, 20, 30, 40. The run is merged with the pmm_dist CLI (EMA on one process, SMA of the newest
three on two torchrun processes), and each result is loaded into a FRESH GPTModel (another seed)
with ``torch.load(weights_only=True)`` and a strict ``load_state_dict``. The loaded weights must
equal an independent float64 reference, sum_i w_i * x_i over the input shards, to within one ulp
of each tensor's own dtype.
"""
import argparse
import hashlib
import json
import pathlib

import pytest
import torch

from .conftest import REPO, run_cli, run_python
from .helpers import ema, ulp

HELPER = pathlib.Path(REPO) / "tests" / "megatron_real" / "gpt_tp2.py"
ITERATIONS = [10, 20, 30, 40]
NEWEST = ITERATIONS[-1]
TP = 2
ALPHA = 0.2

pytestmark = [
    # megatron-core warns on import that Apex / Transformer Engine are missing (CPU fallbacks are used)
    pytest.mark.filterwarnings("ignore:.*Transformer Engine and Apex are not installed:UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:megatron.*"),
    pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning"),
]


def _safe_load(path):
    from megatron.core.safe_globals import SAFE_GLOBALS
    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
        return torch.load(path, map_location="cpu", weights_only=True)


def _shard(run_dir, iteration, tp_rank):
    return pathlib.Path(run_dir) / f"iter_{iteration:07d}" / f"mp_rank_{tp_rank:02d}" / "model_optim_rng.pt"


# name -> (extra CLI args, launcher world size, selected iterations, weights oldest first)
CASES = {
    "ema_ws1": (["--method", "ema", "--alpha", str(ALPHA)], 1, ITERATIONS, ema(len(ITERATIONS), ALPHA)),
    "sma_last3_ws2": (["--method", "sma", "--last", "3"], 2, ITERATIONS[-3:], [1 / 3] * 3),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    base = tmp_path_factory.mktemp("megatron_real")
    run = base / "run"
    run_python([HELPER, "train", run, "--iterations", ",".join(map(str, ITERATIONS))], nproc=TP,
               check="training the megatron-core GPTModel (TP=2)")
    outs = {}
    for name, (extra, world, _, _) in CASES.items():
        out = base / f"out_{name}"
        proc = run_cli(["merge", run, "--out", out, "--quiet", *extra], world_size=world,
                       check=f"pmm_dist merge ({name})")
        outs[name] = (out, proc)
    load_args = []
    for name, (out, _) in outs.items():
        load_args += ["--checkpoint", f"{out}:{NEWEST}:{base / ('loaded_' + name)}"]
    run_python([HELPER, "load", *load_args], nproc=TP,
               check="strict load of the merged checkpoints into a fresh GPTModel (TP=2)")
    return {"base": base, "run": run, "outs": outs}


@pytest.fixture(scope="module")
def inputs(workdir):
    """inputs[iteration][tp_rank] = the training run's checkpoint dict."""
    return {it: {tp: _safe_load(_shard(workdir["run"], it, tp)) for tp in range(TP)} for it in ITERATIONS}


def _reference(inputs, iterations, weights, tp_rank):
    """Independent float64 weighted sum of every floating-point tensor of ``model``.

    Returns key -> (sum_i w_i x_i, sum_i |w_i x_i|), both float64; the second bounds the
    rounding error of any float64 evaluation of the first (see ``_assert_within_one_ulp``).
    """
    ref = {}
    newest = inputs[iterations[-1]][tp_rank]["model"]
    for key, value in newest.items():
        if torch.is_tensor(value) and value.is_floating_point():
            acc = torch.zeros(value.shape, dtype=torch.float64)
            mag = torch.zeros(value.shape, dtype=torch.float64)
            for it, w in zip(iterations, weights):
                term = w * inputs[it][tp_rank]["model"][key].to(torch.float64)
                acc += term
                mag += term.abs()
            ref[key] = (acc, mag)
    return ref


def _assert_within_one_ulp(actual, reference, dtype, what):
    """|actual - exact| <= one ulp of ``dtype``, judged against the float64 reference.

    Where the N weighted terms cancel (an element crossing zero between checkpoints) the exact
    sum can be far below float64's resolution of the terms, and no float64 evaluation (neither
    the reference nor the merger's) is within one ulp of it. So the tolerance adds the float64
    summation error bound, 2 * N * eps64 * sum_i |w_i x_i| (about 1e-17 here): negligible for
    every other element, and many orders of magnitude below what a float32 accumulator or a
    wrong weight produces.
    """
    ref64, magnitude = reference
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, the inputs hold {dtype}"
    assert actual.shape == ref64.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    err = (actual.to(torch.float64) - ref64).abs()
    tol = ulp(ref64, dtype) + 2 * len(ITERATIONS) * torch.finfo(torch.float64).eps * magnitude
    bad = err > tol
    if bad.any():
        i = int(torch.argmax((err / tol).flatten()))
        pytest.fail(f"{what}: {int(bad.sum())} of {err.numel()} elements off by more than one {dtype} ulp; "
                    f"worst: got {actual.flatten()[i].item()!r}, reference {ref64.flatten()[i].item()!r}, "
                    f"tolerance {tol.flatten()[i].item()!r}")


@pytest.mark.parametrize("case", list(CASES))
def test_output_layout_and_tracker(workdir, case):
    out, proc = workdir["outs"][case]
    tracker = out / "latest_checkpointed_iteration.txt"
    assert tracker.is_file(), f"no tracker file in {out}: {sorted(p.name for p in out.iterdir())}"
    assert tracker.read_text().strip() == str(NEWEST)
    iter_dirs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert iter_dirs == [f"iter_{NEWEST:07d}"], iter_dirs
    shards = sorted(p.name for p in (out / f"iter_{NEWEST:07d}").iterdir())
    assert shards == [f"mp_rank_{tp:02d}" for tp in range(TP)], shards
    for tp in range(TP):
        assert _shard(out, NEWEST, tp).is_file()
    assert (out / "pmm_manifest.json").is_file()


@pytest.mark.parametrize("case", list(CASES))
def test_manifest_describes_the_merge(workdir, case):
    out, _ = workdir["outs"][case]
    _, _, iterations, weights = CASES[case]
    manifest = json.loads((out / "pmm_manifest.json").read_text())
    assert [s["iteration"] for s in manifest["sources"]] == iterations
    assert manifest["weights"] == pytest.approx(weights, rel=1e-12, abs=1e-15)
    for entry in manifest["files"]:
        data = (out / entry["path"]).read_bytes()
        assert len(data) == entry["bytes"], entry
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry


@pytest.mark.parametrize("case", list(CASES))
def test_output_metadata_is_newest_and_optimizer_dropped(workdir, inputs, case):
    out, _ = workdir["outs"][case]
    for tp in range(TP):
        merged = _safe_load(_shard(out, NEWEST, tp))
        newest = inputs[NEWEST][tp]
        assert "optimizer" not in merged, f"rank {tp}: --optimizer drop (default) kept an optimizer state"
        assert merged["iteration"] == NEWEST
        assert isinstance(merged["args"], argparse.Namespace)
        assert vars(merged["args"]) == vars(newest["args"])
        assert merged["args"].tensor_model_parallel_size == TP
        # A missing/other checkpoint_version makes Megatron permute QKV on load.
        assert merged.get("checkpoint_version") == newest["checkpoint_version"] == 3.0


@pytest.mark.parametrize("case", list(CASES))
def test_merged_file_matches_float64_reference(workdir, inputs, case):
    out, _ = workdir["outs"][case]
    _, _, iterations, weights = CASES[case]
    for tp in range(TP):
        merged = _safe_load(_shard(out, NEWEST, tp))["model"]
        newest = inputs[NEWEST][tp]["model"]
        assert sorted(merged.keys()) == sorted(newest.keys()), f"rank {tp}: model keys differ from the inputs'"
        ref = _reference(inputs, iterations, weights, tp)
        for key, value in newest.items():
            if key in ref:
                _assert_within_one_ulp(merged[key], ref[key], value.dtype, f"{case} rank {tp} file {key}")
            elif torch.is_tensor(value):
                assert torch.equal(merged[key], value), f"rank {tp}: non-float tensor {key} changed"
            else:  # _extra_state and other non-tensor entries: the newest checkpoint's, untouched
                assert merged[key] == value, f"rank {tp}: {key} = {merged[key]!r}, newest has {value!r}"


@pytest.mark.parametrize("case", list(CASES))
def test_strict_load_into_fresh_gptmodel_matches_reference(workdir, inputs, case):
    _, _, iterations, weights = CASES[case]
    for tp in range(TP):
        dump = torch.load(workdir["base"] / f"loaded_{case}" / f"rank{tp}.pt", map_location="cpu",
                          weights_only=True)
        newest = inputs[NEWEST][tp]["model"]
        assert dump["keys"] == sorted(newest.keys())
        assert "optimizer" not in dump["file_keys"]
        ref = _reference(inputs, iterations, weights, tp)
        assert set(ref) == set(dump["tensors"]), "loaded model's tensors differ from the input's float tensors"
        # The fresh model has another seed: a strict load must have replaced every tensor.
        assert dump["changed_by_load"] == len(ref)
        for key, reference in ref.items():
            _assert_within_one_ulp(dump["tensors"][key], reference, newest[key].dtype,
                                   f"{case} rank {tp} loaded {key}")


def test_setup_is_not_trivial(inputs):
    """Guard the test itself: checkpoints differ, so a merge that copied one would fail above."""
    for tp in range(TP):
        ref = _reference(inputs, ITERATIONS, CASES["ema_ws1"][3], tp)
        newest = inputs[NEWEST][tp]["model"]
        dtypes = {newest[k].dtype for k in ref}
        assert torch.bfloat16 in dtypes and torch.float32 in dtypes, dtypes
        differing = [k for k, (r, _) in ref.items()
                     if ((newest[k].to(torch.float64) - r).abs() > 4 * ulp(r, newest[k].dtype)).any()]
        assert len(differing) == len(ref), f"rank {tp}: merge result equals newest for {set(ref) - set(differing)}"
    # the two TP ranks hold different shards of the column-parallel weights
    key = "decoder.layers.0.mlp.linear_fc1.weight"
    assert not torch.equal(inputs[NEWEST][0]["model"][key], inputs[NEWEST][1]["model"][key])
