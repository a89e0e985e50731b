"""Partial saves with ``None``: a leaf that was not checkpointed is filled from a fresh init.

The Levanter/equinox convention saves ``None`` where a leaf is not checkpointed (an
``eqx.filter`` of the state). On resume the user hands the freshly initialised state as both
``template`` and ``missing``: the checkpointed leaves come from disk, the others from the init.
"""

from __future__ import annotations

import itertools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt_callbacks as cc
from conftest import assert_tree_equal

_URLS = itertools.count()


def _url() -> str:
    return f"memory://tests/saved-none/{next(_URLS)}"


def init(seed: int = 0) -> dict:
    k = jax.random.key(seed)
    return {
        "params": {"w": jax.random.normal(k, (4, 3)), "b": jnp.zeros(3)},
        "ema": {"w": jnp.full((4, 3), float(seed)), "b": jnp.full(3, float(seed))},
        "step": jnp.asarray(seed, jnp.int32),
    }


def checkpointed(state: dict) -> dict:
    """What a Levanter-style save writes: the EMA is not checkpointed (None in its place)."""
    return {**state, "ema": jax.tree.map(lambda _: None, state["ema"])}


def test_leaves_saved_as_none_are_filled_from_the_fresh_init():
    url = _url()
    trained = init(1)
    cc.save(url, checkpointed(trained))
    fresh = init(0)
    restored = cc.restore(url, template=fresh, missing=fresh)
    assert_tree_equal(restored["params"], trained["params"])
    assert_tree_equal(restored["step"], trained["step"])
    assert_tree_equal(restored["ema"], fresh["ema"])


def test_without_missing_the_error_says_saved_as_none_and_suggests_missing():
    url = _url()
    cc.save(url, checkpointed(init(1)))
    with pytest.raises(cc.RestoreMismatchError) as refused:
        cc.restore(url, template=init(0))
    text = str(refused.value)
    for key in ("ema/w", "ema/b"):
        assert f"missing on disk: {key!r} (saved as None, not checkpointed: pass missing=" in text
    assert "kind mismatch" not in text and "params" not in text


def test_a_subtree_saved_as_none_fills_every_leaf_under_it(caplog):
    caplog.set_level(logging.INFO, logger="ckpt_callbacks")
    url = _url()
    trained = init(1)
    cc.save(url, {**trained, "ema": None})  # opt_state=None: a whole subtree not checkpointed
    fresh = init(0)
    with pytest.raises(cc.RestoreMismatchError, match=r"'ema/w' \(saved as None") as refused:
        cc.restore(url, template=fresh)
    assert "unexpected on disk" not in str(refused.value)
    restored = cc.restore(url, template=fresh, missing=fresh)
    assert_tree_equal(restored["ema"], fresh["ema"])
    assert_tree_equal(restored["params"], trained["params"])
    assert "filled 2 from missing=" in caplog.text


def test_a_none_in_the_template_still_takes_a_saved_none():
    url = _url()
    cc.save(url, {"w": jnp.ones(2), "aux": None})
    restored = cc.restore(url, template={"w": jnp.zeros(2), "aux": None})
    assert restored["aux"] is None
    restored = cc.restore(url, template={"w": jnp.zeros(2), "aux": None}, missing={"w": jnp.zeros(2), "aux": 5})
    assert restored["aux"] is None  # nothing to fill: the template wants None


def test_renamed_leaves_saved_as_none_are_filled_under_their_new_name():
    url = _url()
    cc.save(url, {"dense": {"w": jnp.ones(2), "b": None}})
    fresh = {"Dense_0": {"w": jnp.zeros(2), "b": jnp.full(2, 7.0)}}
    restored = cc.restore(url, template=fresh, rename=[("^dense/", "Dense_0/")], missing=fresh)
    np.testing.assert_array_equal(restored["Dense_0"]["w"], np.ones(2))
    np.testing.assert_array_equal(restored["Dense_0"]["b"], np.full(2, 7.0))


def test_a_saved_none_the_template_does_not_have_is_unexpected_as_before():
    url = _url()
    cc.save(url, {"w": jnp.ones(2), "gone": None})
    with pytest.raises(cc.RestoreMismatchError, match=r"unexpected on disk .*'gone'"):
        cc.restore(url, template={"w": jnp.zeros(2)})
    assert list(cc.restore(url, template={"w": jnp.zeros(2)}, drop=True)) == ["w"]


def test_restore_or_init_fills_leaves_saved_as_none_from_missing(tmp_path, mesh42):
    replicated = NamedSharding(mesh42, P())
    init_fn = jax.jit(lambda: init(0), out_shardings=replicated)
    ck = cc.Checkpointer(str(tmp_path))
    trained = init(1)
    ck.save_checkpoint(checkpointed(trained), "run-5", step=5)
    ck.wait_until_finished()

    with pytest.raises(cc.RestoreMismatchError, match=r"'ema/w' \(saved as None, not checkpointed: pass missing="):
        ck.restore_or_init(init_fn)
    state, meta = ck.restore_or_init(init_fn, missing=init_fn())
    assert meta["step"] == 5
    assert_tree_equal(state["params"], trained["params"])
    assert_tree_equal(state["ema"], init(0)["ema"])
    assert state["ema"]["w"].sharding.is_equivalent_to(replicated, 2)
    ck.close()


# --- any tree, Nones anywhere ------------------------------------------------------------------

_NAMES = st.sampled_from(["a", "b", "c", "w", "k/x", "%"])
_TREES = st.recursive(
    st.integers(0, 3).map(lambda n: np.arange(n + 1, dtype=np.float32)),
    lambda kids: st.dictionaries(_NAMES, kids, min_size=1, max_size=3),
    max_leaves=8,
).filter(lambda t: isinstance(t, dict))


def _knock_out(tree, holes):
    """``tree`` with None in place of the leaves (or whole subtrees) ``holes`` picks."""
    if not isinstance(tree, dict):
        return None if holes.draw(st.booleans()) else tree
    if holes.draw(st.integers(0, 5)) == 0:
        return None
    return {k: _knock_out(v, holes) for k, v in tree.items()}


@settings(max_examples=60, deadline=None)
@given(fresh=_TREES, data=st.data())
def test_any_tree_with_nones_anywhere_restores_from_disk_and_the_init(fresh, data):
    url = _url()
    trained = jax.tree.map(lambda x: x + 100, fresh)
    saved = {k: _knock_out(v, data) for k, v in trained.items()}
    cc.save(url, saved)
    want = _combine(saved, fresh)
    assert_tree_equal(cc.restore(url, template=fresh, missing=fresh), want)

    from_init = [path for path, (w, f) in _pairs(want, fresh) if w is f]
    if from_init:
        with pytest.raises(cc.RestoreMismatchError) as refused:
            cc.restore(url, template=fresh)
        assert str(refused.value).count("(saved as None") == len(from_init)
        assert "kind mismatch" not in str(refused.value)
    else:
        assert_tree_equal(cc.restore(url, template=fresh), want)


def _combine(saved, fresh):
    """The saved leaves, and the fresh init's where the save holds None."""
    if saved is None:
        return fresh
    if isinstance(fresh, dict):
        return {k: _combine(saved[k], fresh[k]) for k in fresh}
    return saved


def _pairs(a, b, prefix=()):
    if isinstance(b, dict):
        for k in b:
            yield from _pairs(a[k], b[k], (*prefix, k))
    else:
        yield prefix, (a, b)
