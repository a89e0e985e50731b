"""Snapshots: private copies of what a save writes, taken before ``save_async`` returns.

Three modes (``SaveOptions.snapshot``):

- ``"device"``: each shard is copied on its device (``device_put(..., may_alias=False)``,
  asynchronous); the background writer drains the copies to host and frees them as it goes.
  Costs device memory: as much again as the part of the state this process writes.
- ``"host"``: each shard goes straight to host memory: on accelerators an asynchronous
  transfer into the ``pinned_host`` memory kind (XLA's pinned host allocator keeps freed
  buffers for the next save); where the devices are host memory (CPU) a copy into one host
  buffer that is reused from save to save. Costs no device memory.
- ``"auto"`` (default): device copies while the device has room (``memory_stats()``: limit
  minus in use, minus ``device_headroom`` of the limit), host copies for the rest; where a
  platform reports no memory statistics (CPU), ``"host"``.

In every mode only the slice this process writes is copied (a replicated shard is sliced
first), and ``Snapshot.live`` (a blocking save) copies nothing.

>>> device_budgets(jax.local_devices()[:1], "host", None, 0.1)[jax.local_devices()[0]]
0
"""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import numpy as np

from ckpt_callbacks import format as fmt
from ckpt_callbacks import format as planning
from ckpt_callbacks.format import slices
from ckpt_callbacks.saving._leaves import Leaf

SnapshotMode = Literal["auto", "device", "host"]
MemoryStats = Callable[[Any], dict[str, Any] | None]
Pairs = list[tuple[Leaf, planning.WriteUnit]]


def unit_source(leaf: Leaf, unit: planning.WriteUnit) -> Any:
    """The array a unit is cut from: a numpy leaf itself, or the shard on the unit's device."""
    if leaf.record.source == "numpy":
        return leaf.source
    if isinstance(leaf.source.sharding, jax.sharding.SingleDeviceSharding):
        return leaf.source  # its one shard
    return next(s.data for s in leaf.source.addressable_shards if s.device == unit.device)


def host_resident() -> bool:
    return all(d.platform == "cpu" for d in jax.local_devices())


def device_budgets(
    devices: Sequence[Any], mode: SnapshotMode, memory_stats: MemoryStats | None, headroom: float
) -> dict[Any, int] | None:
    """Bytes a snapshot may copy on each device: None means no limit (``"device"``)."""
    if mode == "device":
        return None
    stats_of = memory_stats or (lambda device: device.memory_stats())
    budgets = {}
    for device in devices:
        stats = stats_of(device) if mode == "auto" else None
        limit = (stats or {}).get("bytes_limit")
        if not limit:
            budgets[device] = 0  # no statistics (or "host"): nothing on device
            continue
        free = int(limit) - int(stats.get("bytes_in_use", 0)) - int(headroom * limit)  # type: ignore[union-attr]
        budgets[device] = max(0, free)
    return budgets


class HostBuffers:
    """One host buffer per process, reused by every snapshot that is not in flight.

    First-touching fresh memory is the slow part of a host copy on many machines; a buffer that
    earlier saves have written is warm. A save takes it and gives it back once written; a save
    that finds it taken (another save in flight) gets a fresh one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: np.ndarray | None = None

    def take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            buffer, self._free = self._free, None
        if buffer is None or buffer.nbytes < nbytes:
            buffer = np.empty(max(nbytes, 1), np.uint8)
        return buffer

    def give(self, buffer: np.ndarray) -> None:
        with self._lock:
            if self._free is None or self._free.nbytes < buffer.nbytes:
                self._free = buffer

    def drop(self) -> None:
        """Frees the kept buffer (tests, or a process that is done saving)."""
        with self._lock:
            self._free = None


HOST_BUFFERS = HostBuffers()


class Snapshot:
    """One batch of write units and, per unit, the array it is written from.

    Three ways to take one: ``live`` (the caller's own buffers; a blocking save), ``staged``
    (host copies in one reused buffer) and ``copied`` (per unit on device or host, as the
    budgets allow; ``save_async``). ``copies[n]`` is unit ``n``'s source until written;
    ``release()`` hands a reused buffer back once every unit is written.
    """

    def __init__(self, batch: Pairs, copies: dict[int, Any], buffer: np.ndarray | None = None) -> None:
        self.batch = batch
        self.copies = copies
        self.buffer = buffer

    @classmethod
    def live(cls, batch: Pairs) -> Snapshot:
        """The caller's buffers as they are: valid only while the caller waits for the write."""
        return cls(batch, {n: unit_source(leaf, unit) for n, (leaf, unit) in enumerate(batch)})

    @classmethod
    def staged(cls, batch: Pairs, buffer: np.ndarray, *, last: bool) -> Snapshot:
        """Every unit copied into ``buffer`` (taken from ``HOST_BUFFERS``, shared by a save's
        batches); the ``last`` batch's snapshot gives it back once written."""
        return cls(batch, _copy_into(batch, range(len(batch)), buffer), buffer if last else None)

    @classmethod
    def copied(cls, batch: Pairs, budgets: dict[Any, int] | None, *, pinned: bool | None = None) -> Snapshot:
        """Private copies, independent of the caller's buffers once this returns.

        Shards are copied on their device while ``budgets`` (bytes per device; None: no
        limit) allow, the rest to host (see the module docstring): by transfers into
        ``pinned_host`` memory, or (``pinned=False``, the default on CPU) into the reused
        host buffer.
        """
        pinned = not host_resident() if pinned is None else pinned
        copies: dict[int, Any] = {}
        on_host: list[int] = []
        groups: dict[tuple[str, int, Any], list[int]] = collections.defaultdict(list)  # by shard
        for n, (leaf, unit) in enumerate(batch):
            if leaf.record.source == "numpy":
                on_host.append(n)
            else:
                groups[(leaf.item, leaf.index, unit.device)].append(n)
        to_device: list[tuple[list[int], Any]] = []
        to_pinned: list[tuple[list[int], Any]] = []
        for members in groups.values():
            leaf, unit = batch[members[0]]
            shard = unit_source(leaf, unit)
            nbytes = sum(_nbytes(batch[n]) for n in members)
            whole = nbytes == shard.nbytes
            if whole and leaf.private:  # already our own copy (a cast)
                copies.update((n, shard) for n in members)
            elif budgets is None or budgets.get(unit.device, 0) >= nbytes:
                if budgets is not None:
                    budgets[unit.device] -= nbytes
                to_device.extend(_slices(batch, members, shard, whole))
            elif pinned:
                to_pinned.extend(_slices(batch, members, shard, whole))
            else:
                on_host.extend(members)
        copies.update(_device_put(to_device, None))
        copies.update(_device_put(to_pinned, "pinned_host"))
        buffer = HOST_BUFFERS.take(staged_bytes([batch[n] for n in on_host])) if on_host else None
        if buffer is not None:
            copies.update(_copy_into(batch, on_host, buffer))
        return cls(batch, copies, buffer)

    def host_array(self, n: int) -> np.ndarray:
        """Unit ``n`` as a C-contiguous host array (device-to-host copy if needed)."""
        leaf, unit = self.batch[n]
        host = np.asarray(self.copies.pop(n))
        if leaf.record.source == "numpy" and tuple(host.shape) != unit.shape:
            host = host[slices(unit.region)]
        elif tuple(host.shape) != unit.shape:
            host = host[slices(unit.local)]
        return host if host.flags.c_contiguous else host.copy(order="C")

    def release(self) -> None:
        """After every unit is written: the host buffer goes back for the next snapshot."""
        self.copies.clear()
        if self.buffer is not None:
            HOST_BUFFERS.give(self.buffer)
            self.buffer = None


def unit_bytes(leaf: Leaf, unit: planning.WriteUnit) -> int:
    return math.prod(unit.shape) * fmt.dtype_from_name(leaf.record.zarr_dtype).itemsize


def _nbytes(pair: tuple[Leaf, planning.WriteUnit]) -> int:
    return unit_bytes(*pair)


def staged_bytes(batch: Pairs) -> int:
    """Bytes of a host buffer that holds every unit of ``batch``, each 64-byte aligned."""
    return sum(planning.aligned(_nbytes(pair)) for pair in batch)


def _slices(batch: Pairs, members: list[int], shard: Any, whole: bool) -> list[tuple[list[int], Any]]:
    """What to copy of a shard: all of it, or (part of a replicated shard) each unit's slice,
    cut on its device so that nothing beyond what this process writes is copied."""
    if whole:
        return [(members, shard)]
    return [([n], shard[slices(batch[n][1].local)]) for n in members]


def _device_put(parts: list[tuple[list[int], Any]], memory_kind: str | None) -> dict[int, Any]:
    """Asynchronous private copies (on device, or into ``memory_kind``), one call for all."""
    if not parts:
        return {}
    shardings = [x.sharding if memory_kind is None else x.sharding.with_memory_kind(memory_kind) for _, x in parts]
    copied = jax.device_put([x for _, x in parts], shardings, may_alias=False)
    return {n: private for (members, _), private in zip(parts, copied, strict=True) for n in members}


def _copy_into(batch: Pairs, members: Sequence[int], buffer: np.ndarray) -> dict[int, np.ndarray]:
    """Copies units into ``buffer`` (each at a 64-byte aligned offset); returns their views."""
    copies = {}
    offset = 0
    for n in members:
        leaf, unit = batch[n]
        if leaf.record.source == "numpy":
            source = np.asarray(leaf.source)[slices(unit.local)]
        else:
            source = np.asarray(unit_source(leaf, unit))[slices(unit.local)]
        view = buffer[offset : offset + source.nbytes].view(source.dtype).reshape(source.shape)
        np.copyto(view, source)
        copies[n] = view
        offset += planning.aligned(source.nbytes)
    return copies
