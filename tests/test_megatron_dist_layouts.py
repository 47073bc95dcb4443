"""Megatron-core torch_dist across TP and PP changes, with a REAL GPTModel (gloo, CPU).

One run directory, as a run resumed at other layouts leaves it (tests/dcp_real/gpt_dist.py):
iterations 2 and 4 trained and saved at TP=2; iteration 6 by a job resumed from 4 at TP=1;
iteration 8 by a job resumed from 6 at PP=2 (two pipeline stages). pmm_dist merges (SMA)
iterations 2, 4, 6 (newest at TP=1) at merge world sizes 1 and 2, and all four (newest at
PP=2). Every input and output is loaded with ``dist_checkpointing.load`` into fresh GPTModels
at TP=1 and TP=2; the merged weights must match the float64 average of the inputs as Megatron
loads them, within one ulp.
"""
import json
import pathlib
import pickle
import shutil

import pytest
import torch

import pmm_dist
from pmm_dist.errors import MergeError
from pmm_dist.formats.megatron_dist import MegatronDistFormat

from .conftest import run_python
from .helpers import assert_merged_within_one_ulp, sma

ROOT = pathlib.Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "dcp_real" / "gpt_dist.py"
LAYOUTS = {2: "TP=2, PP=1, EP=1", 4: "TP=2, PP=1, EP=1", 6: "TP=1, PP=1, EP=1", 8: "TP=1, PP=2, EP=1"}
MERGES = {"tp_ws1": [2, 4, 6], "tp_ws2": [2, 4, 6], "pp_ws1": [2, 4, 6, 8]}

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*Transformer Engine and Apex are not installed:UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
]






def _ckpt(root, iteration):
    return pathlib.Path(root) / f"iter_{iteration:07d}"


def _read_metadata(ckpt_dir):
    with open(pathlib.Path(ckpt_dir) / ".metadata", "rb") as f:  # test side: our own files
        return pickle.load(f)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    base = tmp_path_factory.mktemp("megatron_layouts")
    run = base / "run"
    run_python([HELPER, "train", run, "--iterations", "2,4"], nproc=2, check="training at TP=2")
    run_python([HELPER, "train", run, "--iterations", "6", "--resume", _ckpt(run, 4)], nproc=1, check="resumed at TP=1")
    run_python([HELPER, "train", run, "--iterations", "8", "--pp", "2", "--resume", _ckpt(run, 6)], nproc=2, check="resumed at PP=2")
    outs = {name: base / name for name in MERGES}
    results = {"tp_ws1": pmm_dist.merge(sources=[str(run)], out=str(outs["tp_ws1"]), iterations=[2, 4, 6],
                                        method="sma", device="cpu", quiet=True),
               "pp_ws1": pmm_dist.merge(sources=[str(run)], out=str(outs["pp_ws1"]), method="sma", device="cpu",
                                        quiet=True)}
    results["tp_ws2"] = run_python(["-m", "pmm_dist", "merge", run, "--out", outs["tp_ws2"], "--iterations",
                                             "2,4,6", "--method", "sma", "--device", "cpu"], nproc=2, check="pmm_dist merge at world size 2")
    specs = [(f"in{it}", _ckpt(run, it)) for it in LAYOUTS] + \
        [(name, _ckpt(out, MERGES[name][-1])) for name, out in outs.items()]
    dumps = {}
    for tp in (1, 2):
        args = []
        for name, ckpt in specs:
            dumps[(name, tp)] = base / f"dump_{name}_tp{tp}"
            args += ["--checkpoint", f"{ckpt}:{dumps[(name, tp)]}"]
        run_python([HELPER, "load"] + args, nproc=tp, check=f"dist_checkpointing.load into fresh GPTModels at TP={tp}")
    return {"run": run, "outs": outs, "results": results, "dumps": dumps}


def _dump(workdir, name, tp, rank):
    return torch.load(f"{workdir['dumps'][(name, tp)]}.rank{rank}.pt", map_location="cpu", weights_only=False)


def test_the_run_changed_layout(workdir):
    fmt = MegatronDistFormat()
    refs = fmt.discover([str(workdir["run"])])
    assert [r.iteration for r in refs] == list(LAYOUTS)
    assert [fmt.describe_layout(fmt.checkpoint_layout(r)) for r in refs] == list(LAYOUTS.values())
    chunks = {it: len(_read_metadata(_ckpt(workdir["run"], it)).state_dict_metadata[
        "decoder.layers.mlp.linear_fc1.weight"].chunks) for it in LAYOUTS}
    assert chunks == {2: 8, 4: 8, 6: 4, 8: 4}  # SwiGLU gate/up x TP x layers; at PP=2 a stage per layer


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", list(MERGES))
def test_loads_into_gptmodel_and_matches_reference(workdir, name, tp):
    iterations = MERGES[name]
    for rank in range(tp):
        merged = _dump(workdir, name, tp, rank)
        inputs = [_dump(workdir, f"in{it}", tp, rank) for it in iterations]
        newest = inputs[-1]
        assert set(merged["tensors"]) == set(newest["tensors"])
        assert merged["changed_by_load"] == sorted(merged["tensors"])  # a fresh model: every tensor replaced
        dtypes = set()
        for key, value in merged["tensors"].items():
            assert value.dtype == newest["tensors"][key].dtype, key
            dtypes.add(value.dtype)
            assert_merged_within_one_ulp(value, [d["tensors"][key] for d in inputs], sma(len(iterations)),
                                         f"{name} TP={tp} rank {rank} {key}")
            assert not torch.equal(value, newest["tensors"][key]), key
        assert dtypes == {torch.bfloat16, torch.float32}
        assert merged["extra_state"] == newest["extra_state"] == f"te-{iterations[-1]}".encode()
        assert merged["iteration"] == iterations[-1]


def test_merge_world_sizes_agree_bitwise(workdir):
    for tp in (1, 2):
        for rank in range(tp):
            a, b = _dump(workdir, "tp_ws1", tp, rank)["tensors"], _dump(workdir, "tp_ws2", tp, rank)["tensors"]
            assert all(torch.equal(a[k], b[k]) for k in a), f"TP={tp} rank {rank}"


@pytest.mark.parametrize("name", list(MERGES))
def test_output_has_the_newest_chunking_and_counts_bytes_per_source(workdir, name):
    newest = MERGES[name][-1]
    out = workdir["outs"][name]
    merged_md, newest_md = _read_metadata(_ckpt(out, newest)), _read_metadata(_ckpt(workdir["run"], newest))
    assert merged_md.state_dict_metadata == {k: v for k, v in newest_md.state_dict_metadata.items()
                                             if not k.startswith(("optimizer.", "rng_state/"))}
    manifest = json.loads((out / "pmm_manifest.json").read_text())
    per_source = manifest["bytes_read_by_source"]
    assert [s["iteration"] for s in manifest["sources"]] == MERGES[name] and len(per_source) == len(MERGES[name])
    weights = sum(v.numel() * v.element_size() for v in _dump(workdir, "in2", 1, 0)["tensors"].values())
    assert all(weights <= n <= weights + 200 * 1536 for n in per_source), per_source  # + ~1.5 KiB per chunk


def test_dry_run_shows_bytes_per_source(workdir, capsys):
    pmm_dist.merge(sources=[str(workdir["run"])], out=str(workdir["run"].parent / "never"), dry_run=True,
                   device="cpu")
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if "/iter_000000" in line]
    assert len(lines) == 4 and all("(reads " in line for line in lines), text
    assert not (workdir["run"].parent / "never").exists()


def test_layout_change_with_other_global_shapes_is_one_message(workdir, tmp_path):
    """A vocabulary padded to a multiple of TP changes the embedding's global shape with TP:
    refused in one short message naming the checkpoints of each layout."""
    run = tmp_path / "run"
    shutil.copytree(workdir["run"], run)
    for it in (2, 4):  # as if padded to 136 rows at TP=2
        metadata = _read_metadata(_ckpt(run, it))
        for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
            metadata.state_dict_metadata[key].size = torch.Size([136, 64])
        with open(_ckpt(run, it) / ".metadata", "wb") as f:
            pickle.dump(metadata, f)
    with pytest.raises(MergeError) as info:
        pmm_dist.merge(sources=[str(run)], out=str(tmp_path / "out"), device="cpu", quiet=True)
    message = str(info.value)
    assert message.startswith("the checkpoints were saved at different layouts (TP=2, PP=1, EP=1: iterations 2, 4; "
                              "TP=1, PP=1, EP=1: iteration 6; TP=1, PP=2, EP=1: iteration 8)"), message
    assert "2 tensor(s) have other global shapes" in message and "[136, 64] vs [128, 64]" in message
    assert "--iterations 8" in message and "\n" not in message
    assert not (tmp_path / "out").exists()
