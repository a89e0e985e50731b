"""The read side of a checkpoint base: steps, the best checkpoint, restore, restore-or-init.

An evaluation job that never saves uses ``CheckpointReader`` alone; ``Checkpointer`` is a
reader that also saves.

>>> import jax.numpy as jnp
>>> from ckpt_callbacks.saving import save
>>> save("memory://doc/resume/run-3", {"w": jnp.ones(2)}, step=3)
>>> reader = CheckpointReader("memory://doc/resume")
>>> reader.latest_step(), reader.restore()[0]["w"].tolist()
(3, [1.0, 1.0])
>>> init_template(lambda: {"w": jnp.zeros(2)}, {"shardings": None}, devices=1)["w"].shape
(2,)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from ckpt_callbacks import directory as layout
from ckpt_callbacks import restoring as restore_lib
from ckpt_callbacks import storage as paths
from ckpt_callbacks.directory import CheckpointInfo, list_checkpoints
from ckpt_callbacks.errors import CheckpointNotFoundError, ShardingRuleError
from ckpt_callbacks.format import as_step
from ckpt_callbacks.manager._metrics import Metrics
from ckpt_callbacks.manager._policy import KeepPolicy, metric_of
from ckpt_callbacks.storage import StorageOptions

log = logging.getLogger("ckpt_callbacks")


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


def _to_restore(
    base: paths.Location, step: Any, path: Any, storage: StorageOptions | None = None
) -> tuple[layout.Checkpoint, list[CheckpointInfo] | None]:
    """What to restore: ``path`` (relative to ``base`` unless a URL), ``run-<step>``, or the
    latest (then also the listing it came from); read with ``storage`` (None: the base's), a
    ``Location`` or ``Checkpoint`` given with options of its own keeping them."""
    storage = storage or base.storage
    base = base.with_storage(storage)
    if path is None and step is None:
        found = list_checkpoints(base)
        if not found or found[-1].checkpoint is None:
            raise CheckpointNotFoundError(f"no committed checkpoint under {base.url}")
        return found[-1].checkpoint, found
    if path is None:
        return layout.open_checkpoint(base.join(layout.run_name(as_step(step)))), None
    if isinstance(path, paths.Location) and path.storage is not None:
        return layout.open_checkpoint(path), None
    text = path.url if isinstance(path, layout.Checkpoint) else str(path)
    if isinstance(path, layout.Checkpoint | paths.Location) or "://" in text or text.startswith("/"):
        return layout.open_checkpoint(path, storage=storage), None
    return layout.open_checkpoint(base.join(*text.split("/"))), None


def announce(ck: CheckpointReader, found: Sequence[CheckpointInfo] | None, restored: Any) -> None:
    """The one line a run logs on its first save or restore: where, what is there, what it does."""
    if ck._announced:
        return
    ck._announced = True
    count = "" if found is None else f"{len(found)} committed checkpoint(s) found; "
    latest = f" (latest: step {found[-1].step})" if found else ""
    doing = f"resuming from step {restored}" if restored is not None else f"starting fresh{latest}"
    log.info("checkpoints under %s: %s%s", ck.base.url, count, doing)


def _parse_base(base_path: Any) -> paths.Location:
    loc = paths.parse(base_path)
    text = str(base_path) if isinstance(base_path, str | os.PathLike) else "/"
    if "://" not in text and not os.path.isabs(os.path.expanduser(text)):
        log.info("relative checkpoint path %r resolved to %s", str(base_path), loc.path)
    return loc


_SEED_NAMES = {"partition_rules": "rules", "strict_shapes": "strict", "dtype": "dtype", "template": "template"}


def _seed_restore_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(kw) - set(_SEED_NAMES))
    if unknown:
        raise TypeError(f"load_pytree got unexpected keywords {unknown}; expected some of {sorted(_SEED_NAMES)}")
    return {_SEED_NAMES[k]: v for k, v in kw.items()}


class CheckpointReader:
    """Reads the checkpoints ``<base>/run-<step>`` under one base.

    Args:
      base_path: base URL (relative local paths are resolved once, here, and logged).
      keep: the ``KeepPolicy`` whose ``metric``/``mode`` rank ``best_checkpoint``.
      item: the item ``restore`` reads by default.
      storage: retries and timeouts of requests to S3/GCS (``StorageOptions``; None: defaults).
    """

    def __init__(
        self,
        base_path: Any,
        *,
        keep: KeepPolicy | None = None,
        item: str = "state",
        storage: StorageOptions | None = None,
    ) -> None:
        layout.check_item_name(item)
        self.base = _parse_base(base_path).with_storage(storage)
        self.keep = keep if keep is not None else KeepPolicy()
        self.item = item
        self.retention: Metrics = Metrics(self.base, self.keep)  # a reader deletes nothing
        self._announced = False

    def _settle(self) -> None:
        """Before reading: nothing to wait for (a ``Checkpointer`` waits for its saves)."""

    def _restored(self, step: int | None) -> None:
        """After a restore of ``step`` (a ``Checkpointer`` resumes its schedule there)."""

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints under the base, by step, with recorded eval metrics merged in."""
        return self.retention.checkpoints()

    def latest_step(self) -> int | None:
        """Step of the latest committed checkpoint (lists storage)."""
        return next(reversed(self.all_steps()), None)

    def all_steps(self) -> list[int]:
        return [c.step for c in list_checkpoints(self.base) if c.step is not None]

    def best_checkpoint(self) -> CheckpointInfo | None:
        """The committed checkpoint with the best ``keep.metric`` (recorded eval metrics included)."""
        return best(self.checkpoints(), self.keep)

    def best_step(self) -> int | None:
        return getattr(self.best_checkpoint(), "step", None)

    def restore(
        self, step: int | None = None, *, path: Any = None, **restore_kwargs: Any
    ) -> tuple[Any, dict[str, Any]]:
        """Restores ``path``, ``run-<step>`` or the latest checkpoint; returns (tree, metadata dict).

        ``restore_kwargs`` go to ``ckpt_callbacks.restore`` (mesh, rules, template, item, ...);
        every read, of a URL ``path`` too, uses the reader's ``StorageOptions`` unless
        ``storage=`` is given here (or ``path`` is a ``Location`` with options of its own).
        """
        self._settle()
        ckpt, found = _to_restore(self.base, step, path, restore_kwargs.pop("storage", None))
        restore_kwargs.setdefault("item", self.item)
        tree = restore_lib.restore(ckpt, **restore_kwargs)
        announce(self, found, ckpt.metadata.step)
        self._restored(ckpt.metadata.step)
        return tree, ckpt.metadata.to_json()

    def restore_or_init(self, init_fn: Callable[[], Any], **restore_kwargs: Any) -> tuple[Any, dict[str, Any] | None]:
        """Restores the latest checkpoint, or returns ``(init_fn(), None)`` if there is none.

        Without a ``template``, ``jax.eval_shape(init_fn)`` gives structure, dtypes and (for an
        init jitted with ``out_shardings``) shardings; ``mesh``/``rules`` or ``shardings`` place
        the rest. With several devices and no placement found, it raises (``init_template``).
        """
        self._settle()
        found = list_checkpoints(self.base)
        if not found:
            return init_fn(), None
        if "template" not in restore_kwargs:
            restore_kwargs["template"] = init_template(init_fn, restore_kwargs)
        return self.restore(path=found[-1].checkpoint, **restore_kwargs)

    def load_pytree(
        self, mesh: Any = None, *, prefix: str, path: str | None = None, discover_latest: bool = True, **kw: Any
    ) -> tuple[Any, dict[str, Any]]:
        """Seed-compatible: item ``prefix`` of ``path`` or the latest checkpoint. Keywords:
        ``partition_rules``, ``dtype``, ``template``, ``strict_shapes`` (restore's ``rules``,
        ``dtype``, ``template``, ``strict``)."""
        if path is None and not discover_latest:
            raise ValueError("load_pytree needs path= when discover_latest=False")
        return self.restore(path=path, mesh=mesh, item=prefix, **_seed_restore_kwargs(kw))
