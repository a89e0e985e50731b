"""Reads of stored chunks, from zarr3 arrays or pack files, each checked against its crc32c.

A leaf's regions (what each target device needs) are read as whole regions where they are
made of whole chunks, else chunk by chunk, and every chunk is checked against the manifest's
crc32c when it first arrives. Packed leaves come from pack files, each read once per restore.
Arrays of a format that records no checksums (orbax) are read region by region, unchecked.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import errno
import math
import os
from typing import Any

import numpy as np
import tensorstore as ts

from ckpt_callbacks import format as fmt
from ckpt_callbacks import format as planning
from ckpt_callbacks import storage as paths
from ckpt_callbacks.errors import CorruptCheckpointError, MissingFileError, StorageTimeoutError
from ckpt_callbacks.layouts import _direct as direct_reads
from ckpt_callbacks.layouts._regions import chunk_regions, claimed_bytes


class PackFiles:
    """The pack files of one item directory, each read once (asynchronously) and shared by its leaves."""

    def __init__(self, loc: paths.Location) -> None:
        self.loc = loc
        self.kvstore: ts.KvStore | None = None
        self.files: dict[str, Any] = {}  # name -> read future, then bytes

    def start(self, name: str, byte_range: tuple[int, int] | None = None, *, size: int | None = None) -> Any:
        """A read of a file in the item directory (whole, or bytes ``[a, b)``) as a future of
        ``read_value``'s input. Local files are read here, never opened blocking (a FIFO in
        place of a file is refused at once); others through TensorStore. ``size``: the size
        the file must have (a local file of another is refused unread; elsewhere only that
        many bytes are read)."""
        url = self.loc.join(name).url
        local = paths.local_path(self.loc)
        if local is not None:
            path = os.path.join(local, name)
            if byte_range is None:
                return direct_reads.submit(direct_reads.read_file, path, url, size)
            return direct_reads.submit(direct_reads.read_range, path, byte_range[0], byte_range[1] - byte_range[0], url)
        if self.kvstore is None:
            self.kvstore = ts.KvStore.open(paths.kvstore_spec(self.loc), context=paths.context()).result()
        if byte_range is None and size is not None:
            byte_range = (0, size)
        return self.kvstore.read(name, byte_range=None if byte_range is None else slice(*byte_range))

    def chunk(self, name: str, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> _PackedChunk:
        if name not in self.files:
            self.files[name] = self.start(name)
        return _PackedChunk(self, name, offset, shape, dtype)

    def data(self, name: str, timeout: float | None = None) -> bytes | bytearray:
        data = self.files[name]
        if not isinstance(data, bytes | bytearray):
            try:
                result = data.result(timeout=timeout)
            except TimeoutError as e:
                data.cancel()
                where = self.loc.join(name).url
                raise StorageTimeoutError(
                    errno.ETIMEDOUT, f"pack file {where}: no answer within op_timeout_s={timeout:g}s", where
                ) from e
            value = read_value(result)
            if value is None:
                raise MissingFileError(f"pack file {self.loc.join(name).url} is missing")
            data = self.files[name] = value
        return data

    def cancel(self) -> None:
        """Cancels pack file reads still in flight and waits for them (see ``LeafRead.cancel``)."""
        for data in self.files.values():
            settle(data)


def read_value(result: Any) -> bytes | bytearray | None:
    """The bytes of a finished ``PackFiles.start`` read; None for a missing file."""
    if result is None or isinstance(result, bytes | bytearray):
        return result
    return result.value if result.state == "value" else None


@dataclasses.dataclass(frozen=True)
class _PackedChunk:
    """A chunk stored in a pack file, read like a TensorStore read future."""

    packs: PackFiles
    name: str
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    def result(self, timeout: float | None = None) -> np.ndarray:
        count = math.prod(self.shape)
        data = self.packs.data(self.name, timeout)
        end = self.offset + count * self.dtype.itemsize
        if end > len(data):  # checked before numpy sees the claim
            raise CorruptCheckpointError(
                f"pack file {self.packs.loc.join(self.name).url} holds {len(data)} bytes, "
                f"the chunk is bytes {self.offset}-{end}"
            )
        flat = np.frombuffer(data, self.dtype, count=count, offset=self.offset)
        return flat.reshape(self.shape).copy()  # its own memory: the pack file may be large


class LeafRead:
    """Reads of one leaf's regions; every chunk checked against the manifest's crc32c on arrival.

    A region made of whole chunks is read at once (TensorStore assembles it in its own
    threads); other regions are assembled here from chunk reads, each chunk read once.

    ``checksums=False`` is for arrays of another format that records none (an orbax
    checkpoint): each region is one TensorStore read and nothing is checked. Our own leaves
    are always read with ``checksums=True``, where a chunk without a crc32c is an error.
    """

    def __init__(
        self,
        source: ts.TensorStore | PackFiles,
        record: fmt.LeafRecord,
        regions: list[planning.Region],
        where: str,
        *,
        checksums: bool = True,
        timeout: float | None = None,
    ) -> None:
        self.record, self.regions, self.where, self.checksums = record, regions, where, checksums
        self.timeout = timeout  # the longest wait on one read (a store that stalls fails the restore)
        self.reads: dict[planning.Region, Any] = {}  # read region -> future, then array
        self.source: dict[tuple[int, ...], tuple[planning.Region, planning.Region]] = {}  # chunk -> (its region, read)
        self.checked: set[tuple[int, ...]] = set()
        packed = isinstance(source, PackFiles)
        self.store = None if isinstance(source, PackFiles) else source  # asked which chunk files exist
        itemsize = fmt.dtype_from_name(record.zarr_dtype).itemsize
        claimed = claimed_bytes(record, regions, where)
        if not checksums:
            if isinstance(source, PackFiles):
                raise ValueError(f"leaf {record.key!r}: packed chunks are always read with checksums")
            self.reads = {region: self._zarr_read(source, region, None) for region in regions}
            self.nbytes = claimed
            return
        for region in regions:
            parts = chunk_regions(region, record.chunks, record.data_shape)
            whole = not packed and len(parts) > 1 and _covers(parts, region)
            whole = whole and not any(idx in self.source for idx, _ in parts)
            for idx, creg in parts:
                if idx not in self.source:
                    self.source[idx] = (creg, region if whole else creg)
            for idx, _ in parts:
                read = self.source[idx][1]
                if read in self.reads:
                    continue
                if isinstance(source, PackFiles):  # packed leaves are read chunk by chunk
                    name, offset = self._packed_at(idx)
                    shape = tuple(b - a for a, b in read)
                    self.reads[read] = source.chunk(name, offset, shape, fmt.dtype_from_name(record.zarr_dtype))
                else:
                    self.reads[read] = self._zarr_read(source, read, idx)
        self.nbytes = sum(math.prod(b - a for a, b in read) * itemsize for read in self.reads)

    def cancel(self) -> None:
        """Cancels the reads still in flight and waits for them to settle (after a failure
        elsewhere, so that no TensorStore read outlives the restore that started it)."""
        for data in self.reads.values():
            settle(data)

    def _what(self, read: planning.Region, idx: tuple[int, ...] | None) -> str:
        part = f"region {[list(r) for r in read]}" if idx is None else f"chunk {fmt.chunk_key(idx)}"
        return f"{self.where}: leaf {self.record.key!r} {part}"

    def _unreadable(self, read: planning.Region, idx: tuple[int, ...] | None, e: Exception) -> CorruptCheckpointError:
        """A failed read as the error a restore raises: a missing file stays a ``MissingFileError``."""
        kind = type(e) if isinstance(e, CorruptCheckpointError) else CorruptCheckpointError
        chunk = None if idx is None else fmt.chunk_key(idx)
        return kind(f"{self._what(read, idx)} could not be read: {e}", leaf=self.record.key, chunk=chunk)

    def _zarr_read(self, source: ts.TensorStore, read: planning.Region, idx: tuple[int, ...] | None) -> Any:
        try:
            return source[planning.slices(read)].read()
        except Exception as e:  # TensorStore refuses a region synchronously (ValueError, IndexError)
            raise self._unreadable(read, idx, e) from e

    def _packed_at(self, idx: tuple[int, ...]) -> tuple[str, int]:
        try:
            return self.record.pack[fmt.chunk_key(idx)]
        except KeyError:
            raise CorruptCheckpointError(
                f"{self.where}: leaf {self.record.key!r} chunk {fmt.chunk_key(idx)} is in no pack file; "
                f"the manifest lists chunks {sorted(self.record.pack)}",
                leaf=self.record.key,
                chunk=fmt.chunk_key(idx),
            ) from None

    def _read(self, read: planning.Region, idx: tuple[int, ...] | None) -> np.ndarray:
        data = self.reads[read]
        if not isinstance(data, np.ndarray):
            try:
                data = self.reads[read] = data.result(timeout=self.timeout)
            except StorageTimeoutError:
                raise
            except TimeoutError as e:
                data.cancel()
                raise StorageTimeoutError(
                    errno.ETIMEDOUT,
                    f"{self._what(read, idx)}: no answer within op_timeout_s={self.timeout:g}s",
                    self.where,
                ) from e
            except Exception as e:
                raise self._unreadable(read, idx, e) from e
        return data

    def _chunk(self, idx: tuple[int, ...]) -> np.ndarray:
        creg, read = self.source[idx]
        data = self._read(read, idx)
        if read != creg:
            data = data[tuple(slice(a - r0, b - r0) for (a, b), (r0, _) in zip(creg, read, strict=True))]
        if idx not in self.checked:
            expected = self.record.crc32c.get(fmt.chunk_key(idx))
            found = fmt.crc32c_of(data)
            if expected is None or found != expected:
                raise self._mismatch(idx, creg, found, expected)
            self.checked.add(idx)
        return data

    def _mismatch(
        self, idx: tuple[int, ...], creg: planning.Region, found: int, expected: int | None
    ) -> CorruptCheckpointError:
        """A chunk that fails its crc32c; read as the fill value, for want of a file, it is missing."""
        what, key = f"{self._what(creg, idx)} (region {[list(r) for r in creg]})", fmt.chunk_key(idx)
        if self.store is not None and expected is not None and not _stored(self.store, idx):
            where = f"{self.where}/{self.record.array}/{direct_reads.chunk_file_key(idx)}"
            return MissingFileError(
                f"{what}: its chunk file {where} is missing (the manifest records crc32c {expected:#010x})",
                leaf=self.record.key,
                chunk=key,
            )
        return CorruptCheckpointError(
            f"{what}: crc32c {found:#010x} read, {direct_reads.crc_text(expected)} in the manifest",
            leaf=self.record.key,
            chunk=key,
        )

    def result(self) -> dict[planning.Region, np.ndarray]:
        """Each requested region as one host array of the stored dtype."""
        out = {}
        stored = fmt.dtype_from_name(self.record.stored_dtype)
        for region in self.regions:
            host = self._checked(region) if self.checksums else self._read(region, None)
            out[region] = host.view(stored) if host.dtype != stored else host
        return out

    def _checked(self, region: planning.Region) -> np.ndarray:
        """One region, every chunk of it checked against its crc32c."""
        parts = chunk_regions(region, self.record.chunks, self.record.data_shape)
        if region in self.reads:  # read whole (one chunk, or whole chunks): check each, no copy
            for idx, _ in parts:
                self._chunk(idx)
            return self._read(region, parts[0][0])
        chunks = [(self._chunk(idx), creg) for idx, creg in parts]  # all checked before the region is allocated
        host = np.empty(tuple(b - a for a, b in region), fmt.dtype_from_name(self.record.zarr_dtype))
        for chunk, creg in chunks:
            inter = tuple((max(a, c), min(b, d)) for (a, b), (c, d) in zip(region, creg, strict=True))
            dst = tuple(slice(a - r0, b - r0) for (a, b), (r0, _) in zip(inter, region, strict=True))
            src = tuple(slice(a - c0, b - c0) for (a, b), (c0, _) in zip(inter, creg, strict=True))
            host[dst] = chunk[src]
        return host


def _stored(store: ts.TensorStore, idx: tuple[int, ...]) -> bool:
    """Whether chunk ``idx`` has a file in its zarr3 array (a missing one reads as zeros)."""
    kvstore = store.kvstore
    if kvstore is None:  # the store cannot say: the mismatch is reported as it is
        return True
    try:
        return kvstore.read(direct_reads.chunk_file_key(idx)).result().state != "missing"
    except Exception:
        return True


def _covers(parts: list[tuple[tuple[int, ...], planning.Region]], region: planning.Region) -> bool:
    """Whether the chunks ``parts`` tile ``region`` exactly (no chunk sticks out of it)."""
    return all(all(r0 <= a and b <= r1 for (a, b), (r0, r1) in zip(creg, region, strict=True)) for _, creg in parts)


def settle(future: Any) -> None:
    """Cancels a TensorStore or local read's future (anything else is left alone) and waits
    until it is done."""
    if isinstance(future, ts.Future | concurrent.futures.Future):
        future.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError, concurrent.futures.CancelledError):
            future.result()  # cancelled or failed: over either way
