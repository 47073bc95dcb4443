"""The watcher in every format: a run grown one checkpoint at a time, the marker last.

After each landing without its commit marker nothing new is published (the checkpoint is still
being written); once the marker is there, the published merge equals the float64 reference of
its window to within one ulp, OUT holds exactly the format's layout (plus the watcher's state),
the manifest is the one ``merge --iterations <window>`` writes, and updates after the first read
only the few checkpoints the method needs plus the running state.
"""
import json
import os

import pytest

import pmm_dist
from pmm_dist.engine.manifest import Manifest

from .helpers import assert_merged_within_one_ulp
from .watch_runs import make_kind

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

CASES = [
    ("megatron", "sma", {}, 3), ("megatron", "ema", {"alpha": 0.3}, None), ("megatron", "wma", {}, 3),
    ("megatron", "ema", {"alpha": 0.3}, 3), ("megatron", "wma", {}, None), ("megatron", "sma", {}, None),
    ("deepspeed", "ema", {"alpha": 0.3}, None), ("deepspeed", "sma", {}, 2),
    ("dcp", "ema", {"alpha": 0.3}, 3), ("dcp", "sma", {}, None),
    ("megatron-dist", "ema", {"alpha": 0.3}, None), ("megatron-dist", "sma", {}, 2),
    ("hf", "ema", {"alpha": 0.3}, 3), ("hf", "wma", {}, None),
]
RUN_DIRECTORY = {"megatron": "latest_checkpointed_iteration.txt", "megatron-dist": "latest_checkpointed_iteration.txt",
                 "deepspeed": "latest"}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = make_kind(kind, str(tmp_path_factory.mktemp(kind) / "made"))
        return cache[kind]
    return get


def _check_layout(kind, out, dirname, iteration):
    entries = set(os.listdir(out))
    if kind in RUN_DIRECTORY:
        assert entries == {".pmm_watch", dirname, RUN_DIRECTORY[kind], "pmm_manifest.json"}, entries
        text = open(os.path.join(out, RUN_DIRECTORY[kind])).read().strip()
        assert text == (dirname if kind == "deepspeed" else str(iteration))
        return os.path.join(out, "pmm_manifest.json")
    assert entries == {".pmm_watch", dirname, "pmm_watch_index.json"}, entries
    index = json.load(open(os.path.join(out, "pmm_watch_index.json")))
    assert index["latest"] == dirname and index["iteration"] == iteration
    assert "pmm_manifest.json" in os.listdir(os.path.join(out, dirname))
    return os.path.join(out, dirname, "pmm_manifest.json")


@pytest.mark.parametrize("kind,method,options,last", CASES, ids=lambda v: str(v))
def test_grown_run_publishes_the_reference_of_each_window(made, tmp_path, kind, method, options, last):
    source = made(kind)
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    os.makedirs(run)
    weights_of = pmm_dist.get_method(method)
    args = dict(out=out, method=method, last=last, device="cpu", quiet=True, **options)
    for k, name in enumerate(source.names):
        source.land(run, name, marker=False)
        result = pmm_dist.watch_once(run, **args)
        assert result.ok and not result.published, (result.failures, result.published)  # still being written
        source.land(run, name)
        result = pmm_dist.watch_once(run, **args)
        assert result.ok, result.failures
        [published] = result.published
        window = source.names[: k + 1][-last:] if last else source.names[: k + 1]
        iterations = [source.iteration(n) for n in window]
        assert published.window == iterations and published.iteration == iterations[-1]
        weights = weights_of.weights(len(window), **options)
        merged = source.tensors(published.path)
        inputs = [source.tensors(os.path.join(source.made, n)) for n in window]
        assert merged and set(merged) <= set(inputs[-1])
        for key, value in merged.items():
            assert value.dtype == inputs[-1][key].dtype
            assert_merged_within_one_ulp(value, [t[key] for t in inputs], weights, f"{name}: {key}")
        manifest = Manifest.read(os.path.dirname(_check_layout(kind, out, os.path.basename(published.path),
                                                                iterations[-1])))
        assert [s["iteration"] for s in manifest.sources] == iterations
        assert manifest.weights == pytest.approx(weights) and manifest.method == method
        assert manifest.bytes_read == published.bytes_read > 0
        if k >= 2 and (last is None or last > 2):
            # past the first merges, updates are incremental: the new (and leaving) one + state
            assert published.incremental, published
            assert len(published.reads) <= 2, published.reads
        elif k >= 2:  # a window of two: reading two is the whole window, no state read
            assert not published.incremental and published.reads == iterations
    # The checkpoint itself is laid out as `pmm-dist merge --iterations <window>` lays it out.
    reference_out = str(tmp_path / "merge")
    merged = pmm_dist.merge(sources=[run], out=reference_out, method=method, iterations=iterations, device="cpu",
                            quiet=True, **options)
    ours = published.path
    theirs = merged.output_path
    assert _files(ours) == _files(theirs)
    ref_manifest = Manifest.read(reference_out)
    for field in ("format", "method", "method_options", "weights", "sources", "optimizer", "output_checkpoint",
                  "tracker", "layout"):
        assert getattr(manifest, field) == getattr(ref_manifest, field), field


def _files(checkpoint_dir):
    return sorted(os.path.relpath(os.path.join(d, f), checkpoint_dir) for d, _, fs in os.walk(checkpoint_dir)
                  for f in fs)
