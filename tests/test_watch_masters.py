"""The watcher takes model weights from the fp32 masters exactly where ``merge`` does (issue 13).

A mixed-precision Megatron run keeps its weights as fp32 masters in the optimizer state; the
merge writes them, merged and rounded, as the model's bf16 tensors. Each published merge must be
the very files ``merge --iterations <window>`` writes: for a run whose every checkpoint has
masters (incrementally, from a state of the masters), and for a run where one checkpoint was
saved without optimizer state, so that windows holding it take the model copies and the others
the masters (the watcher then merges the whole window: a state of one kind cannot continue as
the other).
"""
import filecmp
import os
import shutil

import pytest

import pmm_dist
from pmm_dist.engine.manifest import Manifest
from pmm_dist.testing.synthetic import generate_run

ITERATIONS = (100, 200, 300, 400, 500)
SHAPE = dict(tp=2, pp=1, ep=1, num_layers=2, hidden_size=16, ffn_hidden_size=32, num_experts=0, vocab_size=32)


def _land(made: str, run: str, iteration: int) -> None:
    name = f"iter_{iteration:07d}"
    shutil.copytree(os.path.join(made, name), os.path.join(run, name))
    with open(os.path.join(run, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))


def _same_files(ours: str, theirs: str) -> None:
    names = sorted(os.path.relpath(os.path.join(d, f), ours) for d, _, fs in os.walk(ours) for f in fs)
    assert names == sorted(os.path.relpath(os.path.join(d, f), theirs) for d, _, fs in os.walk(theirs) for f in fs)
    for name in names:
        assert filecmp.cmp(os.path.join(ours, name), os.path.join(theirs, name), shallow=False), name


def _grow_and_compare(tmp_path, made: str, **options):
    """Land each checkpoint, publish, and compare with merge; the published merges' records."""
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    os.makedirs(run)
    published = []
    for k, iteration in enumerate(ITERATIONS):
        _land(made, run, iteration)
        result = pmm_dist.watch_once(run, out=out, device="cpu", quiet=True, **options)
        assert result.ok, result.failures
        [merge] = result.published
        reference = str(tmp_path / f"merge{iteration}")
        pmm_dist.merge(sources=[run], out=reference, iterations=merge.window, device="cpu", quiet=True,
                       **{key: value for key, value in options.items() if key != "last"})
        _same_files(merge.path, os.path.join(reference, f"iter_{iteration:07d}"))
        ours, theirs = Manifest.read(out), Manifest.read(reference)
        assert ours.model_weights_from == theirs.model_weights_from, (iteration, ours.model_weights_from)
        published.append((merge, ours.model_weights_from))
    return published


@pytest.mark.parametrize("options", [dict(method="sma", last=3), dict(method="ema", alpha=0.25),
                                     dict(method="wma", last=3), dict(method="sma", last=3, optimizer="latest")],
                         ids=str)
def test_masters_of_every_checkpoint_make_the_weights_incrementally(tmp_path, options):
    made = str(tmp_path / "made")
    generate_run(made, iterations=list(ITERATIONS), fp32_masters=True, **SHAPE)
    published = _grow_and_compare(tmp_path, made, **options)
    assert {weights for _, weights in published} == {"fp32 masters"}
    assert all(merge.incremental and len(merge.reads) <= 2 for merge, _ in published[2:]), published


def test_a_checkpoint_without_masters_decides_the_windows_holding_it(tmp_path):
    made = str(tmp_path / "made")
    generate_run(made, iterations=list(ITERATIONS), fp32_masters=True, **SHAPE)
    weights_only = str(tmp_path / "weights_only")
    generate_run(weights_only, iterations=[200], optimizer_state=False, **SHAPE)  # as --no-save-optim
    shutil.rmtree(os.path.join(made, "iter_0000200"))
    shutil.copytree(os.path.join(weights_only, "iter_0000200"), os.path.join(made, "iter_0000200"))
    published = _grow_and_compare(tmp_path, made, method="sma", last=3)
    # windows 100, 100-200, 100-300 and 200-400 hold the weights-only checkpoint; 300-500 does not
    assert [weights for _, weights in published] == ["fp32 masters"] + ["model copies"] * 3 + ["fp32 masters"]
