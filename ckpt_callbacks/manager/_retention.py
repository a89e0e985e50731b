"""Retention under one base directory: deletions by a ``KeepPolicy`` (metrics are ``Metrics``'s).

>>> import numpy as np
>>> from ckpt_callbacks.manager._policy import KeepPolicy
>>> from ckpt_callbacks.saving import save
>>> for step in (1, 2, 3):
...     save(f"memory://doc/retention/run-{step}", {"a": np.zeros(1)}, step=step)
>>> r = Retention(paths.parse("memory://doc/retention"), KeepPolicy(keep_last=1))
>>> r.apply(committed_this_run=None)
>>> [c.step for c in r.checkpoints()]
[3]
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from ckpt_callbacks import directory as deletes
from ckpt_callbacks import directory as layout
from ckpt_callbacks import directory as leftovers
from ckpt_callbacks import storage as paths
from ckpt_callbacks.directory import CheckpointInfo
from ckpt_callbacks.manager._metrics import Metrics
from ckpt_callbacks.manager._policy import KeepPolicy

log = logging.getLogger("ckpt_callbacks")


class Retention(Metrics):
    """Applies a ``KeepPolicy`` to our committed checkpoints under ``base`` (process 0 deletes).

    Only ours count and go: ``keep_last``, ``keep_every`` and best-k rank our checkpoints
    alone, and the steps of another writer under the base (an orbax run's) are never deleted.
    """

    def __init__(self, base: paths.Location, keep: KeepPolicy) -> None:
        super().__init__(base, keep)
        self._undeleted: dict[str, CheckpointInfo] = {}  # failed deletes, retried by the next pass
        self._failed: set[str] = set()  # paths of failed saves whose leftovers are not gone yet

    def apply(self, *, committed_this_run: Collection[str] | None) -> None:
        """Deletes what the policy says; failures are logged and retried next time, never raised.

        ``committed_this_run`` may be a list that other threads append to as saves start: it is
        read after listing, so checkpoints that committed during the listing count as this run's.
        """
        try:
            listed = self.own_checkpoints()
            this_run = None if committed_this_run is None else list(committed_this_run)
            doomed = self.keep.to_delete(listed, committed_this_run=this_run)
            self._warn_if_never_ranked(listed)
        except Exception as e:
            log.warning("retention: could not list %s: %s", self.base.url, e)
            return
        retry, self._undeleted = list(self._undeleted.values()), {}
        self._finish_deletes({paths.parse(c.path).name for c in listed})
        for info in retry + doomed:
            try:
                loc = paths.parse(info.path, self.base.storage)  # the base's retries and timeouts
                deletes.delete_checkpoint(loc, info.checkpoint.commit if info.checkpoint else None)
                if info.step is not None:
                    paths.delete_entry(self.metrics_dir, layout.metrics_name(info.step))
                log.info("retention: deleted %s", info.path)
            except Exception as e:  # never raised into the loop; retried by the next pass
                self._undeleted[info.path] = info
                log.warning("retention: could not delete %s (will retry): %s", info.path, e)

    def _finish_deletes(self, committed: set[str]) -> None:
        """Completes deletes that a killed process left part-way (``run-*`` directories with a
        ``.deleting`` record and no marker): two reads per uncommitted directory."""
        try:
            names = [n for n in paths.list_dirs(self.base) if n not in committed and layout.step_of(n) is not None]
        except Exception as e:
            log.warning("retention: could not list %s: %s", self.base.url, e)
            return
        for name in names:
            loc = self.base.join(name)
            try:
                if deletes.finish_delete(loc):
                    log.info("retention: finished the interrupted delete of %s", loc.url)
                elif paths.read_bytes(loc, layout.COMMIT_MARKER) is None:  # a save died before its commit
                    leftovers.clean(loc)  # its files, once its claim is dead
                # else a damaged marker: a checkpoint the listing skipped, left as it is for the user
            except Exception as e:  # retried by the next pass
                log.warning("retention: could not finish deleting %s (will retry): %s", loc.url, e)
        self._clean_failed()

    def note_failed(self, path: str) -> None:
        """A save to ``path`` failed: its files go once its claim is dead (checked each pass)."""
        self._failed.add(path)

    def _clean_failed(self) -> None:
        """Leftovers in committed directories where a save of this run failed; a directory is
        dropped from the list once no claim is left in it."""
        for url in sorted(self._failed):
            loc = self.base.join(paths.parse(url).name)
            try:
                leftovers.clean(loc)
                if not any(n.startswith(layout.CLAIM_PREFIX) for n in paths.list_entries(loc)):
                    self._failed.discard(url)
            except Exception as e:  # retried by the next pass
                log.warning("retention: could not clean up %s (will retry): %s", loc.url, e)
