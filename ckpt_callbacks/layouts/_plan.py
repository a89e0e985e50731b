"""Objects and bytes a save writes per process, on paper: no devices, no storage (pure).

``plan_layout`` runs the save's own planner (``planning.plan_array``, ``pack_layout``) over
abstract leaves (shape, dtype, partition spec), a mesh given by axis sizes and a process
count, with devices numbered in mesh order and process ``p`` holding devices
``[p * k, (p + 1) * k)`` (as ``jax.devices()`` reshaped into a mesh gives them).

>>> leaves = [LeafShape(path="w", shape=(8, 4), dtype="float32", spec=("x",))]
>>> zarr = plan_layout(leaves, {"x": 4}, processes=2, layout="zarr3", pack_bytes=0)
>>> zarr.objects, zarr.chunks  # 2 chunks each, plus 2 zarr.json, manifest, metadata, marker on 0
((7, 2), 4)
>>> plan_layout(leaves, {"x": 4}, processes=2, layout="process").objects  # a data file and an index each
(5, 2)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import typing
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from ckpt_callbacks import format as fmt
from ckpt_callbacks import format as pidx
from ckpt_callbacks import format as planning
from ckpt_callbacks.format import MAX_DEPTH, MAX_DIM, MAX_LEAF_BYTES, show
from ckpt_callbacks.layouts import _process_files as process_files
from ckpt_callbacks.layouts._base import kinds, layout_for

Spec = tuple[Any, ...]  # per dim: None, a mesh axis name, or a tuple of names

# Bounds of what is planned on paper (the work grows with each): a leaf as the format bounds it,
# and a plan's steps: one per chunk of each leaf, plus _PLAN_COST per chunk and one per device of
# each distinct leaf plan (the planner's, cached by shape, dtype, spec and a replicated leaf's
# position). Llama-3-70B + Adam on 8,192 devices: 18.5 M steps, 2 minutes; a 1 PiB leaf: 25 M.
MAX_PATH = 4096
MAX_LEAVES = 1 << 17
MAX_DEVICES = 1 << 17
MAX_MESH_AXES = 16
MAX_PLAN_WORK = 20_000_000
_PLAN_COST = 5


def _names(entry: Any) -> tuple[Any, ...] | None:
    """The mesh axes of one spec entry, or None if it is not None, a name or a tuple of names."""
    names = () if entry is None else (entry,) if isinstance(entry, str) else entry
    return names if isinstance(names, tuple) and all(isinstance(n, str) for n in names) else None


@dataclasses.dataclass(frozen=True, kw_only=True)
class LeafShape:
    """An abstract leaf: '/'-joined key path, shape, dtype name, partition spec (``ValueError``
    past the format's bounds: dims in [0, 2**62], 100 dims, 2**50 bytes, its dtypes)."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    spec: Spec = ()

    def __post_init__(self) -> None:
        path = self.path
        if not isinstance(path, str) or len(path) > MAX_PATH or path.count("/") >= MAX_DEPTH:
            raise ValueError(f"leaf path {show(path)}: expected a string of at most {MAX_PATH} chars, {MAX_DEPTH} keys")
        where, shape = f"leaf {show(path)}", self.shape
        dims = isinstance(shape, tuple) and all(isinstance(n, int) and not isinstance(n, bool) for n in shape)
        if not dims or len(shape) > MAX_DEPTH or not all(0 <= n <= MAX_DIM for n in shape):
            raise ValueError(
                f"{where}: shape {show(shape)}; expected a tuple of at most {MAX_DEPTH} ints, each in [0, 2**62]"
            )
        if not isinstance(self.dtype, str) or self.dtype not in fmt.NUMERIC_DTYPES:
            raise ValueError(f"{where}: dtype {show(self.dtype)}; expected one of {sorted(fmt.NUMERIC_DTYPES)}")
        nbytes = math.prod(shape) * fmt.dtype_from_name(self.dtype).itemsize
        if nbytes > MAX_LEAF_BYTES:
            raise ValueError(
                f"{where}: shape {show(list(shape))} {self.dtype} is more than 2**50 bytes ({MAX_LEAF_BYTES:,}), "
                "the format's bound on a leaf"
            )
        spec = self.spec
        entries = [_names(e) for e in spec] if isinstance(spec, tuple) else [None]
        named = [n for names in entries for n in names or ()]
        if None in entries or len(spec) > len(shape) or len(named) != len(set(named)):
            raise ValueError(
                f"{where}: spec {show(spec)}; expected a tuple of at most {len(shape)} entries (one per dim), each "
                "None, a mesh axis name or a tuple of names, no axis named twice"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayoutCounts:
    """What one save writes, per process (process 0 also writes the JSON files)."""

    layout: str
    objects: tuple[int, ...]
    bytes: tuple[int, ...]
    index_bytes: tuple[int, ...]
    manifest_bytes: int  # an upper bound in the zarr3 layout (every crc32c taken as 10 digits)
    chunks: int

    @property
    def total_objects(self) -> int:
        return sum(self.objects)

    def summary(self) -> dict[str, Any]:
        def spread(values: Sequence[int]) -> dict[str, float]:
            return {"min": min(values), "median": statistics.median(values), "max": max(values)}

        return {
            "layout": self.layout,
            "processes": len(self.objects),
            "objects": self.total_objects,
            "chunks": self.chunks,
            "objects_per_process": spread(self.objects),
            "bytes_per_process": spread(self.bytes),
            "manifest_bytes": self.manifest_bytes,
            "index_bytes_per_process": spread(self.index_bytes),
        }


def _parts(entry: Any, axes: Mapping[str, int]) -> tuple[str, ...]:
    names = _names(entry) or ()
    unknown = [n for n in names if n not in axes]
    if unknown:
        raise ValueError(f"partition spec names mesh axes {unknown}; the mesh has {sorted(axes)}")
    return names


@functools.lru_cache(maxsize=256)
def _index_map(shape: tuple[int, ...], spec: Spec, axes: tuple[tuple[str, int], ...]) -> dict[int, planning.Region]:
    """Device id -> the region it holds, devices numbered in C order of the mesh."""
    sizes = dict(axes)
    names = [n for n, _ in axes]
    coords = np.indices([s for _, s in axes]).reshape(len(axes), -1)
    bounds = []
    for dim, n in enumerate(shape):
        used = _parts(spec[dim] if dim < len(spec) else None, sizes)
        count = math.prod(sizes[a] for a in used)  # dividing n: checked by _check_work
        index = np.zeros(coords.shape[1], np.int64)
        for a in used:
            index = index * sizes[a] + coords[names.index(a)]
        step = n // count
        bounds.append((index * step, index * step + step))
    return {d: tuple((int(lo[d]), int(hi[d])) for lo, hi in bounds) for d in range(coords.shape[1])}


@dataclasses.dataclass(frozen=True)
class _LeafPlan:
    grid: tuple[int, ...]  # chunk shape
    units: tuple[tuple[int, int, str], ...]  # (owner, bytes, chunk key)
    writers: tuple[tuple[int, ...], ...]
    crc_json: int


def _owners(leaf: LeafShape, i: int, axes: tuple[tuple[str, int], ...], per: int, max_chunk: int) -> _LeafPlan:
    used = [_parts(e, dict(axes)) for e in leaf.spec]
    replicas = math.prod(dict(axes).values()) // math.prod(dict(axes)[a] for names in used for a in names)
    # Only replicated leaves depend on their position (which replica writes rotates with it).
    return _leaf_plan(
        tuple(leaf.shape), leaf.dtype, tuple(leaf.spec), axes=axes, per=per, max_chunk=max_chunk, i=i % replicas
    )


@functools.lru_cache(maxsize=4096)
def _leaf_plan(
    shape: tuple[int, ...],
    dtype: str,
    spec: Spec,
    *,
    axes: tuple[tuple[str, int], ...],
    per: int,
    max_chunk: int,
    i: int,
) -> _LeafPlan:
    itemsize = fmt.dtype_from_name(dtype).itemsize
    index_map = typing.cast(dict[Hashable, planning.Region], _index_map(shape, spec, axes))
    plan = planning.plan_array(shape, itemsize, index_map, leaf_index=i, max_chunk_bytes=max_chunk)
    units = tuple(
        (typing.cast(int, u.device) // per, math.prod(u.shape) * itemsize, fmt.chunk_key(u.chunk)) for u in plan.units
    )
    grid = tuple(-(-n // c) for n, c in zip(shape, plan.chunks, strict=True))
    strides = [math.prod(grid[d + 1 :]) for d in range(len(grid))]  # C order, as process_files.linear
    owners = [0] * len(units)
    for unit, (owner, _, _) in zip(plan.units, units, strict=True):
        owners[sum(i * s for i, s in zip(unit.chunk, strides, strict=True))] = owner
    writers = tuple(tuple(b) for b in pidx.encode_writers(owners))
    return _LeafPlan(plan.chunks, units, writers, _crc_json_bytes([key for *_, key in units]))


def _crc_json_bytes(keys: Sequence[str]) -> int:
    """What a crc32c dict of these keys adds to a record in the manifest (10-digit values)."""
    if not keys:
        return 0
    return sum(4 + len(k) + 2 + 2 + 10 for k in keys) + 2 * (len(keys) - 1) + 1 + 1 + 3 + 1 - 2


def _json_files(records: list[fmt.LeafRecord], leaves: Sequence[LeafShape], layout: dict[str, Any] | None) -> int:
    tree: dict[str, Any] = {}
    for leaf in leaves:
        *parents, name = leaf.path.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = 0
    structure, _ = fmt.flatten(tree)
    manifest = fmt.Manifest(tree=structure, leaves=tuple(records), layout=layout)
    metadata = fmt.Metadata(step=10**9, timestamp=1.0e9)
    marker = fmt.Commit(checksums={"metadata.json": 2**32 - 1, "state/manifest.json": 2**32 - 1})
    return sum(len(fmt.dumps(x.to_json())) for x in (manifest, metadata, marker))


def plan_layout(
    leaves: Sequence[LeafShape],
    mesh: Mapping[str, int],
    processes: int,
    *,
    layout: str = "zarr3",
    pack_bytes: int = planning.PACK_MAX_LEAF_BYTES,
    max_chunk_bytes: int = planning.DEFAULT_MAX_CHUNK_BYTES,
    file_bytes: int = process_files.FILE_BYTES,
) -> LayoutCounts:
    """Objects and bytes each process writes when one item of ``leaves`` is saved.

    Args:
      leaves: the tree's array leaves (scalars write no object).
      mesh: axis name -> size, in mesh order.
      processes: how many processes share the mesh's devices (equally).
      layout: ``"zarr3"`` or ``"process"`` (``SaveOptions.layout``).
      pack_bytes, max_chunk_bytes, file_bytes: as the save's (``SaveOptions``, ``process_files``).
    """
    devices = _check_setup(mesh, processes, layout, {"file_bytes": file_bytes, "max_chunk_bytes": max_chunk_bytes})
    spec = layout_for(layout)
    _check_work(leaves, dict(mesh), max_chunk_bytes)
    tally = _Tally([0] * processes, [0] * processes)
    every = spec.file_bytes(None) is not None  # every array leaf in this process's data files
    small = 0 if every else min(pack_bytes, planning.PACK_MAX_FILE_BYTES, max_chunk_bytes)
    _tally_leaves(tally, leaves, dict(mesh), devices // processes, max_chunk_bytes, every=every, small=small)
    cap = file_bytes if every else min(planning.PACK_MAX_FILE_BYTES, max_chunk_bytes)
    index, json_layout = _place_packed(tally, spec, cap)
    json_bytes = _json_files(tally.records, leaves, json_layout) + tally.crc_bytes
    tally.objects[0] += 3 if every else 4  # manifest, metadata, marker; a zarr3 item's group zarr.json
    tally.nbytes[0] += json_bytes
    return LayoutCounts(
        layout=layout,
        objects=tuple(tally.objects),
        bytes=tuple(tally.nbytes),
        index_bytes=tuple(index),
        manifest_bytes=json_bytes,
        chunks=tally.chunks,
    )


@dataclasses.dataclass
class _Tally:
    """What ``plan_layout`` has counted so far, per process and in all."""

    objects: list[int]
    nbytes: list[int]
    packed: list[tuple[fmt.LeafRecord, str, int, int]] = dataclasses.field(
        default_factory=list
    )  # record, key, owner, bytes
    records: list[fmt.LeafRecord] = dataclasses.field(default_factory=list)
    chunks: int = 0
    crc_bytes: int = 0


def _tally_leaves(
    tally: _Tally,
    leaves: Sequence[LeafShape],
    mesh: dict[str, int],
    per: int,
    max_chunk_bytes: int,
    *,
    every: bool,
    small: int,
) -> None:
    """Each leaf's chunks to their owners: packed (every leaf when ``every``, else those of at most
    ``small`` bytes) or as a zarr3 array (its zarr.json on process 0, one object per chunk)."""
    axes = tuple(mesh.items())
    for i, leaf in enumerate(leaves):
        planned = _owners(leaf, i, axes, per, max_chunk_bytes)
        units = planned.units
        size = math.prod(leaf.shape) * fmt.dtype_from_name(leaf.dtype).itemsize
        tally.chunks += len(units)
        for owner, unit_bytes, _ in units:
            tally.nbytes[owner] += unit_bytes
        per_process = every and bool(units)
        record = _record(leaf, planned.grid, planned.writers if per_process else (), mesh)
        tally.records.append(record)
        if per_process or (units and size <= small):
            tally.packed += [(record, key, owner, b) for owner, b, key in units]
            continue
        tally.objects[0] += 1  # zarr.json
        for owner, _, _ in units:
            tally.objects[owner] += 1
        tally.crc_bytes += planned.crc_json


def _place_packed(tally: _Tally, spec: Any, cap: int) -> tuple[list[int], dict[str, Any] | None]:
    """The packed chunks into files of at most ``cap`` bytes, and the layout's index files:
    (index bytes per process, the manifest's ``layout`` record or None)."""
    processes = len(tally.objects)
    places = planning.pack_layout([(owner, b) for _, _, owner, b in tally.packed], cap)
    for name in {name for name, _ in places}:
        tally.objects[process_files._process_of(name)] += 1
    counts = [0] * processes
    for _, _, owner, _ in tally.packed:
        counts[owner] += 1
    sizes = spec.index_sizes(counts)
    if sizes is None:  # every chunk's file, offset and crc32c in the manifest
        for (record, key, _, _), where in zip(tally.packed, places, strict=True):
            record.pack[key], record.crc32c[key] = where, 2**32 - 1
        return [0] * processes, None
    # an index file per process, and the manifest's record of them
    tally.objects[:] = [o + 1 for o in tally.objects]
    tally.nbytes[:] = [b + s for b, s in zip(tally.nbytes, sizes, strict=True)]
    return sizes, {"kind": spec.kind, "processes": processes, "indexes": [[s, 2**32 - 1, 9] for s in sizes]}


def _check_setup(mesh: Mapping[str, int], processes: int, layout: str, sizes: dict[str, int]) -> int:
    """The device count of ``mesh``, once mesh, processes, layout and byte sizes are checked."""
    sizes_ok = all(type(v) is int and v > 0 for v in mesh.values())
    if not all(isinstance(k, str) for k in mesh) or not sizes_ok or not 1 <= len(mesh) <= MAX_MESH_AXES:
        raise ValueError(f"mesh {show(dict(mesh))}: expected 1 to {MAX_MESH_AXES} axes, name -> positive int")
    devices = math.prod(mesh.values())
    if devices > MAX_DEVICES:
        raise ValueError(f"mesh {dict(mesh)} has {devices:,} devices; plan_layout plans at most {MAX_DEVICES:,}")
    if layout not in kinds() or type(processes) is not int or processes < 1 or devices % processes:
        raise ValueError(
            f"layout {layout!r}, {processes} processes, {devices} devices: expected one of "
            f"{kinds()} and a process count dividing the device count"
        )
    for name, value in sizes.items():
        if type(value) is not int or value < 1:
            raise ValueError(f"{name} {value!r}: expected a positive byte count")
    return devices


def _units(leaf: LeafShape, sizes: dict[str, int], max_chunk_bytes: int) -> tuple[int, int]:
    """(chunks, replicas) of the planner's plan of ``leaf``, from its chunk shape (none listed)."""
    counts = [math.prod(sizes[a] for a in _parts(e, sizes)) for e in leaf.spec] + [1] * len(leaf.shape)
    for dim, (n, count) in enumerate(zip(leaf.shape, counts, strict=False)):
        if n % count:
            raise ValueError(f"leaf {leaf.path!r}: dim {dim} of shape {leaf.shape} is not divisible by {count}")
    replicas = math.prod(sizes.values()) // math.prod(counts)
    shard = tuple(n // count for n, count in zip(leaf.shape, counts, strict=False))
    itemsize = fmt.dtype_from_name(leaf.dtype).itemsize
    chunk = planning._chunk_shape(shard, itemsize, replicas, max_chunk_bytes)
    units = math.prod(count * -(-n // c) for count, n, c in zip(counts, shard, chunk, strict=False))
    return (units if math.prod(leaf.shape) else 0), replicas


def _check_work(leaves: Sequence[LeafShape], sizes: dict[str, int], max_chunk_bytes: int) -> None:
    """Refuses a tree whose plan takes more than ``MAX_PLAN_WORK`` before planning any of it."""
    if len(leaves) > MAX_LEAVES or not all(isinstance(leaf, LeafShape) for leaf in leaves):
        raise ValueError(f"{len(leaves):,} leaves: expected at most {MAX_LEAVES:,} LeafShape records")
    seen = {leaf.path for leaf in leaves}
    if len(seen) != len(leaves):
        raise ValueError(f"{len(leaves) - len(seen)} leaf paths appear twice; expected one leaf per path")
    work, devices, planned = 0, math.prod(sizes.values()), set()
    for i, leaf in enumerate(leaves):
        parts = leaf.path.split("/")
        parent = next((p for k in range(1, len(parts)) if (p := "/".join(parts[:k])) in seen), None)
        if parent is not None:
            raise ValueError(f"leaf {parent!r} is also the parent of leaf {leaf.path!r}; a leaf has no children")
        units, replicas = _units(leaf, sizes, max_chunk_bytes)
        key = (leaf.shape, leaf.dtype, leaf.spec, i % replicas)  # as _leaf_plan's cache: planned once
        work += units + (0 if key in planned else _PLAN_COST * units + devices)
        planned.add(key)
        if work > MAX_PLAN_WORK:  # checked as it grows: this pass is bounded too
            raise ValueError(
                f"leaf {leaf.path!r} ({units:,} chunks, {i + 1} of {len(leaves):,} leaves) takes the plan past "
                f"{MAX_PLAN_WORK:,} steps (a chunk of each leaf, {_PLAN_COST} more per chunk and one per device "
                "of each distinct leaf plan), the most plan_layout plans"
            )


def _record(
    leaf: LeafShape, chunks: tuple[int, ...], writers: tuple[tuple[int, ...], ...], mesh: dict[str, int]
) -> fmt.LeafRecord:
    path = tuple(leaf.path.split("/"))
    spec = leaf.spec + (None,) * (len(leaf.shape) - len(leaf.spec))
    return fmt.LeafRecord(
        path=path,
        kind="array",
        source="jax",
        shape=tuple(leaf.shape),
        dtype=leaf.dtype,
        stored_dtype=leaf.dtype,
        zarr_dtype=leaf.dtype,
        partition_spec=spec,
        mesh={"axis_names": list(mesh), "axis_sizes": list(mesh.values())},
        array=fmt.leaf_dir(path),
        chunks=chunks,
        writers=writers,
    )
