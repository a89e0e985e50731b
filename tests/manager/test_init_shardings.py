"""``restore_or_init`` learns shardings the way users write inits: ``device_put`` each leaf.

A user's init puts each leaf onto its ``NamedSharding`` with ``jax.device_put`` (no jit, no
``out_shardings``). On resume the state comes back on those shardings, found without running
the init (nothing allocated); only a leaf nothing places is refused, by name.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt_callbacks as cc
from ckpt_callbacks.manager._reader import init_template
from conftest import assert_tree_equal


def _resume(tmp_path, init_fn, saved):
    """Saves ``saved`` as step 3 under a fresh base, then resumes it with ``init_fn``."""
    ck = cc.Checkpointer(str(tmp_path), handle_sigterm=False)
    _, meta = ck.restore_or_init(init_fn)
    assert meta is None  # nothing saved yet: the init itself
    ck.save_checkpoint(saved, "run-3", step=3)
    ck.wait_until_finished()
    restored, meta = ck.restore_or_init(init_fn)
    ck.close()
    assert meta["step"] == 3
    assert_tree_equal(restored, saved)
    return restored


def _specs(tree):
    return jax.tree.map(lambda x: x.sharding.spec if isinstance(x.sharding, NamedSharding) else x.sharding, tree)


def test_an_init_that_device_puts_each_leaf_resumes_onto_those_shardings(tmp_path, mesh42):
    def init():
        return {
            "w": jax.device_put(jnp.zeros((8, 4)), NamedSharding(mesh42, P("x", "y"))),
            "b": jax.device_put(jnp.zeros(4), NamedSharding(mesh42, P())),
        }

    saved = {"w": jnp.arange(32.0).reshape(8, 4), "b": jnp.ones(4)}
    restored = _resume(tmp_path, init, saved)
    assert _specs(restored) == {"w": P("x", "y"), "b": P()}
    assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(restored))


def test_a_whole_tree_device_put_and_a_sharding_constraint_are_seen(tmp_path, mesh42):
    shardings = {"w": NamedSharding(mesh42, P("x")), "v": NamedSharding(mesh42, P(None, "y"))}

    def init():
        tree = jax.device_put({"w": jnp.zeros((8, 2)), "v": jnp.zeros((2, 4))}, shardings)
        tree["c"] = jax.lax.with_sharding_constraint(jnp.zeros((4, 2)), NamedSharding(mesh42, P("x", "y")))
        return tree

    saved = {"w": jnp.ones((8, 2)), "v": jnp.full((2, 4), 2.0), "c": jnp.full((4, 2), 3.0)}
    restored = _resume(tmp_path, init, saved)
    assert _specs(restored) == {"w": P("x"), "v": P(None, "y"), "c": P("x", "y")}


def test_a_jit_with_out_shardings_inside_an_unjitted_init_is_seen(tmp_path, mesh42):
    make_params = jax.jit(lambda: {"w": jnp.zeros((8, 4))}, out_shardings={"w": NamedSharding(mesh42, P("x"))})

    @jax.jit  # no out_shardings: the device_put inside it says where
    def make_head():
        return jax.device_put(jnp.zeros((4, 2)), NamedSharding(mesh42, P(None, "y")))

    def init():
        return {"params": make_params(), "head": make_head(), "step": 0}

    ck = cc.Checkpointer(str(tmp_path), handle_sigterm=False)
    ck.save_checkpoint({"params": {"w": jnp.ones((8, 4))}, "head": jnp.ones((4, 2)), "step": 7}, "run-3", step=3)
    restored, _ = ck.restore_or_init(init)
    ck.close()
    assert restored["params"]["w"].sharding.spec == P("x") and restored["head"].sharding.spec == P(None, "y")
    assert int(restored["step"]) == 7  # saved as a Python int: a scalar, wherever it lands


def test_scalars_and_prng_keys_go_beside_the_placed_leaves(tmp_path, mesh42):
    def init():
        key = jax.random.key(0)
        return {
            "w": jax.device_put(jax.random.normal(key, (8, 4)), NamedSharding(mesh42, P("x"))),
            "keys": jax.device_put(jax.random.split(key, 8), NamedSharding(mesh42, P("x"))),
            "key": key,  # placed nowhere: a scalar, replicated on the mesh
            "step": jnp.zeros((), jnp.int32),
            "lr": 0.1,
        }

    trained = jax.tree.map(lambda x: x, init())
    saved = {**trained, "step": jnp.asarray(5, jnp.int32), "key": jax.random.key(9), "lr": jnp.asarray(0.01)}
    restored = _resume(tmp_path, init, saved)
    assert restored["keys"].sharding.spec == P("x")
    for name in ("key", "step", "lr"):
        assert restored[name].sharding.is_equivalent_to(NamedSharding(mesh42, P()), 0), name
    # the restored state goes into a jitted step with the mesh-sharded leaves
    jax.jit(lambda s: (s["w"] * s["lr"] + s["step"], jax.random.fold_in(s["key"], s["step"])))(restored)


def test_a_leaf_nothing_places_is_refused_by_name(tmp_path, mesh42):
    def init():
        params = {"w": jax.device_put(jnp.zeros((8, 4)), NamedSharding(mesh42, P("x")))}
        return {"params": params, "mu": jnp.zeros_like(params["w"]), "step": 0}

    ck = cc.Checkpointer(str(tmp_path), handle_sigterm=False)
    ck.save_checkpoint({"params": {"w": jnp.ones((8, 4))}, "mu": jnp.ones((8, 4)), "step": 1}, "run-1", step=1)
    with pytest.raises(cc.ShardingRuleError, match=r"1 leaves of init_fn's state are placed nowhere") as refused:
        ck.restore_or_init(init)
    text = str(refused.value)
    assert "(e.g. ['mu'])" in text
    assert "mesh=" in text and "out_shardings" in text
    restored, _ = ck.restore_or_init(init, mesh=mesh42, rules=[("w$|^mu$", P("x"))])  # what it suggests
    ck.close()
    assert restored["mu"].sharding.spec == P("x")


def test_an_init_placing_nothing_is_refused_as_before(tmp_path):
    ck = cc.Checkpointer(str(tmp_path), handle_sigterm=False)
    ck.save_checkpoint({"w": jnp.ones(3), "step": 1}, "run-1", step=1)
    with pytest.raises(cc.ShardingRuleError, match=r"2 leaves .* placed nowhere .*8 devices are visible"):
        ck.restore_or_init(lambda: {"w": jnp.zeros(3), "step": 0})
    ck.close()


def test_inferring_shardings_allocates_nothing_even_for_a_state_too_big_for_the_host(mesh42):
    sharding = NamedSharding(mesh42, P("x", "y"))

    def init():  # 4 TiB of float32: running it would fail
        return {"w": jax.device_put(jnp.zeros((2**20, 2**20)), sharding), "step": 0}

    before = {id(a) for a in jax.live_arrays()}
    template = init_template(init, {})
    after = [a for a in jax.live_arrays() if id(a) not in before]
    assert after == []
    assert template["w"].shape == (2**20, 2**20) and template["w"].sharding == sharding
    assert template["step"].sharding.is_equivalent_to(NamedSharding(mesh42, P()), 0)


def test_given_placement_still_wins_over_the_inits(mesh42):
    def init():
        return {"w": jax.device_put(jnp.zeros((8, 4)), NamedSharding(mesh42, P("x")))}

    template = init_template(init, {"mesh": mesh42})
    assert template["w"].sharding is None  # mesh= with rules (or the saved specs) place it
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    assert init_template(init, {"shardings": one})["w"].sharding is None
    np.testing.assert_array_equal(init()["w"], np.zeros((8, 4)))
