"""Shard sets: what each process holds of a train state, computed by every process alike.

The *set* of process q is, for each leaf in tree order, the distinct global index regions of
the leaf's shards on q's devices, each once (a shard replicated over q's devices is kept once).
It depends only on the tree's paths, shapes, dtypes and shardings, so every process computes
every other process's set, byte sizes included, without asking (a receiver of a replica
rebuilds its manifest itself).

Leaf kinds: ``array`` (a ``jax.Array``), ``key`` (a typed PRNG key array, kept as its
``key_data``), ``numpy`` (a host array, held whole by every process) and ``json`` (a Python
scalar or string, kept in the manifest).

>>> import jax.numpy as jnp
>>> layout = Layout.of({"w": jnp.arange(4.0), "n": 3})
>>> [(leaf.path, leaf.kind) for leaf in layout.leaves]
[('n', 'json'), ('w', 'array')]
>>> [(p.leaf, p.region, p.nbytes) for p in layout.pieces(0)]
[(1, ((0, 4),), 16)]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from ckpt_callbacks import format as fmt

Region = tuple[tuple[int, int], ...]  # (start, stop) per dimension


def region_of(index: Sequence[slice], shape: Sequence[int]) -> Region:
    """A shard's index (slices, as ``devices_indices_map`` gives them) as (start, stop) pairs."""
    return tuple((s.indices(n)[0], s.indices(n)[1]) for s, n in zip(index, shape, strict=True))


def _extent(region: Region) -> tuple[int, ...]:
    return tuple(stop - start for start, stop in region)


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One leaf of the state: its path, kind, and (arrays) shape, dtype and sharding."""

    path: str
    kind: str  # "array" | "key" | "numpy" | "json"
    shape: tuple[int, ...] = ()
    dtype: str = ""
    sharding: Any = None  # of the stored (raw) array: a key's key_data sharding
    impl: str = ""  # a key's PRNG implementation
    value: Any = None  # a json leaf's value
    template: Any = None  # a host leaf's template leaf: restored as it says (a placed array)


@dataclasses.dataclass(frozen=True)
class Piece:
    """One region of one leaf in a set's data file, at ``offset``."""

    leaf: int
    region: Region
    offset: int
    nbytes: int


def _raw_sharding(sharding: Any, extra: int) -> Any:
    """The sharding of a key array's ``key_data`` (``extra`` trailing dims, unsharded)."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * extra
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    raise TypeError(
        f"a PRNG key array sharded by {type(sharding).__name__} cannot go to the local tier "
        "(a NamedSharding or one device can)"
    )


def _key_impl_of_dtype(dtype: Any) -> str:
    return str(dtype._impl.name)  # key<fry>: "threefry2x32"


def _placed(path: str, value: Any) -> Any:
    """A leaf's sharding; a template leaf without one is on the one device, if there is one."""
    sharding = getattr(value, "sharding", None)
    if sharding is None and jax.device_count() == 1:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if sharding is None:
        raise TypeError(f"leaf {path}: the template gives it no sharding, and {jax.device_count()} devices")
    return sharding


def leaf_of(path: str, value: Any) -> Leaf:
    """The ``Leaf`` of a state leaf (a jax or numpy array, a key array, or a JSON scalar) or of
    a template leaf (a ``jax.ShapeDtypeStruct`` with a sharding)."""
    dtype = getattr(value, "dtype", None)
    if isinstance(value, jax.Array | jax.ShapeDtypeStruct) and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        raw = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(value.shape, dtype))
        extra = len(raw.shape) - len(value.shape)
        sharding = _raw_sharding(_placed(path, value), extra)
        return Leaf(path, "key", tuple(raw.shape), np.dtype(raw.dtype).name, sharding, _key_impl_of_dtype(dtype))
    if isinstance(value, jax.Array | jax.ShapeDtypeStruct):
        return Leaf(path, "array", tuple(value.shape), np.dtype(dtype).name, _placed(path, value))
    if isinstance(value, np.ndarray | np.generic):
        dt = np.dtype(dtype)
        if dt.kind in "OUS" or dt.fields is not None or dt.name.startswith("void"):  # no plain raw bytes
            raise TypeError(
                f"leaf {path}: a numpy array of dtype {np.dtype(dtype)} cannot be saved to the local tier "
                "(numeric, bool and datetime dtypes can)"
            )
        return Leaf(path, "numpy", tuple(np.shape(value)), np.dtype(dtype).name)
    if value is None or isinstance(value, bool | int | float | str):
        return Leaf(path, "json", value=value)
    raise TypeError(
        f"leaf {path}: {type(value).__name__} cannot be saved to the local tier "
        "(arrays, PRNG keys, numpy arrays and JSON scalars can)"
    )


def _category(value: Any) -> str:
    if value is None or isinstance(value, str | bool):
        return type(value).__name__
    return "number" if isinstance(value, int | float) else type(value).__name__


def _check_host(path: str, row: dict[str, Any], like: Any) -> None:
    """A host leaf saved as ``row`` fits the template's ``like`` (as the persistent tier would
    have it): a JSON value of the same kind, a numpy array of the same shape and dtype."""
    if row["kind"] == "numpy":
        got = (tuple(getattr(like, "shape", ())), np.dtype(getattr(like, "dtype", object)).name)
        if got != (tuple(row.get("shape", ())), row.get("dtype")):
            raise TypeError(
                f"leaf {path}: saved as a {row.get('dtype')}{row.get('shape')} array, the template has {got}"
            )
        return
    saved = _category(row.get("value"))
    if isinstance(like, jax.ShapeDtypeStruct | jax.Array | np.ndarray | np.generic):
        fits = saved in ("number", "bool") and tuple(like.shape) == ()
    else:
        fits = saved == _category(like)
    if not fits:
        raise TypeError(f"leaf {path}: saved as {saved} {row.get('value')!r:.40}, the template has {like!r:.60}")


def raw_value(leaf: Leaf, value: Any) -> Any:
    """What is stored of a state leaf: a key array's key_data, a host array as numpy."""
    if leaf.kind == "key":
        return jax.random.key_data(value)
    if leaf.kind == "numpy":
        return np.asarray(value)
    return value


def _pieces_of(leaf: Leaf, process: int) -> list[Region]:
    if leaf.kind == "json":
        return []
    if leaf.kind == "numpy":
        return [tuple((0, n) for n in leaf.shape)]
    regions = {
        region_of(index, leaf.shape)
        for device, index in leaf.sharding.devices_indices_map(leaf.shape).items()
        if device.process_index == process
    }
    return sorted(regions)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The leaves of one state, with every process's set computable from them."""

    leaves: tuple[Leaf, ...]
    treedef: Any

    @classmethod
    def of(cls, tree: Any, saved: Sequence[dict[str, Any]] = ()) -> Layout:
        """The layout of a state, or of a template (``saved``: the manifest's leaf rows, whose
        numpy and JSON leaves are restored as such whatever the template says of them)."""
        host = {row["path"]: row for row in saved if row.get("kind") in ("numpy", "json")}
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
        leaves = []
        for path, value in flat:
            name = fmt.key_string(fmt.path_of(path)) or "<root>"
            row = host.get(name)
            if row is not None:
                _check_host(name, row, value)
                like = value if isinstance(value, jax.ShapeDtypeStruct | jax.Array) else None
                leaves.append(Leaf(name, row["kind"], tuple(row.get("shape", ())), row.get("dtype", ""), template=like))
            else:
                leaves.append(leaf_of(name, value))
        return cls(tuple(leaves), treedef)

    def pieces(self, process: int) -> list[Piece]:
        """Process ``process``'s set, in data-file order."""
        out, offset = [], 0
        for i, leaf in enumerate(self.leaves):
            itemsize = np.dtype(leaf.dtype).itemsize if leaf.dtype else 0
            for region in _pieces_of(leaf, process):
                nbytes = int(np.prod(_extent(region), dtype=np.int64)) * itemsize
                out.append(Piece(i, region, offset, nbytes))
                offset += nbytes
        return out

    def set_bytes(self, process: int) -> int:
        return sum(p.nbytes for p in self.pieces(process))

    def describe(self) -> list[Any]:
        """Per leaf: path, kind, and for arrays shape, dtype and every device's region."""
        out: list[Any] = []
        for leaf in self.leaves:
            row: list[Any] = [leaf.path, leaf.kind]
            if leaf.kind in ("array", "key"):
                regions = leaf.sharding.devices_indices_map(leaf.shape)
                placed = sorted((d.id, d.process_index, region_of(ix, leaf.shape)) for d, ix in regions.items())
                row += [list(leaf.shape), leaf.dtype, leaf.impl, placed]
            elif leaf.kind == "numpy":
                row += [list(leaf.shape), leaf.dtype]
            out.append(row)
        return out

    def digest(self) -> str:
        """sha256 of the tree's paths, kinds, shapes, dtypes and every device's region: equal
        exactly when a set saved under one can be placed under the other."""
        text = json.dumps([self.describe(), topology()], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def topology() -> dict[str, Any]:
    """Process count, devices per process, and every device's id and process."""
    devices = sorted(jax.devices(), key=lambda d: d.id)
    per = [sum(d.process_index == p for d in devices) for p in range(jax.process_count())]
    return {"processes": jax.process_count(), "devices_per_process": per, "platform": devices[0].platform}


def summary(topo: dict[str, Any]) -> str:
    """'4 processes x 2 cpu devices' (or the per-process counts when they differ)."""
    per = topo["devices_per_process"]
    each = str(per[0]) if len(set(per)) == 1 else "/".join(map(str, per))
    return f"{topo['processes']} processes x {each} {topo['platform']} devices"
