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
import posixpath
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from ckpt_callbacks import directory as layout
from ckpt_callbacks import format as fmt
from ckpt_callbacks import restoring as restore_lib
from ckpt_callbacks import storage as paths
from ckpt_callbacks.directory import CheckpointInfo
from ckpt_callbacks.errors import CheckpointNotFoundError, ShardingRuleError
from ckpt_callbacks.format import as_step
from ckpt_callbacks.manager import _fallback as fallback_lib
from ckpt_callbacks.manager import _init_shardings as init_shardings
from ckpt_callbacks.manager import _rewinds as rewinds
from ckpt_callbacks.manager._discovery import Listing, discover, foreign_steps, listing
from ckpt_callbacks.manager._metrics import Metrics
from ckpt_callbacks.manager._policy import KeepPolicy, metric_of
from ckpt_callbacks.storage import StorageOptions

log = logging.getLogger("ckpt_callbacks")


def _unplaced(template: Any) -> list[str]:
    """Key paths ('/'-joined) of array leaves of ``template`` that carry no sharding."""
    flat, _ = jax.tree_util.tree_flatten_with_path(template)
    return [
        fmt.key_string(fmt.path_of(path)) or "<root>"
        for path, leaf in flat
        if isinstance(leaf, jax.ShapeDtypeStruct) and getattr(leaf, "sharding", None) is None
    ]


def init_template(init_fn: Callable[[], Any], restore_kwargs: Mapping[str, Any], devices: int | None = None) -> Any:
    """``jax.eval_shape(init_fn)``: the structure, dtypes and shardings a restored state must
    land on. The shardings come from ``out_shardings`` of a jitted init, or, when no
    ``shardings=`` or ``mesh=`` is given, from the ``device_put`` s and sharding constraints
    inside ``init_fn`` (read from its jaxpr; nothing is allocated).

    With more than one device visible, a state with a leaf whose placement can be found
    nowhere is refused, naming the leaves, rather than restored onto one device. An init JAX
    cannot trace (a str leaf; ``np.asarray`` or ``float()`` of a jax value inside) is refused
    with a ``TypeError`` saying so, unless ``shardings=`` or ``mesh=`` place the restore: then
    None (no template: the checkpoint's own structure is restored).
    """
    placed = restore_kwargs.get("shardings") is not None or restore_kwargs.get("mesh") is not None
    try:
        template = init_shardings.shapes(init_fn)
    except TypeError:  # init_fn cannot be traced
        if placed:
            return None
        raise
    devices = jax.device_count() if devices is None else devices
    if placed or devices <= 1 or not _unplaced(template):
        return template
    template = init_shardings.place(template, init_fn)
    unplaced = _unplaced(template)
    if unplaced:
        raise ShardingRuleError(
            f"restore_or_init: {len(unplaced)} leaves of init_fn's state are placed nowhere (e.g. {unplaced[:3]}): "
            f"no out_shardings, device_put or sharding constraint gives them a sharding, and {devices} devices are "
            "visible: the restored state would land on one device. device_put them (a leaf computed from a placed "
            "one, like optax's zeros_like, is not seen), jit init_fn with out_shardings=..., or pass mesh= "
            "(with rules=) or shardings= to restore_or_init"
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


def _info(ckpt: layout.Checkpoint) -> CheckpointInfo:
    meta = ckpt.metadata
    return CheckpointInfo(
        path=ckpt.url,
        step=meta.step,
        timestamp=meta.timestamp,
        is_temporary=meta.is_temporary,
        extras=meta.extras,
        checkpoint=ckpt,
    )


def _explicit(base: paths.Location, step: Any, path: Any, storage: StorageOptions | None) -> CheckpointInfo:
    """What ``restore(step=)`` or ``restore(path=)`` reads: ``path`` (relative to ``base`` unless a
    URL) or ``run-<step>``; a path or step of no checkpoint of ours is left to the foreign
    sources (an orbax step under ``base``). A ``Location`` or ``Checkpoint`` given with options
    of its own keeps them."""
    own = isinstance(path, paths.Location) and path.storage is not None
    if path is None:
        loc: Any = base.join(layout.run_name(as_step(step)))
    elif own:
        loc = path
    elif isinstance(path, layout.Checkpoint | paths.Location) or "://" in str(path) or str(path).startswith("/"):
        loc = path if isinstance(path, layout.Checkpoint) else paths.parse(path, storage)
    else:
        loc = base.join(*str(path).split("/"))
    try:
        return _info(layout.open_checkpoint(loc, storage=None if own else storage))
    except CheckpointNotFoundError:
        if path is not None:  # a foreign source's (its step, if directly under the base), or not found
            return _foreign_at(base, loc) or CheckpointInfo(path=loc.url, step=None, timestamp=0.0)
        foreign = [c for c in discover(base) if c.step == as_step(step) and c.checkpoint is None]
        if not foreign:
            raise
        return foreign[-1]


def _foreign_at(base: paths.Location, loc: paths.Location) -> CheckpointInfo | None:
    """The foreign step ``discover`` lists at ``loc`` (orbax's ``<base>/20``), if it is one of
    ``base``'s: then ``restore(path=)`` of it is its ``restore(step=)``."""
    if not directly_under(base, loc.url):
        return None
    same = [c for c in foreign_steps(base) if paths.parse(c.path).url.rstrip("/") == loc.url.rstrip("/")]
    return same[-1] if same else None


def check_restore_arguments(init_fn: Callable[[], Any], kw: Mapping[str, Any]) -> None:
    """``restore``'s own check of ``kw``, before a listing; without a ``template`` it comes from
    ``init_fn`` (so ``missing`` is checked against it only at the restore)."""
    template = kw.get("template")
    restore_lib.check_arguments(
        kw.get("rules"),
        init_fn if template is None else template,
        rename=kw.get("rename", ()),
        missing=None if template is None else kw.get("missing"),
        drop=kw.get("drop", False),
        max_host_bytes=kw.get("max_host_bytes"),
    )


def _metadata(info: CheckpointInfo) -> dict[str, Any]:
    if info.checkpoint is not None:
        return info.checkpoint.metadata.to_json()
    return {"step": info.step, "timestamp": info.timestamp, "is_temporary": info.is_temporary, "extras": info.extras}


def _unlisted(base: paths.Location, found: Sequence[CheckpointInfo]) -> list[tuple[int | None, str, BaseException]]:
    """The committed directories under ``base`` the listing skipped: (step, path, error)."""
    return [(layout.step_of(loc.name), loc.url, e) for loc, e in rewinds.unreadable(base, found)]


def directly_under(base: paths.Location, path: str) -> bool:
    """Whether the checkpoint at ``path`` is one of ``base``'s own (a directory directly under it)."""
    loc = paths.parse(path)
    return (loc.scheme, loc.bucket, posixpath.dirname(loc.path)) == (base.scheme, base.bucket, base.path)


def _refuse_discard_outside(base: paths.Location, info: CheckpointInfo) -> None:
    if not directly_under(base, info.path):
        raise ValueError(
            f"restore(discard_newer=True): {info.path} is not a checkpoint of the base {base.url} (a directory "
            "directly under it); discard_newer deletes the base's checkpoints newer than the one restored, so it "
            f"acts only on a restore of one of them. Nothing was restored or deleted: restore {info.path} without "
            f"discard_newer, or a step of {base.url} with it"
        )


def _no_checkpoint(base: paths.Location, found: Sequence[CheckpointInfo]) -> BaseException:
    """Why nothing under ``base`` restores when the listing found nothing: the damage of the
    committed directories it skipped, or that there is none."""
    damaged = _unlisted(base, found)
    if not damaged:
        return CheckpointNotFoundError(f"no committed checkpoint under {base.url}")
    return fallback_lib.none_restored(damaged, base.url)


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

    def _restored(self, info: CheckpointInfo, listed: Listing | None, discard_newer: bool) -> None:
        """After a restore of ``info`` (``listed``: the listing it came from, None for an
        explicit one): a ``Checkpointer`` warns of newer checkpoints or discards them, and
        resumes its schedule there."""

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints under the base, by step, with recorded eval metrics merged in."""
        return self.retention.checkpoints()

    def latest_step(self) -> int | None:
        """Step of the latest committed checkpoint (lists storage)."""
        return next(reversed(self.all_steps()), None)

    def all_steps(self) -> list[int]:
        return [c.step for c in discover(self.base) if c.step is not None]

    def best_checkpoint(self) -> CheckpointInfo | None:
        """The committed checkpoint with the best ``keep.metric`` (recorded eval metrics included)."""
        return best(self.checkpoints(), self.keep)

    def best_step(self) -> int | None:
        return getattr(self.best_checkpoint(), "step", None)

    def restore(
        self,
        step: int | None = None,
        *,
        path: Any = None,
        fallback: bool = True,
        discard_newer: bool = False,
        **restore_kwargs: Any,
    ) -> tuple[Any, dict[str, Any]]:
        """Restores ``path``, ``run-<step>`` or the latest checkpoint; returns (tree, metadata dict).

        ``restore_kwargs`` go to ``ckpt_callbacks.restore`` (mesh, rules, template, item, ...);
        every read, of a URL ``path`` too, uses the reader's ``StorageOptions`` unless
        ``storage=`` is given here (or ``path`` is a ``Location`` with options of its own).

        The latest is the newest checkpoint that restores: a damaged one (a missing or corrupt
        chunk, a damaged manifest, metadata or commit marker, listed or not) is skipped with a
        WARNING, unless ``fallback=False``: then its damage is raised. An explicit ``step`` or
        ``path`` never falls back. ``discard_newer=True`` (a ``Checkpointer`` only) deletes the
        checkpoints newer than the one restored, once it is; it is refused (``ValueError``,
        before the restore) for a ``path`` that is not a checkpoint directly under the base.
        """
        self._settle()
        listed = None
        if path is None and step is None:
            listed = listing(self.base.with_storage(restore_kwargs.get("storage")))
        return self._restore(step, path, listed, fallback=fallback, discard_newer=discard_newer, **restore_kwargs)

    def _restore(
        self,
        step: Any,
        path: Any,
        listed: Listing | None,
        *,
        fallback: bool = True,
        discard_newer: bool = False,
        **restore_kwargs: Any,
    ) -> tuple[Any, dict[str, Any]]:
        """``restore`` of ``path`` or ``step``, or else the newest of ``listed`` that restores
        (with ``discard_newer``, only a checkpoint directly under the base)."""
        if discard_newer:
            self._check_discard()
        storage = restore_kwargs.pop("storage", None) or self.base.storage
        base = self.base.with_storage(storage)
        restore_kwargs.setdefault("item", self.item)

        def attempt(info: CheckpointInfo) -> Any:
            target = info.checkpoint if info.checkpoint is not None else info.path
            return restore_lib.restore(target, storage=storage, **restore_kwargs)

        if listed is not None:
            found = listed.found
            if not found:
                raise _no_checkpoint(base, found)
            # The unreadable ones too: a damaged newest the listing skipped is never passed over in silence.
            unlisted = _unlisted(base, found)
            tree, info = fallback_lib.restore_newest(
                found, attempt, fallback=fallback, base=base.url, unlisted=unlisted
            )
        else:
            info = _explicit(base, step, path, storage)
            if discard_newer:
                _refuse_discard_outside(base, info)
            tree = fallback_lib.restore_one(info, attempt)
        announce(self, None if listed is None else listed.found, info.step)
        self._restored(info, listed, discard_newer)
        return tree, _metadata(info)

    def _check_discard(self) -> None:
        raise ValueError(
            f"restore(discard_newer=True) on a CheckpointReader of {self.base.url}: a reader deletes nothing; "
            "use a Checkpointer of the base to discard the checkpoints newer than the one restored"
        )

    def restore_or_init(self, init_fn: Callable[[], Any], **restore_kwargs: Any) -> tuple[Any, dict[str, Any] | None]:
        """Restores the latest checkpoint, or returns ``(init_fn(), None)`` if there is none.

        Without a ``template``, ``jax.eval_shape(init_fn)`` gives structure and dtypes, and the
        init's ``out_shardings``, ``device_put`` s and sharding constraints (read from its jaxpr,
        not run) give shardings, unless ``mesh``/``rules`` or ``shardings`` are given. With
        several devices and a leaf placed nowhere, it raises naming it (``init_template``).
        Leaves saved as None (not checkpointed) are filled only with ``missing=``, say
        ``missing=init_fn()``: never by default, as that builds a second whole state.
        Damaged checkpoints are skipped as by ``restore``; when checkpoints exist and none
        restores, it raises rather than start fresh.
        """
        check_restore_arguments(init_fn, restore_kwargs)  # refused at the first call, of a fresh base too
        self._settle()
        listed = listing(self.base)
        if self._fresh(listed.found):
            return init_fn(), None
        if "template" not in restore_kwargs:
            restore_kwargs["template"] = init_template(init_fn, restore_kwargs)
        return self._restore(None, None, listed, **restore_kwargs)

    def _fresh(self, found: Sequence[CheckpointInfo] | None = None) -> bool:
        """True when the base holds nothing to restore (a fresh start); raises when it holds
        only damaged checkpoints, naming them: never a silent fresh start."""
        found = discover(self.base) if found is None else found
        if found:
            return False
        error = _no_checkpoint(self.base, found)
        if not isinstance(error, CheckpointNotFoundError):
            raise error
        return True

    def load_pytree(
        self, mesh: Any = None, *, prefix: str, path: str | None = None, discover_latest: bool = True, **kw: Any
    ) -> tuple[Any, dict[str, Any]]:
        """Seed-compatible: item ``prefix`` of ``path`` or the latest checkpoint. Keywords:
        ``partition_rules``, ``dtype``, ``template``, ``strict_shapes`` (restore's ``rules``,
        ``dtype``, ``template``, ``strict``)."""
        if path is None and not discover_latest:
            raise ValueError("load_pytree needs path= when discover_latest=False")
        return self.restore(path=path, mesh=mesh, item=prefix, **_seed_restore_kwargs(kw))
