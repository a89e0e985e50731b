"""The training-loop callback: a periodic action that checkpoints by policy.

>>> import jax.numpy as jnp
>>> params = {"w": jnp.ones(2)}
>>> from ckpt_callbacks import CheckpointInterval
>>> cb = CheckpointCallback("memory://doc/cb", state_fn=lambda: params,
...                         step_policies=[CheckpointInterval(every=2)])
>>> hooks = [cb]
>>> for step in range(1, 4):
...     for hook in hooks:
...         _ = hook(step)
>>> cb.on_eval(3, metrics={"loss": 0.5}), cb.on_train_end(3)
(True, False)
>>> cb.checkpointer.all_steps()
[2, 3]

It duck-types clu's ``PeriodicAction`` (``hook(step, t=None) -> bool``) and never imports clu
or TensorFlow; when ``clu.periodic_actions`` is already imported it registers itself as a
virtual subclass (``import ckpt_callbacks.clu`` does it explicitly).

The state is built only when a save is due: pass ``state=`` to each call, or ``state_fn`` once
(for NNX, ``state_fn=lambda: {"model": model, "optimizer": optimizer}``: Modules and
Optimizers are saved through ``nnx.state`` and restored into with ``restore_into``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from ckpt_callbacks.errors import RestoreMismatchError
from ckpt_callbacks.manager._checkpointer import Checkpointer


def _nnx() -> Any:
    from flax import nnx

    return nnx


def _is_nnx_object(value: Any) -> bool:
    # No NNX object can exist before flax.nnx is imported; checking first keeps other loops free of it.
    return "flax.nnx" in sys.modules and isinstance(value, _nnx().Module | _nnx().Optimizer)


def to_state(value: Any) -> Any:
    """A saveable pytree: NNX Modules and Optimizers (also inside a dict) become ``nnx.state``."""
    if _is_nnx_object(value):
        return _nnx().state(value)
    if isinstance(value, dict) and any(_is_nnx_object(v) for v in value.values()):
        return {k: to_state(v) for k, v in value.items()}
    return value


class CheckpointCallback:
    """Checkpoints a training loop; call it after every step.

    Args:
      ck_or_path: a ``Checkpointer``, or a base URL to build one from ``policy_kwargs``
        (``save_interval``, ``step_policies``, ``keep``, ``clock``, ``writer``, ...).
      state_fn: returns the current train state; used when a call passes no ``state``.
    """

    def __init__(
        self, ck_or_path: Checkpointer | Any, *, state_fn: Callable[[], Any] | None = None, **policy_kwargs: Any
    ) -> None:
        if isinstance(ck_or_path, Checkpointer):
            if policy_kwargs:
                raise ValueError(
                    f"policy arguments {sorted(policy_kwargs)} given with a ready Checkpointer; "
                    "configure the Checkpointer instead"
                )
            self.checkpointer = ck_or_path
        else:
            self.checkpointer = Checkpointer(ck_or_path, **policy_kwargs)
        self._state_fn = state_fn

    def _getter(self, state: Any, step: int) -> Callable[[], Any]:
        if state is not None:
            return lambda: to_state(state)
        state_fn = self._state_fn
        if state_fn is None:

            def missing() -> Any:
                raise ValueError(
                    f"step {step}: a checkpoint is due but there is no state; pass state= "
                    "or give the callback a state_fn"
                )

            return missing
        return lambda: to_state(state_fn())

    def __call__(self, step: int, t: float | None = None, *, state: Any = None) -> bool:
        """After a train step; ``t`` (any consistent clock, e.g. clu's) overrides the clock."""
        return self.checkpointer.step_lazy(self._getter(state, step), step=step, now=t)

    def on_eval(self, step: int, state: Any = None, *, metrics: dict[str, float], save: bool = True) -> bool:
        """Records eval metrics for best-k retention; with ``save`` (default), also saves
        ``step`` as a permanent checkpoint if it is not saved yet. ``save=False`` only records."""
        self.checkpointer.record_metrics(step, metrics)
        if not save or (state is None and self._state_fn is None):
            return False
        return self.checkpointer.step_lazy(self._getter(state, step), step=step, force=True)

    def on_train_end(self, step: int, state: Any = None) -> bool:
        """Saves ``step`` unless already saved, then waits for every pending save and deletion."""
        saved = self.checkpointer.step_lazy(self._getter(state, step), step=step, force=True)
        self.checkpointer.wait_until_finished()
        return saved

    def restore(self, step: int | None = None, **restore_kwargs: Any) -> tuple[Any, dict[str, Any]]:
        """``Checkpointer.restore``: (tree, metadata) of ``step`` or the latest checkpoint."""
        return self.checkpointer.restore(step, **restore_kwargs)

    def restore_into(self, step: int | None = None, **objects: Any) -> dict[str, Any]:
        """Restores NNX Modules/Optimizers in place (``nnx.update``), RNG state included.

        The names are the keys ``state_fn`` returned them under. Returns the metadata.
        """
        template = {name: to_state(obj) for name, obj in objects.items()}
        try:
            tree, meta = self.checkpointer.restore(step, template=template, keys=list(objects))
        except RestoreMismatchError:
            if len(objects) != 1:
                raise
            # One object saved on its own (``state_fn=lambda: model``): its state is the whole tree.
            (name,) = objects
            whole, meta = self.checkpointer.restore(step, template=template[name])
            tree = {name: whole}
        for name, obj in objects.items():
            _nnx().update(obj, tree[name])
        return meta

    def restore_or_init_into(self, **objects: Any) -> dict[str, Any] | None:
        """NNX restore-or-init: restores the latest checkpoint into freshly initialised objects
        (in place, their shardings kept), or leaves them as initialised if there is none.
        Returns the metadata, or None when nothing was restored; raises when every checkpoint
        is damaged (as ``restore_or_init``)."""
        self.checkpointer._settle()
        if self.checkpointer._fresh():
            return None
        return self.restore_into(**objects)

    def close(self) -> None:
        self.checkpointer.close()

    def __enter__(self) -> CheckpointCallback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _register_with_clu() -> None:
    module = sys.modules.get("clu.periodic_actions")
    if module is not None:
        module.PeriodicAction.register(CheckpointCallback)


_register_with_clu()
