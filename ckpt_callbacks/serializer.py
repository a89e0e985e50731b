"""Save a pytree: snapshot this process's shards, stream them to TensorStore, then commit.

>>> import jax.numpy as jnp
>>> save("memory://doc/serializer", {"w": jnp.arange(3.0)}, step=1)
>>> handle = save_async("memory://doc/serializer-async", {"w": jnp.ones(2)})
>>> handle.wait().bytes_written
8

``save_async`` returns once the snapshot no longer depends on the caller's buffers (they may
be deleted or donated right away); the write, checksums and commit run in a background
thread, and ``SaveHandle.wait()`` re-raises anything that failed there.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
import threading
import time
import typing
import uuid
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import tensorstore as ts

from ckpt_callbacks import distributed, paths, planning
from ckpt_callbacks import format as fmt
from ckpt_callbacks.errors import CheckpointExistsError

__all__ = ["SaveHandle", "SaveStats", "read_commit", "save", "save_async"]

log = logging.getLogger("ckpt_callbacks")

# Bytes of writes in flight at once (bounds host staging when shards live on an accelerator).
DEFAULT_WINDOW_BYTES = 512 << 20
_SAVE_COUNTER = itertools.count()


@dataclasses.dataclass(frozen=True, kw_only=True)
class SaveStats:
    """Telemetry of one save, as seen by this process."""

    path: str
    bytes_written: int
    blocking_s: float
    write_s: float

    @property
    def total_s(self) -> float:
        return self.blocking_s + self.write_s

    @property
    def gb_per_s(self) -> float:
        return self.bytes_written / 1e9 / self.total_s if self.total_s > 0 else 0.0


class SaveHandle:
    """A save in flight: ``wait()`` blocks until it is committed and re-raises failures."""

    def __init__(self, path: str, blocking_s: float) -> None:
        self.path = path
        self.blocking_s = blocking_s
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._stats: SaveStats | None = None
        self._thread: threading.Thread | None = None

    def _run(self, work: Any) -> None:
        start = time.perf_counter()
        try:
            nbytes = work()
            self._stats = SaveStats(
                path=self.path, bytes_written=nbytes, blocking_s=self.blocking_s, write_s=time.perf_counter() - start
            )
            log.info(
                "saved %s: %.3f GB, blocked %.3fs, total %.2fs (%.2f GB/s)",
                self.path,
                nbytes / 1e9,
                self._stats.blocking_s,
                self._stats.total_s,
                self._stats.gb_per_s,
            )
        except BaseException as e:  # re-raised by wait(); logged so an unwaited failure is seen
            self._error = e
            log.error("save to %s failed: %s: %s", self.path, type(e).__name__, e)
        finally:
            self._done.set()

    def _start(self, work: Any) -> None:
        # Not a daemon: an interpreter exiting mid-save finishes the save rather than dropping it.
        self._thread = threading.Thread(target=self._run, args=(work,), name="ckpt-save")
        self._thread.start()

    def done(self) -> bool:
        """Whether the save has finished (committed or failed)."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> SaveStats:
        """Blocks until committed; raises what failed, or TimeoutError after ``timeout`` seconds."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"save to {self.path} still running after {timeout}s")
        if self._error is not None:
            raise self._error
        assert self._stats is not None
        return self._stats

    @property
    def stats(self) -> SaveStats | None:
        """Telemetry once committed, else None."""
        return self._stats


@dataclasses.dataclass
class _Leaf:
    record: fmt.LeafRecord
    source: Any = None  # jax.Array (key data or cast copy included) or np.ndarray
    private: bool = False  # the source is our own copy (a cast), no snapshot copy needed
    units: list[planning.WriteUnit] = dataclasses.field(default_factory=list)


def _zarr_dtype(dtype: np.dtype) -> str:
    try:
        ts.dtype(dtype.name)
        return dtype.name
    except (TypeError, ValueError):  # an ml_dtype TensorStore lacks: store its bits
        return f"uint{dtype.itemsize * 8}"


def _storable(dtype: np.dtype) -> bool:
    if dtype.kind == "V":  # ml_dtypes (bfloat16, float8_*, int4) are 'V'; plain void/structured are not
        return dtype.fields is None and dtype.type.__module__.startswith("ml_dtypes")
    return dtype.kind in "biufc"


def _spec_json(sharding: Any, ndim: int) -> tuple[tuple[Any, ...] | None, dict[str, Any] | None]:
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None, None
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    mesh = sharding.mesh
    return spec[:ndim], {"axis_names": list(mesh.axis_names), "axis_sizes": list(mesh.devices.shape)}


def _describe(path: fmt.KeyPath, value: Any, cast: Any) -> _Leaf:
    """The record of one leaf and the array to write from (chunks filled in by the planner)."""
    where = fmt.key_string(path) or "<root>"
    if value is None or isinstance(value, bool | int | float | str):
        encoded, value_type = fmt.encode_scalar(value)
        return _Leaf(fmt.LeafRecord(path=path, kind="scalar", value=encoded, value_type=value_type))
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if isinstance(value, jax.Array):
        kind, key_impl = "array", ""
        key_tail: tuple[int, ...] = ()
        spec, mesh = _spec_json(value.sharding, value.ndim)
        dtype = value.dtype
        source, private = value, False
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            kind, key_impl = "prng_key", str(jax.random.key_impl(value))
            source = jax.random.key_data(value)
            key_tail = source.shape[value.ndim :]
        elif cast is not None and jax.numpy.issubdtype(dtype, jax.numpy.floating) and dtype != cast:
            source, private = value.astype(cast), True
        stored = np.dtype(source.dtype)
        record = fmt.LeafRecord(
            path=path,
            kind=kind,
            source="jax",
            shape=tuple(value.shape),
            dtype=fmt.dtype_name(dtype) if kind == "array" else str(dtype),
            stored_dtype=stored.name,
            zarr_dtype=_zarr_dtype(stored),
            key_impl=key_impl,
            key_tail=tuple(key_tail),
            partition_spec=spec,
            mesh=mesh,
        )
        return _Leaf(record, source, private)
    if isinstance(value, np.ndarray):
        if not _storable(value.dtype):
            raise TypeError(
                f"leaf {where!r}: numpy dtype {value.dtype} cannot be saved; "
                "expected a numeric, bool or ml_dtypes array"
            )
        host_source = value
        if cast is not None and np.issubdtype(value.dtype, np.floating) and value.dtype != cast:
            host_source = value.astype(cast)
        stored = np.dtype(host_source.dtype)
        record = fmt.LeafRecord(
            path=path,
            kind="array",
            source="numpy",
            shape=value.shape,
            dtype=fmt.dtype_name(value.dtype),
            stored_dtype=stored.name,
            zarr_dtype=_zarr_dtype(stored),
        )
        return _Leaf(record, host_source, private=host_source is not value)
    raise TypeError(
        f"leaf {where!r}: cannot save {type(value).__name__}; expected jax.Array, numpy "
        "array, typed PRNG key, int, float, bool, str or None"
    )


def _plan(leaves: list[_Leaf], max_chunk_bytes: int) -> None:
    """Fills each leaf's chunk grid and this process's write units (same plan on every process)."""
    me, nproc = distributed.process_index(), distributed.process_count()
    for index, leaf in enumerate(leaves):
        record = leaf.record
        if record.kind == "scalar":
            continue
        shape = record.data_shape
        itemsize = fmt.dtype_from_name(record.zarr_dtype).itemsize
        if record.source == "jax":
            raw = leaf.source.sharding.devices_indices_map(shape)
            index_map = {d: planning.normalize_index(raw[d], shape) for d in sorted(raw, key=lambda d: d.id)}
            plan = planning.plan_array(shape, itemsize, index_map, leaf_index=index, max_chunk_bytes=max_chunk_bytes)
            units = [u for u in plan.units if typing.cast(jax.Device, u.device).process_index == me]
        else:  # numpy leaves are host values, identical on every process: one process writes each
            full = tuple((0, n) for n in shape)
            plan = planning.plan_array(shape, itemsize, {"host": full}, leaf_index=0, max_chunk_bytes=max_chunk_bytes)
            units = list(plan.units) if index % nproc == me else []
        leaf.record = dataclasses.replace(record, chunks=plan.chunks)
        leaf.units = units


def _check_dirs(leaves: list[_Leaf]) -> None:
    seen: dict[str, str] = {}
    for leaf in leaves:
        if leaf.record.kind == "scalar":
            continue
        other = seen.setdefault(leaf.record.array, leaf.record.key)
        if other != leaf.record.key:
            raise ValueError(
                f"leaves {other!r} and {leaf.record.key!r} map to one directory "
                f"{leaf.record.array!r}; rename one of the keys"
            )


def _slices(region: planning.Region) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in region)


def _unit_bytes(leaf: _Leaf, unit: planning.WriteUnit) -> int:
    return math.prod(unit.shape) * fmt.dtype_from_name(leaf.record.zarr_dtype).itemsize


def _host_resident() -> bool:
    return all(d.platform == "cpu" for d in jax.local_devices())


class _Snapshot:
    """Private copies of one batch of units, independent of the caller's buffers.

    A shard is copied once on its device (``device_put`` with ``may_alias=False``: asynchronous,
    and on an accelerator it stays in device memory) and its units are cut from that copy on
    the host later. Only where this process writes part of a replicated shard held in host
    memory is exactly that part copied on the host instead, so the copy never exceeds what
    the process writes.
    """

    def __init__(self, batch: list[tuple[_Leaf, planning.WriteUnit]], staging: np.ndarray | None = None) -> None:
        self.batch = batch
        self.copies: dict[int, Any] = {}
        if staging is not None:
            self._stage(staging)
            return
        groups: dict[tuple[int, tuple[int, ...]], list[int]] = collections.defaultdict(list)
        for n, (leaf, unit) in enumerate(batch):
            if leaf.record.source == "numpy":
                self.copies[n] = np.array(leaf.source[_slices(unit.local)])
            else:
                origin = tuple(a - la for (a, _), (la, _) in zip(unit.region, unit.local, strict=True))
                groups[(id(leaf), origin)].append(n)
        host = _host_resident()
        to_copy: list[tuple[list[int], Any]] = []
        for members in groups.values():
            leaf, unit = batch[members[0]]
            shard = next(s.data for s in leaf.source.addressable_shards if s.device == unit.device)
            covered = sum(math.prod(batch[n][1].shape) for n in members) == math.prod(shard.shape)
            if covered and leaf.private:
                self.copies.update((n, shard) for n in members)
            elif covered or not host:
                to_copy.append((members, shard))
            else:
                for n in members:
                    self.copies[n] = np.array(np.asarray(shard)[_slices(batch[n][1].local)])
        if to_copy:
            copied = jax.device_put(
                [shard for _, shard in to_copy], [shard.sharding for _, shard in to_copy], may_alias=False
            )
            for (members, _), copy in zip(to_copy, copied, strict=True):
                self.copies.update((n, copy) for n in members)

    def _stage(self, staging: np.ndarray) -> None:
        """Copies every unit into one reused host buffer (no allocator churn between batches)."""
        offset = 0
        for n, (leaf, unit) in enumerate(self.batch):
            if leaf.record.source == "numpy":
                source = leaf.source[_slices(unit.local)]
            else:
                shard = next(s.data for s in leaf.source.addressable_shards if s.device == unit.device)
                source = np.asarray(shard)[_slices(unit.local)]
            size = source.nbytes
            view = staging[offset : offset + size].view(source.dtype).reshape(source.shape)
            np.copyto(view, source)
            self.copies[n] = view
            offset += -(-size // 64) * 64  # keep every unit 64-byte aligned

    def host_array(self, n: int) -> np.ndarray:
        """Unit ``n`` as a C-contiguous host array (device-to-host copy if needed)."""
        _, unit = self.batch[n]
        host = np.asarray(self.copies.pop(n))
        if tuple(host.shape) != unit.shape:
            host = host[_slices(unit.local)]
        return host if host.flags.c_contiguous else host.copy(order="C")


class _Writer:
    """Streams snapshots to TensorStore with a bounded number of bytes in flight."""

    def __init__(self, item_kvstores: dict[str, dict[str, Any]], window: int) -> None:
        self.item_kvstores = item_kvstores
        self.window = window
        self.arrays: dict[int, ts.TensorStore] = {}
        self.crcs: dict[str, dict[int, dict[str, int]]] = collections.defaultdict(dict)
        self.nbytes = 0
        # TensorStore may reference written data without copying it. Storage drivers drop the
        # reference once the write commits, and a reused staging buffer is only refilled after
        # every commit of its batch. The memory:// store keeps references for good and drops
        # them (taking the GIL) under its own lock, which deadlocks against a thread holding
        # the GIL in a memory-store call; so memory:// always gets copies.
        self.in_memory = any(spec["driver"] == "memory" for spec in item_kvstores.values())

    def _array(self, item: str, leaf: _Leaf) -> ts.TensorStore:
        key = id(leaf)
        if key not in self.arrays:
            spec = fmt.zarr_spec(self.item_kvstores[item], leaf.record)
            # Metadata (zarr.json) is written once by process 0 at commit, so writers never race.
            self.arrays[key] = ts.open(spec, open=True, assume_metadata=True, context=paths.context()).result()
        return self.arrays[key]

    def write(self, item_of: dict[int, tuple[str, int]], snapshot: _Snapshot) -> None:
        inflight: collections.deque[tuple[Any, int]] = collections.deque()
        pending = 0
        for n, (leaf, unit) in enumerate(snapshot.batch):
            item, leaf_index = item_of[id(leaf)]
            host = snapshot.host_array(n)
            if leaf.record.zarr_dtype != host.dtype.name:
                host = host.view(fmt.dtype_from_name(leaf.record.zarr_dtype))
            self.crcs[item].setdefault(leaf_index, {})[fmt.chunk_key(unit.chunk)] = fmt.crc32c_of(host)
            array = self._array(item, leaf)[_slices(unit.region)]
            future = array.write(host, can_reference_source_data_indefinitely=not self.in_memory)
            inflight.append((future, host.nbytes))
            pending += host.nbytes
            self.nbytes += host.nbytes
            while pending > self.window and inflight:
                done, size = inflight.popleft()
                done.commit.result()
                pending -= size
        for future, _ in inflight:
            future.commit.result()


def read_commit(loc: paths.Location) -> fmt.Commit | None:
    """The commit marker of the checkpoint at ``loc``, or None if it is not committed."""
    raw = paths.read_bytes(loc, fmt.COMMIT_MARKER)
    if raw is None:
        return None
    where = loc.join(fmt.COMMIT_MARKER).url
    return fmt.Commit.from_json(fmt.loads(raw, where), where)


def _choose_layout(loc: paths.Location, items: list[str], overwrite: bool, tag: str) -> fmt.Commit:
    """Names for this save: plain ones in a fresh directory, suffixed ones beside anything old."""
    decision = None
    if distributed.is_primary():
        committed = read_commit(loc) is not None
        decision = {"committed": committed, "occupied": committed or paths.has_any(loc), "nonce": uuid.uuid4().hex[:8]}
    decision = distributed.broadcast_json(f"{tag}/layout", decision)
    if decision["committed"] and not overwrite:
        raise CheckpointExistsError(
            f"{loc.url} already holds a committed checkpoint; pass overwrite=True "
            "to replace it (the old one stays valid until the new one commits)"
        )
    if not decision["occupied"]:
        return fmt.Commit(metadata="metadata.json", items={item: item for item in items})
    nonce = decision["nonce"]
    return fmt.Commit(metadata=f"metadata.{nonce}.json", items={item: f"{item}.{nonce}" for item in items})


def _commit(
    loc: paths.Location,
    commit: fmt.Commit,
    manifests: dict[str, fmt.Manifest],
    metadata: fmt.Metadata,
    leaves_of: dict[str, list[_Leaf]],
) -> None:
    """Process 0: array metadata, manifests, metadata.json, then the marker; then old files go."""
    futures = []
    for item, leaves in leaves_of.items():
        kvstore = paths.kvstore_spec(loc.join(commit.items[item]))
        for leaf in leaves:
            if leaf.record.kind != "scalar":
                spec = fmt.zarr_spec(kvstore, leaf.record)
                futures.append(ts.open(spec, create=True, open=True, context=paths.context()))
    for future in futures:
        future.result()
    for item, manifest in manifests.items():
        paths.write_bytes(loc.join(commit.items[item]), "manifest.json", fmt.dumps(manifest.to_json()))
    paths.write_bytes(loc, commit.metadata, fmt.dumps(metadata.to_json()))
    paths.write_bytes(loc, fmt.COMMIT_MARKER, fmt.dumps(commit.to_json()))
    keep = {fmt.COMMIT_MARKER, commit.metadata, *commit.items.values()}
    for name in paths.list_entries(loc):
        if name not in keep:
            try:
                paths.delete_entry(loc, name)
            except Exception as e:  # best effort: the new checkpoint is already committed
                log.warning("could not delete stale %s: %s", loc.join(name).url, e)


def _batches(pairs: list[tuple[_Leaf, planning.WriteUnit]], budget: int | None) -> list[list[Any]]:
    if budget is None or not _host_resident():
        return [pairs]
    out: list[list[Any]] = [[]]
    size = 0
    for leaf, unit in pairs:
        nbytes = _unit_bytes(leaf, unit)
        if out[-1] and size + nbytes > budget:
            out.append([])
            size = 0
        out[-1].append((leaf, unit))
        size += nbytes
    return out


def _start_save(
    path: Any,
    items: Mapping[str, Any],
    *,
    step: int | None,
    extras: dict[str, Any] | None,
    dtype: Any,
    overwrite: bool,
    max_host_bytes: int | None,
    is_temporary: bool,
    timeout_s: float,
) -> SaveHandle:
    start = time.perf_counter()
    loc = paths.parse(path)
    for item in items:
        if not item or not all(c.isalnum() or c in "_-" for c in item):
            raise ValueError(f"item name {item!r}: use letters, digits, '_' and '-'")
    if max_host_bytes is not None and max_host_bytes < 2:
        raise ValueError(f"max_host_bytes must be a positive byte count, got {max_host_bytes}")
    tag = f"save{next(_SAVE_COUNTER)}"
    cast = None if dtype is None else np.dtype(dtype)
    commit = _choose_layout(loc, list(items), overwrite, tag)
    max_chunk = planning.DEFAULT_MAX_CHUNK_BYTES if max_host_bytes is None else max(1, max_host_bytes // 8)
    structures, leaves_of, item_of = {}, {}, {}
    pairs: list[tuple[_Leaf, planning.WriteUnit]] = []
    for item, tree in items.items():
        structure, flat = fmt.flatten(tree)
        leaves = [_describe(p, v, cast) for p, v in flat]
        for leaf in leaves:
            leaf.record = dataclasses.replace(leaf.record, array=fmt.leaf_dir(leaf.record.path))
        _check_dirs(leaves)
        _plan(leaves, max_chunk)
        structures[item], leaves_of[item] = structure, leaves
        for index, leaf in enumerate(leaves):
            item_of[id(leaf)] = (item, index)
            pairs.extend((leaf, unit) for unit in leaf.units)
    metadata = fmt.Metadata(
        step=step, timestamp=time.time(), is_temporary=is_temporary, extras=dict(extras or {}), items=tuple(items)
    )
    # Writes in flight hold an encoded copy of their chunk: keep them to a fraction of the save
    # (or of the budget, which the snapshot batches share) so the total stays near 1x.
    total = sum(_unit_bytes(leaf, unit) for leaf, unit in pairs)
    window = min(DEFAULT_WINDOW_BYTES, max(total // 5, 1)) if max_host_bytes is None else max(1, max_host_bytes // 8)
    writer = _Writer({item: paths.kvstore_spec(loc.join(commit.items[item])) for item in items}, window)
    batches = _batches(pairs, None if max_host_bytes is None else max_host_bytes // 2)
    # With a host-memory budget smaller than the save, all but the last batch are written
    # before returning: the snapshot cannot hold more than the budget at once.
    staging = None
    if len(batches) > 1:  # one buffer, reused by every batch, instead of fresh copies per batch
        staging = np.empty(max(sum(-(-_unit_bytes(*p) // 64) * 64 for p in b) for b in batches), np.uint8)
    for batch in batches[:-1]:
        writer.write(item_of, _Snapshot(batch, staging))
    last = _Snapshot(batches[-1], staging)
    # The tree is not needed past this point; drop references so donated buffers can go.
    for leaves in leaves_of.values():
        for leaf in leaves:
            leaf.source = None

    def finish() -> int:
        writer.write(item_of, last)
        gathered = distributed.gather_json(
            f"{tag}/crc", {i: {str(k): v for k, v in c.items()} for i, c in writer.crcs.items()}, timeout_s
        )
        distributed.barrier(f"{tag}/written", timeout_s)
        if gathered is not None:
            manifests = {}
            for item, leaves in leaves_of.items():
                crcs: dict[int, dict[str, int]] = collections.defaultdict(dict)
                for per_process in gathered:
                    for index, chunk_crcs in per_process.get(item, {}).items():
                        crcs[int(index)].update(chunk_crcs)
                records = tuple(
                    dataclasses.replace(leaf.record, crc32c=dict(sorted(crcs[i].items())))
                    for i, leaf in enumerate(leaves)
                )
                manifests[item] = fmt.Manifest(tree=structures[item], leaves=records)
            _commit(loc, commit, manifests, metadata, leaves_of)
        distributed.barrier(f"{tag}/committed", timeout_s)
        return writer.nbytes

    handle = SaveHandle(loc.url, time.perf_counter() - start)
    handle._start(finish)
    return handle


def save_async(
    path: Any,
    tree: Any,
    *,
    step: int | None = None,
    extras: dict[str, Any] | None = None,
    dtype: Any = None,
    item: str = "state",
    overwrite: bool = False,
    max_host_bytes: int | None = None,
    is_temporary: bool = False,
    timeout_s: float = distributed.DEFAULT_TIMEOUT_S,
) -> SaveHandle:
    """Starts saving ``tree`` to the checkpoint directory ``path``; returns after the snapshot.

    Args:
      path: checkpoint directory URL (local path, ``file://``, ``memory://``, ``s3://``, ``gs://``).
      tree: pytree of jax arrays (any sharding), numpy arrays, typed PRNG keys, Python scalars,
        strings and None.
      step: recorded in ``metadata.json``.
      extras: JSON-serializable dict recorded in ``metadata.json``.
      dtype: floating leaves are cast to this dtype before they are stored.
      item: name of the item directory.
      overwrite: replace a committed checkpoint at ``path``; the old one stays readable until the
        new one commits. Without it a committed ``path`` raises ``CheckpointExistsError``.
      max_host_bytes: bound on host memory the save holds at once. When the shards live in host
        memory (CPU devices) and the save is larger, all but the last ``max_host_bytes`` are
        written before this returns.
      is_temporary: recorded in ``metadata.json`` (retention deletes superseded temporaries).
      timeout_s: how long a process waits for the others at the commit barrier.

    Returns:
      A ``SaveHandle``; ``wait()`` returns ``SaveStats`` once committed or raises the failure.
    """
    return _start_save(
        path,
        {item: tree},
        step=step,
        extras=extras,
        dtype=dtype,
        overwrite=overwrite,
        max_host_bytes=max_host_bytes,
        is_temporary=is_temporary,
        timeout_s=timeout_s,
    )


def save(
    path: Any,
    tree: Any,
    *,
    step: int | None = None,
    extras: dict[str, Any] | None = None,
    dtype: Any = None,
    item: str = "state",
    overwrite: bool = False,
    max_host_bytes: int | None = None,
    is_temporary: bool = False,
    timeout_s: float = distributed.DEFAULT_TIMEOUT_S,
) -> None:
    """Saves ``tree`` to ``path`` and returns once it is committed (see ``save_async``)."""
    save_async(
        path,
        tree,
        step=step,
        extras=extras,
        dtype=dtype,
        item=item,
        overwrite=overwrite,
        max_host_bytes=max_host_bytes,
        is_temporary=is_temporary,
        timeout_s=timeout_s,
    ).wait()
