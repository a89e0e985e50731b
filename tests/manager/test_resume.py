"""Resuming the way teams train: shardings kept, NNX objects, seed names, eval and best-k."""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt_callbacks as cc
from conftest import make_mesh


def _sharded_init(mesh):
    shardings = {"w": NamedSharding(mesh, P("x", "y")), "b": NamedSharding(mesh, P())}

    @jax.jit
    def init():
        return {"w": jnp.arange(32.0).reshape(8, 4), "b": jnp.zeros(4)}

    return jax.jit(init, out_shardings=shardings), shardings


def test_restore_or_init_keeps_a_jitted_inits_shardings(url, mesh42):
    init, shardings = _sharded_init(mesh42)
    ck = cc.Checkpointer(url, handle_sigterm=False)
    state, meta = ck.restore_or_init(init)
    assert meta is None and state["w"].sharding == shardings["w"]
    ck.save_checkpoint(jax.tree.map(lambda x: x + 1, state), "run-3", step=3)
    restored, meta = ck.restore_or_init(init)
    ck.close()
    assert meta["step"] == 3
    assert restored["w"].sharding.is_equivalent_to(shardings["w"], 2)
    assert len(restored["w"].sharding.device_set) == 8  # not all on one device
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(32.0).reshape(8, 4) + 1)


def test_restore_or_init_places_an_unjitted_init_with_mesh_and_rules(url, mesh42):
    def init():  # placed nowhere: mesh= and rules= say where it goes
        return {"w": jnp.zeros((8, 4))}

    ck = cc.Checkpointer(url, handle_sigterm=False)
    ck.save_checkpoint({"w": jnp.ones((8, 4))}, "run-1", step=1)
    with pytest.raises(cc.ShardingRuleError, match=r"8 devices are visible: the restored state would land on one"):
        ck.restore_or_init(init)
    restored, _ = ck.restore_or_init(init, mesh=mesh42, rules=[("w", P("x"))])
    ck.close()
    assert restored["w"].sharding.spec == P("x") and len(restored["w"].sharding.device_set) == 8


class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 2, rngs=rngs)


def test_nnx_single_module_saved_on_its_own_restores_into(url):
    model = Tiny(nnx.Rngs(0))
    cb = cc.CheckpointCallback(url, state_fn=lambda: model, handle_sigterm=False)
    cb.on_train_end(4)
    other = Tiny(nnx.Rngs(7))
    meta = cb.restore_into(model=other)
    cb.close()
    assert meta["step"] == 4
    np.testing.assert_array_equal(np.asarray(other.lin.kernel[...]), np.asarray(model.lin.kernel[...]))


def test_nnx_restore_or_init_into(url):
    model = Tiny(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    cb = cc.CheckpointCallback(url, state_fn=lambda: {"model": model, "optimizer": optimizer}, handle_sigterm=False)
    fresh = Tiny(nnx.Rngs(5))
    before = np.asarray(fresh.lin.kernel[...]).copy()
    assert cb.restore_or_init_into(model=fresh) is None  # nothing saved yet: left as initialised
    np.testing.assert_array_equal(np.asarray(fresh.lin.kernel[...]), before)
    cb.on_train_end(2)
    fresh_opt = nnx.Optimizer(fresh, optax.sgd(0.1), wrt=nnx.Param)
    meta = cb.restore_or_init_into(model=fresh, optimizer=fresh_opt)
    cb.close()
    assert meta["step"] == 2
    np.testing.assert_array_equal(np.asarray(fresh.lin.kernel[...]), np.asarray(model.lin.kernel[...]))


def test_on_commit_hooks_get_path_step_and_metadata(url):
    seen = []
    ck = cc.Checkpointer(
        url,
        step_policies=[cc.CheckpointInterval(every=2)],
        on_commit=[lambda path, step, meta: seen.append((path, step, meta["step"])), lambda *a: 1 / 0],
        handle_sigterm=False,
    )
    for step in range(1, 5):
        ck.on_step({"w": np.ones(2)}, step=step)
    ck.close()
    assert [(s, m) for _, s, m in seen] == [(2, 2), (4, 4)]
    assert all(path.endswith(f"run-{s}") and cc.open_checkpoint(path) for path, s, _ in seen)


def test_latest_step_is_a_method_like_all_steps(url):
    ck = cc.Checkpointer(url, step_policies=[cc.CheckpointInterval(every=1)], handle_sigterm=False)
    assert ck.latest_step() is None
    ck.on_step({"w": np.ones(1)}, step=7)
    ck.wait_until_finished()
    assert ck.latest_step() == 7 == ck.all_steps()[-1]
    ck.close()


def test_on_eval_with_save_false_only_records(url):
    keep = cc.KeepPolicy(keep_best=1, metric="loss")
    cb = cc.CheckpointCallback(url, state_fn=lambda: {"w": jnp.ones(2)}, keep=keep, handle_sigterm=False)
    assert not cb.on_eval(5, metrics={"loss": 0.3}, save=False)
    assert cb.checkpointer.all_steps() == []
    assert cb.on_eval(10, metrics={"loss": 0.2})  # the default still saves
    cb.on_train_end(12)
    assert cb.checkpointer.all_steps() == [10, 12]
    assert cb.checkpointer.best_step() == 10
    assert cb.checkpointer.best_checkpoint().path.endswith("run-10")
    cb.close()


def test_a_metric_no_eval_reports_is_warned_about_once(url, caplog):
    keep = cc.KeepPolicy(keep_best=1, metric="eval_loss")
    ck = cc.Checkpointer(url, step_policies=[cc.CheckpointInterval(every=1)], keep=keep, handle_sigterm=False)
    for step in range(1, 5):
        ck.record_metrics(step, {"loss": 1.0 / step})  # a different name than the policy's
        ck.on_step({"w": np.ones(1)}, step=step)
        ck.wait_until_finished()
    ck.close()
    assert caplog.text.count("ranks by metric 'eval_loss', but evals report only ['loss']") == 1
    assert ck.best_step() is None


def test_a_partition_rule_that_matches_no_leaf_is_warned_about(caplog):
    tree = {"params": {"dense": {"kernel": np.zeros((8, 4)), "bias": np.zeros(4)}}}
    mesh = make_mesh((4, 2))
    specs = cc.match_partition_rules([("kernal", P("x", "y")), (".*", P())], tree)
    assert specs["params"]["dense"]["kernel"] == P()  # the typo fell through to the catch-all ...
    assert "['kernal'] match no leaf" in caplog.text  # ... and is reported
    caplog.clear()
    cc.shardings_from_rules(mesh, [("kernel", P("x", "y")), (".*", P())], tree)
    assert "match no leaf" not in caplog.text


def test_several_items_in_one_step_committed_together(url, mesh42):
    loader = {"epoch": 3, "offset": 1234, "files": ["a.tfrecord", "b.tfrecord"], "seed": None}
    items = {"model": {"w": jnp.arange(8.0)}, "optimizer": {"mu": jnp.zeros(8)}, "loader": loader}
    cc.save_items(f"{url}/run-5", items, step=5)
    ck = cc.Checkpointer(url, handle_sigterm=False)
    assert ck.restore(item="loader")[0] == loader
    model, meta = ck.load_pytree(prefix="model")
    assert meta["items"] == ["model", "optimizer", "loader"] and model["w"].tolist() == list(range(8))
    ck.close()


def test_one_call_per_item_into_the_same_step(url):
    ck = cc.Checkpointer(url, handle_sigterm=False)
    ck.save_pytree({"w": jnp.ones(4)}, "model", step=7)
    ck.wait_until_finished()
    assert cc.open_checkpoint(f"{url}/run-7").items == ["model"]  # committed on its own
    ck.save_pytree({"mu": jnp.zeros(4)}, "optimizer", step=7, extras={"lr": 0.1})
    ck.save_pytree({"epoch": 2}, "loader", step=7)
    ck.wait_until_finished()
    ckpt = cc.open_checkpoint(f"{url}/run-7")
    assert sorted(ckpt.items) == ["loader", "model", "optimizer"] and ckpt.metadata.extras["lr"] == 0.1
    assert ck.load_pytree(prefix="model")[0]["w"].tolist() == [1.0] * 4
    assert ck.load_pytree(prefix="loader")[0] == {"epoch": 2}
    with pytest.raises(cc.CheckpointExistsError, match=r"already holds items \['model'\]"):
        ck.save_pytree({"w": jnp.zeros(4)}, "model", step=7)
    assert cc.verify(f"{url}/run-7").ok
    ck.close()


def test_an_item_being_added_is_never_seen_half_written(tmp_path):
    path = str(tmp_path / "run-1")
    cc.save_items(path, {"model": {"w": np.ones(1000)}}, step=1)
    handle = cc.save_items_async(path, {"optimizer": {"mu": np.zeros(2_000_000)}}, step=1, add=True)
    seen = []
    while not handle.done():  # a reader at any moment sees a whole checkpoint: old or new
        ckpt = cc.open_checkpoint(path)
        seen.append(tuple(sorted(ckpt.items)))
        for item in ckpt.items:
            cc.restore(ckpt, item=item)
    handle.wait()
    assert set(seen) <= {("model",), ("model", "optimizer")}
    assert cc.restore(path, item="optimizer")["mu"].shape == (2_000_000,) and cc.verify(path).ok


def _params(names, seed=0):
    rng = np.random.default_rng(seed)
    return {name: {"kernel": jnp.asarray(rng.normal(size=(3, 3)), jnp.float32)} for name in names}


def test_renamed_modules_new_heads_and_removed_layers(url, caplog):
    caplog.set_level(logging.INFO, logger="ckpt_callbacks")
    saved = {"params": _params(["dense", "old_head", "aux"])}
    cc.save(url, saved)
    fresh = {"params": _params(["Dense_0", "new_head"], seed=1)}  # the fine-tuning model, initialised
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fresh)
    with pytest.raises(cc.RestoreMismatchError) as refused:
        cc.restore(url, template=template)
    text = str(refused.value)
    assert "missing on disk: 'params/Dense_0/kernel'" in text and "unexpected on disk" in text
    restored = cc.restore(
        url, template=template, rename=[("/dense/", "/Dense_0/")], missing=fresh, drop=["old_head", "aux"]
    )
    np.testing.assert_array_equal(restored["params"]["Dense_0"]["kernel"], saved["params"]["dense"]["kernel"])
    np.testing.assert_array_equal(restored["params"]["new_head"]["kernel"], fresh["params"]["new_head"]["kernel"])
    assert "renamed 1" in caplog.text and "filled 1" in caplog.text and "dropped 2" in caplog.text
    with pytest.raises(cc.RestoreMismatchError, match="unexpected on disk"):  # dropping only when asked
        cc.restore(url, template=template, rename=[("/dense/", "/Dense_0/")], missing=fresh, drop=["aux"])


def test_two_saved_keys_renamed_to_one_name_is_refused(url):
    cc.save(url, {"a": np.zeros(2), "b": np.ones(2)})
    with pytest.raises(cc.RestoreMismatchError, match=r"rename maps both 'a' and 'b' to 'c'"):
        cc.restore(url, template={"c": np.zeros(2)}, rename=[("^[ab]$", "c")])


def test_keys_returns_only_what_was_asked(url):
    state = {"params": {"w": jnp.ones(3)}, "opt_state": optax.adam(1e-3).init({"w": jnp.ones(3)}), "step": 4}
    state["opt_state"] = (*state["opt_state"], optax.EmptyState())
    cc.save(url, state)
    assert list(cc.restore(url, keys=["params"])) == ["params"]  # no empty optimizer containers leak out
    full = cc.restore(url)
    assert set(full) == {"params", "opt_state", "step"} and full["opt_state"][-1] == {}


def test_seed_names_return_paths_in_the_form_given(tmp_path, monkeypatch):
    base = str(tmp_path / "ckpts")
    cc.save(f"{base}/run-10", {"w": np.ones(2)}, step=10)
    latest = cc.find_latest_checkpoint(base)
    assert latest == os.path.join(base, "run-10")
    with open(os.path.join(latest, "metadata.json")) as f:  # a plain path: os.path.join and open work
        assert json.load(f)["step"] == 10
    monkeypatch.chdir(tmp_path)
    assert cc.find_latest_checkpoint("ckpts") == os.path.join("ckpts", "run-10")
    assert cc.find_latest_checkpoint(f"file://{base}") == f"file://{base}/run-10"


def test_weak_types_of_the_template_are_kept(url):
    """A TrainState's ``step`` starts as a Python int (weakly typed); a resumed one must be too,
    or the jitted train step compiles differently and the losses drift from the killed run."""
    init = jax.jit(lambda: {"step": jnp.asarray(0), "w": jnp.ones(2)})
    assert init()["step"].weak_type
    cc.save(url, {"step": jnp.asarray(5), "w": jnp.ones(2)})
    restored = cc.restore(url, template=jax.eval_shape(init))
    assert restored["step"].weak_type and not restored["w"].weak_type and int(restored["step"]) == 5
    assert not cc.restore(url)["step"].weak_type  # without a template there is nothing to follow


def test_no_metric_warning_before_the_first_eval(url, caplog):
    keep = cc.KeepPolicy(keep_best=1, metric="eval_loss")
    ck = cc.Checkpointer(url, step_policies=[cc.CheckpointInterval(every=1)], keep=keep, handle_sigterm=False)
    for step in range(1, 5):  # saves come before the first eval in the README's loop order
        ck.on_step({"w": np.ones(1)}, step=step)
        ck.wait_until_finished()
    ck.record_metrics(4, {"eval_loss": 0.5})
    ck.on_step({"w": np.ones(1)}, step=5)
    ck.close()
    assert "ranks by metric" not in caplog.text


def test_a_reader_only_reads_metrics_it_never_deletes(tmp_path):
    reader, manager = cc.CheckpointReader(tmp_path), cc.Checkpointer(tmp_path)
    assert not hasattr(reader.retention, "apply") and hasattr(manager.retention, "apply")
    manager.close()


def test_nnx_restore_or_init_into_never_starts_fresh_past_only_damaged_checkpoints(tmp_path):
    """Every checkpoint's metadata damaged: ``restore_or_init_into`` raises naming them (it used to
    return None and leave the model as initialised: a silent fresh start)."""
    model = Tiny(nnx.Rngs(0))
    cb = cc.CheckpointCallback(str(tmp_path), state_fn=lambda: {"model": model}, handle_sigterm=False)
    cb.on_train_end(2)
    cb.close()
    (tmp_path / "run-2" / "metadata.json").write_bytes(b'{"step": 2, "timestamp": "not json')
    fresh = Tiny(nnx.Rngs(5))
    cb = cc.CheckpointCallback(str(tmp_path), state_fn=lambda: {"model": fresh}, handle_sigterm=False)
    with pytest.raises(cc.CheckpointError, match="run-2"):
        cb.restore_or_init_into(model=fresh)
    cb.close()
