"""Snapshot one batch of write units and stream it to TensorStore with bounded memory."""

from __future__ import annotations

import collections
import math
from typing import Any

import jax
import numpy as np
import tensorstore as ts

from ckpt_callbacks import format as fmt
from ckpt_callbacks import paths, planning
from ckpt_callbacks.leaves import Leaf
from ckpt_callbacks.planning import slices

# Bytes of writes in flight at once (bounds host staging when shards live on an accelerator).
DEFAULT_WINDOW_BYTES = 512 << 20


def unit_bytes(leaf: Leaf, unit: planning.WriteUnit) -> int:
    return math.prod(unit.shape) * fmt.dtype_from_name(leaf.record.zarr_dtype).itemsize


def _unit_source(leaf: Leaf, unit: planning.WriteUnit) -> Any:
    """The array a unit is cut from: a numpy leaf itself, or the shard on the unit's device."""
    if leaf.record.source == "numpy":
        return leaf.source
    return next(s.data for s in leaf.source.addressable_shards if s.device == unit.device)


def host_resident() -> bool:
    return all(d.platform == "cpu" for d in jax.local_devices())


class Snapshot:
    """One batch of write units and, per unit, the array it is written from.

    Three ways to take one: ``live`` (the caller's own buffers; a blocking save), ``staged``
    (host copies in one reused buffer; a save larger than its host budget) and ``copied``
    (private copies; ``save_async``). ``copies[n]`` is unit ``n``'s source until written.
    """

    def __init__(self, batch: list[tuple[Leaf, planning.WriteUnit]], copies: dict[int, Any]) -> None:
        self.batch = batch
        self.copies = copies

    @classmethod
    def live(cls, batch: list[tuple[Leaf, planning.WriteUnit]]) -> Snapshot:
        """The caller's buffers as they are: valid only while the caller waits for the write."""
        return cls(batch, {n: _unit_source(leaf, unit) for n, (leaf, unit) in enumerate(batch)})

    @classmethod
    def staged(cls, batch: list[tuple[Leaf, planning.WriteUnit]], staging: np.ndarray) -> Snapshot:
        """Every unit copied into one reused host buffer (no allocator churn between batches)."""
        copies = {}
        offset = 0
        for n, (leaf, unit) in enumerate(batch):
            if leaf.record.source == "numpy":
                source = leaf.source[slices(unit.local)]
            else:
                source = np.asarray(_unit_source(leaf, unit))[slices(unit.local)]
            size = source.nbytes
            view = staging[offset : offset + size].view(source.dtype).reshape(source.shape)
            np.copyto(view, source)
            copies[n] = view
            offset += planning.aligned(size)
        return cls(batch, copies)

    @classmethod
    def copied(cls, batch: list[tuple[Leaf, planning.WriteUnit]]) -> Snapshot:
        """Private copies, independent of the caller's buffers once this returns.

        A shard is copied once on its device (``device_put`` with ``may_alias=False``:
        asynchronous, and on an accelerator it stays in device memory) and its units are cut
        from that copy on the host later. Only where this process writes part of a replicated
        shard held in host memory is exactly that part copied on the host instead, so the copy
        never exceeds what the process writes.
        """
        copies: dict[int, Any] = {}
        groups: dict[tuple[str, int, tuple[int, ...]], list[int]] = collections.defaultdict(list)
        for n, (leaf, unit) in enumerate(batch):
            if leaf.record.source == "numpy":
                copies[n] = np.array(leaf.source[slices(unit.local)])
            else:
                origin = tuple(a - la for (a, _), (la, _) in zip(unit.region, unit.local, strict=True))
                groups[(leaf.item, leaf.index, origin)].append(n)
        host = host_resident()
        to_copy: list[tuple[list[int], Any]] = []
        for members in groups.values():
            leaf, unit = batch[members[0]]
            shard = _unit_source(leaf, unit)
            covered = sum(math.prod(batch[n][1].shape) for n in members) == math.prod(shard.shape)
            if covered and leaf.private:
                copies.update((n, shard) for n in members)
            elif covered or not host:
                to_copy.append((members, shard))
            else:
                for n in members:
                    copies[n] = np.array(np.asarray(shard)[slices(batch[n][1].local)])
        if to_copy:
            copied = jax.device_put(
                [shard for _, shard in to_copy], [shard.sharding for _, shard in to_copy], may_alias=False
            )
            for (members, _), private_copy in zip(to_copy, copied, strict=True):
                copies.update((n, private_copy) for n in members)
        return cls(batch, copies)

    def host_array(self, n: int) -> np.ndarray:
        """Unit ``n`` as a C-contiguous host array (device-to-host copy if needed)."""
        leaf, unit = self.batch[n]
        host = np.asarray(self.copies.pop(n))
        if leaf.record.source == "numpy" and tuple(host.shape) != unit.shape:
            host = host[slices(unit.region)]
        elif tuple(host.shape) != unit.shape:
            host = host[slices(unit.local)]
        return host if host.flags.c_contiguous else host.copy(order="C")


class Writer:
    """Streams snapshots to TensorStore with a bounded number of bytes in flight."""

    def __init__(self, window: int, packs: dict[tuple[str, str], tuple[int, int]] | None = None) -> None:
        """``packs``: (item, pack file) -> (size, chunks this process puts in it)."""
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
            self.arrays[key] = ts.open(spec, open=True, assume_metadata=True, context=paths.context()).result()
        return self.arrays[key]

    def write(self, snapshot: Snapshot) -> None:
        inflight: collections.deque[tuple[Any, int]] = collections.deque()
        pending = 0
        for n, (leaf, unit) in enumerate(snapshot.batch):
            item, leaf_index = leaf.item, leaf.index
            host = snapshot.host_array(n)
            if leaf.record.zarr_dtype != host.dtype.name:
                host = host.view(fmt.dtype_from_name(leaf.record.zarr_dtype))
            key = fmt.chunk_key(unit.chunk)
            self.crcs[item].setdefault(leaf_index, {})[key] = fmt.crc32c_of(host)
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
                done.result()
                pending -= size
        for future, _ in inflight:
            future.result()

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
            self.kvstores[item] = ts.KvStore.open(self.item_kvstores[item], context=paths.context()).result()
        return self.kvstores[item].write(name, buffer.tobytes()), size


def batches(pairs: list[tuple[Leaf, planning.WriteUnit]], budget: int | None) -> list[list[Any]]:
    if budget is None or not host_resident():
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
