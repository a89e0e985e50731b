"""Stream snapshots to TensorStore with a bounded number of bytes in flight."""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import os
from typing import Any

import numpy as np
import tensorstore as ts

from ckpt_callbacks import format as fmt
from ckpt_callbacks import paths, planning, storage
from ckpt_callbacks.leaves import Leaf
from ckpt_callbacks.planning import slices
from ckpt_callbacks.snapshot import Snapshot, unit_bytes

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
        self.packs = dict(packs or {})
        self.pack_buffers: dict[tuple[str, str], np.ndarray] = {}
        self.kvstores: dict[str, ts.KvStore] = {}
        self.crcs: dict[str, dict[int, dict[str, int]]] = collections.defaultdict(dict)
        self.nbytes = 0
        self.in_memory = False

    def open(self, item_kvstores: dict[str, dict[str, Any]]) -> None:
        """Where each item goes (known once the save's names are chosen); before any write."""
        self.item_kvstores = item_kvstores
        # TensorStore may reference written data without copying it. Storage drivers drop the
        # reference once the write commits, and a reused staging buffer is only refilled after
        # every commit of its batch. The memory:// store keeps references for good and drops
        # them (taking the GIL) under its own lock, which deadlocks against a thread holding
        # the GIL in a memory-store call; so memory:// always gets copies.
        self.in_memory = any(spec["driver"] == "memory" for spec in item_kvstores.values())

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
                future, size = self._pack(item, *leaf.record.pack[key], host)
                if future is None:  # its pack file is not complete yet
                    continue
            else:
                array = self._array(leaf)[slices(unit.region)]
                future = array.write(host, can_reference_source_data_indefinitely=not self.in_memory).commit
                size = host.nbytes
            inflight.append((future, size))
            pending += size
            while pending > self.window and inflight:
                done, size = inflight.popleft()
                storage.wait(done, self.options, self.where, "write")
                pending -= size
        for future, _ in inflight:
            storage.wait(future, self.options, self.where, "write")
        for table, key, crc in crcs:
            table[key] = crc if isinstance(crc, int) else crc.result()
        snapshot.release()

    def check_complete(self, where: str) -> None:
        """Raises unless every pack file this process fills has been written (before any commit)."""
        unwritten = sorted(f"{item}/{name}" for (item, name), (_, left) in self.packs.items() if left)
        if unwritten:
            raise RuntimeError(f"{where}: pack files left incomplete: {unwritten}; not committing")

    def _pack(self, item: str, name: str, offset: int, host: np.ndarray) -> tuple[Any, int]:
        """Copies a chunk into its pack file's buffer; writes the file (one object) once complete.

        Returns the write's future (None while the file is incomplete) and the file's size.
        """
        size, left = self.packs[(item, name)]
        buffer = self.pack_buffers.get((item, name))
        if buffer is None:
            buffer = self.pack_buffers[(item, name)] = np.zeros(size, np.uint8)
        buffer[offset : offset + host.nbytes] = host.reshape(-1).view(np.uint8)
        self.packs[(item, name)] = (size, left - 1)
        if left > 1:
            return None, size
        del self.pack_buffers[(item, name)]
        if item not in self.kvstores:
            opened = ts.KvStore.open(self.item_kvstores[item], context=paths.context())
            self.kvstores[item] = storage.wait(opened, self.options, self.where, "open")
        return self.kvstores[item].write(name, buffer.tobytes()), size


_CRC_OFFLOAD_BYTES = 1 << 20  # smaller chunks: inline (a pool hand-off costs more than the crc)


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
