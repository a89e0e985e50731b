"""Reads of byte regions of a safetensors tensor: the contiguous runs of a region in C order,
gaps between runs read through when small (few syscalls), the rest skipped (few bytes).
"""

from __future__ import annotations

import collections
import itertools
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from ckpt_callbacks import format as fmt
from ckpt_callbacks.errors import CorruptCheckpointError
from ckpt_callbacks.interop import _safetensors_format as stf

_MERGE_MAX = 64 << 10  # largest gap between runs read through rather than skipped
_MERGE_MIN = 4 << 10  # a gap this small is always read through
# Bytes read per file (local path -> bytes), for tests and diagnostics: a restore reads only its regions.
READ_STATS: collections.Counter[str] = collections.Counter()


class _LocalFile:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def readinto(self, view: memoryview, offset: int) -> int:
        return os.preadv(self.fd, [view], offset)

    def close(self) -> None:
        os.close(self.fd)


class _Handle(Protocol):
    def readinto(self, view: memoryview, offset: int) -> int: ...

    def close(self) -> None: ...


def runs(shape: Sequence[int], itemsize: int, region: fmt.Region) -> tuple[list[int], int]:
    """The C-order contiguous byte runs of ``region`` in a tensor of ``shape``: their offsets
    from the tensor's start (ascending) and their common length ([] for an empty region)."""
    extent = [b - a for a, b in region]
    if any(n == 0 for n in extent):
        return [], 0
    axis = len(shape)  # the runs span the axes from ``axis`` on: full ones, and one partial before them
    while axis > 0 and extent[axis - 1] == shape[axis - 1]:
        axis -= 1
    axis = max(axis - 1, 0)
    strides = [itemsize] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    length = itemsize * int(np.prod(extent[axis:], dtype=np.int64)) if shape else itemsize
    starts = np.zeros(1, dtype=np.int64)
    for i in range(axis):
        starts = (starts[:, None] + np.arange(region[i][0], region[i][1], dtype=np.int64) * strides[i]).reshape(-1)
    if shape:
        starts += region[axis][0] * strides[axis]
    return starts.tolist(), length


def spans(starts: Sequence[int], length: int) -> list[tuple[int, int, int]]:
    """Runs coalesced: (first run, end run, byte end) where the gaps are small (at most
    ``min(64 KiB, max(4 KiB, length))``): bytes read <= 2 x needed + 4 KiB per run."""
    gap = min(_MERGE_MAX, max(_MERGE_MIN, length))
    out: list[tuple[int, int, int]] = []
    first = 0
    for i in range(1, len(starts) + 1):
        if i == len(starts) or starts[i] - (starts[i - 1] + length) > gap:
            out.append((first, i, starts[i - 1] + length))
            first = i
    return out


def _pread(handle: _Handle, view: memoryview, offset: int, file: str, name: str) -> None:
    got = handle.readinto(view, offset)
    READ_STATS[file] += got
    if got != len(view):
        raise CorruptCheckpointError(
            f"{file}: tensor {name!r}: {got} of {len(view)} bytes at offset {offset}; the file is truncated"
        )


def _gather(buf: np.ndarray, offsets: Sequence[int], length: int, out: np.ndarray) -> None:
    """The runs at ``offsets`` of a span read, back to back into ``out``: one strided copy
    where they are evenly spaced (a slice's runs are), else run by run."""
    step = offsets[1] - offsets[0]
    if all(b - a == step for a, b in itertools.pairwise(offsets)):
        rows = np.lib.stride_tricks.as_strided(buf, shape=(len(offsets), length), strides=(step, 1), writeable=False)
        out.reshape(len(offsets), length)[...] = rows
        return
    for k, at in enumerate(offsets):
        out[k * length : (k + 1) * length] = buf[at : at + length]


def read_region(fd: _Handle | int, file: str, info: stf.TensorInfo, region: fmt.Region) -> np.ndarray:
    """One region of a tensor, reading its runs' bytes only (coalesced where the gaps are small)."""
    handle = _LocalFile(fd) if isinstance(fd, int) else fd  # an int: a local file's descriptor
    starts, length = runs(info.shape, info.dtype.itemsize, region)
    out = np.empty(len(starts) * length, dtype=np.uint8)
    for first, end, stop in spans(starts, length):
        base = info.start + starts[first]
        if end - first == 1:  # straight into the output
            _pread(handle, out.data[first * length : end * length], base, file, info.name)
            continue
        buf = np.empty(stop - starts[first], dtype=np.uint8)
        _pread(handle, buf.data, base, file, info.name)
        _gather(buf, [a - starts[first] for a in starts[first:end]], length, out[first * length : end * length])
    shape = tuple(b - a for a, b in region)
    return out.view(info.dtype.newbyteorder("<")).reshape(shape)
