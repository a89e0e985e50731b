"""Where each restored leaf goes: its sharding, dtype and Python type.

Target shardings come from, in order: ``shardings``; template leaves carrying ``.sharding``;
``mesh`` + ``rules``; ``mesh`` alone with the partition specs saved in the manifest. Without any
of them, jax leaves land on the first local device (logged when they were saved sharded) and
numpy leaves come back as numpy.

>>> import numpy as np
>>> scalar_into(3, np.zeros((), np.float32)).dtype
dtype('float32')
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from ckpt_callbacks import format as fmt
from ckpt_callbacks.errors import RestoreMismatchError
from ckpt_callbacks.restoring._rules import Rules, check_spec, spec_for

log = logging.getLogger("ckpt_callbacks")


@dataclasses.dataclass(frozen=True)
class Target:
    """How one leaf comes back: its sharding (None: a numpy array) and dtype.

    ``regions`` (for a reader of parts of leaves, such as an export): read exactly these
    regions of the stored array, and return them as ``{region: numpy array}`` (cast to
    ``dtype``) instead of one finished leaf; ``sharding`` is then ignored.
    """

    sharding: Sharding | None
    dtype: np.dtype | None = None
    regions: tuple[tuple[tuple[int, int], ...], ...] | None = None


def sharding_map(shardings: Any) -> dict[fmt.KeyPath, Sharding] | Sharding | None:
    if shardings is None or isinstance(shardings, Sharding):
        return shardings
    flat, _ = jax.tree_util.tree_flatten_with_path(shardings, is_leaf=lambda x: isinstance(x, Sharding) or x is None)
    return {fmt.path_of(p): s for p, s in flat if s is not None}


def target_sharding(
    record: fmt.LeafRecord, template_leaf: Any, given: Any, mesh: Mesh | None, rules: Rules | None
) -> Sharding | None:
    if isinstance(given, Sharding):
        return given
    if isinstance(given, dict) and record.path in given:
        return given[record.path]
    sharding = getattr(template_leaf, "sharding", None)
    if isinstance(sharding, Sharding):
        return sharding
    if isinstance(template_leaf, np.ndarray):
        return None
    if template_leaf is None and record.source == "numpy":
        return None
    if mesh is not None:
        if rules is not None:
            spec = spec_for(record.key, record.shape, rules)
        elif record.partition_spec is not None:
            spec = PartitionSpec(*record.partition_spec)
        else:
            spec = PartitionSpec()
        check_spec(record.key, record.shape, spec, mesh)
        return NamedSharding(mesh, spec)
    return SingleDeviceSharding(jax.local_devices()[0])


def target_dtype(record: fmt.LeafRecord, template_leaf: Any, dtype: Any) -> np.dtype | None:
    if record.kind == "prng_key":
        return None
    template_dtype = getattr(template_leaf, "dtype", None)
    if template_dtype is not None:
        return np.dtype(template_dtype)
    original = fmt.dtype_from_name(record.dtype)
    if dtype is not None and jax.numpy.issubdtype(original, jax.numpy.floating):
        return np.dtype(dtype)
    return original


def warn_if_gathered(records: Sequence[fmt.LeafRecord], arrays: Any, targets: Sequence[Target], where: str) -> None:
    """Nothing silent: leaves saved sharded over several devices that land on one device
    (no mesh, shardings or template given) are logged, with what to pass instead."""
    if jax.device_count() == 1:
        return
    gathered = [
        records[i].key
        for (i, _), t in zip(arrays, targets, strict=True)
        if isinstance(t.sharding, SingleDeviceSharding)
        and records[i].mesh is not None
        and math.prod(records[i].mesh.get("axis_sizes") or [1]) > 1
        and any(p is not None for p in (records[i].partition_spec or ()))
    ]
    if gathered:
        log.warning(
            "restore %s: %d leaves saved sharded (e.g. %s) land on one device; pass mesh= (and rules=), "
            "shardings= or a template with shardings to place them",
            where,
            len(gathered),
            gathered[:3],
        )


def check_representable(record: fmt.LeafRecord, target: Target, where: str) -> None:
    """Refuses a jax target dtype that jax would silently narrow (64-bit types without x64)."""
    if target.sharding is None or target.dtype is None:
        return
    if jax.dtypes.canonicalize_dtype(target.dtype) != target.dtype:
        raise RestoreMismatchError(
            f"{where}: leaf {record.key!r} is {target.dtype} but jax_enable_x64 is off, so a jax.Array would "
            f"silently become {jax.dtypes.canonicalize_dtype(target.dtype)}; restore it as numpy (a numpy "
            "template leaf), cast it with dtype=, or enable x64"
        )


def scalar_into(value: Any, template_leaf: Any) -> Any:
    if isinstance(template_leaf, jax.Array | jax.ShapeDtypeStruct):
        return jax.numpy.asarray(value, dtype=template_leaf.dtype)
    if isinstance(template_leaf, np.ndarray):
        return np.asarray(value, dtype=template_leaf.dtype)
    return value


@functools.cache
def _weaken() -> Any:
    from jax._src.lax.lax import _convert_element_type  # no public API sets weak_type

    return jax.jit(lambda x: _convert_element_type(x, x.dtype, weak_type=True))


def weak_like(value: Any, leaf: Any) -> Any:
    """``value`` weakly typed where the template leaf is (a ``step`` made from a Python int):
    jit specialises on weak types, so a resumed step must see the types the first run saw to
    compute bit for bit the same."""
    if getattr(leaf, "weak_type", False) and isinstance(value, jax.Array) and not value.weak_type:
        try:
            return _weaken()(value)
        except (ImportError, TypeError):  # a jax without it: strongly typed, values still exact
            return value
    return value
