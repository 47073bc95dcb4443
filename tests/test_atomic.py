"""pmm_dist.io.atomic: a file appears under its name complete or not at all, with its checksum."""
import errno
import fcntl
import hashlib
import json
import os
import random
import threading

import pytest

from pmm_dist.errors import MergeError
from pmm_dist.io import atomic, output_file
from pmm_dist.io.atomic import (copy_atomically, remove_tree_quietly, sha256_of_file, temporary_name,
                                write_atomically, write_json_atomically, write_text_atomically)


def _leftovers(directory):
    return [name for name in os.listdir(directory) if ".tmp." in name]


def test_write_returns_size_and_sha256_of_the_bytes_written(tmp_path):
    path = str(tmp_path / "deep" / "er" / "file.bin")  # missing parents are created
    num_bytes, digest = write_atomically(path, lambda f: (f.write(b"abc"), f.write(b"defg")))
    assert open(path, "rb").read() == b"abcdefg"
    assert (num_bytes, digest) == (7, hashlib.sha256(b"abcdefg").hexdigest())
    assert _leftovers(tmp_path / "deep" / "er") == []


def test_nothing_is_under_the_final_name_while_writing(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    seen = []

    def produce(f):
        f.write(b"new, partly")
        f.flush()
        seen.append(path.read_bytes())  # a reader meanwhile sees the old file, whole
        seen.append(os.path.exists(temporary_name(str(path))))
        f.write(b" and finished")
    write_atomically(str(path), produce)
    assert seen == [b"old", True]
    assert path.read_bytes() == b"new, partly and finished"


@pytest.mark.parametrize("error", [ValueError("bad tensor"), KeyboardInterrupt()])
def test_a_failing_producer_leaves_the_old_file_and_no_temporary(tmp_path, error):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def produce(f):
        f.write(b"half")
        raise error
    with pytest.raises(type(error)):  # not wrapped: a bug stays a bug, Ctrl-C stays Ctrl-C
        write_atomically(str(path), produce)
    assert path.read_bytes() == b"old" and _leftovers(tmp_path) == []


def _writer_threads():
    return [t for t in threading.enumerate() if t.name.startswith(("pmm-hash", "pmm-disk"))]


@pytest.fixture
def small_buffers(monkeypatch):
    """Staging buffers of two blocks: files of a few KB take the threaded path, O_DIRECT included."""
    monkeypatch.setattr(output_file, "BUFFER_BYTES", 8192)
    monkeypatch.setattr(output_file, "_free_buffers", [])


def _pieces(seed=5, count=60):
    rng = random.Random(seed)
    return [bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 7, 999, 4096, 5000, 20000]))) for _ in range(count)]


def _spy_on_writes(monkeypatch):
    """(offset, length, written with O_DIRECT) of every write that reaches the file."""
    seen, real = [], output_file._write_all

    def write_all(fd, view, offset):
        seen.append((offset, len(view), bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)))
        real(fd, view, offset)
    monkeypatch.setattr(output_file, "_write_all", write_all)
    return seen


@pytest.mark.parametrize("direct", ["1", "0"])
def test_a_large_file_is_staged_hashed_and_written_from_threads(tmp_path, monkeypatch, small_buffers, direct):
    """Past one staging buffer: the same bytes and digest as written inline, for writes of every
    size and memoryviews of reused buffers (torch hands such); whole buffers written with
    O_DIRECT (unless PMM_DIST_DIRECT_IO=0), the tail buffered; at most BUFFERS buffers in use;
    the threads gone afterwards."""
    monkeypatch.setenv("PMM_DIST_DIRECT_IO", direct)
    seen = _spy_on_writes(monkeypatch)
    pieces, reused, owned, written = _pieces(), bytearray(3000), [], []

    def produce(f):
        for piece in pieces:
            f.write(piece)
            reused[:] = os.urandom(len(reused))
            f.write(memoryview(reused))  # overwritten at the next turn, as torch's buffers are
            written.extend([piece, bytes(reused)])
            owned.append(len(f._owned))
    path = str(tmp_path / "big.bin")
    num_bytes, digest = write_atomically(path, produce)
    content = open(path, "rb").read()
    assert content == b"".join(written) and num_bytes == len(content) > 10 * 8192
    assert digest == hashlib.sha256(content).hexdigest()
    assert max(owned) == output_file.BUFFERS and _writer_threads() == []
    whole, tail = seen[:-1], seen[-1]
    assert [o for o, _, _ in seen] == sorted(o for o, _, _ in seen) and tail[0] + tail[1] == len(content)
    assert all(length == 8192 for _, length, _ in whole) and not tail[2]
    assert all(d == (direct == "1") for _, _, d in whole)


def test_the_threaded_path_writes_what_was_written(tmp_path, small_buffers):
    pieces = _pieces(seed=9, count=30)
    path = str(tmp_path / "big.bin")
    write_atomically(path, lambda f: [f.write(p) for p in pieces])
    assert open(path, "rb").read() == b"".join(pieces)


def test_a_small_file_is_written_in_one_call_without_threads(tmp_path, monkeypatch):
    seen = _spy_on_writes(monkeypatch)
    started = []
    monkeypatch.setattr(output_file.OutputFile, "_hand_over", lambda *a: started.append(a))
    write_atomically(str(tmp_path / "small.json"), lambda f: (f.write(b"{"), f.write(b"}")))
    assert seen == [(0, 2, False)] and started == []


def test_direct_io_refused_by_the_file_system_writes_buffered(tmp_path, monkeypatch, small_buffers):
    """O_DIRECT refused when asked for (tmpfs) or at the first write (EINVAL): the same file."""
    real_fcntl, real_pwrite = fcntl.fcntl, os.pwrite

    def no_direct_setfl(fd, command, *args):
        if command == fcntl.F_SETFL and args[0] & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fcntl(fd, command, *args)

    def no_direct_write(fd, data, offset):
        if real_fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)
    pieces = _pieces(seed=3, count=20)
    for name, target, replacement in (("setfl", output_file.fcntl, no_direct_setfl), ("write", output_file.os, None)):
        with monkeypatch.context() as patch:
            if replacement is not None:
                patch.setattr(target, "fcntl", replacement)
            else:
                patch.setattr(target, "pwrite", no_direct_write)
            path = str(tmp_path / f"{name}.bin")
            num_bytes, digest = write_atomically(path, lambda f: [f.write(p) for p in pieces])
            assert open(path, "rb").read() == b"".join(pieces), name
            assert digest == hashlib.sha256(b"".join(pieces)).hexdigest()


def test_a_failing_producer_stops_the_writer_threads(tmp_path, small_buffers):
    path = tmp_path / "out.bin"

    def produce(f):
        f.write(b"x" * 100_000)
        raise ValueError("bad tensor")
    with pytest.raises(ValueError):
        write_atomically(str(path), produce)
    assert not path.exists() and _leftovers(tmp_path) == [] and _writer_threads() == []


@pytest.mark.parametrize("size", [100, 100_000])  # the tail's write, and the writing thread's
def test_a_failing_write_names_the_file(tmp_path, monkeypatch, small_buffers, size):
    def disk_full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(output_file.os, "pwrite", disk_full)
    path = str(tmp_path / "out.bin")
    with pytest.raises(MergeError, match=rf"^{path}: cannot write \(No space left on device\)$"):
        write_atomically(path, lambda f: f.write(b"y" * size))
    assert os.listdir(tmp_path) == [] and _writer_threads() == []


def test_an_os_error_names_the_file(tmp_path):
    path = str(tmp_path / "out.bin")

    def disk_full(f):
        f.write(b"some")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(MergeError, match=rf"^{path}: cannot write \(No space left on device\)$"):
        write_atomically(path, disk_full)
    assert os.listdir(tmp_path) == []


def test_an_unwritable_place_names_the_file(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    path = str(tmp_path / "a_file" / "out.bin")  # fails even as root, unlike a read-only directory
    with pytest.raises(MergeError, match=f"^{path}: cannot write"):
        write_text_atomically(path, "x")


def test_text_and_json(tmp_path):
    text = str(tmp_path / "t.txt")
    assert write_text_atomically(text, "40\n")[0] == 3 and open(text).read() == "40\n"
    obj = {"files": [{"path": "a", "bytes": 1}], "ünïcode": "ok"}
    num_bytes, digest = write_json_atomically(str(tmp_path / "m.json"), obj)
    data = (tmp_path / "m.json").read_bytes()
    assert json.loads(data) == obj and data.endswith(b"\n")
    assert (num_bytes, digest) == (len(data), hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize("size", [0, 1, 5 * 7 + 3])
def test_copy_is_byte_identical_in_chunks(tmp_path, monkeypatch, size):
    monkeypatch.setattr(atomic, "_COPY_CHUNK", 7)  # several chunks and a ragged last one
    src, dst = tmp_path / "src.bin", tmp_path / "copy" / "dst.bin"
    content = bytes(range(256))[:size]
    src.write_bytes(content)
    num_bytes, digest = copy_atomically(str(src), str(dst))
    assert dst.read_bytes() == content and src.read_bytes() == content
    assert (num_bytes, digest) == (size, hashlib.sha256(content).hexdigest())
    assert sha256_of_file(str(dst)) == digest


def test_copy_of_a_missing_source_names_the_source_and_leaves_nothing(tmp_path):
    src = str(tmp_path / "missing.bin")
    with pytest.raises(MergeError, match=rf"^{src}: cannot read \(No such file or directory\)$"):
        copy_atomically(src, str(tmp_path / "out" / "dst.bin"))
    assert os.listdir(tmp_path / "out") == []


def test_copy_onto_an_unwritable_place_names_the_destination(tmp_path):
    src, dst = tmp_path / "src.bin", tmp_path / "src.bin" / "dst.bin"
    src.write_bytes(b"x")
    with pytest.raises(MergeError, match=f"^{dst}: cannot write"):
        copy_atomically(str(src), str(dst))


def test_temporary_name_is_per_process_and_recognisable():
    # staging removes files with ".tmp." in their name on --resume: a killed writer's leftovers
    assert temporary_name("/out/x.pt") == f"/out/x.pt.tmp.{os.getpid()}"


def test_remove_tree_quietly(tmp_path):
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "f").write_text("x")
    remove_tree_quietly(str(tmp_path / "tree"))
    remove_tree_quietly(str(tmp_path / "never_existed"))
    assert os.listdir(tmp_path) == []


def test_write_behind_runs_jobs_in_order_and_waits_for_them():
    import threading
    import time
    from pmm_dist.io.write_behind import WriteBehind
    done, threads = [], set()
    with WriteBehind(depth=1) as behind:
        for k in range(20):
            def job(k=k):
                time.sleep(0.001 * (k % 3))  # uneven jobs: the order must not depend on their length
                threads.add(threading.current_thread().name)
                done.append(k)
            behind.submit(job)
    assert done == list(range(20))
    assert len(threads) == 1 and threading.current_thread().name not in threads


def test_write_behind_raises_a_job_failure_and_skips_the_rest():
    from pmm_dist.io.write_behind import WriteBehind
    done = []

    def fail():
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        with WriteBehind(depth=1) as behind:
            behind.submit(fail)
            for k in range(10):
                behind.submit(lambda k=k: done.append(k))
    assert len(done) < 10  # the failure surfaced at a later submit: the file is abandoned


def test_write_behind_waits_for_the_running_job_when_the_caller_fails():
    import time
    from pmm_dist.io.write_behind import WriteBehind
    done = []
    with pytest.raises(RuntimeError, match="merge failed"):
        with WriteBehind() as behind:
            behind.submit(lambda: (time.sleep(0.05), done.append("written")))
            raise RuntimeError("merge failed")
    assert done == ["written"]  # nothing writes after the with block: the caller may remove the file


def test_a_source_file_read_by_two_units_is_checked_once(tmp_path, monkeypatch):
    """io.record_check: the CRC check of a file is shared while its size and mtime stay (DeepSpeed's
    optimizer files are read for the model states' masters and for their own unit)."""
    import torch
    from pmm_dist.io import record_check
    path = str(tmp_path / "shard.pt")
    torch.save({"w": torch.arange(1000.0)}, path)
    calls = []
    real = record_check.record_problems
    monkeypatch.setattr(record_check, "record_problems", lambda p: calls.append(p) or real(p))
    for _ in range(2):
        checker = record_check.RecordChecker()
        checker.submit(path)
        checker.result()
    assert calls == [path]
    torch.save({"w": torch.arange(1000.0)}, path)  # written again: checked again
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1))
    checker = record_check.RecordChecker()
    checker.submit(path)
    checker.result()
    assert calls == [path, path]
