"""Where an ``init_fn`` puts each leaf, read from its jaxpr: traced under ``jax.jit``, never run.

``jax.eval_shape`` sees the shardings of an init jitted with ``out_shardings``, not those of a
``jax.device_put(x, NamedSharding(...))`` or ``with_sharding_constraint`` inside it (under jit
both lower to nothing XLA reports back): the jaxpr still holds them as equations.

>>> import jax.numpy as jnp
>>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
>>> mesh = Mesh(jax.devices()[:1], ("x",))
>>> found = placements(lambda: {"w": jax.device_put(jnp.zeros(2), NamedSharding(mesh, P("x"))), "b": jnp.ones(2)})
>>> found["w"].spec, found["b"]
(P('x',), None)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.extend import core
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from ckpt_callbacks import format as fmt

_NESTED = ("jit", "pjit")
_TRACEABLE = (jax.Array, np.ndarray, np.generic, bool, int, float, complex)


def shapes(init_fn: Callable[[], Any]) -> Any:
    """``jax.eval_shape(init_fn)``; an init JAX cannot trace raises ``TypeError`` (as JAX's own
    tracing errors are) naming its leaves of no JAX type (a str), or else what failed (a
    host-side step: ``np.asarray`` or ``float()`` of a jax value)."""
    odd: list[str] = []

    def watched() -> Any:
        out = init_fn()
        flat, _ = jax.tree_util.tree_flatten_with_path(out)
        odd[:] = [
            f"{fmt.key_string(fmt.path_of(p)) or '<root>'} ({type(x).__name__})"
            for p, x in flat
            if not isinstance(x, _TRACEABLE)
        ]
        return out

    try:
        return jax.eval_shape(watched)
    except TypeError as e:
        lines = str(e).strip().splitlines()
        why = f"its leaves {odd[:3]} are of no JAX type" if odd else f"{type(e).__name__}: {lines[0] if lines else ''}"
        raise TypeError(
            f"restore_or_init: init_fn cannot be traced ({why}); it is traced (jax.eval_shape, never run) for "
            "the structure, dtypes and shardings of the state to restore. Pass template= (a tree like the saved "
            "state: arrays or jax.ShapeDtypeStruct with shardings, e.g. jax.eval_shape of a traceable init), or "
            "mesh= (with rules=) or shardings= to restore the checkpoint's own structure"
        ) from e


def placements(init_fn: Callable[[], Any]) -> Any:
    """``init_fn``'s output tree with, for each leaf, the ``Sharding`` its init gives it (the
    ``device_put``, sharding constraint or ``out_shardings`` that made it), or None where none
    does. Traces ``init_fn`` once; allocates nothing on any device."""
    traced = jax.jit(init_fn).trace()
    where = _Placer(traced.jaxpr)
    return jax.tree_util.tree_unflatten(traced.out_tree, [where(v) for v in traced.jaxpr.jaxpr.outvars])


class _Placer:
    """The sharding each variable of a closed jaxpr is given where it is made."""

    def __init__(self, closed: core.ClosedJaxpr) -> None:
        jaxpr = closed.jaxpr
        self.made = {v: (eqn, i) for eqn in jaxpr.eqns for i, v in enumerate(eqn.outvars)}
        self.consts = dict(zip(jaxpr.constvars, closed.consts, strict=True))
        self.inner: dict[int, _Placer] = {}  # one per nested jit, built once

    def __call__(self, var: Any) -> Sharding | None:
        if isinstance(var, core.Literal):
            return None
        if var in self.consts:  # a closed-over array: already placed
            value = self.consts[var]
            return _concrete(value.sharding) if isinstance(value, jax.Array) else None
        return self._of_equation(*self.made[var]) if var in self.made else None

    def _of_equation(self, eqn: core.JaxprEqn, i: int) -> Sharding | None:
        name = eqn.primitive.name
        if name == "device_put":  # to a memory kind only (no sharding): not followed further
            device = eqn.params["devices"][i]
            return SingleDeviceSharding(device) if isinstance(device, jax.Device) else _concrete(device)
        if name == "sharding_constraint":
            sharding = eqn.params["sharding"]
            if isinstance(sharding, PartitionSpec) and isinstance(eqn.params.get("context_mesh"), Mesh):
                sharding = NamedSharding(eqn.params["context_mesh"], sharding)
            return _concrete(sharding)
        if name in _NESTED:
            given = _concrete(eqn.params["out_shardings"][i])
            if given is not None:
                return given
            inner = eqn.params["jaxpr"]
            if id(inner) not in self.inner:
                self.inner[id(inner)] = _Placer(inner)
            return self.inner[id(inner)](inner.jaxpr.outvars[i])
        return None


def _concrete(sharding: Any) -> Sharding | None:
    """``sharding`` if it names devices (not an abstract mesh, not ``UNSPECIFIED``), else None."""
    if not isinstance(sharding, Sharding):
        return None
    if isinstance(sharding, NamedSharding) and not isinstance(sharding.mesh, Mesh):
        return None
    return sharding


def _mesh_of(shardings: list[Sharding]) -> Mesh | None:
    """The one mesh the ``NamedSharding`` s among ``shardings`` share, or None (none, or several)."""
    meshes = {s.mesh for s in shardings if isinstance(s, NamedSharding) and isinstance(s.mesh, Mesh)}
    return meshes.pop() if len(meshes) == 1 else None


def place(template: Any, init_fn: Callable[[], Any]) -> Any:
    """``template`` (``jax.eval_shape(init_fn)``) with the shardings ``placements`` finds on
    its leaves that have none; a scalar placed nowhere goes replicated onto the one mesh the
    others use (where a jitted step puts it beside them)."""
    found = jax.tree_util.tree_leaves(placements(init_fn), is_leaf=lambda x: x is None)
    leaves, treedef = jax.tree_util.tree_flatten(template)
    if len(found) != len(leaves):
        return template
    mesh = _mesh_of([s for s in found if s is not None])
    out = [_with_sharding(leaf, given, mesh) for leaf, given in zip(leaves, found, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, out)


def _with_sharding(leaf: Any, given: Sharding | None, mesh: Mesh | None) -> Any:
    if not isinstance(leaf, jax.ShapeDtypeStruct) or leaf.sharding is not None:
        return leaf
    if given is None and mesh is not None and leaf.shape == ():
        given = NamedSharding(mesh, PartitionSpec())
    if given is None:
        return leaf
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=given, weak_type=leaf.weak_type)
