"""Rewinds: a restore older than the latest checkpoint, and discarding the newer ones on purpose.

>>> import jax.numpy as jnp
>>> from ckpt_callbacks.saving import save
>>> for step in (10, 20):
...     save(f"memory://doc/rewinds/run-{step}", {"w": jnp.ones(2)}, step=step)
>>> from ckpt_callbacks.manager._discovery import discover
>>> [c.step for c in newer(discover("memory://doc/rewinds"), 10)]
[20]

A run that restores step 10 while 20 and 30 exist resumes a trajectory those checkpoints are
not on: a later resume would take 30, and this run's saves at 20 and 30 are skipped (the
steps exist). ``Checkpointer.restore`` warns of it, and with ``discard_newer=True`` deletes
them (process 0, newest first, through ``directory.delete_checkpoint``: a kill part-way leaves
nothing that looks committed). Orbax's steps are never deleted: they are left, with a warning.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

from ckpt_callbacks import directory as deletes
from ckpt_callbacks import directory as layout
from ckpt_callbacks import distributed
from ckpt_callbacks import storage as paths
from ckpt_callbacks.directory import CheckpointInfo
from ckpt_callbacks.errors import CheckpointError

log = logging.getLogger("ckpt_callbacks")

_ROUNDS = itertools.count()


def newer(found: Sequence[CheckpointInfo], step: int) -> list[CheckpointInfo]:
    """The checkpoints of ``found`` with a step above ``step``, oldest first."""
    return [c for c in found if c.step is not None and c.step > step]


def unreadable(base: paths.Location, found: Sequence[CheckpointInfo]) -> list[tuple[paths.Location, CheckpointError]]:
    """Committed ``run-<step>`` directories a listing skipped (marker or metadata damaged), by step."""
    listed = {c.name for c in found}
    out = []
    for name in paths.list_dirs(base):
        if layout.step_of(name) is None or name in listed:
            continue
        loc = base.join(name)
        if paths.read_bytes(loc, layout.COMMIT_MARKER) is None:
            continue
        try:
            layout.try_open(loc)
        except CheckpointError as e:
            out.append((loc, e))
    return sorted(out, key=lambda le: layout.step_of(le[0].name) or 0)


def warn(base: str, step: int, later: Sequence[CheckpointInfo]) -> None:
    """The WARNING of a restore older than the latest checkpoint."""
    steps = [c.step for c in later]
    log.warning(
        "restored step %d, but %s holds newer checkpoints (steps %s): a later resume tries step %s first, and this "
        "run's saves at those steps are skipped (they exist). To go on from step %d, delete them: "
        "restore(..., discard_newer=True), or `ckpt-callbacks prune %s --after %d --yes`",
        step,
        base,
        steps,
        steps[-1],
        step,
        base,
        step,
    )


def discard(
    base: paths.Location, step: int, later: Sequence[CheckpointInfo], damaged: Sequence[paths.Location]
) -> None:
    """Process 0 deletes ``later`` (ours; the newest first) and the ``damaged`` directories; every
    process returns once it is done, or raises its failure."""
    name = f"discard/{next(_ROUNDS)}"
    error = None
    if distributed.is_primary():
        try:
            _delete(base, step, later, damaged)
        except Exception as e:  # raised on every process, below
            error = f"{type(e).__name__}: {e}"
            log.error("discard_newer: %s", error)
    error = distributed.broadcast_json(name, error)
    if error is not None:
        raise CheckpointError(
            f"discard_newer: deleting checkpoints newer than step {step} under {base.url} failed: {error}"
        )


def _delete(
    base: paths.Location, step: int, later: Sequence[CheckpointInfo], damaged: Sequence[paths.Location]
) -> None:
    foreign = [c for c in later if c.checkpoint is None]
    if foreign:
        log.warning(
            "discard_newer: left %s (steps %s): not written by ckpt_callbacks, so not deleted; a later resume "
            "takes step %s until this run saves past it",
            [c.path for c in foreign],
            [c.step for c in foreign],
            foreign[-1].step,
        )
    doomed: list[tuple[int | None, paths.Location, layout.Checkpoint | None]] = [
        (c.step, paths.parse(c.path, base.storage), c.checkpoint) for c in later if c.checkpoint is not None
    ]
    doomed += [(layout.step_of(loc.name), loc, None) for loc in damaged]
    doomed.sort(key=lambda d: d[0] or 0, reverse=True)  # the newest first: a kill part-way leaves the oldest
    for at, loc, ckpt in doomed:
        deletes.delete_checkpoint(loc, ckpt.commit if ckpt is not None else None)
        if at is not None:  # its recorded metrics, as retention deletes them
            paths.delete_entry(base.join(layout.METRICS_DIR), layout.metrics_name(at))
    if doomed:
        log.warning(
            "discard_newer: deleted %d checkpoint(s) newer than the restored step %d under %s: %s",
            len(doomed),
            step,
            base.url,
            [loc.url for _, loc, _ in doomed],
        )
