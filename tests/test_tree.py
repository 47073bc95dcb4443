"""pmm_dist.io.tree: leaves of nested state dicts by exact key path, and copies with new leaves."""
import collections
from collections import OrderedDict

import torch

from pmm_dist.io.tree import dotted, flatten, get_path, iter_leaves, map_leaves, remove_subtree, replace_subtree

Pair = collections.namedtuple("Pair", "first second")


def _state():
    module = OrderedDict([("layer.0.weight", torch.ones(2)), ("layer.0.bias", torch.zeros(2))])
    module._metadata = {"": {"version": 1}}  # what nn.Module.state_dict() attaches
    return {"model": module, "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}},
                                           "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
            "rng": (1, Pair(2, None)), "iteration": 40}


def test_leaves_in_order_with_exact_paths():
    paths = [path for path, _ in iter_leaves(_state())]
    assert paths == [("model", "layer.0.weight"), ("model", "layer.0.bias"),
                     ("optimizer", "state", 0, "exp_avg"),
                     ("optimizer", "param_groups", 0, "lr"), ("optimizer", "param_groups", 0, "params", 0),
                     ("optimizer", "param_groups", 0, "params", 1),
                     ("rng", 0), ("rng", 1, 0), ("rng", 1, 1), ("iteration",)]
    assert dotted(("model", "layer.0.weight")) == "model.layer.0.weight"  # for messages only: not unique
    assert list(iter_leaves(5)) == [((), 5)] and list(iter_leaves({})) == []


def test_flatten_maps_paths_to_the_leaves_themselves():
    state = _state()
    flat = flatten(state, prefix=("ckpt",))
    assert flat[("ckpt", "model", "layer.0.weight")] is state["model"]["layer.0.weight"]
    assert flat[("ckpt", "rng", 1, 1)] is None and flat[("ckpt", "iteration")] == 40
    assert len(flat) == 10


def test_map_leaves_keeps_container_types_and_state_dict_metadata():
    state = _state()
    seen = []

    def double(path, leaf):
        seen.append(path)
        return leaf * 2 if torch.is_tensor(leaf) else leaf
    result = map_leaves(state, double)
    assert seen == [path for path, _ in iter_leaves(state)]
    assert type(result["model"]) is OrderedDict and list(result["model"]) == ["layer.0.weight", "layer.0.bias"]
    assert result["model"]._metadata == {"": {"version": 1}}
    assert type(result["rng"]) is tuple and type(result["rng"][1]) is Pair and result["rng"][1] == Pair(2, None)
    assert type(result["optimizer"]["param_groups"]) is list
    assert torch.equal(result["model"]["layer.0.weight"], torch.full((2,), 2.0))
    assert torch.equal(state["model"]["layer.0.weight"], torch.ones(2))  # the input is left as it was


def test_get_path():
    state = _state()
    assert get_path(state, ("optimizer", "state", 0, "exp_avg")) is state["optimizer"]["state"][0]["exp_avg"]
    assert get_path(state, ()) is state
    assert get_path(state, ("optimizer", "missing")) is None
    assert get_path(state, ("iteration", "deeper")) is None  # through a leaf
    assert get_path(state, ("optimizer", "param_groups", 0)) is None  # dicts only, not lists


def test_replace_subtree_copies_only_along_the_path():
    state = _state()
    result = replace_subtree(state, ("optimizer", "state"), lambda subtree: {"replaced": len(subtree)})
    assert result["optimizer"]["state"] == {"replaced": 1}
    assert 0 in state["optimizer"]["state"]  # the input is left as it was
    assert result["optimizer"] is not state["optimizer"]
    assert result["optimizer"]["param_groups"] is state["optimizer"]["param_groups"]  # shared, not copied
    assert result["model"] is state["model"]
    assert replace_subtree(state, ("optimizer", "nothing"), lambda s: 1 / 0) == state  # missing: left alone
    assert replace_subtree(state, ("nothing", "deeper"), lambda s: 1 / 0) is state
    assert replace_subtree(state, (), lambda s: "whole") == "whole"


def test_replace_inside_a_state_dict_keeps_its_type_and_metadata():
    state = _state()
    result = replace_subtree(state, ("model", "layer.0.bias"), lambda bias: bias + 1)
    assert type(result["model"]) is OrderedDict and result["model"]._metadata == {"": {"version": 1}}
    assert list(result["model"]) == ["layer.0.weight", "layer.0.bias"]
    assert torch.equal(result["model"]["layer.0.bias"], torch.ones(2))
    assert torch.equal(state["model"]["layer.0.bias"], torch.zeros(2))


def test_remove_subtree():
    state = _state()
    result = remove_subtree(state, ("optimizer", "state"))
    assert list(result["optimizer"]) == ["param_groups"] and "state" in state["optimizer"]
    assert list(remove_subtree(state, ("optimizer",))) == ["model", "rng", "iteration"]
    assert list(state) == ["model", "optimizer", "rng", "iteration"]
    assert remove_subtree(state, ("optimizer", "missing")) == state
    assert remove_subtree(state, ("iteration", "deeper")) is state  # parent is a leaf: nothing to remove
    without_bias = remove_subtree(state, ("model", "layer.0.bias"))["model"]
    assert type(without_bias) is OrderedDict and without_bias._metadata == {"": {"version": 1}}
    assert list(without_bias) == ["layer.0.weight"]
