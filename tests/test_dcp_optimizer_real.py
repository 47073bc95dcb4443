"""Plain DCP with --optimizer merge and latest, on the real FSDP2 stack (gloo, CPU).

tests/dcp_real/dcp_train.py trains a tiny MLP (fp32 and bf16 parameters) with FSDP2 and AdamW and
saves ``get_state_dict``'s model and optimizer state with ``dcp.save``: steps 10 and 20 by a
2-rank job, step 30 by a 1-rank job resumed from step 20 (uneven shards, then none: the Adam
moments are chunked differently across the sources). Under FSDP2 the parameters are the fp32
weights the optimizer updates (no separate masters): the model is merged as under
``drop``, and the optimizer state is keyed by parameter FQN, ``optimizer.state.<fqn>.exp_avg``.
Each merge is loaded back with ``dcp.load`` + ``set_state_dict`` into a fresh FSDP2 model and
AdamW on 2 ranks, which then take one optimizer step: the moments they hold equal the float64
average of the sources' (merge) or the newest's (latest), the step counters and scheduler the
newest's.
"""
import pathlib
import pickle

import pytest
import torch

import pmm_dist

from .conftest import run_python
from .helpers import assert_merged_within_one_ulp, sma
from .test_dcp_merge import _load_tensors as _load

ROOT = pathlib.Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "dcp_real" / "dcp_train.py"
SHAPE_ARGS = ["--vocab", "67", "--ffn", "45"]
STEPS = [10, 20, 30]
WEIGHTS = sma(len(STEPS))
POLICIES = ("latest", "merge")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    base = tmp_path_factory.mktemp("dcp_optim")
    run = base / "run"
    run_python([HELPER, "train", run, "--steps", "10,20"] + SHAPE_ARGS, nproc=2, check="steps 10, 20 at world size 2")
    run_python([HELPER, "train", run, "--steps", "30", "--resume", run / "step-20"] + SHAPE_ARGS, nproc=1,
               check="resumed at world size 1, step 30")
    outs, pairs = {}, []
    for policy in POLICIES:
        outs[policy] = base / f"merged_{policy}"
        pmm_dist.merge(sources=[str(run)], out=str(outs[policy]), method="sma", optimizer=policy, device="cpu",
                       quiet=True)
        pairs += [outs[policy], base / f"resumed_{policy}.pt"]
    run_python([HELPER, "resume", *pairs] + SHAPE_ARGS, nproc=2,
               check="dcp.load + set_state_dict into FSDP2 and AdamW on 2 ranks, one step")
    return {"run": run, "outs": outs, "dumps": {p: base / f"resumed_{p}.pt" for p in POLICIES}}


def test_sources_chunk_the_moments_differently(resumed):
    def chunks(step):
        with open(resumed["run"] / f"step-{step}" / ".metadata", "rb") as f:
            return len(pickle.load(f).state_dict_metadata["optimizer.state.embed.weight.exp_avg"].chunks)
    assert [chunks(s) for s in STEPS] == [2, 2, 1]


@pytest.mark.parametrize("policy", POLICIES)
def test_merged_moments_and_model(resumed, policy):
    sources = [_load(resumed["run"] / f"step-{s}", "") for s in STEPS]
    merged = _load(resumed["outs"][policy], "")
    assert set(merged) == set(sources[-1])
    moments = [k for k in merged if k.startswith("optimizer.state.") and not k.endswith(".step")]
    assert len(moments) == 12 and {merged[k].dtype for k in moments} == {torch.float32, torch.bfloat16}
    for key in moments:
        if policy == "merge":
            assert_merged_within_one_ulp(merged[key], [s[key] for s in sources], WEIGHTS, key)
            assert not torch.equal(merged[key], sources[-1][key]), key
        else:
            assert torch.equal(merged[key], sources[-1][key]), key
    for key in (k for k in merged if k.endswith(".step") or k == "model.num_updates"):
        assert torch.equal(merged[key], sources[-1][key]), key  # counters: the newest's
    for key in (k for k in merged if k.startswith("model.") and merged[k].is_floating_point()):
        assert_merged_within_one_ulp(merged[key], [s[key] for s in sources], WEIGHTS, key)  # as under drop


@pytest.mark.parametrize("policy", POLICIES)
def test_set_state_dict_resumes_from_the_merge(resumed, policy):
    dump = torch.load(resumed["dumps"][policy], weights_only=False)
    merged = _load(resumed["outs"][policy], "optimizer.state.")
    loaded = {f"optimizer.state.{fqn}.{name}": value for fqn, entries in dump["loaded"].items()
              for name, value in entries.items()}
    assert set(loaded) == set(merged)
    for key, value in loaded.items():  # what FSDP2's AdamW holds after set_state_dict: the merge
        assert torch.equal(value, merged[key]), key
    assert torch.isfinite(torch.tensor(dump["loss"]))
    assert set(dump["steps_after"].values()) == {31.0}  # the newest's 30 steps, plus the one taken
    assert dump["last_epoch"] == 31 and dump["train_state"] == {"step": 30, "tag": "step-30"}
