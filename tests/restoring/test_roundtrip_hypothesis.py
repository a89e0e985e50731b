"""Property: any tree saved on one mesh restores bit-exactly on another."""

from __future__ import annotations

import itertools
import re

import jax
import ml_dtypes
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt_callbacks as cc
from ckpt_callbacks import format as fmt
from conftest import assert_tree_equal, make_mesh

MESHES = [
    ((8,), ("a",)),
    ((4, 2), ("a", "b")),
    ((2, 4), ("a", "b")),
    ((2, 2, 2), ("a", "b", "c")),
    ((1, 8), ("a", "b")),
    ((2,), ("a",)),
    ((1,), ("a",)),
]
DTYPES = [
    np.float32,
    ml_dtypes.bfloat16,
    np.int32,
    np.uint8,
    np.float16,
    np.bool_,
    ml_dtypes.float8_e5m2,
    np.int64,
    np.complex64,
]
_COUNTER = itertools.count()


@st.composite
def spec_for(draw, shape, mesh):
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))
    free = list(mesh.axis_names)
    entries = []
    for dim in shape:
        options = [None] + [a for a in free if dim % sizes[a] == 0 and dim > 0]
        choice = draw(st.sampled_from(options))
        if choice is not None:
            free.remove(choice)
        entries.append(choice)
    return P(*entries)


@st.composite
def leaf(draw, mesh):
    shape = tuple(draw(st.lists(st.sampled_from([1, 2, 3, 4, 8, 16, 0]), min_size=0, max_size=3)))
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    if dtype.kind in "fc" or dtype.kind == "V":
        raw = raw & 0x7B  # keep floats finite and non-NaN so equality is meaningful
    value = raw.view(dtype).reshape(shape) if dtype != np.bool_ else (raw % 2).astype(bool).reshape(shape)
    if draw(st.booleans()):
        return value  # a numpy leaf
    return jax.device_put(value, NamedSharding(mesh, draw(spec_for(shape, mesh))))


@st.composite
def case(draw):
    save_mesh = make_mesh(*draw(st.sampled_from(MESHES)))
    keys = draw(st.lists(st.text(min_size=0, max_size=12), min_size=1, max_size=5, unique=True))
    tree = {k: draw(leaf(save_mesh)) for k in keys}
    if draw(st.booleans()):
        tree = {"outer": tree, "n": draw(st.integers(-(2**40), 2**40))}
    target = make_mesh(*draw(st.sampled_from(MESHES)))
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    rules = []
    for path, value in flat:
        key = fmt.key_string(fmt.path_of(path))  # the spelling rules match: '/' in a key is %2F
        rules.append((f"^{re.escape(key)}$", draw(spec_for(np.shape(value), target))))
    # packing: none (every leaf a zarr3 array), some leaves (a 64-byte threshold), all (the default)
    pack_bytes = draw(st.sampled_from([0, 64, 1 << 20]))
    return tree, target, rules, draw(st.booleans()), pack_bytes


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case())
def test_save_on_one_mesh_restore_on_another(args):
    tree, target, rules, use_template, pack_bytes = args
    url = f"memory://hypothesis/{next(_COUNTER)}"
    cc.save(url, tree, pack_bytes=pack_bytes)
    if use_template:
        shardings = cc.shardings_from_rules(target, rules, tree)
        template = jax.tree.map(
            lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s) if isinstance(v, jax.Array) else v,
            tree,
            shardings,
        )
        restored = cc.restore(url, template=template)
    else:
        restored = cc.restore(url, mesh=target, rules=rules)
    for value in jax.tree.leaves(restored):
        if isinstance(value, jax.Array):
            assert value.sharding.mesh.devices.shape == target.devices.shape
    expected = jax.tree.map(lambda v: np.asarray(v) if hasattr(v, "dtype") else v, tree)
    assert_tree_equal(jax.tree.map(lambda v: np.asarray(v) if hasattr(v, "dtype") else v, restored), expected)
