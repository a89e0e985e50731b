"""The safetensors file format, ours (issue 23 groundwork): an 8-byte little-endian header
length, a JSON header, then the tensors' raw little-endian bytes, back to back.

Every header is checked before any field of it is used, and before any allocation it sizes:
its length against the file, UTF-8, JSON (no duplicate keys, bounded depth), each entry's
dtype, shape and offsets, and the offsets against each other (no overlap, no hole, the data
section covered exactly). A forged header is a typed ``CheckpointFormatError`` naming the file.

>>> import tempfile, os, numpy as np
>>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
>>> write(path, [("a.w", np.arange(6, dtype=np.float32).reshape(2, 3))], metadata={"format": "np"})
>>> header = read_header(path)
>>> header.tensors["a.w"].shape, header.metadata
((2, 3), {'format': 'np'})
>>> read_tensor(path, header.tensors["a.w"]).tolist()
[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from ckpt_callbacks.errors import CheckpointFormatError

# safetensors dtype names -> numpy (ml_dtypes) dtypes; sub-byte types (F4, F6_*) are not handled
DTYPES: dict[str, Any] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "C64": np.dtype(np.complex64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the safetensors package's own limit
MAX_RANK = 64
MAX_DEPTH = 8  # of the header's JSON: {name: {"shape": [...]}} is 3


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a file: ``start``/``stop`` are byte offsets in the file itself."""

    name: str
    dtype: Any
    shape: tuple[int, ...]
    start: int
    stop: int


@dataclasses.dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def _refuse(path: str, what: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{path}: not a valid safetensors file: {what}")


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys {sorted({k for k in keys if keys.count(k) > 1})[:3]}")
    return dict(pairs)


def _parse(path: str, raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _refuse(path, f"its header is not UTF-8 ({e})") from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise _refuse(path, "its header's JSON nests too deep") from None
    except ValueError as e:
        raise _refuse(path, f"its header is not JSON ({e})") from None
    if not isinstance(value, dict):
        raise _refuse(path, f"its header is a JSON {type(value).__name__}, expected an object")
    if _depth(value) > MAX_DEPTH:
        raise _refuse(path, f"its header's JSON nests deeper than {MAX_DEPTH}")
    return value


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(path: str, name: str, entry: Any, data_bytes: int, data_start: int) -> TensorInfo:
    where = f"tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _refuse(path, f"{where}: expected exactly dtype, shape and data_offsets, found {str(entry)[:80]}")
    dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise _refuse(path, f"{where}: dtype {entry['dtype']!r} is not one of {sorted(DTYPES)}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_int(n) and n >= 0 for n in shape):
        raise _refuse(path, f"{where}: shape {str(shape)[:80]} is not a list of at most {MAX_RANK} sizes >= 0")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_int(n) for n in offsets):
        raise _refuse(path, f"{where}: data_offsets {str(offsets)[:80]} is not [begin, end]")
    begin, end = offsets
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: a giant shape never overflows
    if not 0 <= begin <= end <= data_bytes:
        raise _refuse(path, f"{where}: data_offsets [{begin}, {end}] outside the {data_bytes} data bytes")
    if end - begin != nbytes:
        raise _refuse(path, f"{where}: {end - begin} bytes at [{begin}, {end}], its shape {shape} needs {nbytes}")
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_coverage(path: str, tensors: Iterable[TensorInfo], data_start: int, data_bytes: int) -> None:
    """The tensors cover the data section exactly: no overlap, no hole (as the format requires)."""
    at = data_start
    for t in sorted(tensors, key=lambda t: (t.start, t.stop)):
        if t.start != at:
            what = "overlaps the tensor before it" if t.start < at else f"leaves a hole of {t.start - at} bytes"
            raise _refuse(path, f"tensor {t.name!r} at [{t.start - data_start}, {t.stop - data_start}] {what}")
        at = t.stop
    if at != data_start + data_bytes:
        raise _refuse(path, f"{data_start + data_bytes - at} data bytes at the end belong to no tensor")


def header_length(path: str, head: bytes, size: int) -> int:
    """The JSON header's length from a file's first 8 bytes, checked against its ``size``."""
    if len(head) < 8:
        raise _refuse(path, f"{size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise _refuse(path, f"a header of {n} bytes, in a file of {size} (at most {MAX_HEADER_BYTES})")
    return int(n)


def parse_header(path: str, raw: bytes, size: int) -> Header:
    """The checked header from its JSON bytes ``raw`` (as ``header_length`` sized them) of a
    file of ``size`` bytes, read by any reader (a local file, byte ranges of an object)."""
    value = _parse(path, raw)
    data_start, data_bytes = 8 + len(raw), size - 8 - len(raw)
    metadata = value.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _refuse(path, "__metadata__ is not an object of strings")
    tensors = {name: _entry(path, name, entry, data_bytes, data_start) for name, entry in value.items()}
    _check_coverage(path, tensors.values(), data_start, data_bytes)
    return Header(tensors, dict(metadata), data_start)


def read_header(path: str) -> Header:
    """The checked header of the safetensors file at ``path`` (see the module's checks)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        n = header_length(path, f.read(8), size)
        raw = f.read(n)
    return parse_header(path, raw, size)


def read_tensor(path: str, info: TensorInfo) -> np.ndarray:
    """One tensor's bytes as an array (little-endian, as the format stores them)."""
    count = info.stop - info.start
    raw = np.fromfile(path, dtype=np.uint8, count=count, offset=info.start)
    if raw.size != count:
        raise _refuse(path, f"tensor {info.name!r}: {raw.size} of its {count} bytes are in the file")
    return raw.view(info.dtype.newbyteorder("<")).reshape(info.shape)


def header_bytes(tensors: Iterable[tuple[str, np.dtype, tuple[int, ...]]], metadata: Mapping[str, str] | None) -> bytes:
    """The 8-byte length and the JSON header for tensors laid out in the order given (padded
    with spaces to a multiple of 8, as the safetensors package writes it)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    at = 0
    for name, dtype, shape in tensors:
        if name == "__metadata__" or name in header:
            raise ValueError(f"tensor name {name!r} is reserved or repeated")
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [at, at + nbytes]}
        at += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write(path: str, tensors: Iterable[tuple[str, np.ndarray]], metadata: Mapping[str, str] | None = None) -> None:
    """Writes a safetensors file under a temporary name, renamed once whole."""
    arrays = [(name, np.asarray(a, order="C")) for name, a in tensors]  # ascontiguousarray makes 0-d 1-d
    for name, a in arrays:
        if a.dtype not in NAMES:
            raise TypeError(
                f"tensor {name!r}: dtype {a.dtype} has no safetensors name (expected one of {sorted(DTYPES)})"
            )
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(header_bytes([(n, a.dtype, a.shape) for n, a in arrays], metadata))
        for _, a in arrays:
            f.write(a.astype(a.dtype.newbyteorder("<"), copy=False).reshape(-1).view(np.uint8).data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
