"""Megatron legacy checkpoints across PP, EP and VP changes.

Layer placement is checked against the installed megatron-core's own functions; merges of one
synthetic model saved at several layouts against a float64 reference by GLOBAL name (global
layer, global expert), renumbered by the test itself; a TP change is refused in one message.
"""
import argparse
import itertools
import json
import os
import re
import shutil
import types

import pytest
import torch

import pmm_dist
from pmm_dist.errors import InputError
from pmm_dist.formats.megatron_layout import shard_layout
from pmm_dist.testing.synthetic import generate_run

from .conftest import run_cli
from .helpers import assert_merged_within_one_ulp, ema, shard_files, trusted_load

transformer_layer = pytest.importorskip("megatron.core.transformer.transformer_layer")
transformer_block = pytest.importorskip("megatron.core.transformer.transformer_block")


def _configs():
    for num_layers, pp, vp in itertools.product((4, 6, 8, 12, 16), (1, 2, 3, 4), (None, 2, 3)):
        if vp and pp == 1:
            continue  # interleaving needs pipeline stages
        for first, last, embedding, loss in ((None, None, False, False), (None, None, True, False),
                                             (None, None, False, True), (None, None, True, True),
                                             (2, None, False, False), (None, 2, False, False), (2, 2, False, False)):
            if pp == 1 and (first or last):
                continue
            yield num_layers, pp, vp, first, last, embedding, loss


def _megatron(num_layers, pp, vp, first, last, embedding, loss):
    """(offset, count) per (chunk, pp rank) by megatron-core, or None where it refuses the configuration."""
    config = types.SimpleNamespace(
        num_layers=num_layers, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vp,
        pipeline_model_parallel_layout=None, num_layers_in_first_pipeline_stage=first,
        num_layers_in_last_pipeline_stage=last, account_for_embedding_in_pipeline_split=embedding,
        account_for_loss_in_pipeline_split=loss)
    chunks = []
    try:
        for chunk in range(vp or 1):
            for rank in range(pp):
                vp_stage = chunk if vp else None
                count = transformer_block.get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=rank)
                offset = transformer_layer.get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=rank)
                chunks.append((offset, count))
    except (AssertionError, ZeroDivisionError):
        return None
    return chunks


@pytest.mark.parametrize("config", list(_configs()), ids=lambda c: "L{}-pp{}-vp{}-first{}-last{}-emb{}-loss{}".format(*c))
def test_layer_offsets_and_counts_match_megatron_core(config):
    num_layers, pp, vp, first, last, embedding, loss = config
    expected = _megatron(*config)
    args = argparse.Namespace(num_layers=num_layers, pipeline_model_parallel_size=pp,
                              virtual_pipeline_model_parallel_size=vp, decoder_first_pipeline_num_layers=first,
                              decoder_last_pipeline_num_layers=last, account_for_embedding_in_pipeline_split=embedding,
                              account_for_loss_in_pipeline_split=loss)
    try:
        layout = shard_layout(args, "args")
    except InputError:
        assert expected is None or sum(c for _, c in expected) != num_layers or min(c for _, c in expected) < 0, \
            f"refused a configuration megatron-core places: {expected}"
        return
    if expected is None:
        pytest.skip("megatron-core refuses this configuration; ours is a valid placement of it")
    if pp == 1:  # megatron-core's offset is 0 without pipelining; a single chunk starts at 0 anyway
        expected = [(0, count) for _, count in expected]
    assert list(layout.chunks) == expected
    assert sum(count for _, count in layout.chunks) == num_layers


def test_keys_are_renumbered_both_ways():
    layout = shard_layout(argparse.Namespace(num_layers=8, pipeline_model_parallel_size=2,
                                             virtual_pipeline_model_parallel_size=2, expert_model_parallel_size=2,
                                             num_experts=4), "args")
    assert layout.chunks == ((0, 2), (2, 2), (4, 2), (6, 2))
    key = "decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight"
    name = layout.global_key(key, pp_rank=1, chunk=1, ep_rank=1)
    assert name == "decoder.layers.7.mlp.experts.local_experts.3.linear_fc1.weight"
    assert layout.local_key(name, prefer_ep=0) == (1, 1, 1, key)
    grouped = layout.global_key("decoder.layers.0.mlp.experts.linear_fc2.weight1", 0, 1, 1)
    assert grouped == "decoder.layers.4.mlp.experts.linear_fc2.weight3"
    assert layout.local_key("decoder.layers.5.self_attention.linear_qkv.weight", prefer_ep=1) == \
        (0, 1, 1, "decoder.layers.1.self_attention.linear_qkv.weight")  # replicated over EP: the preferred rank
    assert layout.local_key("embedding.word_embeddings.weight", 0) is None
    assert layout.local_key("decoder.layers.8.pre_mlp_layernorm.weight", 0)[0] == -1
    assert layout.rank_of("mp_rank_01_001_000") == (1, 1, 0)


# -- merging across PP / EP / VP changes (synthetic runs of one model at several layouts) --------------
MODEL = dict(num_layers=4, hidden_size=16, ffn_hidden_size=32, num_experts=4, vocab_size=32)
ITERATIONS = [100, 200, 300, 400]


def _shard_name(t, p, e, pp, ep):
    return f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "") + (f"_{e:03d}" if ep > 1 else "")


def global_tensors(ckpt_dir, tp, pp, ep, vp):
    """(tp rank, global name) -> float tensor of a synthetic checkpoint, renumbered here by the
    generator's own rules (interleaved chunks, EP-local experts), independently of pmm_dist."""
    per_chunk, local_experts = MODEL["num_layers"] // (pp * vp), MODEL["num_experts"] // ep
    found = {}
    for t, p, e in itertools.product(range(tp), range(pp), range(ep)):
        state = trusted_load(os.path.join(ckpt_dir, _shard_name(t, p, e, pp, ep), "model_optim_rng.pt"))
        for chunk in range(vp):
            for key, value in state[f"model{chunk}" if vp > 1 else "model"].items():
                if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
                    continue
                match = re.match(r"decoder\.layers\.(\d+)\.(.*)$", key)
                if match:
                    rest = re.sub(r"local_experts\.(\d+)\.", lambda m: f"local_experts.{e * local_experts + int(m[1])}.",
                                  match[2])
                    key = f"decoder.layers.{(chunk * pp + p) * per_chunk + int(match[1])}.{rest}"
                if (t, key) in found:  # replicated over EP: the copies agree
                    assert torch.equal(found[(t, key)], value), key
                found[(t, key)] = value
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same model saved at several PP/EP/VP layouts (all at TP 2)."""
    base = tmp_path_factory.mktemp("layouts")
    made = {}
    for pp, ep, vp in ((2, 1, 1), (1, 1, 1), (1, 2, 1), (2, 2, 1), (2, 1, 2)):
        run = str(base / f"pp{pp}_ep{ep}_vp{vp}")
        generate_run(run, iterations=ITERATIONS, tp=2, pp=pp, ep=ep, vp=vp, **MODEL)
        made[(pp, ep, vp)] = run
    made[("tp1",)] = str(base / "tp1")
    generate_run(made[("tp1",)], iterations=ITERATIONS, tp=1, pp=2, ep=1, vp=1, **MODEL)
    return base, made


def _mixed(runs, name, layouts):
    """A run whose checkpoint i was saved at layouts[i]."""
    base, made = runs
    run = os.path.join(str(base), "mixed", name)
    for iteration, layout in zip(ITERATIONS, layouts):
        shutil.copytree(os.path.join(made[layout], f"iter_{iteration:07d}"), os.path.join(run, f"iter_{iteration:07d}"))
    with open(os.path.join(run, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(ITERATIONS[len(layouts) - 1]))
    return run


MIXES = {  # name -> each checkpoint's (pp, ep, vp), oldest first; the output takes the last one's
    "pp2_to_pp1": [(2, 1, 1), (2, 1, 1), (1, 1, 1), (1, 1, 1)],
    "pp1_to_pp2": [(1, 1, 1), (1, 1, 1), (2, 1, 1), (2, 1, 1)],
    "ep2_to_ep1": [(1, 2, 1), (1, 2, 1), (1, 1, 1), (1, 1, 1)],
    "ep1_to_ep2": [(1, 1, 1), (1, 2, 1), (1, 2, 1), (1, 2, 1)],
    "vp_pp_ep": [(2, 2, 1), (1, 1, 1), (2, 1, 2), (2, 2, 1)],
    "to_vp2": [(2, 2, 1), (1, 2, 1), (2, 1, 1), (2, 1, 2)],
}


@pytest.mark.parametrize("mix", list(MIXES))
def test_merge_across_layouts_matches_a_global_reference(runs, tmp_path, mix):
    layouts = MIXES[mix]
    run = _mixed(runs, mix, layouts)
    out = str(tmp_path / "out")
    pmm_dist.merge(sources=[run], out=out, method="ema", alpha=0.3, device="cpu", quiet=True)
    weights = ema(len(layouts), 0.3)
    sources = [global_tensors(os.path.join(run, f"iter_{it:07d}"), 2, *layout) for it, layout in zip(ITERATIONS, layouts)]
    pp, ep, vp = layouts[-1]
    newest_dir = os.path.join(run, f"iter_{ITERATIONS[-1]:07d}")
    merged_dir = os.path.join(out, f"iter_{ITERATIONS[-1]:07d}")
    assert sorted(os.listdir(merged_dir)) == sorted(os.listdir(newest_dir))  # the newest's shards
    merged = global_tensors(merged_dir, 2, pp, ep, vp)
    assert set(merged) == set(sources[-1]) and all(set(s) == set(merged) for s in sources)
    for name, value in merged.items():
        assert value.dtype == sources[-1][name].dtype
        assert_merged_within_one_ulp(value, [s[name] for s in sources], weights, f"{mix} {name}")
    assert any(not torch.equal(sources[0][n], sources[-1][n]) for n in merged)  # the sources differ
    manifest = json.load(open(os.path.join(out, "pmm_manifest.json")))
    assert [(l["pp"], l["ep"], l["vp"]) for l in manifest["source_layouts"]] == layouts
    for name in os.listdir(newest_dir):  # all but the weights: the newest's
        result = trusted_load(os.path.join(merged_dir, name, "model_optim_rng.pt"))
        newest = trusted_load(os.path.join(newest_dir, name, "model_optim_rng.pt"))
        assert result["args"] == newest["args"] and "optimizer" not in result
        for chunk in [k for k in newest if k.startswith("model")]:
            assert list(result[chunk]) == list(newest[chunk])
            assert result[chunk]["rotary_pos_emb.inv_freq_step"] == newest[chunk]["rotary_pos_emb.inv_freq_step"]


def test_world_size_2_gives_the_same_bytes_and_latest_is_refused_across_layouts(runs, tmp_path):
    """The weights merge across layouts (--optimizer drop); a shard's optimizer state is kept in
    the order of that shard's parameters, so --optimizer latest|merge is refused in one message."""
    run = _mixed(runs, "ws", MIXES["vp_pp_ep"])
    outs = {}
    for world_size in (1, 2):
        outs[world_size] = str(tmp_path / f"ws{world_size}")
        proc = run_cli(["merge", run, "--out", outs[world_size], "--quiet", "--device", "cpu"], world_size=world_size)
        assert proc.returncode == 0, proc.stderr
    one, two = (os.path.join(outs[w], "iter_0000400") for w in (1, 2))
    for rel in shard_files(one):
        assert open(os.path.join(one, rel), "rb").read() == open(os.path.join(two, rel), "rb").read(), rel
    manifest = json.load(open(os.path.join(outs[1], "pmm_manifest.json")))
    assert manifest["model_weights_from"] == "model copies"  # the renumbered sources' masters are not used
    assert "another PP/EP/VP layout" in manifest["model_weights_notes"][0]
    proc = run_cli(["merge", run, "--out", str(tmp_path / "latest"), "--optimizer", "latest", "--device", "cpu"])
    assert proc.returncode == 1 and "must have the newest's shard layout" in proc.stderr
    assert "--iterations 400" in proc.stderr and not os.path.exists(tmp_path / "latest")


def test_dry_run_lists_each_source_layout(runs, tmp_path):
    run = _mixed(runs, "dry", MIXES["pp2_to_pp1"])
    proc = run_cli(["merge", run, "--out", str(tmp_path / "out"), "--dry-run", "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if "tp=2" in line][1:]  # after the output's layout
    assert len(rows) == 4 and ["layout changes" in r for r in rows] == [False, False, True, False]
    assert "pp=2" in rows[0] and "pp=1" in rows[2]
    assert not os.path.exists(tmp_path / "out")


# -- refused: one message ---------------------------------------------------------------------------------
def _refused(run, tmp_path, *needles):
    out = str(tmp_path / "refused")
    proc = run_cli(["merge", run, "--out", out, "--quiet", "--device", "cpu"])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in:\n{proc.stderr}"
    assert "problems:" not in proc.stderr
    assert not os.path.exists(os.path.join(out, "latest_checkpointed_iteration.txt"))
    return proc.stderr


def test_a_tensor_parallel_change_is_refused_in_one_message(runs, tmp_path):
    run = _mixed(runs, "tp", [(2, 1, 1), (2, 1, 1), ("tp1",), ("tp1",)])
    err = _refused(run, tmp_path, f"(in {run})", "tp=2, pp=2, ep=1: iter_0000100, iter_0000200",
                   "tp=1, pp=2, ep=1: iter_0000300, iter_0000400", "--iterations 300,400", "torch_dist",
                   "SwiGLU")
    assert len(err.strip().splitlines()) == 4


def test_another_model_is_refused_in_one_message(runs, tmp_path):
    run = _mixed(runs, "model", MIXES["pp2_to_pp1"])
    generate_run(str(tmp_path / "deeper"), iterations=[100], tp=2, pp=1, ep=1, **dict(MODEL, num_layers=6))
    shutil.rmtree(os.path.join(run, "iter_0000100"))
    shutil.copytree(str(tmp_path / "deeper" / "iter_0000100"), os.path.join(run, "iter_0000100"))
    _refused(run, tmp_path, "different models", "num_layers=6", "the newest has num_layers=4")


def test_a_key_missing_from_a_renumbered_source_names_key_and_file(runs, tmp_path):
    run = _mixed(runs, "missing", MIXES["pp1_to_pp2"])
    path = os.path.join(run, "iter_0000100", "mp_rank_01", "model_optim_rng.pt")
    state = trusted_load(path)
    del state["model"]["decoder.layers.3.mlp.experts.local_experts.2.linear_fc2.weight"]
    torch.save(state, path)
    _refused(run, tmp_path, "decoder.layers.3.mlp.experts.local_experts.2.linear_fc2.weight", path, "missing")


def test_a_shape_change_in_a_renumbered_source_names_key_and_file(runs, tmp_path):
    run = _mixed(runs, "shape", MIXES["ep1_to_ep2"])
    path = os.path.join(run, "iter_0000100", "mp_rank_00", "model_optim_rng.pt")
    state = trusted_load(path)
    state["model"]["decoder.layers.2.mlp.experts.local_experts.3.linear_fc1.weight"] = torch.zeros(3, 3, dtype=torch.bfloat16)
    torch.save(state, path)
    _refused(run, tmp_path, path, "local_experts.1.linear_fc1.weight", "shape (3, 3)")
