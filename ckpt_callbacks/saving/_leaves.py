"""What is saved of each leaf: its manifest record, the array to write from, and its units.

``describe`` turns a leaf into a record (shape, dtypes, partition spec, mesh) and ``plan``
assigns the chunks this process writes, the same way on every process.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import typing
from typing import Any

import jax
import numpy as np
import tensorstore as ts

from ckpt_callbacks import distributed
from ckpt_callbacks import format as fmt
from ckpt_callbacks import format as planning
from ckpt_callbacks.errors import DeletedArrayError

# Plans of recently saved trees, by tree signature: a training loop saves the same structure,
# shapes and shardings every time, and planning thousands of leaves costs tens of ms.
_PLANS: collections.OrderedDict[Any, list[tuple[fmt.LeafRecord, list[planning.WriteUnit]]]] = collections.OrderedDict()
_PLANS_KEPT = 8


@dataclasses.dataclass
class Leaf:
    record: fmt.LeafRecord
    source: Any = None  # jax.Array (key data or cast copy included) or np.ndarray
    private: bool = False  # the source is our own copy (a cast), no snapshot copy needed
    units: list[planning.WriteUnit] = dataclasses.field(default_factory=list)
    item: str = ""  # the item it is saved under, and its index in that item's manifest
    index: int = 0


@functools.cache
def _zarr_dtype(dtype: np.dtype) -> str:
    try:
        ts.dtype(dtype.name)
        return dtype.name
    except (TypeError, ValueError):  # an ml_dtype TensorStore lacks: store its bits
        return f"uint{dtype.itemsize * 8}"


def _check_dtype(where: str, dtype: Any, stored: Any) -> None:
    """Refuses a leaf whose dtype (or ``dtype=`` cast) the format has no name for, before planning.

    Its allow-list, not numpy's kinds: float128 and complex256 are numeric, but no reader knows them.
    """
    for name, value in (("dtype", dtype), ("stored dtype (the dtype= cast)", stored)):
        found = np.dtype(value)
        if found.name not in fmt.NUMERIC_DTYPES:
            raise TypeError(
                f"leaf {where!r}: {name} {found} cannot be saved; expected one of {sorted(fmt.NUMERIC_DTYPES)}"
            )


def _spec_json(sharding: Any, ndim: int) -> tuple[tuple[Any, ...] | None, dict[str, Any] | None]:
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None, None
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    mesh = sharding.mesh
    return spec[:ndim], {"axis_names": list(mesh.axis_names), "axis_sizes": list(mesh.devices.shape)}


def _describe_jax(path: fmt.KeyPath, value: jax.Array, cast: Any) -> Leaf:
    kind: fmt.LeafKind = "array"
    key_impl = ""
    key_tail: tuple[int, ...] = ()
    spec, mesh = _spec_json(value.sharding, value.ndim)
    dtype = value.dtype
    source, private = value, False
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        kind, key_impl = "prng_key", str(jax.random.key_impl(value))
        source = jax.random.key_data(value)
        key_tail = source.shape[value.ndim :]
    elif cast is not None and jax.numpy.issubdtype(dtype, jax.numpy.floating) and dtype != cast:
        _check_dtype(fmt.key_string(path) or "<root>", dtype, cast)  # before the cast is computed
        source, private = value.astype(cast), True
    else:
        _check_dtype(fmt.key_string(path) or "<root>", dtype, dtype)
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
        array=fmt.leaf_dir(path),
    )
    return Leaf(record, source, private)


def describe(path: fmt.KeyPath, value: Any, cast: Any) -> Leaf:
    """The record of one leaf and the array to write from (chunks filled in by the planner)."""
    where = fmt.key_string(path) or "<root>"
    if value is None or isinstance(value, bool | int | float | str):
        encoded, value_type = fmt.encode_scalar(value)
        return Leaf(fmt.LeafRecord(path=path, kind="scalar", value=encoded, value_type=value_type))
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if isinstance(value, jax.Array):
        return _describe_jax(path, value, cast)
    if isinstance(value, np.ndarray):
        casts = cast is not None and np.issubdtype(value.dtype, np.floating) and value.dtype != cast
        _check_dtype(where, value.dtype, cast if casts else value.dtype)
        host_source = _native(value)  # stored and checksummed little-endian
        if casts:
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
            array=fmt.leaf_dir(path),
        )
        return Leaf(record, host_source, private=host_source is not value)
    raise TypeError(
        f"leaf {where!r}: cannot save {type(value).__name__}; expected jax.Array, numpy "
        "array, typed PRNG key, int, float, bool, str or None"
    )


def plan(
    leaves: list[Leaf],
    max_chunk_bytes: int,
    pack_bytes: int = planning.PACK_MAX_LEAF_BYTES,
    file_bytes: int | None = None,
) -> None:
    """Fills each leaf's chunk grid, pack layout and this process's write units.

    The plan is computed from shardings alone, so it is the same on every process. Leaves of
    at most ``pack_bytes`` are packed (see ``planning.pack_layout``); with ``file_bytes`` (the
    "process" layout) every array leaf is, into files of at most that size.
    """
    me, nproc = distributed.process_index(), distributed.process_count()
    max_file = min(planning.PACK_MAX_FILE_BYTES, max_chunk_bytes) if file_bytes is None else file_bytes
    packed: list[tuple[Leaf, planning.WriteUnit, tuple[int, int]]] = []  # (leaf, unit, (process, bytes))
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
            owners = [typing.cast(jax.Device, u.device).process_index for u in plan.units]
        else:  # numpy leaves are host values, identical on every process: one process writes each
            full = tuple((0, n) for n in shape)
            plan = planning.plan_array(shape, itemsize, {"host": full}, leaf_index=0, max_chunk_bytes=max_chunk_bytes)
            owners = [index % nproc] * len(plan.units)
        leaf.record = dataclasses.replace(record, chunks=plan.chunks)
        leaf.units = [u for u, owner in zip(plan.units, owners, strict=True) if owner == me]
        if plan.units and (file_bytes is not None or record.nbytes <= min(pack_bytes, max_file)):
            packed.extend(
                (leaf, u, (owner, math.prod(u.shape) * itemsize)) for u, owner in zip(plan.units, owners, strict=True)
            )
    layout = planning.pack_layout([size for _, _, size in packed], max_file)
    for (leaf, unit, _), where in zip(packed, layout, strict=True):
        leaf.record.pack[fmt.chunk_key(unit.chunk)] = where


def check_dirs(leaves: list[Leaf]) -> None:
    seen: dict[str, fmt.KeyPath] = {}
    for leaf in leaves:
        if leaf.record.kind == "scalar":
            continue
        other = seen.setdefault(leaf.record.array, leaf.record.path)
        if other != leaf.record.path:  # paths, not key strings: int key 1 and str key "1" differ
            raise ValueError(
                f"leaves {list(other)!r} and {list(leaf.record.path)!r} map to one directory "
                f"{leaf.record.array!r}; rename one of the keys"
            )


def _signature(path: fmt.KeyPath, value: Any) -> tuple[Any, ...]:
    """What a leaf's plan depends on (a scalar's value is described afresh on every save)."""
    if isinstance(value, jax.Array):
        return (path, "jax", value.shape, value.dtype, value.sharding)
    if isinstance(value, np.ndarray | np.generic):
        return (path, "numpy", value.shape, value.dtype)
    return (path, "scalar")


def _source(record: fmt.LeafRecord, value: Any, cast: Any) -> tuple[Any, bool]:
    """The array to write a planned leaf from, as ``describe`` derives it: (source, private)."""
    if record.kind == "prng_key":
        return jax.random.key_data(value), False
    if record.source == "numpy":
        value = np.asarray(value)
        native = _native(value)
        if native is not value and record.stored_dtype == record.dtype:
            return native, True
    if record.stored_dtype == record.dtype:
        return value, False
    return value.astype(cast), True


def _native(value: np.ndarray) -> np.ndarray:
    """``value`` in little-endian byte order, as stored (a copy only when it is not already)."""
    little = value.dtype.newbyteorder("<")
    return value if value.dtype == little else value.astype(little)


def check_live(flat: list[tuple[fmt.KeyPath, Any]]) -> None:
    """Refuses a tree holding deleted ``jax.Array`` leaves (donated to a jitted step, or
    ``.delete()``d), naming them, before anything is written."""
    dead = [fmt.key_string(p) or "<root>" for p, v in flat if isinstance(v, jax.Array) and v.is_deleted()]
    if dead:
        shown = ", ".join(map(repr, dead[:5])) + (f" and {len(dead) - 5} more" if len(dead) > 5 else "")
        what = "leaf {}: the jax.Array was" if len(dead) == 1 else "leaves {}: their jax.Arrays were"
        raise DeletedArrayError(
            f"{what.format(shown)} deleted, or donated to a jitted step (donate_argnums / donate_argnames) "
            "that has run since; save the state before that step, or pass the new state it returned"
        )


def plan_tree(
    flat: list[tuple[fmt.KeyPath, Any]], cast: Any, max_chunk_bytes: int, pack_bytes: int, file_bytes: int | None = None
) -> list[Leaf]:
    """``check_live``, ``describe``, ``check_dirs`` and ``plan`` for a flattened tree, reusing the
    plan of a tree with the same signature (paths, shapes, dtypes, shardings, settings) saved before."""
    check_live(flat)
    try:
        key: Any = (
            cast,
            max_chunk_bytes,
            pack_bytes,
            file_bytes,
            distributed.process_index(),
            distributed.process_count(),
        )
        key += tuple(_signature(path, value) for path, value in flat)
        cached = _PLANS.get(key)
    except TypeError:  # an unhashable sharding: plan every time
        key, cached = None, None
    if cached is None:
        leaves = [describe(path, value, cast) for path, value in flat]
        check_dirs(leaves)
        plan(leaves, max_chunk_bytes, pack_bytes, file_bytes)
        if key is not None:
            _PLANS[key] = [(leaf.record, list(leaf.units)) for leaf in leaves]
            while len(_PLANS) > _PLANS_KEPT:
                _PLANS.popitem(last=False)
        return leaves
    _PLANS.move_to_end(key)
    out = []
    for (path, value), (record, units) in zip(flat, cached, strict=True):
        if record.kind == "scalar":
            out.append(describe(path, value, cast))
        else:
            source, private = _source(record, value, cast)
            out.append(Leaf(record, source, private, list(units)))
    return out
