"""What a restart needs beyond ``restore``: where an initialised state lives, and which
checkpoint is the best.

>>> import jax.numpy as jnp
>>> init_template(lambda: {"w": jnp.zeros(2)}, {"shardings": None}, devices=1)["w"].shape
(2,)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from ckpt_callbacks.discovery import CheckpointInfo
from ckpt_callbacks.errors import ShardingRuleError
from ckpt_callbacks.policy import KeepPolicy, metric_of


def _unplaced(template: Any) -> list[str]:
    """Key paths of array leaves of ``template`` that carry no sharding."""
    flat, _ = jax.tree_util.tree_flatten_with_path(template)
    return [
        jax.tree_util.keystr(path)
        for path, leaf in flat
        if isinstance(leaf, jax.ShapeDtypeStruct) and getattr(leaf, "sharding", None) is None
    ]


def init_template(init_fn: Callable[[], Any], restore_kwargs: Mapping[str, Any], devices: int | None = None) -> Any:
    """``jax.eval_shape(init_fn)``: the structure, dtypes and, where ``init_fn`` is jitted with
    ``out_shardings``, the shardings a restored state must land on.

    With more than one device visible, a state whose placement can be found nowhere (no
    shardings from the init, no ``shardings=`` or ``mesh=`` given) is refused rather than
    restored onto one device.
    """
    template = jax.eval_shape(init_fn)
    devices = jax.device_count() if devices is None else devices
    placed = restore_kwargs.get("shardings") is not None or restore_kwargs.get("mesh") is not None
    unplaced = _unplaced(template)
    if unplaced and not placed and devices > 1:
        raise ShardingRuleError(
            f"restore_or_init: {len(unplaced)} leaves of init_fn's state have no sharding under jax.eval_shape "
            f"(e.g. {unplaced[:3]}), and {devices} devices are visible: the restored state would land on one "
            "device. Jit init_fn with out_shardings=..., or pass mesh= (with rules=) or shardings= to restore_or_init"
        )
    return template


def best(checkpoints: Sequence[CheckpointInfo], keep: KeepPolicy) -> CheckpointInfo | None:
    """The checkpoint with the best ``keep.metric`` (``keep.mode``), or None if none has it."""
    if not keep.metric:
        return None
    scored = [(m, c) for c in checkpoints if (m := metric_of(c, keep.metric)) is not None]
    if not scored:
        return None
    pick = min if keep.mode == "min" else max
    return pick(scored, key=lambda mc: mc[0])[1]
