"""Bad input: a clear error naming file and key, exit code 1, and no tracker in the output."""
import os
import shutil

import pytest
import torch

from pmm_dist.testing.synthetic import generate_run

from .conftest import run_cli
from .helpers import trusted_load

TRACKER = "latest_checkpointed_iteration.txt"
SHARD = "mp_rank_01_001/model_optim_rng.pt"
KEY = "decoder.layers.0.self_attention.linear_qkv.weight"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("pristine") / "run")
    generate_run(run, iterations=[10, 20, 30], tp=2, pp=2, ep=1, num_layers=2, hidden_size=16,
                 ffn_hidden_size=32, num_experts=0, vocab_size=32)
    return run


@pytest.fixture
def run(pristine, fresh_copy):
    return fresh_copy(pristine)


def _rewrite(path, change):
    state = trusted_load(path)
    change(state)
    torch.save(state, path)


def _assert_fails(run_dir, out, *needles, extra=(), world_size=1):
    proc = run_cli(["merge", run_dir, "--out", out, "--quiet", *extra], world_size=world_size)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in:\n{proc.stderr}"
    assert not os.path.exists(os.path.join(out, TRACKER))
    assert not os.path.exists(os.path.join(out, "pmm_manifest.json"))
    assert not os.path.exists(os.path.join(out, "iter_0000030"))
    return proc


def test_missing_shard(run, tmp_path):
    shutil.rmtree(os.path.join(run, "iter_0000020", "mp_rank_01_001"))
    _assert_fails(run, str(tmp_path / "out"), os.path.join(run, "iter_0000020", "mp_rank_01_001"), "missing shard")


def test_shape_mismatch_names_file_and_key(run, tmp_path):
    path = os.path.join(run, "iter_0000010", SHARD)
    _rewrite(path, lambda s: s["model"].__setitem__(KEY, torch.zeros(3, 3, dtype=torch.bfloat16)))
    _assert_fails(run, str(tmp_path / "out"), path, KEY, "shape (3, 3)", world_size=2)


def test_dtype_mismatch_names_file_and_key(run, tmp_path):
    path = os.path.join(run, "iter_0000020", SHARD)
    _rewrite(path, lambda s: s["model"].__setitem__(KEY, s["model"][KEY].float()))
    _assert_fails(run, str(tmp_path / "out"), path, KEY, "torch.float32")


def test_missing_key(run, tmp_path):
    path = os.path.join(run, "iter_0000020", SHARD)
    _rewrite(path, lambda s: s["model"].pop(KEY))
    _assert_fails(run, str(tmp_path / "out"), path, KEY, "missing")


def test_tensor_parallel_degree_mismatch(run, tmp_path):
    other = str(tmp_path / "tp1")
    generate_run(other, iterations=[20], tp=1, pp=2, ep=1, num_layers=2, hidden_size=16, ffn_hidden_size=32,
                 num_experts=0, vocab_size=32)
    shutil.rmtree(os.path.join(run, "iter_0000020"))
    shutil.copytree(os.path.join(other, "iter_0000020"), os.path.join(run, "iter_0000020"))
    proc = _assert_fails(run, str(tmp_path / "out"), f"(in {run})", "tp=1, pp=2, ep=1: iter_0000020",
                         "tp=2, pp=2, ep=1: iter_0000010, iter_0000030", "--iterations 30", "torch_dist")
    assert "problems:" not in proc.stderr  # one message, however many shards and keys differ


def test_truncated_file(run, tmp_path):
    path = os.path.join(run, "iter_0000010", SHARD)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    _assert_fails(run, str(tmp_path / "out"), path, "truncated or corrupt", world_size=2)


@pytest.mark.parametrize("newest", [False, True])
def test_flipped_bytes_inside_a_tensor_fail_the_merge(run, tmp_path, newest):
    """torch.load does not check the CRC-32 of a tensor's record; the merge does (io/record_check)."""
    import zipfile
    path = os.path.join(run, "iter_0000030" if newest else "iter_0000020", SHARD)
    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(record.header_offset + 30 + len(record.filename.encode()))
        header_end = f.tell()
        f.seek(record.header_offset + 28)
        extra = int.from_bytes(f.read(2), "little")
        f.seek(header_end + extra + record.file_size // 2)  # the middle of the tensor's bytes
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    proc = _assert_fails(run, str(tmp_path / "out"), path, record.filename, "CRC-32", world_size=2)
    assert "--resume" not in proc.stderr and not os.path.exists(os.path.join(tmp_path, "out", ".pmm_staging"))


def test_code_in_a_pickle_never_runs(run, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = os.path.join(run, "iter_0000020", SHARD)
    _rewrite(path, lambda s: s.__setitem__("payload", Exploit()))
    _assert_fails(run, str(tmp_path / "out"), path, "allow-list")
    assert not marker.exists()


def test_output_may_not_be_an_input(run, tmp_path):
    for out in (run, os.path.join(run, "iter_0000030"), os.path.join(run, "iter_0000030", "merged")):
        proc = run_cli(["merge", run, "--out", out, "--quiet", "--overwrite"])
        assert proc.returncode == 1 and "overlaps the input" in proc.stderr, proc.stderr
    assert open(os.path.join(run, TRACKER)).read().strip() == "30"  # the input is untouched
    assert not os.path.exists(os.path.join(run, "iter_0000030", "merged"))


def test_existing_output_is_refused_without_overwrite(run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    _assert_fails(run, str(out), "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "old"
    # --overwrite replaces only a previous pmm_dist output (issue 15): a foreign directory is refused.
    proc = run_cli(["merge", run, "--out", str(out), "--quiet", "--overwrite"])
    assert proc.returncode == 1 and "not a pmm_dist output" in proc.stderr and "keep.txt" in proc.stderr
    assert (out / "keep.txt").read_text() == "old"
    (out / "keep.txt").unlink()
    assert run_cli(["merge", run, "--out", str(out), "--quiet", "--last", "2"]).returncode == 0
    proc = run_cli(["merge", run, "--out", str(out), "--quiet", "--overwrite"])
    assert proc.returncode == 0, proc.stderr
    assert (out / TRACKER).read_text().strip() == "30"


def test_selection_errors_name_the_missing_iteration(run, tmp_path):
    _assert_fails(run, str(tmp_path / "out"), "15", extra=["--interval", "15", "--last", "2"])
    _assert_fails(run, str(tmp_path / "out"), "99 not found", extra=["--iterations", "10,99"])


def test_usage_errors_exit_2(run, tmp_path):
    proc = run_cli(["merge", run, "--out", str(tmp_path / "o"), "--method", "ema", "--alpha", "1.5"])
    assert proc.returncode in (1, 2) and "alpha" in proc.stderr
    proc = run_cli(["merge", run, "--out", str(tmp_path / "o"), "--method", "nope"])
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_inputs_are_never_modified(run, tmp_path):
    def snapshot():
        return {os.path.join(d, f): (os.path.getsize(os.path.join(d, f)), os.stat(os.path.join(d, f)).st_mtime_ns)
                for d, _, fs in os.walk(run) for f in fs}
    before = snapshot()
    assert run_cli(["merge", run, "--out", str(tmp_path / "o"), "--quiet"], world_size=2).returncode == 0
    assert snapshot() == before
