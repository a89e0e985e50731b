"""Our safetensors reader and writer against the safetensors package, both ways, and hostile headers."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt_callbacks.errors import CheckpointFormatError
from ckpt_callbacks.interop import _safetensors_format as fmt

SHAPES = [(), (0, 4), (3,), (2, 3, 2)]


def _array(dtype, shape, seed=0):
    raw = np.random.default_rng(seed).integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


@pytest.mark.parametrize("name", sorted(fmt.DTYPES))
def test_ours_written_reads_bit_exact_in_the_package(tmp_path, name):
    dtype = fmt.DTYPES[name]
    tensors = [(f"layer.{i}/w.{name}", _array(dtype, shape, i)) for i, shape in enumerate(SHAPES)]
    path = str(tmp_path / "m.safetensors")
    fmt.write(path, tensors, metadata={"format": "pt"})
    with open(path, "rb") as f:
        loaded = dict(safetensors.deserialize(f.read()))
    for key, array in tensors:
        assert loaded[key]["dtype"] == name and tuple(loaded[key]["shape"]) == array.shape
        assert bytes(loaded[key]["data"]) == array.tobytes()


@pytest.mark.parametrize("name", sorted(fmt.DTYPES))
def test_the_package_s_files_read_bit_exact_here(tmp_path, name):
    dtype = fmt.DTYPES[name]
    tensors = {f"t{i}.x": _array(dtype, shape, i) for i, shape in enumerate(SHAPES)}
    specs = {  # the package's raw writer names dtypes as numpy does; the arrays outlive the call
        k: safetensors.TensorSpec(dtype=dtype.name, shape=list(a.shape), data_ptr=a.ctypes.data, data_len=a.nbytes)
        for k, a in tensors.items()
    }
    raw = safetensors.serialize(specs, metadata={"who": "package"})
    path = tmp_path / "p.safetensors"
    path.write_bytes(raw)
    header = fmt.read_header(str(path))
    assert header.metadata == {"who": "package"}
    for key, array in tensors.items():
        got = fmt.read_tensor(str(path), header.tensors[key])
        assert got.dtype == dtype and got.shape == array.shape and got.tobytes() == array.tobytes()


def test_bf16_and_f32_from_the_numpy_writer(tmp_path):
    from safetensors.numpy import save_file

    path = str(tmp_path / "n.safetensors")
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    save_file({"w": w}, path)
    assert fmt.read_tensor(path, fmt.read_header(path).tensors["w"]).tolist() == w.tolist()
    b = np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16)
    fmt.write(path, [("b", b)])
    assert fmt.read_tensor(path, fmt.read_header(path).tensors["b"]).tobytes() == b.tobytes()


def _file(tmp_path, header, data=b"", length=None):
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return str(path)


HOSTILE = {
    "overlapping offsets": ({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                             "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, b"\0" * 6, "overlaps"),
    "a hole": ({"a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, b"\0" * 4, "hole"),
    "size past the file": ({"a": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}, b"\0" * 8, "outside"),
    "size against shape": ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12"),
    "unknown dtype": ({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16, "not one of"),
    "giant shape": ({"a": {"dtype": "F64", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, b"\0" * 8, "needs"),
    "negative size": ({"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}, b"", "sizes >= 0"),
    "bool size": ({"a": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, b"\0", "sizes >= 0"),
    "extra field": ({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": 1}}, b"\0", "exactly"),
    "bad metadata": ({"__metadata__": {"a": 1}}, b"", "__metadata__"),
    "trailing data": ({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0\0", "belong to no tensor"),
    "not an object": ([1, 2], b"", "expected an object"),
    "non-UTF-8": (b'{"\xff": 1}', b"", "not UTF-8"),
    "deep JSON": (b"[" * 100_000 + b"]" * 100_000, b"", "nests"),
    "duplicate keys": (b'{"a": {}, "a": {}}', b"", "duplicate"),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_headers_are_refused_typed_naming_the_file(tmp_path, kind):
    header, data, match = HOSTILE[kind]
    path = _file(tmp_path, header, data)
    with pytest.raises(CheckpointFormatError, match=match) as e:
        fmt.read_header(path)
    assert path in str(e.value)


def test_a_header_length_past_the_file_is_refused_before_reading_it(tmp_path):
    for length in (2**63, fmt.MAX_HEADER_BYTES + 1, 1000):
        with pytest.raises(CheckpointFormatError, match="a header of"):
            fmt.read_header(_file(tmp_path, {}, length=length))
    (tmp_path / "short").write_bytes(b"\1\2")
    with pytest.raises(CheckpointFormatError, match="shorter than the 8-byte"):
        fmt.read_header(str(tmp_path / "short"))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 199), st.integers(1, 255))
def test_any_byte_flipped_is_read_or_refused_typed(tmp_path_factory, at, mask):
    tmp = tmp_path_factory.mktemp("flip")
    path = str(tmp / "f.safetensors")
    fmt.write(path, [("a", np.arange(3, dtype=np.int16)), ("b", np.ones(2, np.float32))], metadata={"k": "v"})
    file = tmp / "f.safetensors"
    raw = bytearray(file.read_bytes())
    raw[at % len(raw)] ^= mask
    file.write_bytes(bytes(raw))
    try:
        header = fmt.read_header(path)
    except CheckpointFormatError:
        return
    for info in header.tensors.values():  # a flip in the data, or one the header still describes
        assert fmt.read_tensor(path, info).nbytes == info.stop - info.start
