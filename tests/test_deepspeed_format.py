"""The DeepSpeed format's discovery, detection and planning, on small hand-made tag directories.

The files here only have the shape of DeepSpeed's (the keys planning reads); what DeepSpeed
really writes and loads is proven in tests/test_deepspeed_real.py against the real engine.
"""
import collections
import json
import os

import pytest
import torch

import pmm_dist
from pmm_dist.errors import InputError, MergeError
from pmm_dist.formats import resolve_format
from pmm_dist.formats.deepspeed import (EXPERT, EXPERT_OPTIM, LAYER, MODEL, ZERO_OPTIM, DeepSpeedFormat,
                                        classify)
from pmm_dist.testing.synthetic import generate_run

from .conftest import run_cli
from .helpers import trusted_load, zero3_padding


def _save(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(obj, path)


def true_params(step):
    """The full weights of the 2-tensor model at ``step`` (what ZeRO-3 partitions hold, with geometry=True)."""
    return {"w": torch.arange(12.0).reshape(4, 3) + step, "b": -torch.arange(3.0) - step}


def zero3_partition(step, dp, dp_rank):
    """Rank ``dp_rank``'s stream at partition count ``dp``: each parameter's ceil(numel/dp) slice,
    padded with NaN (DeepSpeed leaves the padding uninitialized: it must never reach a weight,
    nor make a merge refuse the checkpoint)."""
    parts = []
    for value in true_params(step).values():
        flat, size = value.reshape(-1), -(-value.numel() // dp)
        part = torch.full((size,), float("nan"))
        piece = flat[dp_rank * size:(dp_rank + 1) * size]
        part[:piece.numel()] = piece
        parts.append(part)
    return torch.cat(parts)


def make_checkpoint(run, step, *, stage=2, dp=2, bf16=False, num_experts=None, extra=(), geometry=False):
    """A tag directory shaped like DeepSpeed's for a 2-tensor model (values depend on ``step``);
    ``geometry``: ZeRO-3 flat partitions hold true partitions of ``true_params(step)``."""
    tag = os.path.join(run, f"global_step{step}")
    weight = torch.full((4, 3), float(step))
    module = {"w": torch.empty(0) if stage == 3 else weight, "b": torch.full((3,), -float(step))}
    states = {"module": module, "buffer_names": [], "optimizer": None,
              "param_shapes": [{"w": torch.Size([4, 3]), "b": torch.Size([3])}] if stage else None,
              "global_steps": step, "dp_world_size": dp, "mp_world_size": 1, "ds_config": {"zero_optimization": {"stage": stage}}}
    if num_experts:
        states["num_experts"] = [num_experts]
        for expert in range(num_experts):
            _save(os.path.join(tag, f"layer_0_expert_{expert}_mp_rank_00_model_states.pt"),
                  {f"moe.experts.{expert}.w": torch.full((2,), float(step + expert))})
    prefix = "bf16_" if bf16 else ""
    for dp_rank in range(dp if stage else 0):
        flat = zero3_partition(step, dp, dp_rank) if geometry else torch.full((8,), float(step + dp_rank))
        if stage == 3 and not geometry and dp == 2:  # the places ZeRO-3 pads, uninitialized (see zero3_partition)
            flat[zero3_padding(states["param_shapes"], dp, dp_rank)] = float("nan")
        optim = {"zero_stage": stage, "partition_count": dp if stage == 3 else [dp]}
        optim["fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"] = [flat]
        optim["optimizer_state_dict" if stage == 3 else "base_optimizer_state"] = {"state": {0: {"exp_avg": flat * 0}}}
        _save(os.path.join(tag, f"{prefix}zero_pp_rank_{dp_rank}_mp_rank_00_optim_states.pt"),
              {"optimizer_state_dict": optim, "ds_config": states["ds_config"]})
        if stage == 3:
            rank_states = dict(states)
            if geometry:  # a frozen parameter: partitioned in the model states, like DeepSpeed's
                rank_states["frozen_param_shapes"] = {"f": torch.Size([5])}
                size = -(-5 // dp)
                fragment = torch.full((size,), float("nan"))
                piece = (torch.arange(5.0) * step)[dp_rank * size:(dp_rank + 1) * size]
                fragment[:piece.numel()] = piece
                rank_states["frozen_param_fragments"] = {"f": fragment}
            _save(os.path.join(tag, f"zero_pp_rank_{dp_rank}_mp_rank_00_model_states.pt"), rank_states)
    if stage != 3:
        _save(os.path.join(tag, "mp_rank_00_model_states.pt"), states)
    for name in extra:
        _save(os.path.join(tag, name), {"weight": torch.ones(2) * step})
    return tag


def make_run(run, steps, latest=None, **kwargs):
    for step in steps:
        make_checkpoint(run, step, **kwargs)
    with open(os.path.join(run, "latest"), "w") as f:
        f.write(latest or f"global_step{steps[-1]}")
    return run


def test_classify_deepspeed_file_names():
    assert classify("mp_rank_00_model_states.pt") == MODEL
    assert classify("zero_pp_rank_13_mp_rank_01_model_states.pt") == MODEL
    assert classify("zero_pp_rank_3_mp_rank_00_optim_states.pt") == ZERO_OPTIM
    assert classify("bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt") == ZERO_OPTIM
    assert classify("zero_pp_rank_3_mp_rank_00optim_states.pt") == ZERO_OPTIM  # DeepSpeed's old name
    assert classify("layer_2_expert_17_mp_rank_00_model_states.pt") == EXPERT
    assert classify("expert_5_mp_rank_00_model_states.pt") == EXPERT  # old MoE name (no layer id)
    assert classify("expp_rank_1_mp_rank_00_optim_states.pt") == EXPERT_OPTIM
    assert classify("layer_03-model_states.pt") == LAYER
    assert classify("layer_03-model_01-model_states.pt") == LAYER
    for other in ("latest", "zero_to_fp32.py", "model_optim_rng.pt", "mp_rank_00_model_states.pt.tmp"):
        assert classify(other) is None


def test_discovers_tags_up_to_latest(tmp_path):
    run = make_run(str(tmp_path / "run"), [10, 20, 30, 40], latest="global_step30")
    refs = DeepSpeedFormat().discover([run])
    # global_step40 is newer than `latest`: maybe still being written, never merged
    assert [r.iteration for r in refs] == [10, 20, 30]
    assert refs[-1].path == os.path.join(run, "global_step30")


def test_explicit_tag_directories_are_ordered_and_may_have_custom_tags(tmp_path):
    run = str(tmp_path / "run")
    a, b = make_checkpoint(run, 20), make_checkpoint(run, 10)
    custom = os.path.join(run, "before_decay")
    os.rename(make_checkpoint(run, 30), custom)
    refs = DeepSpeedFormat().discover([custom, a, b])
    assert [r.iteration for r in refs] == [10, 20, 30]  # the custom tag is ordered by its global_steps
    assert DeepSpeedFormat().output_layout(refs[-1]).checkpoint_dirname == "before_decay"


def test_discovery_errors_name_the_file(tmp_path):
    run = make_run(str(tmp_path / "run"), [10, 20])
    with pytest.raises(InputError, match="run directory"):
        DeepSpeedFormat().discover([run, os.path.join(run, "global_step10")])
    with open(os.path.join(run, "latest"), "w") as f:
        f.write("final")
    os.rename(os.path.join(run, "global_step20"), os.path.join(run, "final"))
    with pytest.raises(InputError, match="not of the form global_step"):
        DeepSpeedFormat().discover([run])
    with pytest.raises(InputError, match="not a DeepSpeed checkpoint directory"):
        DeepSpeedFormat().discover([str(tmp_path)])


def test_auto_detection_keeps_formats_apart(tmp_path):
    ds_run = make_run(str(tmp_path / "ds"), [10, 20])
    assert resolve_format("auto", [ds_run]).name == "deepspeed"
    assert resolve_format("auto", [os.path.join(ds_run, "global_step10")]).name == "deepspeed"
    megatron_run = str(tmp_path / "megatron")
    generate_run(megatron_run, iterations=[1, 2], tp=1, pp=1, ep=1, num_layers=1, hidden_size=8,
                 ffn_hidden_size=16, vocab_size=16)
    assert resolve_format("auto", [megatron_run]).name == "megatron"
    with pytest.raises(MergeError, match="could not detect"):
        resolve_format("auto", [str(tmp_path)])


def _relpaths(units):
    return {(u.relpath, u.action) for u in units}


def test_zero12_optimizer_files_are_dropped_or_merged(tmp_path):
    run = make_run(str(tmp_path / "run"), [10, 20], stage=2, bf16=True)
    fmt = DeepSpeedFormat()
    refs = fmt.discover([run])
    assert _relpaths(fmt.plan_units(refs, "drop", 1)) == {("mp_rank_00_model_states.pt", "merge")}
    for policy in ("latest", "merge"):  # their fp32 masters are merged (tests/test_optimizer_merge.py)
        assert _relpaths(fmt.plan_units(refs, policy, 1)) == {
            ("mp_rank_00_model_states.pt", "merge"),
            ("bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "merge"),
            ("bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "merge")}
    assert fmt.layout(refs) == {"zero_stage": 2, "dp": 2, "bf16": True, "mp": 1, "experts": 0,
                                "pipeline_layers": 0}


def test_zero3_optimizer_files_are_always_merged(tmp_path):
    run = make_run(str(tmp_path / "run"), [10, 20], stage=3, dp=2)
    fmt = DeepSpeedFormat()
    refs = fmt.discover([run])
    for policy in ("drop", "latest"):
        units = fmt.plan_units(refs, policy, 4)
        assert {u.action for u in units} == {"merge"}
        assert {u.relpath for u in units} == {f"zero_pp_rank_{d}_mp_rank_00_{k}_states.pt"
                                              for d in range(2) for k in ("model", "optim")}


def test_zero3_merge_of_flat_partitions_and_moments(tmp_path):
    run = make_run(str(tmp_path / "run"), [10, 20, 30], stage=3, dp=2)
    for policy in ("drop", "latest"):
        out = str(tmp_path / f"out_{policy}")
        pmm_dist.merge(sources=[run], out=out, method="wma", optimizer=policy, device="cpu", quiet=True)
        optim = trusted_load(os.path.join(out, "global_step30", "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
        optim = optim["optimizer_state_dict"]
        expected = (1 * 11 + 2 * 21 + 3 * 31) / 6  # wma of step + dp_rank
        # rank 1's stream: w's elements 6..11, then b's element 2 and one place of padding (zero)
        assert torch.allclose(optim["fp32_flat_groups"][0], torch.tensor([expected] * 7 + [0.0]))
        assert ("optimizer_state_dict" in optim) == (policy == "latest")
        assert optim["zero_stage"] == 3 and optim["partition_count"] == 2


def test_unknown_files_and_missing_experts_are_refused(tmp_path):
    run = make_run(str(tmp_path / "run"), [10, 20], stage=1, num_experts=2)
    fmt = DeepSpeedFormat()
    assert fmt.plan_units(fmt.discover([run]), "drop", 1)  # complete: fine
    stray = os.path.join(run, "global_step10", "notes.txt")
    open(stray, "w").close()
    os.remove(os.path.join(run, "global_step20", "layer_0_expert_1_mp_rank_00_model_states.pt"))
    with pytest.raises(InputError) as info:
        DeepSpeedFormat().plan_units(fmt.discover([run]), "drop", 1)
    message = str(info.value)
    assert f"{stray}: not a DeepSpeed checkpoint file" in message
    assert "global_step20/layer_0_expert_1_mp_rank_00_model_states.pt: missing file (num_experts=[2]" in message


@pytest.mark.parametrize("tag", [10, 20])
def test_some_missing_zero12_optimizer_files_are_refused_under_drop(tmp_path, tag):
    run = make_run(str(tmp_path / "run"), [10, 20], stage=2, dp=2)
    fmt = DeepSpeedFormat()
    for name in ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        os.remove(os.path.join(run, "global_step10", name))
    assert DeepSpeedFormat().plan_units(fmt.discover([run]), "drop", 1)  # all pruned: fine under drop
    run = make_run(str(tmp_path / "run2"), [10, 20], stage=2, dp=2)
    missing = os.path.join(run, f"global_step{tag}", "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    os.remove(missing)
    with pytest.raises(InputError) as info:
        DeepSpeedFormat().plan_units(fmt.discover([run]), "drop", 1)
    assert f"{missing}: missing file" in str(info.value)


def test_dry_run_prints_the_layout(tmp_path, capsys):
    run = make_run(str(tmp_path / "run"), [10, 20, 30], stage=3, dp=2, extra=["layer_00-model_states.pt"])
    pmm_dist.merge(sources=[run], out=str(tmp_path / "out"), dry_run=True, last=2, device="cpu")
    printed = capsys.readouterr().out
    assert "zero_stage=3" in printed and "pipeline_layers=1" in printed
    assert "global_step20" in printed and "global_step10" not in printed  # --last 2
    assert not os.path.exists(tmp_path / "out")


# -- layout changes: only the data-parallel size may change -----------------------------------------
def _merge(run, out, **options):
    pmm_dist.merge(sources=[run], out=out, device="cpu", quiet=True, **options)
    return out


def _make_mixed(run, layouts, **kwargs):
    """A run whose checkpoints (steps 10, 20, ...) were saved at ``layouts``: (stage, dp) each."""
    for index, (stage, dp) in enumerate(layouts):
        make_checkpoint(run, 10 * (index + 1), stage=stage, dp=dp, **kwargs)
    with open(os.path.join(run, "latest"), "w") as f:
        f.write(f"global_step{10 * len(layouts)}")
    return run


@pytest.mark.parametrize("dps,bf16", [((2, 2, 1), False), ((1, 1, 2), True), ((3, 1, 2), False), ((2, 3, 4), False),
                                      ((2, 2, 2), False), ((4, 4, 4), True)])
def test_zero3_partitions_are_remapped_onto_the_newest_dp_size(tmp_path, dps, bf16):
    """Also at one DP size (merged elementwise): the NaN padding is neither merged nor refused."""
    run = _make_mixed(str(tmp_path / "run"), [(3, dp) for dp in dps], geometry=True, bf16=bf16)
    prefix = "bf16_" if bf16 else ""
    for policy in ("drop", "latest"):
        out = _merge(run, str(tmp_path / f"out_{policy}"), method="wma", optimizer=policy)
        tag = os.path.join(out, f"global_step{10 * len(dps)}")
        newest = dps[-1]
        assert sorted(os.listdir(tag)) == sorted(f"{prefix if k == 'optim' else ''}zero_pp_rank_{r}_mp_rank_00_{k}_states.pt"
                                                 for r in range(newest) for k in ("model", "optim"))
        streams = [trusted_load(os.path.join(tag, f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
                   ["optimizer_state_dict"] for r in range(newest)]
        assert all(("optimizer_state_dict" in s) == (policy == "latest") for s in streams)
        weights = [1 / 6, 2 / 6, 3 / 6]
        expected = {name: sum(w * true_params(10 * (i + 1))[name].double() for i, w in enumerate(weights))
                    for name in ("w", "b")}
        offset = 0
        for name, value in expected.items():  # rebuild each parameter as zero_to_fp32 does
            size = -(-value.numel() // newest)
            full = torch.cat([s["fp32_flat_groups"][0][offset:offset + size] for s in streams])
            assert torch.allclose(full[:value.numel()].double(), value.reshape(-1), rtol=0, atol=1e-5), name
            assert torch.all(full[value.numel():] == 0)  # padding: zeros, never the sources' NaN
            offset += size
        fragments = [trusted_load(os.path.join(tag, f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"))
                     ["frozen_param_fragments"]["f"] for r in range(newest)]
        assert torch.all(torch.cat(fragments)[5:] == 0)
        frozen = torch.cat(fragments)[:5].double()
        assert torch.allclose(frozen, sum(w * torch.arange(5.0).double() * 10 * (i + 1) for i, w in enumerate(weights)))


def test_zero12_dp_change_merges_the_whole_weights(tmp_path):
    run = _make_mixed(str(tmp_path / "run"), [(2, 2), (2, 2), (2, 1)], bf16=True)
    fmt = DeepSpeedFormat()
    refs = fmt.discover([run])
    assert _relpaths(fmt.plan_units(refs, "drop", 1)) == {("mp_rank_00_model_states.pt", "merge")}
    assert _relpaths(fmt.plan_units(refs, "latest", 1)) == {  # the newest's partitioning, remapped onto
        ("mp_rank_00_model_states.pt", "merge"), ("bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "merge")}
    out = _merge(run, str(tmp_path / "out"), method="sma")
    merged = trusted_load(os.path.join(out, "global_step30", "mp_rank_00_model_states.pt"))
    # these hand-made partitions do not add up to param_shapes: the module's own copies are merged
    assert torch.allclose(merged["module"]["w"], torch.full((4, 3), 20.0)) and merged["dp_world_size"] == 1
    manifest = json.load(open(os.path.join(out, "pmm_manifest.json")))
    assert manifest["model_weights_from"] == "model copies"
    assert "param_shapes" in manifest["model_weights_notes"][0]


def _refusal(run, tmp_path, **options):
    with pytest.raises(MergeError) as info:
        _merge(run, str(tmp_path / "refused"), **options)
    assert not os.path.exists(tmp_path / "refused")
    assert "problems:" not in str(info.value)  # ONE message
    return str(info.value)


def test_a_zero_stage_change_is_refused_in_one_message(tmp_path):
    run = _make_mixed(str(tmp_path / "run"), [(1, 2), (1, 2), (2, 1), (2, 2)])
    message = _refusal(run, tmp_path)
    assert f"(in {run})" in message
    assert "zero_stage=1, dp=2: global_step10, global_step20" in message
    assert "zero_stage=2, dp=1: global_step30" in message and "zero_stage=2, dp=2: global_step40" in message
    assert "--iterations 30,40" in message  # the newest's same-layout window


def test_a_param_shapes_change_is_refused_in_one_message(tmp_path):
    run = _make_mixed(str(tmp_path / "run"), [(3, 2), (3, 1), (3, 1)], geometry=True)
    for dp_rank in range(2):
        path = os.path.join(run, "global_step10", f"zero_pp_rank_{dp_rank}_mp_rank_00_model_states.pt")
        state = trusted_load(path)
        state["param_shapes"] = [{"w": torch.Size([3, 4]), "b": torch.Size([3])}]
        torch.save(state, path)
    message = _refusal(run, tmp_path)
    assert "param_shapes" in message and os.path.join(run, "global_step10") in message
    assert "global_step20" not in message


def test_zero3_groups_of_several_partition_counts_are_refused(tmp_path):
    run = _make_mixed(str(tmp_path / "run"), [(3, 2), (3, 1)], geometry=True)
    for dp_rank in range(2):
        path = os.path.join(run, "global_step10", f"zero_pp_rank_{dp_rank}_mp_rank_00_optim_states.pt")
        state = trusted_load(path)
        state["optimizer_state_dict"]["partition_count"] = [2, 1]
        torch.save(state, path)
    assert "one partition count" in _refusal(run, tmp_path)


def test_dry_run_and_manifest_show_each_source_layout(tmp_path, capsys):
    run = _make_mixed(str(tmp_path / "run"), [(3, 2), (3, 1), (3, 1)], geometry=True)
    pmm_dist.merge(sources=[run], out=str(tmp_path / "dry"), dry_run=True, device="cpu")
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if "zero_stage=3" in line]
    assert len(lines) == 4  # the output's, then one per source
    assert "dp=2" in lines[1] and "dp=1" in lines[2] and "layout changes" in lines[2]
    assert "layout changes" not in lines[3]
    out = _merge(run, str(tmp_path / "out"))
    manifest = json.load(open(os.path.join(out, "pmm_manifest.json")))
    assert [layout["dp"] for layout in manifest["source_layouts"]] == [2, 1, 1] and manifest["layout"]["dp"] == 1


def test_inspect_marks_where_the_layout_changes(tmp_path):
    run = _make_mixed(str(tmp_path / "run"), [(2, 2), (2, 1), (2, 1)])
    proc = run_cli(["inspect", run])
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if "global_step" in line]
    assert ["layout changes" in line for line in rows] == [False, True, False]
    assert "dp=2" in rows[0] and "dp=1" in rows[1]
    info = json.loads(run_cli(["inspect", run, "--json"]).stdout)
    assert info["layout_changes"] == [20]
    assert [c["layout"]["dp"] for c in info["checkpoints"]] == [2, 1, 1]
    assert [c["layout_changed"] for c in info["checkpoints"]] == [False, True, False]


def _deepspeed_objects():
    """What DeepSpeed's optimizer files pickle of DeepSpeed (bf16/fp16 optimizers, ZeRO-1/2/3), real."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    dynamic = DynamicLossScaler(init_scale=2.0 ** 16, scale_window=100, min_scale=1.0, delayed_shift=2,
                                consecutive_hysteresis=False)
    address = fragment_address(numel=12, start=4)
    return {"optimizer_state_dict": {"zero_stage": ZeroStageEnum.gradients, "loss_scaler": dynamic,
                                     "dynamic_loss_scale": True, "partition_count": [2]},
            "static": LossScaler(scale=128.0), "again": dynamic,  # one object at two places
            "param_slice_mappings": [{"w": address, "b": fragment_address(numel=3, start=16)}],
            "w": torch.arange(6.0), "ds_config": collections.OrderedDict(train_batch_size=8)}


def _saved_bytes(obj) -> bytes:
    import io
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_deepspeed_classes_are_read_as_stand_ins_and_saved_as_deepspeeds_own(tmp_path, monkeypatch):
    from pmm_dist.formats import deepspeed_classes
    from pmm_dist.io.safe_load import safe_load
    path = tmp_path / "optim_states.pt"
    torch.save(_deepspeed_objects(), path)
    real = safe_load(str(path))  # deepspeed is imported in this process: its own classes
    assert type(real["static"]).__module__ == "deepspeed.runtime.fp16.loss_scaler"

    monkeypatch.setattr(deepspeed_classes, "_imported", lambda: False)  # as in a fresh `pmm-dist merge`
    read = safe_load(str(path))
    optim = read["optimizer_state_dict"]
    assert type(optim["loss_scaler"]) is deepspeed_classes.DynamicLossScaler and read["again"] is optim["loss_scaler"]
    assert type(read["static"]) is deepspeed_classes.LossScaler and read["static"].cur_scale == 128.0
    assert optim["zero_stage"] == 2 and int(optim["zero_stage"]) == 2 and type(optim["zero_stage"]).__module__ == \
        "pmm_dist.formats.deepspeed_classes"
    mappings = read["param_slice_mappings"][0]
    assert mappings["w"] == deepspeed_classes.FragmentAddress(numel=12, start=4) and mappings["w"] != mappings["b"]
    assert optim["loss_scaler"].__dict__ == real["optimizer_state_dict"]["loss_scaler"].__dict__

    with pytest.raises(TypeError, match="with_deepspeed_objects"):  # never pmm_dist's names in a file
        _saved_bytes(read)
    import copy
    assert type(copy.deepcopy(read)["static"]) is deepspeed_classes.LossScaler
    saved = deepspeed_classes.with_deepspeed_objects(read)
    assert _saved_bytes(saved) == _saved_bytes(real)
    assert saved["ds_config"] is read["ds_config"] and saved["w"] is read["w"]  # only the way to a stand-in is copied
    assert type(saved["optimizer_state_dict"]) is type(read["optimizer_state_dict"])
    assert type(read["static"]) is deepspeed_classes.LossScaler  # what was read is left as it is
    no_stand_ins = {"w": torch.ones(2), "n": [1, {"x": 2}]}
    assert deepspeed_classes.with_deepspeed_objects(no_stand_ins) is no_stand_ins
