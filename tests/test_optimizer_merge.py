"""``--optimizer drop|latest|merge`` on synthetic Megatron runs (pmm_dist.testing.synthetic with
``fp32_masters``: optimizer state shaped as megatron-core saves it, the model holding the masters'
rounding), the masters -> model mapping on its own, and the engine's side (the policies a format
implements, the manifest's record of where the model weights came from). In this process: seconds.

The references are computed here from what the generator wrote, read by the rules the generator
follows (masters per param group in state-dict order: matrices, then biases and norms; buffers
in reverse parameter order at 64-element alignment), not by pmm_dist's matching.
"""
import json
import os

import pytest
import torch

import pmm_dist
from pmm_dist.engine.manifest import model_weights_summary
from pmm_dist.errors import MergeError
from pmm_dist.formats.masters import MatchError, match_masters, rounds_to
from pmm_dist.formats.megatron_optim import _walk_buffer
from pmm_dist.plan.types import UnitResult
from pmm_dist.testing.synthetic import generate_run

from .hf_models import llama_config, llama_state, save_checkpoint
from .helpers import assert_merged_within_one_ulp, shard_files, trusted_load, wma

ITERATIONS = [100, 200, 300]
WEIGHTS = wma(3)
MODEL = dict(num_layers=2, hidden_size=16, ffn_hidden_size=32, vocab_size=32)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("optimizer_runs")
    made = {"float16": str(base / "float16"), "distrib": str(base / "distrib"), "distrib_dense": str(base / "dense")}
    generate_run(made["float16"], iterations=ITERATIONS, tp=2, pp=1, ep=2, vp=2, num_experts=2, fp32_masters=True,
                 **MODEL)
    generate_run(made["distrib"], iterations=ITERATIONS, tp=1, pp=2, ep=2, num_experts=2, distrib_optim=True,
                 fp32_masters=True, **MODEL)
    generate_run(made["distrib_dense"], iterations=ITERATIONS, tp=2, pp=1, ep=1, vp=2, num_experts=0,
                 distrib_optim=True, fp32_masters=True, **MODEL)
    return made


def _merge(run, out, policy, **options):
    pmm_dist.merge(sources=[run], out=str(out), method="wma", optimizer=policy, device="cpu", quiet=True, **options)
    return os.path.join(str(out), "iter_0000300")


def _load(run, iteration, rel):
    return trusted_load(os.path.join(run, f"iter_{iteration:07d}", rel))


def _masters_by_name(state):
    """(chunk, key) -> fp32 master of a Float16Optimizer shard file, by the generator's grouping."""
    params = [(chunk, key, value) for chunk in state if chunk.startswith("model") for key, value in state[chunk].items()
              if torch.is_tensor(value) and value.is_floating_point()]
    groups = [[p for p in params if p[2].dim() > 1], [p for p in params if p[2].dim() <= 1]]
    named = {}
    for group, masters in zip(groups, state["optimizer"]["fp32_from_fp16_params"]):
        low = [(chunk, key) for chunk, key, value in group if value.dtype != torch.float32]
        assert len(low) == len(masters)
        named.update(zip(low, masters))
    return named


@pytest.mark.parametrize("policy", ["drop", "latest", "merge"])
def test_float16_optimizer_masters_are_the_weights(runs, tmp_path, policy):
    run = runs["float16"]
    out = _merge(run, tmp_path / "out", policy)
    files = shard_files(out)
    assert len(files) == 4
    for rel in files:
        merged = trusted_load(os.path.join(out, rel))
        sources = [_load(run, it, rel) for it in ITERATIONS]
        masters = [_masters_by_name(s) for s in sources]
        for (chunk, key), _ in masters[-1].items():
            value = merged[chunk][key]
            assert value.dtype == torch.bfloat16
            reference = [m[(chunk, key)] for m in masters]
            assert_merged_within_one_ulp(value, reference, WEIGHTS, f"{rel} {chunk}.{key}")
            exact = sum(w * m.double() for w, m in zip(WEIGHTS, reference)).float().to(torch.bfloat16)
            assert torch.equal(value, exact)  # the merged fp32 master, rounded: not the copies averaged
        router = "decoder.layers.0.mlp.router.weight"  # fp32: no master, its own tensor merged
        assert_merged_within_one_ulp(merged["model0"][router], [s["model0"][router] for s in sources], WEIGHTS, router)
        if policy == "drop":
            assert "optimizer" not in merged
            continue
        optimizer, newest = merged["optimizer"], sources[-1]["optimizer"]
        for group, masters_group in enumerate(optimizer["fp32_from_fp16_params"]):
            for j, master in enumerate(masters_group):
                assert_merged_within_one_ulp(master, [s["optimizer"]["fp32_from_fp16_params"][group][j] for s in sources],
                                             WEIGHTS, f"{rel} master {group}.{j}")
        for index, state in optimizer["optimizer"]["state"].items():
            assert torch.equal(state["step"], newest["optimizer"]["state"][index]["step"])  # a counter: the newest's
            for key in ("exp_avg", "exp_avg_sq"):
                if policy == "merge":
                    assert_merged_within_one_ulp(state[key], [s["optimizer"]["optimizer"]["state"][index][key]
                                                              for s in sources], WEIGHTS, f"{rel} {key} {index}")
                else:
                    assert torch.equal(state[key], newest["optimizer"]["state"][index][key])
        assert optimizer["optimizer"]["param_groups"] == newest["optimizer"]["param_groups"]
        assert merged["opt_param_scheduler"] == sources[-1]["opt_param_scheduler"]
    manifest = json.load(open(os.path.join(tmp_path / "out", "pmm_manifest.json")))
    assert manifest["model_weights_from"] == "fp32 masters" and manifest["optimizer"] == policy


def _buffer_masters(model_state, buffers):
    """(chunk, key) -> (master, exp_avg, exp_avg_sq) cut from distrib_optim.pt by the generator's layout."""
    entries = buffers if isinstance(buffers, list) else [buffers]
    named = {}
    for index, entry in enumerate(entries):
        gbufs = iter(sorted(k for k in entry if isinstance(k, int)))
        for chunk in (k for k in model_state if k.startswith("model")):
            params = [(key, v) for key, v in model_state[chunk].items() if torch.is_tensor(v) and v.is_floating_point()
                      and (len(entries) == 1 or (".experts." in key) == (index == 1))]
            for dtype in dict.fromkeys(v.dtype for _, v in params):
                (dtype_key, buffer), = entry[next(gbufs)].items()
                assert dtype_key[0] == dtype
                start = 0
                for key, value in reversed([(k, v) for k, v in params if v.dtype == dtype]):
                    start = -(-start // 64) * 64
                    named[(chunk, key)] = tuple(buffer[name][start:start + value.numel()]
                                                for name in ("param", "exp_avg", "exp_avg_sq"))
                    start += value.numel()
    return named


@pytest.mark.parametrize("run_name", ["distrib", "distrib_dense"])
@pytest.mark.parametrize("policy", ["drop", "latest", "merge"])
def test_distributed_optimizer_buffers_give_the_weights(runs, tmp_path, run_name, policy):
    run = runs[run_name]
    out = _merge(run, tmp_path / "out", policy)
    models = [f for f in shard_files(out) if f.endswith("model_optim_rng.pt")]
    shards = {"distrib": 4, "distrib_dense": 2}[run_name]
    assert len(models) == shards
    assert len([f for f in shard_files(out) if f.endswith("distrib_optim.pt")]) == (0 if policy == "drop" else shards)
    for rel in models:
        distrib = os.path.join(os.path.dirname(rel), "distrib_optim.pt")
        merged = trusted_load(os.path.join(out, rel))
        sources = [_load(run, it, rel) for it in ITERATIONS]
        cut = [_buffer_masters(s, _load(run, it, distrib)) for s, it in zip(sources, ITERATIONS)]
        for (chunk, key), _ in cut[-1].items():
            value = merged[chunk][key]
            reference = [c[(chunk, key)][0].reshape(value.shape) for c in cut]
            assert torch.equal(value, sum(w * m.double() for w, m in zip(WEIGHTS, reference)).float().to(value.dtype)), key
        if policy == "drop":
            continue
        merged_distrib, newest_distrib = trusted_load(os.path.join(out, distrib)), _load(run, 300, distrib)
        mine, newest = _buffer_masters(merged, merged_distrib), cut[-1]
        for name, (master, exp_avg, exp_avg_sq) in mine.items():
            assert_merged_within_one_ulp(master, [c[name][0] for c in cut], WEIGHTS, f"{rel} master of {name}")
            for i, moment in ((1, exp_avg), (2, exp_avg_sq)):
                if policy == "merge":
                    assert_merged_within_one_ulp(moment, [c[name][i] for c in cut], WEIGHTS, f"{name} moment {i}")
                else:
                    assert torch.equal(moment, newest[name][i])
        entries = merged_distrib if isinstance(merged_distrib, list) else [merged_distrib]
        newest_entries = newest_distrib if isinstance(newest_distrib, list) else [newest_distrib]
        for entry, newest_entry in zip(entries, newest_entries):
            assert entry["buckets_coalesced"] is True
            for gbuf in (k for k in entry if isinstance(k, int)):
                (key, buffer), = entry[gbuf].items()
                assert buffer["numel_unpadded"] == newest_entry[gbuf][key]["numel_unpadded"]
        assert merged["optimizer"] == sources[-1]["optimizer"]  # param groups and step: the newest's


def test_a_tensor_filter_keeps_the_newest_weight_and_master(runs, tmp_path):
    run = runs["float16"]
    out = _merge(run, tmp_path / "out", "merge", exclude=["model0.embedding.*"])
    rel = "mp_rank_00_000/model_optim_rng.pt"
    merged, newest = trusted_load(os.path.join(out, rel)), _load(run, 300, rel)
    key = "embedding.word_embeddings.weight"
    assert torch.equal(merged["model0"][key], newest["model0"][key])
    mine, theirs = _masters_by_name(merged), _masters_by_name(newest)
    assert torch.equal(mine[("model0", key)], theirs[("model0", key)])
    other = ("model0", "decoder.layers.0.self_attention.linear_qkv.weight")
    assert not torch.equal(mine[other], theirs[other])
    with pytest.raises(MergeError, match="flat partitions"):
        _merge(runs["distrib_dense"], tmp_path / "refused", "latest", exclude=["model0.embedding.*"])


# -- validation ---------------------------------------------------------------------------------------
def _copy(run, tmp_path):
    import shutil
    shutil.copytree(run, tmp_path / "run")
    return str(tmp_path / "run")


def _edit(path, change):
    state = trusted_load(path)
    change(state)
    torch.save(state, path)


def test_latest_refuses_a_checkpoint_without_optimizer_state_and_drop_says_why_it_used_the_copies(runs, tmp_path):
    run = _copy(runs["float16"], tmp_path)
    path = os.path.join(run, "iter_0000200", "mp_rank_01_001", "model_optim_rng.pt")
    _edit(path, lambda state: state.pop("optimizer"))
    with pytest.raises(MergeError) as info:
        _merge(run, tmp_path / "refused", "latest")
    assert f"{path}: no optimizer state" in str(info.value) and not (tmp_path / "refused").exists()
    _merge(run, tmp_path / "drop", "drop")
    manifest = json.load(open(tmp_path / "drop" / "pmm_manifest.json"))
    assert manifest["model_weights_from"] == "fp32 masters (3 files); model copies (1 files)"
    assert manifest["model_weights_notes"] == [f"mp_rank_01_001/model_optim_rng.pt: {path} has no optimizer state "
                                               "(--no-save-optim?): the masters of every source are needed"]


def test_merge_refuses_another_param_group_structure(runs, tmp_path):
    run = _copy(runs["float16"], tmp_path)
    path = os.path.join(run, "iter_0000100", "mp_rank_00_000", "model_optim_rng.pt")
    _edit(path, lambda state: state["optimizer"]["optimizer"]["param_groups"][0]["params"].pop())
    with pytest.raises(MergeError) as info:
        _merge(run, tmp_path / "refused", "merge")
    assert f"{path}: optimizer structure" in str(info.value) and "differs from the newest" in str(info.value)


def test_optimizer_policies_need_one_shard_layout(runs, tmp_path):
    mixed = tmp_path / "mixed"
    generate_run(str(mixed), iterations=[100], tp=2, pp=1, ep=2, vp=1, num_experts=2, fp32_masters=True, **MODEL)
    generate_run(str(tmp_path / "other"), iterations=[200], tp=2, pp=1, ep=2, vp=2, num_experts=2, fp32_masters=True,
                 **MODEL)
    os.rename(tmp_path / "other" / "iter_0000200", mixed / "iter_0000200")
    (mixed / "latest_checkpointed_iteration.txt").write_text("200")
    with pytest.raises(MergeError, match="must have the newest's shard layout"):
        _merge(str(mixed), tmp_path / "refused", "merge")
    _merge(str(mixed), tmp_path / "drop", "drop")  # renumbered: the weights merge, from the model copies
    manifest = json.load(open(tmp_path / "drop" / "pmm_manifest.json"))
    assert manifest["model_weights_from"] == "model copies" and "another PP/EP/VP layout" in manifest["model_weights_notes"][0]


def test_a_distrib_buffer_that_does_not_follow_the_model_falls_back_with_a_note(runs, tmp_path):
    run = _copy(runs["distrib_dense"], tmp_path)
    for it in ITERATIONS:  # the same (wrong) layout everywhere: one bucket padded to 128 instead of 64
        path = os.path.join(run, f"iter_{it:07d}", "mp_rank_01", "distrib_optim.pt")

        def shift(state):
            (key, buffer), = state[0].items()
            buffer["param"] = torch.cat([torch.zeros(7), buffer["param"]])[:buffer["param"].numel()]
        _edit(path, shift)
    _merge(run, tmp_path / "out", "latest")
    manifest = json.load(open(tmp_path / "out" / "pmm_manifest.json"))
    assert manifest["model_weights_from"] == "fp32 masters (1 files); model copies (1 files)"
    assert "mp_rank_01/distrib_optim.pt buffer 0: no place for" in manifest["model_weights_notes"][0]


@pytest.mark.parametrize("run_name", ["float16", "distrib_dense"])
def test_an_older_source_whose_masters_do_not_round_to_its_model_falls_back_with_a_note(runs, tmp_path, run_name):
    """The mapping found in the newest must hold in every source (checked on samples of each
    master, see masters.check_mapping): an older source whose masters are not its model's
    (scaled here) gives that file's weights from the model copies, and the manifest says why."""
    run = _copy(runs[run_name], tmp_path)
    shard, name = ("mp_rank_00_000", "model_optim_rng.pt") if run_name == "float16" else ("mp_rank_01", "distrib_optim.pt")
    path = os.path.join(run, "iter_0000200", shard, name)

    def scale(state):
        if run_name == "float16":
            state["optimizer"]["fp32_from_fp16_params"][0][0].mul_(1.5)
        else:
            (_, buffer), = state[0].items()
            buffer["param"].mul_(1.5)
    _edit(path, scale)
    _merge(run, tmp_path / "out", "drop")
    manifest = json.load(open(tmp_path / "out" / "pmm_manifest.json"))
    assert manifest["model_weights_from"].startswith("fp32 masters (")
    assert manifest["model_weights_from"].endswith("files); model copies (1 files)")
    assert f"in {path} the master" in manifest["model_weights_notes"][0]
    assert "does not round to" in manifest["model_weights_notes"][0]


def test_a_sampled_comparison_looks_at_three_runs_of_elements():
    """rounds_to(sampled=True) compares the first, middle and last 2048 elements (a source whose
    mapping the newest showed in full); without it, every element."""
    master = torch.randn(100_000)
    model = master.to(torch.bfloat16)
    assert rounds_to(master, model) and rounds_to(master, model, sampled=True)
    for place, seen_by_sample in ((10, True), (50_000, True), (99_990, True), (30_000, False)):
        changed = model.clone()
        changed[place] += 1
        assert not rounds_to(master, changed)
        assert rounds_to(master, changed, sampled=True) != seen_by_sample, place
    assert not rounds_to(master, model[:-1], sampled=True)


def _resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="resident memory from /proc")
def test_a_mapped_comparison_gives_its_pages_back_and_the_values_stay(tmp_path):
    """rounds_to(mapped=True), as the newest's masters are matched: the same answer, the pages it
    compared dropped from the process (not all of a file's masters resident before the merge),
    and the tensors still read their values (from the file) afterwards."""
    master = torch.randn(16 << 20)
    path = str(tmp_path / "masters.pt")
    torch.save({"master": master, "model": master.to(torch.bfloat16)}, path)
    grown = {}
    for mapped in (False, True):
        loaded = torch.load(path, mmap=True, weights_only=True)
        before = _resident_bytes()
        assert rounds_to(loaded["master"], loaded["model"], mapped=mapped)
        grown[mapped] = _resident_bytes() - before
        assert torch.equal(loaded["master"], master) and torch.equal(loaded["model"], master.to(torch.bfloat16))
        del loaded
    assert grown[False] > 80 << 20 and grown[True] < 16 << 20, grown


def test_formats_refuse_a_policy_they_do_not_implement(tmp_path):
    config = llama_config(num_layers=1, hidden=16, ffn=32, vocab=32)
    for step in (10, 20):
        save_checkpoint(str(tmp_path / "run" / f"checkpoint-{step}"), llama_state(step, config), config)
    with pytest.raises(MergeError, match="--optimizer merge is not implemented for hf checkpoints .it takes drop, latest") \
            as info:
        pmm_dist.merge(sources=[str(tmp_path / "run")], out=str(tmp_path / "out"), optimizer="merge", device="cpu",
                       quiet=True)
    assert info.value.usage  # the command line exits 2
    assert not (tmp_path / "out").exists()


# -- the mapping on its own -----------------------------------------------------------------------------
def _bf16(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_masters_are_matched_by_value_within_their_group_order():
    model = [(("m", "a"), _bf16(1.0, 2.0).bfloat16()), (("m", "b"), _bf16(3.0).bfloat16()),
             (("m", "c"), _bf16(1.0, 2.0).bfloat16()), (("m", "d"), _bf16(5.0).bfloat16())]
    # group 0 holds a and c (identical values: the first free in order), group 1 holds b and d
    masters = [(("g0", 0), _bf16(1.0001, 2.0)), (("g1", 0), _bf16(5.0)), (("g0", 1), _bf16(1.0, 2.0001)),
               (("g1", 1), _bf16(3.0))]
    mapping = match_masters(masters, [0, 1, 0, 1], model)
    assert mapping == {("g0", 0): ("m", "a"), ("g0", 1): ("m", "c"), ("g1", 0): ("m", "d"), ("g1", 1): ("m", "b")}
    with pytest.raises(MatchError, match="rounds to no model tensor"):
        match_masters([(("g0", 0), _bf16(7.0, 2.0))], [0], model)


def test_buffer_walk_follows_alignment_and_bucket_ends():
    tensors = [(("m", name), torch.full((size,), value, dtype=torch.float32).bfloat16())
               for name, size, value in (("a", 10, 1.0), ("b", 70, 2.0), ("c", 5, 3.0))]
    # reverse order: c at 0, b at 64 (aligned); then a new bucket: a right after b's end (134)
    flat = torch.zeros(144)
    flat[0:5], flat[64:134], flat[134:144] = 3.0, 2.0, 1.0
    placed = _walk_buffer(tensors, flat, 144, "test")
    assert [(path[1], start) for path, start, _ in placed] == [("c", 0), ("b", 64), ("a", 134)]
    with pytest.raises(MatchError, match="numel_unpadded"):
        _walk_buffer(tensors, torch.cat([flat, torch.zeros(6)]), 150, "test")


def test_manifest_summary_of_where_the_weights_came_from():
    def result(relpath, **details):
        return UnitResult(relpath, 1, 1, "x", 1, details=details)
    assert model_weights_summary([]) == ("model copies", [])
    assert model_weights_summary([result("a", model_weights_from="fp32 masters"), result("b")]) == ("fp32 masters", [])
    summary, notes = model_weights_summary([result("a", model_weights_from="fp32 masters"),
                                            result("b", model_weights_from="model copies", model_weights_note="why")])
    assert summary == "fp32 masters (1 files); model copies (1 files)" and notes == ["b: why"]


def test_a_rounded_master_keeps_no_reference_to_the_fp32_master():
    """DeepSpeed saves its fp32 partitions as tensors that require grad, and so the merged master
    does: its rounding must not build an autograd graph holding the master (4 bytes per parameter
    of the whole model stayed alive that way)."""
    import gc
    import weakref
    from pmm_dist.formats.masters import rounded
    master = torch.randn(64, dtype=torch.float32).requires_grad_()
    like = torch.zeros(8, 8, dtype=torch.bfloat16)
    out = rounded(master, like)
    assert out.grad_fn is None and not out.requires_grad and out.dtype == torch.bfloat16 and out.shape == (8, 8)
    assert torch.equal(out, master.detach().reshape(8, 8).bfloat16())
    alive = weakref.ref(master)
    del master
    gc.collect()
    assert alive() is None
