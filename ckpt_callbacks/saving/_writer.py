"""Stream snapshots to storage with a bounded number of bytes (and of host memory) in flight."""

from __future__ import annotations

import collections
import concurrent.futures
import errno
import functools
import os
import typing
from typing import Any

import numpy as np
import tensorstore as ts

from ckpt_callbacks import format as fmt
from ckpt_callbacks import format as planning
from ckpt_callbacks import storage
from ckpt_callbacks import storage as paths
from ckpt_callbacks.errors import CheckpointStorageError
from ckpt_callbacks.format import slices
from ckpt_callbacks.saving._leaves import Leaf
from ckpt_callbacks.saving._snapshot import Snapshot, unit_bytes

# Bytes of writes in flight at once (bounds host staging when shards live on an accelerator).
DEFAULT_WINDOW_BYTES = 512 << 20


class Writer:
    """Streams snapshots to TensorStore with a bounded number of bytes in flight."""

    def __init__(
        self,
        window: int,
        packs: dict[tuple[str, str], tuple[int, int]] | None = None,
        *,
        options: storage.StorageOptions | None = None,
        where: str = "",
    ) -> None:
        """``packs``: (item, pack file) -> (size, chunks this process puts in it). Each wait on
        storage is bounded by ``options.op_timeout_s``; errors name ``where`` (the save's path)."""
        self.options = options or storage.DEFAULT
        self.where = where
        self.item_kvstores: dict[str, dict[str, Any]] = {}
        self.window = window
        self.arrays: dict[tuple[str, int], ts.TensorStore] = {}
        self.files = PackWriter(packs or {}, self.options, where)
        self.crcs: dict[str, dict[int, dict[str, int]]] = collections.defaultdict(dict)
        self.nbytes = 0
        self.in_memory = False

    def open(self, item_locs: dict[str, paths.Location]) -> None:
        """Where each item goes (known once the save's names are chosen); before any write."""
        item_kvstores = {item: paths.kvstore_spec(loc) for item, loc in item_locs.items()}
        self.item_kvstores = item_kvstores
        # TensorStore may reference written data without copying it. Storage drivers drop the
        # reference once the write commits, and a reused staging buffer is only refilled after
        # every commit of its batch. The memory:// store keeps references for good and drops
        # them (taking the GIL) under its own lock, which deadlocks against a thread holding
        # the GIL in a memory-store call; so TensorStore's memory driver (whatever URL scheme
        # uses it) always gets copies.
        self.in_memory = any(spec["driver"] == "memory" for spec in item_kvstores.values())
        self.files.open(item_kvstores, {item: paths.local_path(loc) for item, loc in item_locs.items()})

    def _array(self, leaf: Leaf) -> ts.TensorStore:
        key = (leaf.item, leaf.index)
        if key not in self.arrays:
            spec = fmt.zarr_spec(self.item_kvstores[leaf.item], leaf.record)
            # Metadata (zarr.json) is written once by process 0 at commit, so writers never race.
            opened = ts.open(spec, open=True, assume_metadata=True, context=paths.context())
            self.arrays[key] = storage.wait(opened, self.options, self.where, "open")
        return self.arrays[key]

    def write(self, snapshot: Snapshot) -> None:
        """Writes every unit of ``snapshot``, a bounded number of bytes in flight.

        Each chunk's crc32c is computed as soon as its bytes are on the host (still hot in
        cache), large ones on a thread pool (crc32c releases the GIL) while TensorStore writes.
        """
        try:
            self._write(snapshot)
        except BaseException:
            self.files.abandon()
            raise

    def _write(self, snapshot: Snapshot) -> None:
        inflight: collections.deque[tuple[Any, int]] = collections.deque()
        crcs: list[tuple[dict[str, Any], str, Any]] = []
        pending = 0
        for n, (leaf, unit) in enumerate(snapshot.batch):
            item, leaf_index = leaf.item, leaf.index
            host = snapshot.host_array(n)
            if leaf.record.zarr_dtype != host.dtype.name:
                host = host.view(fmt.dtype_from_name(leaf.record.zarr_dtype))
            key = fmt.chunk_key(unit.chunk)
            crcs.append((self.crcs[item].setdefault(leaf_index, {}), key, _crc(host)))
            self.nbytes += host.nbytes
            if leaf.record.pack:
                name, offset = leaf.record.pack[key]
                size = self.files.put(item, name, offset, host)
                if size is None:  # its file is not complete yet
                    continue
                # Room first: TensorStore copies a file as its write starts, and the copies in
                # flight are what the window bounds (an array write references the snapshot).
                pending = self._drain(inflight, pending, self.window - size)
                future = self.files.write(item, name)
            else:
                size = host.nbytes
                array = self._array(leaf)[slices(unit.region)]
                future = array.write(host, can_reference_source_data_indefinitely=not self.in_memory).commit
            inflight.append((future, size))
            pending = self._drain(inflight, pending + size, self.window)
        for future, _ in inflight:
            storage.wait(future, self.options, self.where, "write")
        for table, key, crc in crcs:
            table[key] = crc if isinstance(crc, int) else crc.result()
        snapshot.release()

    def _drain(self, inflight: collections.deque[tuple[Any, int]], pending: int, limit: int) -> int:
        """Waits for the oldest writes until at most ``limit`` bytes are in flight; returns them."""
        while pending > limit and inflight:
            done, size = inflight.popleft()
            storage.wait(done, self.options, self.where, "write")
            pending -= size
        return pending

    def check_complete(self, where: str) -> None:
        """Raises unless every pack file this process fills has been written (before any commit)."""
        self.files.check_complete(where)


class PackWriter:
    """The pack files one process fills (``packs``: (item, name) -> (size, chunks)), in both
    layouts. On local disk each is written in place, chunk by chunk, and made durable once
    complete: nothing of it is held in host memory. Elsewhere a file is assembled in one
    buffer (reused from file to file) and written as one object, which TensorStore copies
    twice as the write starts: a file costs three times its size while it is written."""

    def __init__(self, packs: dict[tuple[str, str], tuple[int, int]], options: storage.StorageOptions, where: str):
        self.packs, self.options, self.where = dict(packs), options, where
        self.specs: dict[str, dict[str, Any]] = {}
        self.local_dirs: dict[str, str | None] = {}
        self.kvstores: dict[str, ts.KvStore] = {}
        self.buffers: dict[tuple[str, str], bytearray] = {}
        self.spare: bytearray | None = None  # a written file's buffer, for the next
        self.local: dict[tuple[str, str], int] = {}  # open local files: descriptors

    def open(self, item_kvstores: dict[str, dict[str, Any]], local_dirs: dict[str, str | None]) -> None:
        """Each item's kvstore, and its directory on local disk (None: not a local path; its
        files are assembled in memory and written through TensorStore)."""
        self.specs, self.local_dirs = item_kvstores, local_dirs

    def check_complete(self, where: str) -> None:
        unwritten = sorted(f"{item}/{name}" for (item, name), (_, left) in self.packs.items() if left)
        if unwritten:
            raise RuntimeError(f"{where}: pack files left incomplete: {unwritten}; not committing")

    def put(self, item: str, name: str, offset: int, host: np.ndarray) -> int | None:
        """Puts a chunk (C-contiguous) into its file; once the file is complete, returns the
        host bytes its write will hold (None before; 0 on local disk)."""
        size, left = self.packs[(item, name)]
        raw = host.reshape(-1).view(np.uint8)
        if self.local_dirs.get(item) is not None:  # written in place
            path = self._path(item, name)
            fd = self.local.get((item, name))
            if fd is None:
                _local(path, os.makedirs, os.path.dirname(path), exist_ok=True)
                fd = self.local[(item, name)] = _local(path, os.open, path, _CREATE, 0o666)
            _local(path, _pwrite_all, fd, raw, offset)
        else:
            buffer = self.buffers.get((item, name))
            if buffer is None:
                buffer = self.buffers[(item, name)] = self._buffer(size)
            np.frombuffer(buffer, np.uint8, raw.size, offset)[:] = raw
        self.packs[(item, name)] = (size, left - 1)
        if left > 1:
            return None
        return 0 if (item, name) in self.local else size

    def write(self, item: str, name: str) -> Any:
        """Starts the write of a complete file (to durability); returns its future."""
        if (item, name) in self.local:
            fd, size = self.local.pop((item, name)), self.packs[(item, name)][0]
            return _in_background(_finish_local, fd, self._path(item, name), size)
        buffer = self.buffers.pop((item, name))
        if item not in self.kvstores:
            opened = ts.KvStore.open(self.specs[item], context=paths.context())
            self.kvstores[item] = storage.wait(opened, self.options, self.where, "open")
        future = _in_background(self.kvstores[item].write, name, typing.cast(bytes, buffer)).result()
        self.spare = buffer  # TensorStore copied it before write() returned
        return future

    def _path(self, item: str, name: str) -> str:
        local = self.local_dirs[item]
        assert local is not None  # only local files have a path
        return os.path.join(local, name)

    def _buffer(self, size: int) -> bytearray:
        """A zeroed buffer of ``size`` bytes: the last written file's if it has that size."""
        buffer, self.spare = self.spare, None
        if buffer is None or len(buffer) != size:
            return bytearray(size)
        np.frombuffer(buffer, np.uint8).fill(0)  # the gaps between aligned chunks are zeros
        return buffer

    def abandon(self) -> None:
        """Closes the local files left open by a failed save."""
        for fd in self.local.values():
            os.close(fd)
        self.local.clear()


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)


def _local(path: str, call: Any, *args: Any, **kwargs: Any) -> Any:
    """An operation on the local file ``path``; an operating-system failure as the
    ``CheckpointStorageError`` TensorStore's would be (errno and path)."""
    try:
        return call(*args, **kwargs)
    except OSError as e:
        code = e.errno or errno.EIO
        raise CheckpointStorageError(code, os.strerror(code), path) from e


def _pwrite_all(fd: int, raw: np.ndarray, offset: int) -> None:
    view, done = raw.data, 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _finish_local(fd: int, path: str, size: int) -> None:
    """A local file at its full size (a last gap included), durable, closed; then its
    directory entry."""
    try:
        _local(path, os.ftruncate, fd, size)
        _local(path, os.fsync, fd)
    finally:
        os.close(fd)
    directory = _local(path, os.open, os.path.dirname(path), os.O_RDONLY)
    try:
        _local(path, os.fsync, directory)
    finally:
        os.close(directory)


def _in_background(call: Any, *args: Any) -> concurrent.futures.Future[Any]:
    """``call(*args)`` on the one ``_files`` thread (inline while the interpreter exits)."""
    try:
        return _files().submit(call, *args)
    except RuntimeError:  # the interpreter is exiting (a save finishing at exit): no new threads
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            done.set_result(call(*args))
        except Exception as e:
            done.set_exception(e)
        return done


_CRC_OFFLOAD_BYTES = 1 << 20  # smaller chunks: inline (a pool hand-off costs more than the crc)


@functools.cache
def _files() -> concurrent.futures.ThreadPoolExecutor:
    """The one thread that starts every pack file's write: it hands the file to TensorStore,
    which copies it there, or makes a local one durable. glibc gives each thread a malloc arena
    of its own and keeps what is freed in it; a save's writes run on its caller's thread and on
    a new thread per save, so copies made there took their size again in every such arena (a
    process-layout save exceeded ``max_host_bytes``). Made on one long-lived thread, every
    copy reuses the memory the previous ones freed."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-files")


@functools.cache
def _crc_pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="ckpt-crc")


def _crc(host: np.ndarray) -> int | concurrent.futures.Future[int]:
    if host.nbytes >= _CRC_OFFLOAD_BYTES:
        try:
            return _crc_pool().submit(fmt.crc32c_of, host)
        except RuntimeError:  # the interpreter is exiting (a save finishing at exit): no new threads
            pass
    return fmt.crc32c_of(host)


def batches(pairs: list[tuple[Leaf, planning.WriteUnit]], budget: int | None) -> list[list[Any]]:
    """``pairs`` cut into consecutive batches of at most ``budget`` bytes (one if None)."""
    if budget is None:
        return [pairs]
    out: list[list[Any]] = [[]]
    size = 0
    for leaf, unit in pairs:
        nbytes = unit_bytes(leaf, unit)
        if out[-1] and size + nbytes > budget:
            out.append([])
            size = 0
        out[-1].append((leaf, unit))
        size += nbytes
    return out
