"""Reads of a local checkpoint's chunk files straight into the restored arrays' memory.

On local disk a zarr3 chunk file (``bytes`` codec, little-endian, uncompressed) is the chunk's
C-order bytes, so a region made of whole chunks is read with ``readinto`` into its destination,
one buffer per region, aligned so that JAX on CPU takes it without copying. Each chunk's crc32c
is computed right after its read, while its bytes are still hot in cache, on the same thread; the
reads run on a thread pool (both ``readinto`` and crc32c release the GIL).

Other backends and formats go through TensorStore (``chunk_reads``); both check the same crc32c.
Every local file a restore or ``verify`` reads (chunk files here; pack, data and index files
through ``read_file`` and ``read_range``) is opened without blocking and refused unless it is
a regular file: a FIFO in its place would otherwise hold the read until ``op_timeout_s``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import math
import os
import stat
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import crc32c
import numpy as np

from ckpt_callbacks import format as fmt
from ckpt_callbacks import format as planning
from ckpt_callbacks import storage as paths
from ckpt_callbacks.errors import CorruptCheckpointError, MissingFileError
from ckpt_callbacks.layouts._regions import chunk_regions, claimed_bytes

ALIGN = 64  # JAX's CPU client aliases host buffers aligned to this instead of copying them


@functools.cache
def _pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max(8, min(32, 4 * (os.cpu_count() or 1))), "ckpt-read")


class _Budget:
    """Bytes of scratch chunk buffers held at once by all reads (a chunk that is larger than the
    whole budget waits until it is alone)."""

    def __init__(self, nbytes: int) -> None:
        self.limit, self.held = nbytes, 0
        self.cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        with self.cond:
            self.cond.wait_for(lambda: self.held == 0 or self.held + nbytes <= self.limit)
            self.held += nbytes
        try:
            yield
        finally:
            with self.cond:
                self.held -= nbytes
                self.cond.notify_all()


_SCRATCH = _Budget(256 << 20)  # chunks read whole to be cut into regions (a restore onto another mesh)


def aligned_empty(shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
    """An uninitialized C-order array whose data starts on an ``ALIGN``-byte boundary."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def applies(loc: paths.Location, record: fmt.LeafRecord) -> bool:
    """Whether a leaf's chunks can be read as plain files: our zarr3 array, on local disk."""
    return paths.local_path(loc) is not None and sys.byteorder == "little" and not record.pack


def chunk_file_key(idx: tuple[int, ...]) -> str:
    """A chunk's key under its zarr3 array: the "default" chunk key encoding ("c" if 0-d)."""
    return "/".join(["c", *(str(i) for i in idx)])


def _chunk_file(array_dir: str, idx: tuple[int, ...]) -> str:
    return os.path.join(array_dir, *chunk_file_key(idx).split("/"))


def crc_text(crc: int | None) -> str:
    """A crc32c as every message prints it (``0x%08x``), or "no crc32c"."""
    return "no crc32c" if crc is None else f"{crc:#010x}"


def _prefix_layout(creg: planning.Region, idx: tuple[int, ...], chunks: tuple[int, ...]) -> bool:
    """Whether chunk ``idx``'s stored region ``creg`` is a C-order prefix of its file: only its
    first dimension may be cut by the array's edge."""
    inner = all(b - a == c for (a, b), c in zip(creg[1:], chunks[1:], strict=True))
    return inner and (not creg or creg[0][0] == idx[0] * chunks[0])  # a 0-d chunk is its whole file


class DirectRead:
    """Reads of one leaf's regions from its chunk files, every chunk checked against its crc32c.

    Same interface as ``chunk_reads.LeafRead``: ``nbytes``, ``result()``, ``cancel()``.
    """

    def __init__(self, loc: paths.Location, record: fmt.LeafRecord, regions: list[planning.Region], where: str) -> None:
        self.record, self.where = record, where
        self.array_dir = os.path.join(loc.path, record.array)
        self.dtype = fmt.dtype_from_name(record.zarr_dtype)
        self.chunk_bytes = math.prod(record.chunks) * self.dtype.itemsize
        self.nbytes = claimed_bytes(record, regions, where)
        self.out: dict[planning.Region, np.ndarray] = {}
        targets: dict[tuple[int, ...], tuple[planning.Region, list[tuple[planning.Region, np.ndarray]]]] = {}
        for region in regions:
            host = self.out[region] = aligned_empty(tuple(b - a for a, b in region), self.dtype)
            for idx, creg in chunk_regions(region, record.chunks, record.data_shape):
                targets.setdefault(idx, (creg, []))[1].append((region, host))
        pool = _pool()  # each chunk read once, however many regions it falls in
        self.futures = [pool.submit(self._read_chunk, idx, creg, into) for idx, (creg, into) in targets.items()]

    def _what(self, idx: tuple[int, ...]) -> str:
        return f"{self.where}: leaf {self.record.key!r} chunk {fmt.chunk_key(idx)}"

    def _read_chunk(
        self, idx: tuple[int, ...], creg: planning.Region, into: list[tuple[planning.Region, np.ndarray]]
    ) -> None:
        dsts = []
        for region, host in into:
            inter = tuple((max(a, c), min(b, d)) for (a, b), (c, d) in zip(region, creg, strict=True))
            cut: tuple[Any, ...] = tuple(slice(a - r0, b - r0) for (a, b), (r0, _) in zip(inter, region, strict=True))
            dst = host[(*cut, Ellipsis)]  # a view, also of a 0-d array (``host[()]`` would be a copy)
            dsts.append((inter, dst))
        (inter, dst), *_ = dsts
        if (
            len(dsts) == 1
            and inter == creg
            and dst.flags.c_contiguous
            and _prefix_layout(creg, idx, self.record.chunks)
        ):
            stored = self._load(idx, dst)  # straight into the destination
            self._check(idx, creg, dst, stored)
            return
        with _SCRATCH.hold(self.chunk_bytes):
            whole = aligned_empty(self.record.chunks, self.dtype)
            stored = self._load(idx, whole)
            chunk = whole[tuple(slice(0, b - a) for a, b in creg)]
            self._check(idx, creg, chunk, stored)
            for inter, dst in dsts:
                dst[...] = chunk[tuple(slice(a - c0, b - c0) for (a, b), (c0, _) in zip(inter, creg, strict=True))]

    def _check(self, idx: tuple[int, ...], creg: planning.Region, chunk: np.ndarray, stored: bool) -> None:
        found = int(crc32c.crc32c(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8).data))
        key = fmt.chunk_key(idx)
        expected = self.record.crc32c.get(key)
        if expected is not None and found == expected:
            return
        path = _chunk_file(self.array_dir, idx)
        if not stored and expected is not None:  # zeros are stored as no file; this chunk was not zeros
            raise MissingFileError(
                f"{self._what(idx)} (region {[list(r) for r in creg]}): its chunk file {path} is missing "
                f"(the manifest records crc32c {expected:#010x})",
                leaf=self.record.key,
                chunk=key,
            )
        raise CorruptCheckpointError(
            f"{self._what(idx)} (region {[list(r) for r in creg]}, file {path}): "
            f"crc32c {found:#010x} read, {crc_text(expected)} in the manifest",
            leaf=self.record.key,
            chunk=key,
        )

    def _load(self, idx: tuple[int, ...], into: np.ndarray) -> bool:
        """Fills ``into`` (C-contiguous) with the first bytes of chunk ``idx``'s file; a missing
        file is a chunk of zeros (zarr3 stores no chunk equal to the fill value): False."""
        path = _chunk_file(self.array_dir, idx)
        fd = open_regular(path, self._what(idx))
        if fd is None:
            into.fill(0)
            return False
        try:
            size = os.fstat(fd).st_size
            if size != self.chunk_bytes:
                raise CorruptCheckpointError(
                    f"{self._what(idx)}: file {path} holds {size} bytes, expected {self.chunk_bytes} "
                    f"(chunk {list(self.record.chunks)} of {self.record.zarr_dtype})"
                )
            _read_into(fd, path, 0, into.reshape(-1).view(np.uint8).data, self._what(idx))
        finally:
            os.close(fd)
        return True

    def result(self) -> dict[planning.Region, np.ndarray]:
        """Each requested region as one aligned host array of the stored dtype."""
        for future in self.futures:
            future.result()
        stored = fmt.dtype_from_name(self.record.stored_dtype)
        return {r: (a.view(stored) if a.dtype != stored else a) for r, a in self.out.items()}

    def cancel(self) -> None:
        """Cancels the chunk reads not started yet and waits for the others."""
        for future in self.futures:
            future.cancel()
        concurrent.futures.wait(self.futures)


def open_regular(path: str, what: str) -> int | None:
    """A read-only descriptor of the regular file at ``path`` (None if there is none), opened
    without blocking: a FIFO, device or directory there is refused at once, naming ``what``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO there must not block the open
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CorruptCheckpointError(f"{what}: file {path} could not be opened: {e}") from e
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        os.close(fd)
        raise CorruptCheckpointError(f"{what}: file {path} could not be read: {e}") from e
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CorruptCheckpointError(f"{what}: {path} is not a regular file (mode {stat.filemode(mode)})")
    return fd


def _read_into(fd: int, path: str, offset: int, view: memoryview, what: str) -> None:
    done = 0
    try:
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if not n:
                raise CorruptCheckpointError(f"{what}: file {path} ended after {offset + done} bytes")
            done += n
    except OSError as e:
        raise CorruptCheckpointError(f"{what}: file {path} could not be read: {e}") from e


def read_file(path: str, what: str, size: int | None = None) -> bytearray | None:
    """The bytes of the regular file at ``path`` (None if there is none); with ``size``, a file
    of any other size is refused before anything is read."""
    fd = open_regular(path, what)
    if fd is None:
        return None
    try:
        found = os.fstat(fd).st_size
        if size is not None and found != size:
            raise CorruptCheckpointError(f"{what}: file {path} holds {found} bytes, expected {size}")
        out = bytearray(found)
        _read_into(fd, path, 0, memoryview(out), what)
        return out
    finally:
        os.close(fd)


def read_range(path: str, offset: int, nbytes: int, what: str) -> bytearray:
    """Bytes ``offset`` to ``offset + nbytes`` of the regular file at ``path``, all inside it."""
    fd = open_regular(path, what)
    if fd is None:
        raise MissingFileError(f"{what}: file {path} is missing")
    try:
        size = os.fstat(fd).st_size
        if offset + nbytes > size:
            raise CorruptCheckpointError(
                f"{what}: file {path} holds {size} bytes, the chunk is bytes {offset}-{offset + nbytes}"
            )
        out = bytearray(nbytes)
        _read_into(fd, path, offset, memoryview(out), what)
        return out
    finally:
        os.close(fd)


def submit(fn: Any, *args: Any) -> concurrent.futures.Future[Any]:
    """``fn(*args)`` on the read pool (a local file read, like a TensorStore read, in the background)."""
    return _pool().submit(fn, *args)
