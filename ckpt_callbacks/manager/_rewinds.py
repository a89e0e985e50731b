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
nothing that looks committed). Orbax's steps are never deleted: they are left, with a warning
that they stay the latest (the run skips its saves at their steps) until moved away.
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


def warn(base: str, step: int, later: Sequence[CheckpointInfo], *, outside: str | None = None) -> None:
    """The WARNING of a restore older than the latest checkpoint (of a checkpoint ``outside``
    the base, if given: then discard_newer does not apply)."""
    steps = [c.step for c in later]
    ours = [c.step for c in later if c.checkpoint is not None]
    where = f"restored step {step} from {outside}, outside {base}" if outside else f"restored step {step}"
    text = (
        f"{where}, but {base} holds newer checkpoints (steps {steps}): a later resume tries step {steps[-1]} first, "
        "and this run's saves at those steps are skipped (they exist)."
    )
    if ours:
        how = "" if outside else "restore(..., discard_newer=True), or "
        text += f" To go on from step {step}, delete them: {how}`ckpt-callbacks prune {base} --after {step} --yes`"
        text += f" (steps {ours})" if len(ours) < len(later) else ""
        text += " (discard_newer acts only on a restore of one of the base's own checkpoints)." if outside else "."
    text += _left_text(base, step, [c for c in later if c.checkpoint is None])
    log.warning("%s", text)


def _left_text(base: str, step: int, foreign: Sequence[CheckpointInfo]) -> str:
    """What becomes of ``foreign`` newer steps, which nothing of ours deletes."""
    if not foreign:
        return ""
    return (
        f" Steps {[c.step for c in foreign]} ({', '.join(sorted({c.source for c in foreign}))}: "
        f"{[c.path for c in foreign]}) were not written by ckpt_callbacks: neither discard_newer nor prune deletes "
        f"them, so they stay the latest and this run skips its saves at those steps; to go on from step {step}, "
        f"move them out of {base}."
    )


def discard(
    base: paths.Location,
    step: int,
    later: Sequence[CheckpointInfo],
    damaged: Sequence[paths.Location],
    left: Sequence[CheckpointInfo],
) -> None:
    """Process 0 deletes ``later`` (ours; the newest first) and the ``damaged`` directories, and
    warns of the foreign steps newer than ``step`` it leaves (``left``); every process returns
    once it is done, or raises its failure."""
    name = f"discard/{next(_ROUNDS)}"
    error = None
    if distributed.is_primary():
        try:
            _delete(base, step, later, damaged, left)
        except Exception as e:  # raised on every process, below
            error = f"{type(e).__name__}: {e}"
            log.error("discard_newer: %s", error)
    error = distributed.broadcast_json(name, error)
    if error is not None:
        raise CheckpointError(
            f"discard_newer: deleting checkpoints newer than step {step} under {base.url} failed: {error}"
        )


def _delete(
    base: paths.Location,
    step: int,
    later: Sequence[CheckpointInfo],
    damaged: Sequence[paths.Location],
    left: Sequence[CheckpointInfo],
) -> None:
    if left:
        log.warning(
            "discard_newer: left the checkpoints newer than step %d under %s.%s",
            step,
            base.url,
            _left_text(base.url, step, left),
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
