"""Reads of array leaves onto their targets, a bounded number of bytes in flight.

Each leaf's regions (what this process's devices need) are read through the layouts' checked
chunk reads (``layouts.LeafRead``), or straight into the restored arrays on local disk
(``layouts.DirectRead``), then handed to their devices while later leaves are read.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import tensorstore as ts

from ckpt_callbacks import format as fmt
from ckpt_callbacks import format as planning
from ckpt_callbacks import layouts as direct_reads
from ckpt_callbacks import storage as paths
from ckpt_callbacks.errors import CorruptCheckpointError
from ckpt_callbacks.layouts import DirectRead, LeafRead, PackFiles, data_sharding, settle
from ckpt_callbacks.restoring._targets import Target

# Bytes of chunk reads in flight at once: bounds host memory beyond the restored arrays.
READ_WINDOW_BYTES = 512 << 20
Opener = Callable[[fmt.LeafRecord], Any]  # a leaf's array -> its TensorStore open future


def finish_leaf(record: fmt.LeafRecord, target: Target, regions: dict[planning.Region, np.ndarray]) -> Any:
    """The restored leaf from its regions read (those ``regions_of`` named), on its target:
    cast to the target's dtype, then a numpy array or a ``jax.Array`` of the target sharding
    (a PRNG key array for a key leaf); the regions themselves for a target of ``regions``."""
    dtype = target.dtype
    if record.kind == "array" and dtype is not None:
        regions = {r: (a if a.dtype == dtype else a.astype(dtype)) for r, a in regions.items()}
    if target.regions is not None:
        return regions
    if target.sharding is None:
        return regions[tuple((0, n) for n in record.data_shape)]
    sharding = data_sharding(record, target.sharding)
    shape = record.data_shape

    def region_of(index: Any) -> np.ndarray:
        return regions[planning.normalize_index(index, shape)]

    array = jax.make_array_from_callback(shape, sharding, region_of)
    if record.kind == "prng_key":
        return jax.random.wrap_key_data(array, impl=record.key_impl)
    return array


def _open_array(kvstore: dict[str, Any], record: fmt.LeafRecord, where: str, unchecked: Opener | None = None) -> Any:
    """The open future of a leaf's zarr3 array, with the manifest's metadata (zarr.json unread)."""
    try:
        if unchecked is not None:
            return unchecked(record)
        return ts.open(fmt.zarr_spec(kvstore, record), open=True, assume_metadata=True, context=paths.context())
    except Exception as e:  # a spec TensorStore refuses at once (a dtype or grid it lacks)
        raise CorruptCheckpointError(f"{where}: leaf {record.key!r}: cannot open its array: {e}") from e


def regions_of(record: fmt.LeafRecord, target: Target) -> list[planning.Region]:
    """The regions of a leaf to read: those this process's devices hold (the whole leaf for a
    numpy target; a target's own ``regions`` where it names them), distinct and sorted."""
    shape = record.data_shape
    if target.regions is not None:
        return sorted(set(target.regions))
    if target.sharding is None:
        return [tuple((0, n) for n in shape)]
    index_map = data_sharding(record, target.sharding).addressable_devices_indices_map(shape)
    return sorted({planning.normalize_index(x, shape) for x in index_map.values() if x is not None})


def _opened(future: Any, record: fmt.LeafRecord, where: str) -> ts.TensorStore:
    try:
        return future.result()
    except Exception as e:
        raise CorruptCheckpointError(f"{where}: leaf {record.key!r}: cannot open its array: {e}") from e


def read_leaves(
    loc: paths.Location,
    records: Sequence[fmt.LeafRecord],
    targets: Sequence[Target],
    window: int = READ_WINDOW_BYTES,
    packs: PackFiles | None = None,
    *,
    open_unchecked: Opener | None = None,
) -> list[Any]:
    """Reads array leaves onto their targets, a bounded number of bytes in flight.

    ``packs`` shares pack files already read between calls on the same item directory.
    ``open_unchecked`` opens the arrays of a format that records no chunk checksums (an orbax
    checkpoint): their reads are not checked.
    """
    kvstore = paths.kvstore_spec(loc)
    packs = PackFiles(loc) if packs is None else packs
    direct = [open_unchecked is None and direct_reads.applies(loc, r) for r in records]
    opened = [
        None if r.pack or d else _open_array(kvstore, r, loc.url, open_unchecked)
        for r, d in zip(records, direct, strict=True)
    ]
    out: list[Any] = [None] * len(records)
    inflight: collections.deque[tuple[int, LeafRead | DirectRead]] = collections.deque()
    pending = 0

    def drain_one() -> None:
        nonlocal pending
        i, read = inflight.popleft()
        out[i] = finish_leaf(records[i], targets[i], read.result())
        pending -= read.nbytes

    try:
        for i, (record, target) in enumerate(zip(records, targets, strict=True)):
            regions = regions_of(record, target)
            read: LeafRead | DirectRead
            if direct[i]:
                read = DirectRead(loc, record, regions, loc.url)
            else:
                source = packs if opened[i] is None else _opened(opened[i], record, loc.url)
                checked, timeout = open_unchecked is None, loc.options.op_timeout_s
                read = LeafRead(source, record, regions, loc.url, checksums=checked, timeout=timeout)
            inflight.append((i, read))
            pending += read.nbytes
            while pending > window and len(inflight) > 1:
                drain_one()
        while inflight:
            drain_one()
    except BaseException:  # no read outlives a failed restore
        for _, read in inflight:
            read.cancel()
        for future in opened:
            settle(future)
        packs.cancel()
        raise
    return out
