"""The manager: save policy, async saves, retention and discovery under one base directory.

>>> import jax.numpy as jnp
>>> ck = Checkpointer("memory://doc/ck", step_policies=[CheckpointInterval(every=2)])
>>> [ck.on_step({"w": jnp.ones(2)}, step=s) for s in range(1, 5)]
[False, True, False, True]
>>> ck.wait_until_finished(); ck.all_steps()
[2, 4]
>>> tree, meta = ck.restore()
>>> meta["step"], tree["w"].tolist()
(4, [1.0, 1.0])
>>> ck.close()

Checkpoints are ``<base>/run-<step>``. Resume rules: after ``restore`` of step N, a call at
step N does not save again and N+1 continues the schedule; calls may skip steps. Only one
save is in flight at a time: a save that comes due while the previous one is still writing
waits for it (and raises its failure, if it failed).
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ckpt_callbacks import directory as layout
from ckpt_callbacks import distributed
from ckpt_callbacks.directory import CheckpointInfo
from ckpt_callbacks.errors import (
    CheckpointExistsError,
    CheckpointFormatError,
    CheckpointPathError,
    RestoreMismatchError,
)
from ckpt_callbacks.format import as_step
from ckpt_callbacks.manager import _rewinds as rewinds
from ckpt_callbacks.manager._aftercommit import AfterCommit, ScalarWriter, close_at_exit
from ckpt_callbacks.manager._discovery import Listing, foreign_steps, listing
from ckpt_callbacks.manager._local import LocalSaver, LocalTier
from ckpt_callbacks.manager._local import _recover as local_lib
from ckpt_callbacks.manager._policy import CheckpointInterval, Decision, KeepPolicy, SavePolicy, as_interval
from ckpt_callbacks.manager._preemption import Preemption, agree
from ckpt_callbacks.manager._reader import (
    CheckpointReader,
    announce,
    check_restore_arguments,
    directly_under,
    init_template,
)
from ckpt_callbacks.manager._retention import Retention
from ckpt_callbacks.saving import SaveHandle, SaveOptions, save_items_async

log = logging.getLogger("ckpt_callbacks")

_ASKED = Decision(True, False, "asked")
_ROUNDS = itertools.count()  # names of the agreements on foreign steps: every process lists in the same order
_DISCARD_HINT = (
    ". After a restore older than the latest, restore(..., discard_newer=True) deletes the newer checkpoints"
)


def _skipped(step: int, why: object, hint: str = "", level: int = logging.WARNING) -> None:
    # A WARNING: the checkpoint there is another trajectory's (a restore older than the latest,
    # another run on this base, another writer's step); this run's state at ``step`` is not saved.
    # INFO for a step this run saved or restored itself (``on_train_end`` after the last due save).
    log.log(level, "step %d: a checkpoint is due, but skipped: %s%s", step, why, hint)


def _refuse_checkpoint_as_base(base_path: Any, base: Any) -> None:
    """A base that is itself a committed checkpoint (one read) is refused, naming its parent."""
    if not layout.has_marker(base):
        return
    given = os.fspath(base_path) if isinstance(base_path, str | os.PathLike) else base.url
    parent = (os.path.dirname(given.rstrip("/")) or ".") if "://" not in given else base.url.rsplit("/", 1)[0]
    raise CheckpointPathError(
        f"Checkpointer({given!r}): {base.url} is a committed checkpoint (it holds {layout.COMMIT_MARKER}), not a "
        f"base of run-<step> checkpoints; pass its parent, Checkpointer({parent!r}), to save and resume "
        f"there, or read this one with restore({given!r})"
    )


def _unrestorable_local(root: str, base: str, agreed: dict[str, Any]) -> RestoreMismatchError:
    why = agreed["rejected"][0][1] if agreed["rejected"] else "every attempt failed (see the warnings above)"
    return RestoreMismatchError(
        f"restore_or_init: the local tier holds {agreed['seen']} part(s) (this host: {root}) that no step can be "
        f"restored from ({why}), and {base} holds no checkpoint: not starting fresh over them. Fix init_fn or pass "
        "template= to restore them, or move the local directories away to start fresh"
    )


def _timestamp(now: Any) -> float:
    """A clock reading as seconds: floats as they are, ``datetime``s (the seed's clocks) too."""
    if isinstance(now, datetime.datetime):
        return now.timestamp()
    if isinstance(now, bool) or not isinstance(now, int | float):
        raise TypeError(f"a clock returned {now!r}; expected seconds (a float) or a datetime")
    return float(now)


class Checkpointer(CheckpointReader):
    """Saves a train state by policy, under the seed's ``Checkpointer`` names.

    Args:
      base_path: base URL; checkpoints are ``<base>/run-<step>``.
      save_interval: time between temporary checkpoints (timedelta or seconds), or None.
      step_policies: ``CheckpointInterval``s sorted by ``until``: permanent checkpoints.
      keep: ``KeepPolicy`` for retention (default: delete superseded temporaries only).
      clock: the time now, as seconds or a ``datetime`` (default ``time.time``); inject one in
        tests. A ``t`` given to a call is used instead, for that decision and its record.
      writer: gets per-save telemetry through ``write_scalars(step, dict)``.
      options: ``SaveOptions`` for every save; its fields (``dtype``, ``max_host_bytes``,
        ``pack_bytes``, ``timeout_s``, ``storage``) may also be given as keywords; ``storage``
        (retries and timeouts of requests) also applies to its restores, listings and deletes.
      handle_sigterm: on the first ``on_step``, chain a SIGTERM handler that makes the next
        ``on_step`` save a permanent checkpoint (see ``ckpt_callbacks.preemption``).
      sync_every_steps: with several processes, process 0's clock and the preemption flags
        are shared every this many steps; only those steps communicate.
      item: name of the item the state is saved under.
      on_commit: the seed's ``true_callbacks``: each is called as ``fn(path, step, metadata)``
        once a save's marker is durable (in the background; failures are logged).
      local: a ``LocalTier``: frequent per-host checkpoints beside the base's (the persistent
        tier), each process's shards also kept by peers; ``restore_or_init`` restores the newest
        step either tier can give.
    """

    def __init__(
        self,
        base_path: Any,
        save_interval: datetime.timedelta | float | None = None,
        step_policies: Sequence[CheckpointInterval] = (),
        *,
        keep: KeepPolicy | None = None,
        clock: Callable[[], Any] | None = None,
        writer: ScalarWriter | None = None,
        options: SaveOptions | None = None,
        handle_sigterm: bool = True,
        sync_every_steps: int = 10,
        item: str = "state",
        on_commit: Sequence[Callable[[str, int, dict[str, Any]], Any]] = (),
        local: LocalTier | None = None,
        **option_overrides: Any,
    ) -> None:
        if sync_every_steps < 1:
            raise ValueError(f"sync_every_steps must be >= 1, got {sync_every_steps}")
        self.options = dataclasses.replace(options or SaveOptions(), **option_overrides)
        super().__init__(base_path, keep=keep, item=item, storage=self.options.storage)
        self.retention: Retention = Retention(self.base, self.keep)
        self.policy = SavePolicy(step_policies=step_policies, save_interval=as_interval(save_interval))
        _refuse_checkpoint_as_base(base_path, self.base)  # arguments first: a bad one is refused without I/O
        self._clock = clock or time.time
        self._sync_every = sync_every_steps
        self._last_save_step: int | None = None
        self._last_save_time: float | None = None
        self._previous_step: int | None = None
        # The save in flight, the last step saved before it, and the thread that started it.
        self._inflight: tuple[SaveHandle, int | None, int] | None = None
        self._lock = threading.Lock()  # for _inflight: several threads may wait at once
        self._started: list[str] = []  # paths this run began saving to, recorded before each save starts
        self.preemption = Preemption(handle_sigterm)
        self._after = AfterCommit(
            writer,
            lambda: self.retention.apply(committed_this_run=self._started),
            on_commit,
            on_failure=self.retention.note_failed,
        )
        if local is not None and not isinstance(local, LocalTier):
            raise TypeError(f"Checkpointer(local=...) takes a LocalTier, got {type(local).__name__}")
        self.local: LocalSaver | None = LocalSaver(local, self.base) if local is not None else None
        self._closed = False
        self.saves = self._after.saves  # telemetry of every committed save, in order
        close_at_exit(self)

    def request_save(self) -> None:
        """Makes the next ``on_step`` save a permanent checkpoint (thread- and signal-safe)."""
        self.preemption.request()

    def on_step(self, state: Any, *, step: int, force: bool = False, extras: dict[str, Any] | None = None) -> bool:
        """Called after every train step; saves when the policy says so. Returns whether it did."""
        return self.step_lazy(lambda: state, step=step, force=force, extras=extras)

    def step_lazy(
        self, state_fn: Callable[[], Any], *, step: int, force: bool = False, extras: Any = None, now: Any = None
    ) -> bool:
        """``on_step`` with the state built only when a save is due (no work on other steps).

        ``now`` overrides the clock for this decision and for the save's record.
        """
        self._check_open()
        step, now = as_step(step), _timestamp(self._clock() if now is None else now)
        self.preemption.install_once()
        if self._last_save_time is None:
            self._last_save_time = now
        agreed_now, last, preempt = agree(
            f"ck/{self.base.url}",
            step,
            now=now,
            last=self._last_save_time,
            flag=self.preemption,
            every=self._sync_every,
        )
        decision = self.policy.decide(
            step,
            now=agreed_now,
            last_save_step=self._last_save_step,
            last_save_time=last,
            force=force or preempt,
            previous_step=self._previous_step,
        )
        self._previous_step = step
        built: list[Any] = []

        def state() -> Any:  # built once, for either tier
            if not built:
                built.append(state_fn())
            return built[0]

        if self.local is not None:
            self.local.pump()
            if self.local.due(step, agreed_now):  # process 0's clock: every process decides alike
                self.local.save(state(), step, now=now, extras=extras)
        return self._persistent_step(state, step, decision, force=force, extras=extras, now=now)

    def _persistent_step(
        self, state_fn: Callable[[], Any], step: int, decision: Decision, *, force: bool, extras: Any, now: float
    ) -> bool:
        if not decision.save:
            if force and step == self._last_save_step:  # asked for, so never refused in silence
                _skipped(
                    step,
                    f"step {step} was saved, restored or skipped by this run already (a step is saved once)",
                    level=logging.INFO,
                )
            return False
        damaged = self._damaged_at(step)
        if damaged is not None:  # never raised into the loop; never deleted for the user either
            self._last_save_step = step
            _skipped(step, damaged)
            return False
        extras = self.retention.with_recorded_metrics(step, extras)
        self._wait_inflight()  # the previous save's failure is raised here, never taken for this step's
        try:
            self._save_now(
                {self.item: state_fn()}, layout.run_name(step), step=step, extras=extras, now=now, decision=decision
            )
        except CheckpointExistsError as e:  # saved before (a resumed run): never twice, never overwritten
            self._last_save_step = step
            _skipped(step, e, "" if step in (self._foreign or {}) else _DISCARD_HINT)
            return False
        return True

    def _damaged_at(self, step: int) -> str | None:
        """Why ``run-<step>`` cannot take this step's save: it holds a commit marker that cannot
        be read (process 0 reads it, one read; every process agrees). None: the save may go on."""
        why = None
        if distributed.is_primary():
            loc = self.base.join(layout.run_name(step))
            try:
                layout.read_commit(loc)
            except CheckpointFormatError as e:
                why = (
                    f"{loc.url} holds a damaged checkpoint ({e}); it is left as it is: check it with "
                    f"`ckpt-callbacks verify {loc.url}`, then delete or move it away to save step {step} there"
                )
        return distributed.broadcast_json(f"ck-damaged/{next(_ROUNDS)}", why)

    def _save_now(
        self,
        items: Any,
        dest: str,
        *,
        step: int,
        extras: Any = None,
        now: Any = None,
        decision: Any = _ASKED,
        add=False,
    ) -> SaveHandle:
        """The one save path: wait for the previous save, start this one, hand it to the worker.

        The path counts as this run's before the save can commit (so retention running behind
        never takes it for an earlier run's); the step counts as saved until the save fails.
        """
        self._check_open()
        self._wait_inflight()
        step = as_step(step)
        listed = None
        if not self._announced:
            listed = listing(self.base)
            announce(self, listed.found, None)
        foreign = self._foreign if self._foreign is not None else self._agree_foreign(listed)
        if step in foreign and dest == layout.run_name(step):
            raise CheckpointExistsError(
                f"{foreign[step]} holds step {step} under {self.base.url}: a {dest} beside it would shadow it. To "
                f"save step {step} here, move that checkpoint out of {self.base.url}"
            )
        loc = self.base.join(dest)
        new = loc.url not in self._started
        if new:
            self._started.append(loc.url)
        temporary = decision.temporary
        try:
            handle = save_items_async(
                loc, items, step=step, extras=extras, is_temporary=temporary, add=add, options=self.options
            )
        except CheckpointExistsError:  # an earlier run's checkpoint, not this run's
            if new:
                self._started.remove(loc.url)
            raise
        log.info("checkpoint at step %d (%s%s)", step, decision.reason, ", temporary" if decision.temporary else "")
        with self._lock:
            self._inflight = (handle, self._last_save_step, threading.get_ident())
        self._last_save_step = step
        self._last_save_time = _timestamp(self._clock()) if now is None else now
        terminate = self.preemption.clear()
        self._after.submit(handle, step, (lambda: self.preemption.terminate(step)) if terminate else None)
        return handle

    def save_checkpoint(
        self, state: Any, destination: str, *, step: int, is_temporary: bool = False, extras: Any = None
    ) -> SaveHandle:
        """Saves ``state`` now to ``<base>/<destination>`` (no policy); returns the handle."""
        decision = Decision(True, is_temporary, "save_checkpoint")
        return self._save_now({self.item: state}, destination, step=step, extras=extras, decision=decision)

    def save_pytree(
        self, tree: Any, prefix: str, *, step: int, destination: str | None = None, extras: dict[str, Any] | None = None
    ) -> SaveHandle:
        """Saves ``tree`` as item ``prefix`` of ``<base>/<destination or run-step>``, beside the
        items already committed there (one call per item into the same step)."""
        return self._save_now({prefix: tree}, destination or layout.run_name(step), step=step, extras=extras, add=True)

    def save_items(self, items: dict[str, Any], *, step: int, extras: Any = None) -> SaveHandle:
        """Saves named items (model, optimizer, a loader's JSON state) as ``run-<step>``, committed together."""
        return self._save_now(items, layout.run_name(step), step=step, extras=extras)

    def record_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Eval metrics of ``step`` for best-k retention; kept beside checkpoints as JSON."""
        self.retention.record_metrics(step, metrics)

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints under the base, by step, with recorded eval metrics merged in."""
        return self.retention.checkpoints()

    def _wait_inflight(self) -> None:
        """Waits for the save in flight and raises its failure to every thread waiting. The
        failure stays pending until raised in the thread that started the save (the loop: at
        its next save or wait, unless its own ``handle.wait()`` raised it already)."""
        with self._lock:
            inflight = self._inflight
        if inflight is None:
            return
        handle, saved_before, owner = inflight
        here = threading.get_ident()
        already = here == owner and here in handle.raised_to
        try:
            handle.wait()
        except BaseException:
            if here == owner:
                with self._lock:
                    if self._inflight is inflight:
                        self._inflight = None
                        self._last_save_step = saved_before  # not committed: the step may be saved again
            if not already:
                raise
            return
        with self._lock:
            if self._inflight is inflight:
                self._inflight = None

    def wait_until_finished(self) -> None:
        """Blocks until the save in flight has committed and retention has run; raises failures.

        With a ``LocalTier``, the pending replication rounds are dispatched here: call it from
        the thread that runs the train steps (every process does, at the same point)."""
        if self.local is not None:
            self.local.flush()
        self._wait_inflight()
        self._after.join()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"Checkpointer for {self.base.url} is closed")

    def close(self) -> None:
        """Waits for pending work, stops the worker and restores the SIGTERM handler."""
        if self._closed:
            return
        try:
            self.wait_until_finished()
        finally:
            self._closed = True
            if self.local is not None:
                self.local.close()
            self._after.close()
            self.preemption.uninstall()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _settle(self) -> None:
        self.wait_until_finished()

    def _check_discard(self) -> None:
        """A ``Checkpointer`` may discard newer checkpoints."""

    def _restored(self, info: CheckpointInfo, listed: Listing | None, discard_newer: bool) -> None:
        step = info.step
        if step is None:
            return
        outside = None if listed is not None or directly_under(self.base, info.path) else info.path
        self._rewound(step, listed, discard_newer, outside)
        # resume rules: the restored step is not saved again; the schedule goes on from there
        self._last_save_step = self._previous_step = step
        self._last_save_time = _timestamp(self._clock())
        if self.local is not None and discard_newer:
            self.local.discard_after(step)
        elif self.local is not None:
            self.local.restored(step)

    def restore_or_init(self, init_fn: Callable[[], Any], **restore_kwargs: Any) -> tuple[Any, dict[str, Any] | None]:
        """As ``CheckpointReader.restore_or_init``; with a ``LocalTier``, the newest step either
        tier restores: a local step (from this host's directory, or a peer's replica) on the
        topology it was saved on, when it is at least the persistent tier's newest (or newer
        than the step the persistent tier falls back to). Restore options other than
        ``template=`` and ``missing=`` apply to the persistent tier only. With local steps on
        some host that none can restore and an empty persistent tier, it raises: never a
        silent fresh start. ``meta["tier"]`` is ``"local"`` or ``"persistent"``."""
        if self.local is None:
            return super().restore_or_init(init_fn, **restore_kwargs)
        check_restore_arguments(init_fn, restore_kwargs)
        self._settle()
        listed = listing(self.base)
        steps = [c.step for c in listed.found if c.step is not None]
        newest = max(steps) if steps else None
        others = sorted(k for k in restore_kwargs if k not in ("template", "missing"))
        agreed, template = None, restore_kwargs.get("template")
        if others:
            log.info(
                "restore: restore options %s apply to the persistent tier only; the local tier is not read", others
            )
        else:
            template, agreed = self._local_plan(init_fn, restore_kwargs)
            local_lib.explain(agreed, newest)
            best = local_lib.newest(agreed)
            if best is not None and (newest is None or best >= newest):
                got = self.local.restore(agreed, template, newest)
                if got is not None:
                    return self._restored_local(got, listed)
            elif best is not None:
                log.info("restore: the persistent tier's step %d is newer than local step %d; using it", newest, best)
        if self._fresh(listed.found):
            if agreed is not None and agreed["seen"]:
                raise _unrestorable_local(self.local.root, self.base.url, agreed)
            return init_fn(), None
        if "template" not in restore_kwargs:
            restore_kwargs["template"] = template if template is not None else init_template(init_fn, restore_kwargs)
        tree, meta = self._restore(None, None, listed, **restore_kwargs)
        best = local_lib.newest(agreed) if agreed is not None else None
        if agreed is not None and best is not None and best > meta["step"]:  # the persistent tier fell back past damage
            log.warning("restore: the persistent tier restored step %d only; trying local step %d", meta["step"], best)
            got = self.local.restore(agreed, template, meta["step"] + 1)
            if got is not None:
                return self._restored_local(got, listed)
        return tree, {**meta, "tier": "persistent"}

    def _local_plan(self, init_fn: Callable[[], Any], restore_kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """The template (None if it cannot be built) and the local tier's agreed plan."""
        assert self.local is not None
        template, why = restore_kwargs.get("template"), None
        if template is None:
            try:
                template = init_template(init_fn, restore_kwargs)
            except Exception as e:  # the persistent tier's restore (or a fresh start) says it again
                why = f"{type(e).__name__}: {e}"
        return template, self.local.plan(template, why)

    def _restored_local(self, got: tuple[Any, dict[str, Any], int], listed: Listing) -> tuple[Any, dict[str, Any]]:
        tree, meta, step = got
        announce(self, listed.found, f"{step} of the local tier")
        self._rewound(step, listed, False, None)
        self._last_save_step = self._previous_step = step
        self._last_save_time = _timestamp(self._clock())
        return tree, meta

    def _rewound(self, step: int, listed: Listing | None, discard: bool, outside: str | None) -> None:
        """Newer checkpoints than the restored ``step`` (restored from ``outside`` the base, if
        given): warned of, or deleted with ``discard`` (process 0 lists and decides; every
        process returns once the deletes are done). The foreign steps listed are kept."""
        later: list[CheckpointInfo] = []
        left: list[CheckpointInfo] = []
        damaged: list[Any] = []
        if distributed.is_primary():
            listed = listing(self.base) if listed is None else listed
            later, left = rewinds.newer(listed.found, step), rewinds.newer(listed.foreign, step)
            if discard:
                unreadable = rewinds.unreadable(self.base, listed.found)
                damaged = [loc for loc, _ in unreadable if (layout.step_of(loc.name) or 0) > step]
        self._agree_foreign(listed)
        if discard:
            rewinds.discard(self.base, step, later, damaged, left)
        elif later:
            rewinds.warn(self.base.url, step, later, outside=outside)

    # Foreign sources' steps under the base ({step: what holds it}), as process 0 listed them at
    # the last restore or the first save: they gain none while this run goes on.
    _foreign: dict[int, str] | None = None

    def _agree_foreign(self, listed: Listing | None) -> dict[int, str]:
        """Process 0's foreign steps (of ``listed``, else listed now), kept on every process."""
        mine = None
        if distributed.is_primary():
            foreign = listed.foreign if listed is not None else foreign_steps(self.base)
            mine = [[c.step, f"{c.source}'s checkpoint {c.path}"] for c in foreign]
        agreed = distributed.broadcast_json(f"ck-foreign/{next(_ROUNDS)}", mine)
        self._foreign = {int(step): what for step, what in agreed}
        return self._foreign
