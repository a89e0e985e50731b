"""Preemption: SIGTERM or ``request_save()`` asks for a permanent checkpoint at the next step.

>>> p = Preemption(handle_sigterm=False)
>>> p.requested
False
>>> p.request(); p.requested
True

With the default SIGTERM action (terminate), the process is terminated by SIGTERM once that
checkpoint has committed; a previous Python handler is called at once instead. Several
processes agree on the flag on sync steps (see ``Checkpointer``), not here.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from ckpt_callbacks import distributed

log = logging.getLogger("ckpt_callbacks")


class Preemption:
    """The preemption flag and the SIGTERM handler that sets it."""

    def __init__(self, handle_sigterm: bool) -> None:
        self._handle_sigterm = handle_sigterm
        self._flag = threading.Event()
        self._previous: Any = None
        self._installed = False
        self._checked = False
        self._terminate_after_save = False
        self._terminate_now = False

    @property
    def requested(self) -> bool:
        return self._flag.is_set()

    def request(self) -> None:
        """Thread- and signal-safe."""
        self._flag.set()

    def clear(self) -> bool:
        """Clears the flag (a save has started); returns whether that save should end the process."""
        self._flag.clear()
        return self._terminate_after_save

    def install_once(self) -> None:
        """Chains the SIGTERM handler, once, from the main thread only."""
        if self._checked:
            return
        self._checked = True
        if not self._handle_sigterm or threading.current_thread() is not threading.main_thread():
            return
        self._previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self._installed = True

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self._terminate_now:  # the preemption checkpoint is committed: now do what SIGTERM did before
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        log.warning("SIGTERM: saving a checkpoint at the next step")
        self._flag.set()
        if callable(self._previous):
            self._previous(signum, frame)
        else:  # the default action (terminate) is deferred until the checkpoint has committed
            self._terminate_after_save = True

    def terminate(self, step: int) -> None:
        """After the preemption checkpoint committed: terminate as SIGTERM would have."""
        log.warning("SIGTERM: checkpoint at step %d committed; terminating", step)
        self._terminate_now = True
        os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread, see _on_sigterm

    def uninstall(self) -> None:
        """Restores the previous handler. A SIGTERM whose default action (terminate) was deferred
        for a checkpoint that never came (no step followed) terminates the process now."""
        if not self._installed or threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, self._previous)
        self._installed = False
        if self._terminate_after_save and self._flag.is_set():
            log.warning("SIGTERM arrived after the last step: no checkpoint was due; terminating now")
            os.kill(os.getpid(), signal.SIGTERM)


def agree(
    name: str, step: int, *, now: float, last: float, flag: Preemption, every: int
) -> tuple[float | None, float, bool]:
    """(clock, last save time, preemption) as every process acts on them at ``step``.

    With several processes they are process 0's, shared on sync steps only (every ``every``
    steps); other steps have no clock reading (the time rule waits for the next
    sync step) and no communication at all.
    """
    if distributed.process_count() == 1:
        return now, last, flag.requested
    if step % every:
        return None, last, False
    flags = distributed.gather_json(f"{name}/sync/{step}", flag.requested)
    mine = None if flags is None else {"now": now, "last": last, "preempt": any(flags)}
    agreed = distributed.broadcast_json(f"{name}/decide/{step}", mine)
    return float(agreed["now"]), float(agreed["last"]), bool(agreed["preempt"])
