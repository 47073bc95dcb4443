"""pmm_dist.io.staging: the input snapshot, the fingerprint, and the resumable work area."""
import json
import os

import pytest

from pmm_dist.errors import InputError, MergeError
from pmm_dist.io.atomic import temporary_name
from pmm_dist.io.staging import STAGING, Staging, changed_inputs, fingerprint, snapshot_inputs
from pmm_dist.plan.types import Action, CheckpointRef, UnitResult, WorkUnit


def _checkpoint(root, iteration, files=("a.pt", "sub/b.pt")):
    path = root / f"iter_{iteration}"
    for name in files:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(b"x" * iteration)
    return CheckpointRef(iteration, str(path))


# -- snapshot and fingerprint -----------------------------------------------------------------------
def test_snapshot_records_every_file_of_every_checkpoint(tmp_path):
    refs = [_checkpoint(tmp_path, 1), _checkpoint(tmp_path, 2)]
    snapshot = snapshot_inputs(refs)
    assert sorted(snapshot) == sorted(os.path.join(r.path, n) for r in refs for n in ("a.pt", "sub/b.pt"))
    path = os.path.join(refs[1].path, "a.pt")
    assert snapshot[path] == (2, os.stat(path).st_mtime_ns)
    assert changed_inputs(snapshot) == []


def test_changed_and_removed_inputs_are_named(tmp_path):
    ref = _checkpoint(tmp_path, 3)
    snapshot = snapshot_inputs([ref])
    grown, removed = os.path.join(ref.path, "a.pt"), os.path.join(ref.path, "sub", "b.pt")
    with open(grown, "ab") as f:
        f.write(b"more")
    os.remove(removed)
    assert changed_inputs(snapshot) == [f"{grown}: modified while the merge ran (size 3 -> 7)",
                                        f"{removed}: removed while the merge ran"]


def test_same_size_rewrite_is_seen_by_its_mtime(tmp_path):
    ref = _checkpoint(tmp_path, 4)
    path = os.path.join(ref.path, "a.pt")
    snapshot = snapshot_inputs([ref])
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert changed_inputs(snapshot) == [f"{path}: modified while the merge ran (size 4 -> 4)"]


def test_symbolic_links_are_refused(tmp_path):
    ref = _checkpoint(tmp_path, 5)
    elsewhere = _checkpoint(tmp_path / "elsewhere", 6)
    linked = tmp_path / "iter_linked"
    linked.symlink_to(elsewhere.path)
    with pytest.raises(InputError, match=f"{linked}: is a symbolic link"):
        snapshot_inputs([ref, CheckpointRef(6, str(linked))])
    inner = os.path.join(ref.path, "sub", "c.pt")
    os.symlink(os.path.join(elsewhere.path, "a.pt"), inner)
    with pytest.raises(InputError, match=f"{inner}: symbolic link inside a source checkpoint is refused"):
        snapshot_inputs([ref])


def test_fingerprint_depends_on_the_plan_and_the_inputs_only(tmp_path):
    ref = _checkpoint(tmp_path, 7)
    snapshot = snapshot_inputs([ref])
    plan = {"method": "ema", "alpha": 0.1, "units": ["a.pt", "sub/b.pt"]}
    assert fingerprint(plan, snapshot) == fingerprint(dict(reversed(list(plan.items()))), dict(snapshot))
    assert fingerprint({**plan, "alpha": 0.2}, snapshot) != fingerprint(plan, snapshot)
    touched = dict(snapshot)
    path = next(iter(touched))
    touched[path] = (touched[path][0], touched[path][1] + 1)
    assert fingerprint(plan, touched) != fingerprint(plan, snapshot)


# -- the work area ----------------------------------------------------------------------------------
UNIT = WorkUnit("mp_rank_00/model_optim_rng.pt", 100)
OTHER = WorkUnit("mp_rank_01/model_optim_rng.pt", 100)


def _result(unit, num_bytes):
    return UnitResult(unit.relpath, num_bytes, 3 * num_bytes, "0" * 64, 2, {"chunks": [[0, num_bytes]]})


def _stage_file(staging, unit, num_bytes):
    path = os.path.join(staging.data_dir, unit.relpath)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"m" * num_bytes)
    return path


@pytest.fixture
def staging(tmp_path):
    out = tmp_path / "out"
    staging = Staging(str(out), "iter_0000040")
    assert staging.prepare("fp-1", {}, resume=False) == 0
    return staging


def test_layout_under_the_output(tmp_path, staging):
    root = tmp_path / "out" / STAGING
    assert staging.root == str(root) and staging.exists()
    assert staging.data_dir == str(root / "data" / "iter_0000040") and os.path.isdir(staging.data_dir)
    assert json.loads((root / "state" / "fingerprint.json").read_text()) == {"fingerprint": "fp-1", "identity": {}}
    # a format whose output is OUT itself stages straight into data/
    assert Staging(str(tmp_path / "o2"), "").data_dir == str(tmp_path / "o2" / STAGING / "data")


def test_a_unit_is_complete_once_marked_and_its_file_intact(staging):
    assert staging.completed(UNIT) is None
    path = _stage_file(staging, UNIT, 10)
    assert staging.completed(UNIT) is None  # written but not marked: redone on resume
    staging.mark_done(UNIT, _result(UNIT, 10))
    assert staging.completed(UNIT) == _result(UNIT, 10)  # details come back from JSON as they went in
    assert staging.completed(OTHER) is None
    with open(path, "ab") as f:
        f.write(b"!")
    assert staging.completed(UNIT) is None  # not the size recorded
    os.remove(path)
    assert staging.completed(UNIT) is None


def test_markers_tell_merge_and_copy_of_one_path_apart(staging):
    copy = WorkUnit(UNIT.relpath, UNIT.num_bytes, Action.COPY)
    _stage_file(staging, UNIT, 10)
    staging.mark_done(UNIT, _result(UNIT, 10))
    assert staging.completed(copy) is None


def test_a_damaged_marker_means_not_done(staging):
    _stage_file(staging, UNIT, 10)
    staging.mark_done(UNIT, _result(UNIT, 10))
    (marker,) = os.listdir(os.path.join(staging.state_dir, "done"))
    with open(os.path.join(staging.state_dir, "done", marker), "w") as f:
        f.write('{"relpath": ')
    assert staging.completed(UNIT) is None


def test_resume_with_the_same_fingerprint_keeps_finished_units(tmp_path, staging):
    for unit in (UNIT, OTHER):
        _stage_file(staging, unit, 10)
        staging.mark_done(unit, _result(unit, 10))
    leftover = temporary_name(os.path.join(staging.data_dir, "mp_rank_02", "model_optim_rng.pt"))
    os.makedirs(os.path.dirname(leftover))
    open(leftover, "wb").close()  # a writer killed mid-file
    again = Staging(str(tmp_path / "out"), "iter_0000040")
    assert again.prepare("fp-1", {}, resume=True) == 2
    assert again.completed(UNIT) == _result(UNIT, 10) and again.completed(OTHER) == _result(OTHER, 10)
    assert not os.path.exists(leftover)


def test_resume_with_another_fingerprint_is_refused_and_keeps_the_work(tmp_path, staging):
    _stage_file(staging, UNIT, 10)
    staging.mark_done(UNIT, _result(UNIT, 10))
    with pytest.raises(MergeError, match=f"refusing to --resume in {staging.root}: the inputs or options differ"):
        Staging(str(tmp_path / "out"), "iter_0000040").prepare("fp-2", {}, resume=True)
    assert staging.completed(UNIT) == _result(UNIT, 10)


def test_without_resume_a_previous_merge_is_started_over(tmp_path, staging):
    _stage_file(staging, UNIT, 10)
    staging.mark_done(UNIT, _result(UNIT, 10))
    staging.set_flag("cleared")
    again = Staging(str(tmp_path / "out"), "iter_0000040")
    assert again.prepare("fp-1", {}, resume=False) == 0
    assert again.completed(UNIT) is None and not again.has_flag("cleared")
    assert os.listdir(again.data_dir) == []


def test_resume_without_a_previous_merge_starts_afresh(tmp_path):
    staging = Staging(str(tmp_path / "out"), "iter_0000040")
    assert not staging.exists()
    assert staging.prepare("fp-1", {}, resume=True) == 0 and staging.exists()


def test_commit_record_flags_and_discard(tmp_path, staging):
    assert staging.commit_record() is None
    _stage_file(staging, UNIT, 10)
    staging.mark_done(UNIT, _result(UNIT, 10))
    finalized = UnitResult("metadata.json", 5, 0, "1" * 64, 0)
    staging.record_commit([_result(UNIT, 10), finalized])
    assert staging.commit_record() == [_result(UNIT, 10), finalized]
    # Once the commit has begun the staged files are moved away: every unit still counts as done.
    os.remove(os.path.join(staging.data_dir, UNIT.relpath))
    assert staging.completed(UNIT) == _result(UNIT, 10)
    assert not staging.has_flag("cleared")
    staging.set_flag("cleared")
    assert staging.has_flag("cleared")
    staging.discard()
    assert not os.path.exists(staging.root) and not staging.exists()
    assert os.listdir(tmp_path / "out") == []
