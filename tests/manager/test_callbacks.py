"""CheckpointCallback in real loops: Flax linen, Flax NNX (RNG state included), and clu."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import linen_model
import optax
import pytest
from flax import nnx

import ckpt_callbacks as cc
from conftest import run_python


def _linen_setup():
    return linen_model.init_state(3, 16), linen_model.train_step


def _batch(step):
    x = jax.random.normal(jax.random.key(step), (32, 3))
    return x, x.sum(axis=1, keepdims=True)


def test_linen_loop_with_hooks_and_resume(url):
    state, train_step = _linen_setup()
    holder = {"state": state}
    cb = cc.CheckpointCallback(url, state_fn=lambda: holder["state"], step_policies=[cc.CheckpointInterval(every=10)])
    hooks = [cb]
    losses = {}
    for step in range(1, 26):
        holder["state"], losses[step] = train_step(holder["state"], *_batch(step))
        for hook in hooks:
            hook(step)
    assert cb.on_train_end(25)
    assert cb.checkpointer.all_steps() == [10, 20, 25]
    # resume from 20 in a fresh callback and replay: the losses continue exactly
    fresh, _ = _linen_setup()
    cb2 = cc.CheckpointCallback(url, step_policies=[cc.CheckpointInterval(every=10)])
    restored, meta = cb2.restore(20, template=fresh)
    assert meta["step"] == 20 and int(restored.step) == 20
    assert not cb2(20, state=restored)
    resumed = restored
    for step in range(21, 26):
        resumed, loss = train_step(resumed, *_batch(step))
        assert float(loss) == float(losses[step])
    cb.close()
    cb2.close()


class DropoutModel(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 4, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(self.lin(x))


def test_nnx_objects_and_rng_state_round_trip(url):
    model = DropoutModel(nnx.Rngs(0, dropout=1))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def step_fn(model, optimizer, x):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    cb = cc.CheckpointCallback(
        url, state_fn=lambda: {"model": model, "optimizer": optimizer}, step_policies=[cc.CheckpointInterval(every=3)]
    )
    x = jnp.ones((2, 3))
    for step in range(1, 4):
        step_fn(model, optimizer, x)
        cb(step)
    cb.checkpointer.wait_until_finished()
    expected_next = float(step_fn(model, optimizer, x))  # step 4 uses the dropout RNG state of step 3

    other = DropoutModel(nnx.Rngs(42, dropout=99))
    other_opt = nnx.Optimizer(other, optax.sgd(0.1), wrt=nnx.Param)
    meta = cb.restore_into(model=other, optimizer=other_opt)
    assert meta["step"] == 3 and int(other_opt.step[...]) == 3
    assert float(step_fn(other, other_opt, x)) == expected_next
    cb.close()


def test_missing_state_is_a_clear_error_only_when_saving(url):
    cb = cc.CheckpointCallback(url, step_policies=[cc.CheckpointInterval(every=2)])
    assert not cb(1)
    with pytest.raises(ValueError, match="step 2: a checkpoint is due but there is no state"):
        cb(2)


def test_on_eval_records_metrics_and_saves(url):
    ck = cc.Checkpointer(url, keep=cc.KeepPolicy(keep_best=1, metric="loss"))
    cb = cc.CheckpointCallback(ck, state_fn=lambda: {"w": jnp.ones(2)})
    assert cb.on_eval(5, metrics={"loss": 0.3})
    assert cb.on_eval(10, metrics={"loss": 0.1})
    assert cb.on_eval(15, metrics={"loss": 0.2})
    ck.wait_until_finished()
    infos = ck.checkpoints()
    assert [(c.step, c.extras["metrics"]["loss"]) for c in infos] == [(10, 0.1), (15, 0.2)]
    assert not cb.on_eval(15, metrics={"loss": 0.2})  # already saved at 15
    cb.close()


def test_policy_kwargs_with_a_ready_checkpointer_are_refused(url):
    with pytest.raises(ValueError, match=r"policy arguments \['keep'\] given with a ready Checkpointer"):
        cc.CheckpointCallback(cc.Checkpointer(url), keep=cc.KeepPolicy())


def test_importing_never_pulls_in_clu_or_tensorflow():
    code = "import sys, ckpt_callbacks; print(any(m.split('.')[0] in ('clu', 'tensorflow') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_clu_registration_and_hooks_loop_with_real_clu():
    out = run_python("tests/programs/clu_loop.py", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[5, 10, 12]"
