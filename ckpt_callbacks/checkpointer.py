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

import datetime
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ckpt_callbacks import distributed, paths, planning
from ckpt_callbacks import format as fmt
from ckpt_callbacks import restore as restore_lib
from ckpt_callbacks.discovery import CheckpointInfo, list_checkpoints
from ckpt_callbacks.errors import CheckpointExistsError, CheckpointNotFoundError
from ckpt_callbacks.policy import CheckpointInterval, Decision, KeepPolicy, SavePolicy
from ckpt_callbacks.retention import Retention
from ckpt_callbacks.serializer import SaveHandle, save_async

__all__ = ["CheckpointInterval", "Checkpointer", "ScalarWriter"]

log = logging.getLogger("ckpt_callbacks")


class ScalarWriter(Protocol):
    """A clu-style metric writer (``clu.metric_writers`` satisfy it)."""

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None: ...


def _seconds(interval: datetime.timedelta | float | None) -> datetime.timedelta | None:
    if interval is None or isinstance(interval, datetime.timedelta):
        return interval
    return datetime.timedelta(seconds=float(interval))


class Checkpointer:
    """Saves a train state by policy; a drop-in for the seed's ``Checkpointer``.

    Args:
      base_path: base URL; checkpoints are ``<base>/run-<step>``.
      save_interval: time between temporary checkpoints (timedelta or seconds), or None.
      step_policies: ``CheckpointInterval``s sorted by ``until``: permanent checkpoints.
      keep: ``KeepPolicy`` for retention (default: delete superseded temporaries only).
      clock: seconds since an epoch (default ``time.time``); inject one in tests.
      writer: gets per-save telemetry through ``write_scalars(step, dict)``.
      dtype: floating leaves are stored in this dtype.
      max_host_bytes: host-memory budget of one save (see ``save_async``).
      pack_bytes: leaves up to this size are packed into shared files (see ``save_async``).
      handle_sigterm: on the first ``on_step``, chain a SIGTERM handler that makes the next
        ``on_step`` save a permanent checkpoint (main thread only). A previous Python handler
        is called at once; if there was none (default action: terminate), the process
        terminates by SIGTERM once that checkpoint has committed.
      sync_every_steps: with several processes, how often (in steps) process 0's view of
        the clock and of preemption requests is shared; only those steps communicate.
      timeout_s: how long a save waits for other processes before failing.
      item: name of the item the state is saved under.
    """

    def __init__(
        self,
        base_path: Any,
        save_interval: datetime.timedelta | float | None = None,
        step_policies: Sequence[CheckpointInterval] = (),
        *,
        keep: KeepPolicy | None = None,
        clock: Callable[[], float] | None = None,
        writer: ScalarWriter | None = None,
        dtype: Any = None,
        max_host_bytes: int | None = None,
        pack_bytes: int = planning.PACK_MAX_LEAF_BYTES,
        handle_sigterm: bool = True,
        sync_every_steps: int = 10,
        timeout_s: float = distributed.DEFAULT_TIMEOUT_S,
        item: str = "state",
    ) -> None:
        if sync_every_steps < 1:
            raise ValueError(f"sync_every_steps must be >= 1, got {sync_every_steps}")
        self.base = paths.parse(base_path)
        self.policy = SavePolicy(step_policies=tuple(step_policies), save_interval=_seconds(save_interval))
        self._step_policy = SavePolicy(step_policies=self.policy.step_policies)
        self.keep = keep if keep is not None else KeepPolicy()
        self.item = item
        self._clock = clock or time.time
        self._writer = writer
        self._save_kwargs = {
            "dtype": dtype,
            "max_host_bytes": max_host_bytes,
            "timeout_s": timeout_s,
            "pack_bytes": pack_bytes,
        }
        self._handle_sigterm = handle_sigterm
        self._sync_every = sync_every_steps
        self._last_save_step: int | None = None
        self._last_save_time: float | None = None
        self._previous_step: int | None = None
        self._inflight: SaveHandle | None = None
        self._started: list[str] = []  # paths this run began saving to, recorded before each save starts
        self.retention = Retention(self.base, self.keep)
        self._preempt = threading.Event()
        self._previous_handler: Any = None
        self._terminate_after_save = False
        self._terminate_now = False
        self._signal_checked = False
        self._jobs: queue.Queue[Any] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._closed = False
        self.saves: list[dict[str, Any]] = []  # telemetry of every committed save, in order

    # ------------------------------------------------------------------ policy
    def request_save(self) -> None:
        """Makes the next ``on_step`` save a permanent checkpoint (thread- and signal-safe)."""
        self._preempt.set()

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self._terminate_now:  # the preemption checkpoint is committed: now do what SIGTERM did before
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        log.warning("SIGTERM: saving a checkpoint at the next step")
        self._preempt.set()
        if callable(self._previous_handler):
            self._previous_handler(signum, frame)
        else:  # the default action (terminate) is deferred until the checkpoint has committed
            self._terminate_after_save = True

    def _install_signal_handler(self) -> None:
        self._signal_checked = True
        if not self._handle_sigterm or threading.current_thread() is not threading.main_thread():
            return
        self._previous_handler = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _agreed(self, step: int, time_due: bool) -> tuple[bool, bool]:
        """(time due, preemption requested) as every process will act on them at ``step``."""
        if distributed.process_count() == 1:
            return time_due, self._preempt.is_set()
        if step % self._sync_every:
            return False, False
        flags = distributed.gather_json(f"ck/{self.base.url}/sync/{step}", self._preempt.is_set())
        decision = None if flags is None else {"time": time_due, "preempt": any(flags)}
        decision = distributed.broadcast_json(f"ck/{self.base.url}/decide/{step}", decision)
        return bool(decision["time"]), bool(decision["preempt"])

    def _decide(self, step: int, force: bool, now: float | None) -> Decision:
        now = self._clock() if now is None else now
        if self._last_save_time is None:
            self._last_save_time = now
        if not self._signal_checked:
            self._install_signal_handler()
        interval = self.policy.save_interval
        time_due = interval is not None and now - self._last_save_time >= interval.total_seconds()
        time_due, preempt = self._agreed(step, time_due)
        decision = self._step_policy.decide(
            step,
            now=now,
            last_save_step=self._last_save_step,
            last_save_time=self._last_save_time,
            force=force or preempt,
            previous_step=self._previous_step,
        )
        self._previous_step = step
        if not decision.save and time_due and step not in (0, self._last_save_step):
            return Decision(True, True, "save_interval elapsed")
        return decision

    # ------------------------------------------------------------------ saving
    def on_step(self, state: Any, *, step: int, force: bool = False, extras: dict[str, Any] | None = None) -> bool:
        """Called after every train step; saves when the policy says so. Returns whether it did."""
        return self.step_lazy(lambda: state, step=step, force=force, extras=extras)

    def step_lazy(
        self,
        state_fn: Callable[[], Any],
        *,
        step: int,
        force: bool = False,
        extras: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> bool:
        """``on_step`` with the state built only when a save is due (no work on other steps).

        ``now`` overrides the clock for the time policy (use one clock consistently).
        """
        self._check_open()
        decision = self._decide(step, force, now)
        if not decision.save:
            return False
        return self._save(state_fn(), step, decision.temporary, extras, decision.reason)

    def _save(self, state: Any, step: int, temporary: bool, extras: dict[str, Any] | None, reason: str) -> bool:
        self._wait_inflight()
        merged = dict(extras or {})
        recorded = self.retention.metrics.get(step)
        if recorded:
            merged["metrics"] = {**recorded, **merged.get("metrics", {})}
        try:
            handle = self._start(f"run-{step}", state, step=step, item=self.item, extras=merged, is_temporary=temporary)
        except CheckpointExistsError:  # saved before (a resumed run): never twice, never overwritten
            self._last_save_step = step
            return False
        log.info("checkpoint at step %d (%s%s)", step, reason, ", temporary" if temporary else "")
        self._last_save_step = step
        self._last_save_time = self._clock()
        self._preempt.clear()
        self._submit(handle, step, terminate=self._terminate_after_save)
        return True

    def _start(self, destination: str, tree: Any, *, step: int, item: str, **kwargs: Any) -> SaveHandle:
        """Starts ``save_async`` to ``<base>/<destination>``; the caller submits the handle.

        The path is recorded as this run's before the save can commit, so a retention pass
        running behind never takes this run's newest checkpoint for one left by an earlier run.
        """
        loc = self.base.join(destination)
        if loc.url not in self._started:
            self._started.append(loc.url)
        self._inflight = save_async(loc, tree, item=item, step=step, **kwargs, **self._save_kwargs)
        return self._inflight

    def save_checkpoint(
        self,
        state: Any,
        destination: str,
        *,
        step: int,
        is_temporary: bool = False,
        extras: dict[str, Any] | None = None,
    ) -> SaveHandle:
        """Saves ``state`` now to ``<base>/<destination>`` (no policy); returns the handle."""
        self._check_open()
        self._wait_inflight()
        handle = self._start(destination, state, step=step, item=self.item, extras=extras, is_temporary=is_temporary)
        self._last_save_step, self._last_save_time = step, self._clock()
        self._submit(handle, step)
        return handle

    def save_pytree(
        self, tree: Any, prefix: str, *, step: int, destination: str | None = None, extras: dict[str, Any] | None = None
    ) -> SaveHandle:
        """Saves ``tree`` as item ``prefix`` of ``<base>/<destination or run-step>``."""
        self._check_open()
        self._wait_inflight()
        handle = self._start(destination or f"run-{step}", tree, step=step, item=prefix, extras=extras)
        self._submit(handle, step)
        return handle

    def record_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Eval metrics of ``step`` for best-k retention; kept beside checkpoints as JSON."""
        self.retention.record_metrics(step, metrics)

    # ------------------------------------------------------------------ background work
    def _submit(self, handle: SaveHandle, step: int, terminate: bool = False) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="ckpt-retention", daemon=True)
            self._worker.start()
        self._jobs.put((handle, step, terminate))

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                handle, step, terminate = job
                try:
                    stats = handle.wait()
                except BaseException:
                    continue  # raised to the caller by the next save or wait_until_finished
                self._report(step, stats)
                if distributed.is_primary():
                    self._apply_retention()
                if terminate:
                    log.warning("SIGTERM: checkpoint at step %d committed; terminating", step)
                    self._terminate_now = True
                    os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread, see _on_sigterm
            finally:
                self._jobs.task_done()

    def _report(self, step: int, stats: Any) -> None:
        scalars = {
            "checkpoint/blocking_s": stats.blocking_s,
            "checkpoint/write_s": stats.write_s,
            "checkpoint/bytes": float(stats.bytes_written),
            "checkpoint/gb_per_s": stats.gb_per_s,
        }
        self.saves.append({"step": step, "path": stats.path, **scalars})
        if self._writer is not None:
            try:
                self._writer.write_scalars(step, scalars)
            except Exception as e:  # telemetry must not break saving
                log.warning("writer.write_scalars failed: %s", e)

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints under the base, by step, with recorded eval metrics merged in."""
        return self.retention.checkpoints()

    def _apply_retention(self) -> None:
        # Runs after this run's first commit. The live list is read after the listing, so every
        # checkpoint that listing shows as this run's (saves started before it) is in it.
        self.retention.apply(committed_this_run=self._started)

    def _wait_inflight(self) -> None:
        handle, self._inflight = self._inflight, None
        if handle is not None:
            handle.wait()

    def wait_until_finished(self) -> None:
        """Blocks until the save in flight has committed and retention has run; raises failures."""
        self._wait_inflight()
        self._jobs.join()

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
            if self._worker is not None:
                self._jobs.put(None)
                self._worker.join()
            if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, self._previous_handler)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ discovery and restore
    @property
    def latest_step(self) -> int | None:
        """Step of the latest committed checkpoint (lists storage)."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        return [c.step for c in list_checkpoints(self.base) if c.step is not None]

    def _path_for(self, step: int | None) -> str:
        if step is not None:
            return self.base.join(f"run-{step}").url
        found = list_checkpoints(self.base)
        if not found:
            raise CheckpointNotFoundError(f"no committed checkpoint under {self.base.url}")
        return found[-1].path

    def _note_restored(self, meta: fmt.Metadata) -> None:
        if meta.step is not None:
            self._last_save_step = self._previous_step = meta.step
            self._last_save_time = self._clock()

    def restore(self, step: int | None = None, **restore_kwargs: Any) -> tuple[Any, dict[str, Any]]:
        """Restores ``run-<step>`` (default: the latest); returns (tree, metadata dict).

        ``restore_kwargs`` go to ``ckpt_callbacks.restore`` (mesh, rules, template, ...).
        """
        self.wait_until_finished()
        path = self._path_for(step)
        restore_kwargs.setdefault("item", self.item)
        tree = restore_lib.restore(path, **restore_kwargs)
        _, _, meta = restore_lib.open_checkpoint(path)
        self._note_restored(meta)
        return tree, meta.to_json()

    def restore_or_init(self, init_fn: Callable[[], Any], **restore_kwargs: Any) -> tuple[Any, dict[str, Any] | None]:
        """Restores the latest checkpoint, or returns ``(init_fn(), None)`` if there is none.

        Without a ``template``, ``jax.eval_shape(init_fn)`` gives the structure and dtypes.
        """
        self.wait_until_finished()
        if not list_checkpoints(self.base):
            return init_fn(), None
        if "template" not in restore_kwargs:
            import jax

            restore_kwargs["template"] = jax.eval_shape(init_fn)
        return self.restore(**restore_kwargs)

    def load_pytree(
        self,
        mesh: Any = None,
        *,
        prefix: str,
        path: str | None = None,
        discover_latest: bool = True,
        partition_rules: Any = None,
        dtype: Any = None,
        template: Any = None,
        strict_shapes: bool = True,
    ) -> tuple[Any, dict[str, Any]]:
        """Seed-compatible: loads item ``prefix`` from ``path`` or the latest checkpoint."""
        if path is None:
            if not discover_latest:
                raise ValueError("load_pytree needs path= when discover_latest=False")
            path = self._path_for(None)
        elif "://" not in path and not path.startswith("/"):
            path = self.base.join(*path.split("/")).url
        tree = restore_lib.restore(
            path, mesh=mesh, rules=partition_rules, dtype=dtype, template=template, strict=strict_shapes, item=prefix
        )
        _, _, meta = restore_lib.open_checkpoint(path)
        self._note_restored(meta)
        return tree, meta.to_json()
