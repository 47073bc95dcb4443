"""pmm_dist.io.torch_save_stream: the streamed file is torch.save's file of the finished object,
whatever order its tensors are handed over in; an incomplete one is no file a trainer loads."""
import collections
import errno
import io
import os
import zipfile

import pytest
import torch

from pmm_dist.errors import MergeError
from pmm_dist.io.atomic import write_atomically
from pmm_dist.io.torch_blob import locate_tensor
from pmm_dist.io.torch_save_stream import Placeholder, TorchSaveStream, save_streamed
from pmm_dist.plan.regions import contiguous_strides


def _finished():
    """An object as a merged shard file holds it: nested containers, tensors of several dtypes
    and shapes (0-d, empty), views sharing a storage, a non-contiguous tensor, non-tensors."""
    gen = torch.Generator().manual_seed(0)
    shared = torch.arange(24, dtype=torch.float32)
    return collections.OrderedDict(
        model={"w": torch.randn(8, 4, generator=gen).bfloat16(), "h": torch.randn(3, generator=gen).half(),
               "f": torch.randn(2, 3, 4, generator=gen), "scalar": torch.tensor(2.5), "empty": torch.empty(0, 5),
               "flat": torch.randn(0, generator=gen)},
        counters=[torch.tensor([1, 2, 3]), torch.tensor(7, dtype=torch.int64)],
        mask=torch.tensor([True, False, True]),
        views={"whole": shared.view(4, 6), "part": shared[5:11], "strided": shared.view(4, 6)[:, ::2]},
        transposed=torch.randn(5, 3, generator=gen).t(),
        param=torch.nn.Parameter(torch.ones(2, 2)),
        args={"lr": 1e-4, "name": "run", "steps": (1, 2)},
        iteration=100,
    )


# The tensors computed later (placeholders); the others stay in the skeleton as they are.
_PLACEHOLDERS = [("model", "w"), ("model", "h"), ("model", "f"), ("model", "scalar"), ("model", "empty"),
                 ("model", "flat"), ("counters", 0), ("mask",)]


def _at(obj, path):
    for key in path:
        obj = obj[key]
    return obj


def _skeleton(finished):
    placeholders = {}

    def rebuild(obj, path=()):
        if path in _PLACEHOLDERS:
            placeholders[path] = Placeholder.like(obj)
            return placeholders[path]
        if isinstance(obj, dict):
            return type(obj)((key, rebuild(value, path + (key,))) for key, value in obj.items())
        if isinstance(obj, list):
            return [rebuild(value, path + (index,)) for index, value in enumerate(obj)]
        return obj
    return rebuild(finished), placeholders


def _torch_save_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _streamed_bytes(finished, order, write_behind=False) -> bytes:
    skeleton, placeholders = _skeleton(finished)
    buffer = io.BytesIO()
    with TorchSaveStream(buffer, skeleton, write_behind=write_behind) as stream:
        for path in order:
            stream.put(placeholders[path], _at(finished, path))
    return buffer.getvalue()


def _assert_same(loaded, expected):
    assert type(loaded) is type(expected)
    if isinstance(expected, dict):
        assert list(loaded) == list(expected)
        for key in expected:
            _assert_same(loaded[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(loaded) == len(expected)
        for a, b in zip(loaded, expected):
            _assert_same(a, b)
    elif isinstance(expected, torch.Tensor):
        assert (loaded.dtype, loaded.shape, loaded.requires_grad) == \
            (expected.dtype, expected.shape, expected.requires_grad)
        assert torch.equal(loaded, expected)
    else:
        assert loaded == expected


@pytest.mark.parametrize("write_behind", [False, True])
@pytest.mark.parametrize("order", ["file", "reversed", "shuffled"])
def test_the_file_is_torch_saves_byte_for_byte_whatever_the_order_of_handing_over(order, write_behind):
    finished = _finished()
    paths = {"file": _PLACEHOLDERS, "reversed": _PLACEHOLDERS[::-1],
             "shuffled": [_PLACEHOLDERS[i] for i in (3, 0, 7, 5, 1, 6, 2, 4)]}[order]
    assert _streamed_bytes(finished, paths, write_behind) == _torch_save_bytes(finished)


@pytest.mark.parametrize("mmap", [False, True])
def test_torch_load_gives_what_it_gives_for_torch_saves_file(tmp_path, mmap):
    finished = _finished()
    streamed, saved = tmp_path / "streamed.pt", tmp_path / "saved.pt"
    streamed.write_bytes(_streamed_bytes(finished, _PLACEHOLDERS[::-1]))
    torch.save(finished, saved)
    loaded = torch.load(streamed, weights_only=True, mmap=mmap)
    _assert_same(loaded, torch.load(saved, weights_only=True, mmap=mmap))
    _assert_same(loaded, finished)
    views = loaded["views"]  # views still share one storage, as torch.save keeps them
    assert views["whole"].untyped_storage().data_ptr() == views["part"].untyped_storage().data_ptr() == \
        views["strided"].untyped_storage().data_ptr()
    assert isinstance(loaded["param"], torch.nn.Parameter)


def test_storages_are_in_key_order_as_torchs_own_offset_calculation_assumes(tmp_path, monkeypatch):
    from torch.utils.serialization import config
    finished = _finished()
    path = tmp_path / "streamed.pt"
    path.write_bytes(_streamed_bytes(finished, _PLACEHOLDERS[::-1]))
    monkeypatch.setenv("TORCH_SERIALIZATION_DEBUG", "1")  # torch checks each offset against the directory
    with config.patch({"load.calculate_storage_offsets": True}):
        _assert_same(torch.load(path, weights_only=True, mmap=True), finished)


def test_records_are_aligned_for_mmap_and_found_through_the_directory(tmp_path):
    tensor = torch.randn(1000)
    placeholder = Placeholder.like(tensor)
    buffer = io.BytesIO()
    with TorchSaveStream(buffer, placeholder) as stream:
        stream.put(placeholder, tensor)
    blob = buffer.getvalue()
    location = locate_tensor(lambda offset, length: blob[offset:offset + length], len(blob))
    assert location.data_offset % 64 == 0 and location.shape == (1000,) and location.stride == (1,)
    assert blob[location.data_offset:location.data_offset + 4000] == tensor.numpy().tobytes()
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        assert archive.testzip() is None  # every record's CRC-32 holds


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, torch.uint8, torch.int16, torch.int32, torch.complex64,
                                   torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32])
def test_every_dtype_pickles_as_torch_pickles_it(dtype):
    tensor = torch.arange(6).reshape(2, 3).to(dtype)  # typed storages, and the untyped ones of newer dtypes
    placeholder = Placeholder.like(tensor)
    buffer = io.BytesIO()
    with TorchSaveStream(buffer, {"x": placeholder, "kept": tensor[1]}) as stream:
        stream.put(placeholder, tensor.clone())
    assert buffer.getvalue() == _torch_save_bytes({"x": tensor.clone(), "kept": tensor[1]})
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert loaded["x"].dtype == dtype and torch.equal(loaded["x"].view(torch.uint8), tensor.view(torch.uint8))


def test_a_placeholder_at_two_places_is_one_tensor():
    tied = torch.randn(4, 4)
    placeholder = Placeholder.like(tied)
    buffer = io.BytesIO()
    with TorchSaveStream(buffer, {"embed": placeholder, "head": placeholder}) as stream:
        assert stream.placeholders == [placeholder]
        stream.put(placeholder, tied)
    assert buffer.getvalue() == _torch_save_bytes({"embed": tied, "head": tied})
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert loaded["embed"] is loaded["head"]


@pytest.mark.parametrize("handed_over", [torch.randn(6, 3).t(), torch.randn(4, 5)[1, :3].view(1, 3).expand(3, 3),
                                         torch.randn(40)[7:16].view(3, 3)])
def test_a_non_contiguous_or_partial_tensor_is_written_as_its_elements(handed_over):
    placeholder = Placeholder.like(handed_over)
    buffer = io.BytesIO()
    with TorchSaveStream(buffer, [placeholder]) as stream:
        stream.put(placeholder, handed_over)
    loaded, = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert torch.equal(loaded, handed_over) and loaded.is_contiguous()
    assert loaded.untyped_storage().nbytes() == handed_over.numel() * handed_over.element_size()


def test_strides_are_torchs_for_contiguous_tensors():
    for shape in [(), (0,), (3, 0), (2, 0, 3), (1,), (4, 1, 3), (0, 0), (5, 7, 2)]:
        assert contiguous_strides(shape) == torch.empty(shape).stride()


def test_computed_placeholders_are_written_in_file_order_and_companions_not_in_the_file_dropped():
    master = torch.randn(3, 2)
    model = master.bfloat16()
    calls = []
    master_placeholder = Placeholder.like(master)
    dropped = Placeholder.like(master)  # computed along, but not part of this file

    def merge_master():
        calls.append("master")
        return {model_placeholder: model, master_placeholder: master, dropped: master * 2}
    model_placeholder = Placeholder.like(model, compute=merge_master)
    master_placeholder.compute = merge_master
    plain = Placeholder(torch.Size([2]), torch.int64, compute=lambda: calls.append("plain") or torch.tensor([4, 5]))
    buffer = io.BytesIO()
    skeleton = {"model": {"w": model_placeholder}, "n": plain, "optimizer": {"master": master_placeholder}}
    save_streamed(buffer, skeleton)  # written behind
    assert calls == ["master", "plain"]  # the master once, for the model weight that needs it first
    assert buffer.getvalue() == _torch_save_bytes({"model": {"w": model}, "n": torch.tensor([4, 5]),
                                                   "optimizer": {"master": master}})


def test_a_placeholder_never_handed_over_is_an_error_and_leaves_no_file(tmp_path):
    tensor = torch.ones(3)
    first, second = Placeholder.like(tensor), Placeholder.like(tensor)
    path = str(tmp_path / "out.pt")

    def produce(f):
        with TorchSaveStream(f, {"a": first, "b": second}) as stream:
            stream.put(first, tensor)
    with pytest.raises(ValueError, match=r"1 placeholder\(s\) never handed over.*data/1"):
        write_atomically(path, produce)
    assert os.listdir(tmp_path) == []

    buffer = io.BytesIO()
    with pytest.raises(ValueError, match="never handed over"):
        with TorchSaveStream(buffer, {"a": first, "b": second}) as stream:
            stream.put(second, tensor)  # even the tensor waiting for its turn is not written
    assert b"PK\x05\x06" not in buffer.getvalue()  # no zip directory: nothing opens this
    with pytest.raises(Exception):
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)


def test_a_placeholder_without_compute_is_an_error_for_fill():
    with pytest.raises(ValueError, match="has no compute"):
        save_streamed(io.BytesIO(), [Placeholder((2,), torch.float32)])


@pytest.mark.parametrize("wrong, message", [
    (torch.ones(3, 2), r"has shape \(3, 2\), torch.float32: the pickle already says shape \(2, 3\)"),
    (torch.ones(2, 3, dtype=torch.bfloat16), "has shape .*bfloat16"),
    (torch.ones(2, 3, requires_grad=True), "requires_grad: the pickle"),
    (None, "has NoneType"),
])
def test_a_tensor_that_does_not_fit_its_placeholder_is_an_error(wrong, message):
    placeholder = Placeholder((2, 3), torch.float32)
    buffer = io.BytesIO()
    with pytest.raises(ValueError, match=message):
        with TorchSaveStream(buffer, [placeholder]) as stream:
            stream.put(placeholder, wrong)
    assert b"PK\x05\x06" not in buffer.getvalue()


def test_handing_over_twice_or_a_stranger_is_an_error():
    placeholder, stranger = Placeholder((1,), torch.float32), Placeholder((1,), torch.float32)
    with TorchSaveStream(io.BytesIO(), [placeholder]) as stream:
        stream.put(placeholder, torch.ones(1))
        with pytest.raises(ValueError, match="handed over twice"):
            stream.put(placeholder, torch.ones(1))
        with pytest.raises(ValueError, match="not in this file's pickle"):
            stream.put(stranger, torch.ones(1))


def test_a_placeholder_is_not_pickled_by_torch_save():
    with pytest.raises(TypeError, match="pickled by TorchSaveStream only"):
        torch.save({"w": Placeholder((2,), torch.float32)}, io.BytesIO())


@pytest.mark.parametrize("write_behind", [False, True])
def test_a_failing_write_is_raised_as_itself_and_leaves_no_file(tmp_path, write_behind):
    path = str(tmp_path / "out.pt")
    tensor = torch.randn(1 << 16)
    placeholders = [Placeholder.like(tensor) for _ in range(4)]

    class DiskFull:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 100_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    def produce(f):
        with TorchSaveStream(DiskFull(f), {"w": placeholders, "v": torch.ones(1)}, write_behind=write_behind) as stream:
            for placeholder in placeholders:  # behind: the error shows at a later put, or at the end
                stream.put(placeholder, tensor)
    with pytest.raises(MergeError, match=r"cannot write \(No space left on device\)"):
        write_atomically(path, produce)
    assert os.listdir(tmp_path) == []


def test_a_computation_failing_midway_leaves_no_file_and_writes_nothing_more(tmp_path):
    path = str(tmp_path / "out.pt")
    tensor = torch.randn(1 << 16)

    def fails():
        raise RuntimeError("a NaN in source 2")
    skeleton = [Placeholder.like(tensor, compute=lambda: tensor), Placeholder.like(tensor, compute=fails),
                Placeholder.like(tensor, compute=lambda: tensor)]
    with pytest.raises(RuntimeError, match="a NaN in source 2"):
        write_atomically(path, lambda f: save_streamed(f, skeleton))
    assert os.listdir(tmp_path) == []


def test_a_torch_without_the_streams_internals_gets_torch_saves_file_of_the_finished_object(monkeypatch):
    """pmm_dist installs into existing environments (torch >= 2.6): where torch lacks what the
    stream matches (its save config's storage alignment, in older releases), save_streamed computes
    every placeholder and calls torch.save itself: the same file."""
    import pmm_dist.io.torch_save_stream as stream_module
    monkeypatch.setattr(stream_module, "streaming_supported", lambda: False)
    finished = _finished()
    skeleton, placeholders = _skeleton(finished)
    for path, placeholder in placeholders.items():
        placeholder.compute = lambda path=path: _at(finished, path)
    buffer = io.BytesIO()
    save_streamed(buffer, skeleton)
    assert buffer.getvalue() == _torch_save_bytes(finished)
    assert stream_module.streaming_supported.__name__ == "<lambda>"
    monkeypatch.undo()
    assert stream_module.streaming_supported() == hasattr(torch.utils.serialization.config.save, "storage_alignment")
