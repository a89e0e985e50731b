"""Orbax PyTree checkpoints as a ``restoring`` source (registered when ``interop`` is imported).

A step directory or an item directory written by orbax restores like one of ours (read
without orbax; see ``_orbax_reader``), except that orbax records no chunk checksums, so its
reads are unchecked. Under a base, the steps of an orbax ``CheckpointManager`` are listed
beside ours (``steps``), so a ``Checkpointer`` of an orbax run directory resumes from them.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, ClassVar

from ckpt_callbacks import restoring
from ckpt_callbacks import storage as paths
from ckpt_callbacks.directory import CheckpointInfo
from ckpt_callbacks.errors import CheckpointError, CheckpointNotFoundError
from ckpt_callbacks.interop._orbax_reader import find_items, open_item, step_metadata, step_of_name

log = logging.getLogger("ckpt_callbacks")


def _seconds(data: dict[str, Any]) -> float:
    """When orbax committed the step (its ``_CHECKPOINT_METADATA``), else began it; 0 if neither."""
    for key in ("commit_timestamp_nsecs", "init_timestamp_nsecs"):
        value = data.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63:
            return value / 1e9
    return 0.0


def _metrics(data: dict[str, Any]) -> dict[str, float]:
    """The metrics orbax recorded for the step (``save(metrics=...)``), the finite numbers only."""
    metrics = data.get("metrics")
    if not isinstance(metrics, dict):
        return {}
    numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return {str(k): float(v) for k, v in numbers.items() if math.isfinite(v)}


def step_info(loc: paths.Location, step: int) -> CheckpointInfo | None:
    """The committed orbax step at ``loc`` (None: no orbax checkpoint there, or one orbax has
    not finished: a temporary, or on GCS one without ``commit_success.txt``)."""
    try:
        if not find_items(loc):
            return None
    except CheckpointNotFoundError:  # unfinished, as orbax's ``is_path_finalized`` says
        return None
    data = step_metadata(loc) or {}
    metrics = _metrics(data)
    extras = {"metrics": metrics} if metrics else {}
    return CheckpointInfo(path=loc.url, step=step, timestamp=_seconds(data), extras=extras, source=OrbaxSource.name)


class OrbaxSource:
    """``restoring.StepSource`` for orbax PyTree checkpoints."""

    name: ClassVar[str] = "orbax"

    def open(self, loc: paths.Location, item: str) -> restoring.Located | None:
        found = open_item(loc, item)
        if found is None:
            return None
        read = functools.partial(restoring.read_leaves, found.loc, open_unchecked=found.open_array)
        return restoring.Located(found.loc, found.manifest, read)

    def steps(self, base: paths.Location) -> list[CheckpointInfo]:
        """Orbax's committed steps directly under ``base``: directories named as its
        ``CheckpointManager`` names steps (``<step>``, ``<prefix>_<step>``, zero-padded or not)
        holding an orbax checkpoint; temporaries and unfinished ones are left out, unreadable
        ones too (logged)."""
        out = []
        for name in paths.list_dirs(base):
            step = step_of_name(name)
            if step is None:
                continue
            loc = base.join(name)
            try:
                info = step_info(loc, step)
            except CheckpointError as e:  # committed but unreadable: say so, keep looking
                log.warning("skipping %s: %s", loc.url, e)
                continue
            if info is not None:
                out.append(info)
        return out


restoring.register_source(OrbaxSource())
