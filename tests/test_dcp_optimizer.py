"""--optimizer drop|latest|merge for DCP and torch_dist, in one process, on hand-made checkpoints.

Plain DCP holds per-parameter optimizer state under ``optimizer.state.<param>.<name>``
(FSDP2 / torchtitan, ``get_state_dict``); torch_dist holds megatron-core's keys: model-space
fp32 masters ``optimizer.state.param.<key>`` / ``optimizer.state.fp32_param.<key>``, moments
``optimizer.state.exp_avg.<key>``, and the distributed optimizer's flat buckets. Every merged
tensor is compared with the float64 reference of the sources; what is the newest's must be its
bytes; bad optimizer input is refused at plan time in one message naming the checkpoint.
(The real frameworks: tests/test_dcp_optimizer_real.py, tests/test_megatron_dist_optimizer_real.py.)
"""
import json
import os
import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

import pmm_dist
from pmm_dist.errors import MergeError
from pmm_dist.testing.synthetic_dcp import read_metadata, split, write_dcp, write_metadata, write_torch_dist

from .helpers import assert_merged_within_one_ulp, wma

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

NUM = 3
WEIGHTS = wma(NUM)
DCP_PARAMS = {"fc1.weight": ((12, 8), torch.float32), "fc2.weight": ((8, 12), torch.bfloat16)}


def _random(shape, dtype, generator, positive=False):
    values = torch.randn(shape, generator=generator, dtype=torch.float64)
    return (values.abs() if positive else values).to(dtype)


def _whole(shape):
    return [(tuple(0 for _ in shape), tuple(shape))]


def _load(ckpt):
    """Every tensor of a checkpoint, through torch.distributed.checkpoint.load (one process)."""
    with open(os.path.join(ckpt, ".metadata"), "rb") as f:  # test side: our own files
        entries = pickle.load(f).state_dict_metadata
    state = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in entries.items() if hasattr(v, "size")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(ckpt)))
    return state


def _bytes_keys(ckpt):
    with open(os.path.join(ckpt, ".metadata"), "rb") as f:
        return {k for k, v in pickle.load(f).state_dict_metadata.items() if not hasattr(v, "size")}


def _merge(sources, out, **options):
    return pmm_dist.merge(sources=[str(s) for s in sources], out=str(out), method="wma", device="cpu", quiet=True,
                          **options)


# -- plain DCP (FSDP2 / torchtitan naming) ----------------------------------------------------------
def _write_dcp_run(root, layouts=("rows", "whole", "columns"), drop_key=None, no_optimizer_at=None):
    """Three DCP checkpoints of one model with Adam state; ``layouts``: how each one chunks its
    tensors (rows / columns: 2 chunks, whole: 1)."""
    generator = torch.Generator().manual_seed(7)
    paths = []
    for k, layout in enumerate(layouts, start=1):
        tensors = {}
        for name, (shape, dtype) in DCP_PARAMS.items():
            boxes = _whole(shape) if layout == "whole" else split(shape, 0 if layout == "rows" else 1, 2)
            tensors[f"model.{name}"] = (_random(shape, dtype, generator), boxes)
            tensors[f"optimizer.state.{name}.exp_avg"] = (_random(shape, dtype, generator), boxes)
            tensors[f"optimizer.state.{name}.exp_avg_sq"] = (_random(shape, dtype, generator, positive=True), boxes)
            tensors[f"optimizer.state.{name}.step"] = (torch.tensor(float(10 * k)), [((), ())])
        if k == no_optimizer_at:
            tensors = {key: value for key, value in tensors.items() if key.startswith("model.")}
        if drop_key is not None and k == 1:
            tensors.pop(drop_key)
        paths.append(os.path.join(root, f"step-{10 * k}"))
        objects = {"optimizer.param_groups.0.lr": pickle.dumps(0.1 / k), "lr_scheduler.last_epoch": pickle.dumps(k),
                   "train_state.step": pickle.dumps(10 * k)}
        if k == no_optimizer_at:  # saved without its optimizer and scheduler
            objects = {"train_state.step": objects["train_state.step"]}
        write_dcp(paths[-1], tensors, bytes_entries=objects)
    return paths


@pytest.fixture(scope="module")
def dcp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcp_optim")
    return root, _write_dcp_run(str(root))


@pytest.mark.parametrize("policy", ["drop", "latest", "merge"])
def test_dcp_policies(dcp_run, tmp_path, policy):
    root, paths = dcp_run
    out = tmp_path / "out"
    _merge([root], out, optimizer=policy)
    sources = [_load(p) for p in paths]
    merged = _load(out)
    moments = [k for k in sources[-1] if k.startswith("optimizer.state.") and not k.endswith(".step")]
    for key in (k for k in sources[-1] if k.startswith("model.")):
        assert_merged_within_one_ulp(merged[key], [s[key] for s in sources], WEIGHTS, key)
    if policy == "drop":
        assert not any(k.startswith("optimizer") for k in merged)
        assert _bytes_keys(out) == {"train_state.step"}
    else:
        assert _bytes_keys(out) == _bytes_keys(paths[-1])
        for key in moments:  # mixed layouts: the older sources chunk them otherwise
            if policy == "merge":
                assert_merged_within_one_ulp(merged[key], [s[key] for s in sources], WEIGHTS, key)
            else:
                assert torch.equal(merged[key], sources[-1][key]), key
        for key in (k for k in sources[-1] if k.endswith(".step")):  # counters: the newest's, float or not
            assert torch.equal(merged[key], sources[-1][key]), key
    manifest = json.loads((out / "pmm_manifest.json").read_text())
    assert manifest["optimizer"] == policy and manifest["model_weights_from"] == "model copies"


def test_dcp_exclude_keeps_the_newest_state_of_that_parameter(dcp_run, tmp_path):
    root, paths = dcp_run
    _merge([root], tmp_path / "out", optimizer="merge", exclude=["model.fc1.*"])
    sources, merged = [_load(p) for p in paths], _load(tmp_path / "out")
    for key in ("model.fc1.weight", "optimizer.state.fc1.weight.exp_avg", "optimizer.state.fc1.weight.exp_avg_sq"):
        assert torch.equal(merged[key], sources[-1][key]), key
    key = "optimizer.state.fc2.weight.exp_avg"
    assert_merged_within_one_ulp(merged[key], [s[key] for s in sources], WEIGHTS, key)


def test_torchtitan_naming(tmp_path):
    """torchtitan: the model's keys at the top level, the optimizer state flattened into one
    dotted name under 'optimizer' (DCP's flattening map says so)."""
    generator = torch.Generator().manual_seed(3)
    paths = []
    for k in range(1, NUM + 1):
        tensors = {"tok_embeddings.weight": (_random((16, 4), torch.float32, generator), split((16, 4), 0, 2)),
                   "output.weight": (_random((16, 4), torch.float32, generator), split((16, 4), 0, 2))}
        for name in ("tok_embeddings.weight", "output.weight"):
            tensors[f"optimizer.state.{name}.exp_avg"] = (_random((16, 4), torch.float32, generator),
                                                           split((16, 4), 0, 2))
            tensors[f"optimizer.state.{name}.step"] = (torch.tensor(float(k)), [((), ())])
        paths.append(str(tmp_path / f"step-{k}"))
        write_dcp(paths[-1], tensors)
        metadata = read_metadata(paths[-1])
        metadata.planner_data = {key: (key,) if not key.startswith("optimizer.") else
                                 ("optimizer", key[len("optimizer."):]) for key in tensors}
        write_metadata(paths[-1], metadata)
    _merge(paths, tmp_path / "out", optimizer="merge", exclude=["output.*"])
    sources, merged = [_load(p) for p in paths], _load(tmp_path / "out")
    for key in ("tok_embeddings.weight", "optimizer.state.tok_embeddings.weight.exp_avg"):
        assert_merged_within_one_ulp(merged[key], [s[key] for s in sources], WEIGHTS, key)
    for key in ("output.weight", "optimizer.state.output.weight.exp_avg", "optimizer.state.output.weight.step",
                "optimizer.state.tok_embeddings.weight.step"):
        assert torch.equal(merged[key], sources[-1][key]), key


def test_dcp_merge_refuses_another_optimizer_structure_in_one_line(tmp_path):
    paths = _write_dcp_run(str(tmp_path / "run"), drop_key="optimizer.state.fc1.weight.exp_avg_sq")
    with pytest.raises(MergeError) as info:
        _merge([tmp_path / "run"], tmp_path / "out", optimizer="merge")
    message = str(info.value)
    assert message.count("\n") == 0 and paths[0] in message
    assert "its optimizer state differs" in message and "optimizer.state.fc1.weight.exp_avg_sq" in message
    assert not (tmp_path / "out").exists()
    _merge([tmp_path / "run"], tmp_path / "latest", optimizer="latest")  # latest reads no moments of it


@pytest.mark.parametrize("policy", ["latest", "merge"])
@pytest.mark.parametrize("where", [1, NUM])
def test_dcp_without_optimizer_state_is_refused_naming_it(tmp_path, policy, where):
    paths = _write_dcp_run(str(tmp_path / "run"), no_optimizer_at=where)
    with pytest.raises(MergeError) as info:
        _merge([tmp_path / "run"], tmp_path / "out", optimizer=policy)
    assert str(info.value).startswith(f"{paths[where - 1]}: holds no optimizer state")
    assert f"--optimizer {policy}" in str(info.value) and "--optimizer drop" in str(info.value)
    _merge([tmp_path / "run"], tmp_path / "out", optimizer="drop")


# -- torch_dist (megatron-core naming) ----------------------------------------------------------------
MODEL = {"decoder.layers.mlp.linear_fc1.weight": (2, 16, 8), "embedding.word_embeddings.weight": (24, 8)}
BUCKET = "optimizer.distributed.dp_group_idx_0.gbuf_idx_0.dtype_(torch.bfloat16, torch.float32).bucket_idx_0"
PER_BUCKET = "optimizer.distributed.dp_group_idx_0.per_bucket_numel"


def _common(k, sharding=None, groups=2):
    common = {"iteration": 2 * k, "checkpoint_version": 3.0,
              "optimizer": {"optimizer": {"param_groups": [{"lr": 0.1 / k, "step": 2 * k} for _ in range(groups)]}},
              "opt_param_scheduler": {"num_steps": 2 * k}}
    if sharding is not None:
        common["content_metadata"] = {"distrib_optim_sharding_type": sharding}
    return common


def _write_torch_dist_run(root, masters="param", layouts=("rows", "whole", "rows"), master_chunks=None,
                          common=None):
    """Three torch_dist checkpoints of a bf16 model with megatron-core's model-space optimizer
    state: fp32 masters under ``optimizer.state.<masters>.<key>`` and Adam moments."""
    generator = torch.Generator().manual_seed(11)
    for k, layout in enumerate(layouts, start=1):
        tensors = {}
        for key, shape in MODEL.items():
            boxes = _whole(shape) if layout == "whole" else split(shape, 1, 2)
            master = _random(shape, torch.float32, generator)
            tensors[key] = (master.to(torch.bfloat16), boxes)
            master_boxes = boxes if master_chunks is None else split(shape, len(shape) - 1, master_chunks)
            if masters:
                tensors[f"optimizer.state.{masters}.{key}"] = (master, master_boxes)
            tensors[f"optimizer.state.exp_avg.{key}"] = (_random(shape, torch.float32, generator), boxes)
            tensors[f"optimizer.state.exp_avg_sq.{key}"] = (_random(shape, torch.float32, generator, True), boxes)
        write_torch_dist(os.path.join(root, f"iter_{2 * k:07d}"), tensors,
                         (common or _common)(k), objects={"rng_state/shard_0_1": [{"it": k}]})
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(2 * len(layouts)))
    return [os.path.join(root, f"iter_{2 * k:07d}") for k in range(1, len(layouts) + 1)]


def _common_pt(ckpt):
    return torch.load(os.path.join(ckpt, "common.pt"), weights_only=False)


@pytest.mark.parametrize("masters", ["param", "fp32_param"])
@pytest.mark.parametrize("policy", ["drop", "latest", "merge"])
def test_torch_dist_model_weights_are_the_merged_masters_rounded(tmp_path, policy, masters):
    paths = _write_torch_dist_run(str(tmp_path / "run"), masters=masters)
    _merge([tmp_path / "run"], tmp_path / "out", optimizer=policy)
    out = tmp_path / "out" / "iter_0000006"
    sources, merged = [_load(p) for p in paths], _load(out)
    for key in MODEL:
        master = f"optimizer.state.{masters}.{key}"
        # Within one bf16 ulp of the float64 average of the fp32 masters, not of the bf16 copies:
        assert_merged_within_one_ulp(merged[key], [s[master] for s in sources], WEIGHTS, key)
        exact = sum(w * s[master].double() for w, s in zip(WEIGHTS, sources))
        assert torch.equal(merged[key], exact.float().to(torch.bfloat16)), key  # as the trainer rounds its master
        if policy == "drop":
            assert not any(k.startswith("optimizer") for k in merged)
            continue
        assert torch.equal(merged[master].to(torch.bfloat16), merged[key])
        assert_merged_within_one_ulp(merged[master], [s[master] for s in sources], WEIGHTS, master)
        for moment in (f"optimizer.state.exp_avg.{key}", f"optimizer.state.exp_avg_sq.{key}"):
            if policy == "merge":
                assert_merged_within_one_ulp(merged[moment], [s[moment] for s in sources], WEIGHTS, moment)
            else:
                assert torch.equal(merged[moment], sources[-1][moment]), moment
    common = _common_pt(out)
    assert ("optimizer" in common) == (policy != "drop")
    if policy != "drop":  # param groups, step counters and scheduler: the newest's
        assert common["optimizer"] == _common_pt(paths[-1])["optimizer"]
        assert common["opt_param_scheduler"] == _common_pt(paths[-1])["opt_param_scheduler"]
    manifest = json.loads((tmp_path / "out" / "pmm_manifest.json").read_text())
    assert manifest["model_weights_from"] == "fp32 masters"


def test_torch_dist_without_masters_merges_the_model_copies(tmp_path):
    paths = _write_torch_dist_run(str(tmp_path / "run"), masters=None)
    _merge([tmp_path / "run"], tmp_path / "out", optimizer="latest")
    sources, merged = [_load(p) for p in paths], _load(tmp_path / "out" / "iter_0000006")
    for key in MODEL:
        assert_merged_within_one_ulp(merged[key], [s[key] for s in sources], WEIGHTS, key)
    manifest = json.loads((tmp_path / "out" / "pmm_manifest.json").read_text())
    assert manifest["model_weights_from"] == "model copies"


def test_torch_dist_masters_chunked_otherwise_than_the_model(tmp_path):
    """Every source's masters in 3 chunks along the last dim, its model tensors otherwise (the
    newest's too): the output's model chunks are filled from pieces of the masters."""
    paths = _write_torch_dist_run(str(tmp_path / "run"), master_chunks=3)
    _merge([tmp_path / "run"], tmp_path / "out", optimizer="merge")
    sources, merged = [_load(p) for p in paths], _load(tmp_path / "out" / "iter_0000006")
    for key in MODEL:
        master = f"optimizer.state.param.{key}"
        exact = sum(w * s[master].double() for w, s in zip(WEIGHTS, sources))
        assert torch.equal(merged[key], exact.float().to(torch.bfloat16)), key
        assert_merged_within_one_ulp(merged[master], [s[master] for s in sources], WEIGHTS, master)


def test_torch_dist_exclude_keeps_the_newest_model_master_and_moments(tmp_path):
    paths = _write_torch_dist_run(str(tmp_path / "run"))
    key = "embedding.word_embeddings.weight"
    _merge([tmp_path / "run"], tmp_path / "out", optimizer="merge", exclude=[key])
    sources, merged = [_load(p) for p in paths], _load(tmp_path / "out" / "iter_0000006")
    for name in (key, f"optimizer.state.param.{key}", f"optimizer.state.exp_avg.{key}"):
        assert torch.equal(merged[name], sources[-1][name]), name
    other = "optimizer.state.exp_avg.decoder.layers.mlp.linear_fc1.weight"
    assert_merged_within_one_ulp(merged[other], [s[other] for s in sources], WEIGHTS, other)


def _write_bucket_run(root, per_bucket_numel=(160, 160, 160), sharding=("dp_reshardable",) * 3, groups=(2, 2, 2)):
    """dp_reshardable: flat fp32 bucket state (DP-sharded: 2 chunks) and its ShardedObjects."""
    generator = torch.Generator().manual_seed(5)
    paths = []
    for k in range(1, NUM + 1):
        tensors = {key: (_random(shape, torch.bfloat16, generator), _whole(shape)) for key, shape in MODEL.items()}
        for name in ("param", "exp_avg", "exp_avg_sq"):
            tensors[f"{BUCKET}.{name}"] = (_random((150,), torch.float32, generator, name == "exp_avg_sq"),
                                           split((150,), 0, 2))
        numel = [[{(torch.bfloat16, torch.float32): [per_bucket_numel[k - 1]]}]]
        objects = {f"{PER_BUCKET}/shard_0_1": numel, f"{PER_BUCKET}_unpadded/shard_0_1": [[{(torch.bfloat16,
                                                                                             torch.float32): [150]}]],
                   "optimizer.distributed.dp_group_idx_0.optimizer/shard_0_1": [
                       {"param_groups": [{"lr": 0.1, "step": k} for _ in range(groups[k - 1])]}]}
        paths.append(os.path.join(root, f"iter_{2 * k:07d}"))
        common = {"iteration": 2 * k, "optimizer": {"param_state_sharding_type": sharding[k - 1]},
                  "content_metadata": {"distrib_optim_sharding_type": sharding[k - 1]}}
        write_torch_dist(paths[-1], tensors, common, objects=objects)
    return paths


@pytest.mark.parametrize("policy", ["latest", "merge"])
def test_torch_dist_buckets_merge_elementwise(tmp_path, policy):
    paths = _write_bucket_run(str(tmp_path / "run"))
    _merge(paths, tmp_path / "out", optimizer=policy)
    sources, merged = [_load(p) for p in paths], _load(tmp_path / "out" / "iter_0000006")
    assert_merged_within_one_ulp(merged[f"{BUCKET}.param"], [s[f"{BUCKET}.param"] for s in sources], WEIGHTS, "param")
    for name in ("exp_avg", "exp_avg_sq"):
        key = f"{BUCKET}.{name}"
        if policy == "merge":
            assert_merged_within_one_ulp(merged[key], [s[key] for s in sources], WEIGHTS, key)
        else:
            assert torch.equal(merged[key], sources[-1][key]), key
    for key in MODEL:  # no model-space masters: the model copies are merged
        assert_merged_within_one_ulp(merged[key], [s[key] for s in sources], WEIGHTS, key)
    manifest = json.loads((tmp_path / "out" / "pmm_manifest.json").read_text())
    assert manifest["model_weights_from"] == "model copies"


@pytest.mark.parametrize("change, words", [
    ({"per_bucket_numel": (192, 160, 160)}, ["'optimizer.distributed.dp_group_idx_0.per_bucket_numel/shard_0_1' is",
                                              "192", "same DP size and bucket size"]),
    ({"sharding": ("fully_reshardable", "dp_reshardable", "dp_reshardable")},
     ["sharding type (content_metadata in common.pt) is 'fully_reshardable', the newest's 'dp_reshardable'"]),
    ({"groups": (3, 2, 2)}, ["the number of param groups ('optimizer.distributed.dp_group_idx_0.optimizer/shard_0_1')"
                             " is [3], the newest's [2]"]),
])
@pytest.mark.parametrize("policy", ["latest", "merge"])
def test_torch_dist_another_optimizer_structure_is_refused_in_one_message(tmp_path, policy, change, words):
    paths = _write_bucket_run(str(tmp_path / "run"), **change)
    with pytest.raises(MergeError) as info:
        _merge(paths, tmp_path / "out", optimizer=policy)
    message = str(info.value)
    assert message.startswith("2 problems:") and message.count(paths[0]) == 1 and paths[1] not in message
    assert all(word in message for word in words), message
    assert f"--optimizer {policy} merges optimizer state only between checkpoints of one optimizer" in message
    assert not (tmp_path / "out").exists()
    _merge(paths, tmp_path / "out", optimizer="drop")  # the weights alone still merge


def test_torch_dist_param_group_count_in_common_pt(tmp_path):
    def common(k):
        return _common(k, groups=3 if k == 2 else 2)
    paths = _write_torch_dist_run(str(tmp_path / "run"), common=common)
    with pytest.raises(MergeError, match=r"the number of param groups \(common.pt\) is \[3\], the newest's \[2\]") \
            as info:
        _merge([tmp_path / "run"], tmp_path / "out", optimizer="merge")
    assert paths[1] in str(info.value)


def test_torch_dist_without_optimizer_state_is_refused(tmp_path):
    paths = _write_bucket_run(str(tmp_path / "run"))
    for path in paths:  # weights only, as a --no-save-optim run saves
        write_torch_dist(path, {key: (value, _whole(value.shape)) for key, value in _load(path).items()
                                if not key.startswith("optimizer")}, {"iteration": 1})
    with pytest.raises(MergeError, match="holds no optimizer state \\(no 'optimizer' entries"):
        _merge(paths, tmp_path / "out", optimizer="latest")
