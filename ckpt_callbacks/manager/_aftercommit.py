"""What runs after each save commits, in background threads: telemetry, retention, exit.

The training loop hands over a save's handle and goes on; this worker waits for the commit,
records the save's telemetry (and sends it to a clu-style writer), asks for a retention pass
on process 0 and, for a preemption checkpoint under the default SIGTERM action, ends the
process once that pass is done. Retention runs in a thread of its own: a long delete (a
checkpoint of many objects on a slow store) never holds back the next save, its ``on_commit``
hooks or its telemetry. Commits that arrive during a pass make one more pass, not one each.
A failed save is not handled here: its handle raises to the loop at the next save or wait.
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ckpt_callbacks import distributed
from ckpt_callbacks.saving import SaveHandle, SaveStats

log = logging.getLogger("ckpt_callbacks")


class ScalarWriter(Protocol):
    """A clu-style metric writer (``clu.metric_writers`` satisfy it)."""

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None: ...


def telemetry(stats: SaveStats) -> dict[str, float]:
    """The scalars reported for one committed save."""
    return {
        "checkpoint/blocking_s": stats.blocking_s,
        "checkpoint/write_s": stats.write_s,
        "checkpoint/bytes": float(stats.bytes_written),
        "checkpoint/gb_per_s": stats.gb_per_s,
    }


class Coalescing:
    """Runs ``fn`` in a daemon thread when asked; asks made while it runs make one more run."""

    def __init__(self, fn: Callable[[], None], name: str) -> None:
        self._fn = fn
        self._name = name
        self._cond = threading.Condition()
        self._asked = self._busy = self._stop = False
        self._thread: threading.Thread | None = None

    def ask(self) -> None:
        with self._cond:
            self._asked = True
            if self._thread is None:
                self._stop = False
                self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def join(self) -> None:
        """Blocks until no run is asked for or in progress."""
        with self._cond:
            while self._asked or self._busy:
                self._cond.wait()

    def close(self) -> None:
        """Finishes the runs asked for, then stops the thread."""
        with self._cond:
            thread, self._thread, self._stop = self._thread, None, True
            self._cond.notify_all()
        if thread is not None:
            thread.join()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._asked and not self._stop:
                    self._cond.wait()
                if not self._asked:
                    return
                self._asked, self._busy = False, True
            try:
                self._fn()
            except Exception as e:  # a pass that failed is logged; the next commit asks again
                log.warning("%s failed: %s: %s", self._name, type(e).__name__, e)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


class AfterCommit:
    """A daemon worker over a queue of (handle, step, then): ``then`` runs once committed."""

    def __init__(
        self,
        writer: ScalarWriter | None,
        retention: Callable[[], None],
        on_commit: Sequence[Callable[[str, int, dict[str, Any]], Any]] = (),
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self._writer = writer
        self._on_failure = on_failure
        self._retention = Coalescing(retention, "ckpt-retention")
        self._on_commit = list(on_commit)
        self._jobs: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.saves: list[dict[str, Any]] = []  # telemetry of every committed save, in order

    def submit(self, handle: SaveHandle, step: int, then: Callable[[], None] | None = None) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="ckpt-after-commit", daemon=True)
            self._thread.start()
        self._jobs.put((handle, step, then))

    def join(self) -> None:
        """Blocks until every submitted save has been handled and retention has caught up."""
        self._jobs.join()
        self._retention.join()

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
        self._retention.close()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                self._handle(*job)
            finally:
                self._jobs.task_done()

    def _handle(self, handle: SaveHandle, step: int, then: Callable[[], None] | None) -> None:
        stats = handle.outcome()
        if stats is None:  # a failure: raised to the caller by the next save or wait_until_finished
            if self._on_failure is not None and distributed.is_primary():
                self._on_failure(handle.path)  # its files are cleaned up once they are provably dead
            return
        for hook in self._on_commit:
            try:
                hook(stats.path, step, dict(handle.metadata))
            except Exception as e:  # a user's hook must not stop telemetry or retention
                log.warning("on_commit hook %r failed for %s: %s: %s", hook, stats.path, type(e).__name__, e)
        scalars = telemetry(stats)
        self.saves.append({"step": step, "path": stats.path, **scalars})
        if self._writer is not None:
            try:
                self._writer.write_scalars(step, scalars)
            except Exception as e:  # telemetry must not break saving
                log.warning("writer.write_scalars failed: %s", e)
        if distributed.is_primary():
            self._retention.ask()
        if then is not None:  # a preemption checkpoint: the process ends once retention has run
            self._retention.join()
            then()


_OPEN: weakref.WeakSet[Any] = weakref.WeakSet()  # managers whose pending work must finish at exit


def close_at_exit(manager: Any) -> None:
    """Has ``manager.close()`` run when the interpreter exits normally, if not called before.

    It runs before Python joins non-daemon threads, so a script that ends without ``close()``
    still commits its last save, runs retention and exits cleanly (a daemon worker killed
    during a TensorStore call is what aborted such processes).
    """
    _OPEN.add(manager)


def _close_all() -> None:
    for manager in list(_OPEN):
        try:
            manager.close()
        except BaseException as e:  # at exit there is no caller left to raise to
            log.error("closing %r at exit failed: %s: %s", manager, type(e).__name__, e)


threading._register_atexit(_close_all)  # type: ignore[attr-defined]  # what concurrent.futures uses
