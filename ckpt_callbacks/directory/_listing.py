"""Find committed checkpoints under a base directory (``verify`` is in ``restoring``: it reads).

Only directories with a commit marker count; order is by step, never by timestamp.

>>> import jax.numpy as jnp
>>> from ckpt_callbacks.saving import save
>>> for step in (10, 5):
...     save(f"memory://doc/discovery/run-{step}", {"w": jnp.zeros(2)}, step=step)
>>> [c.step for c in list_checkpoints("memory://doc/discovery")]
[5, 10]
>>> find_latest_checkpoint("memory://doc/discovery")
'memory://doc/discovery/run-10'
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from ckpt_callbacks import storage as paths
from ckpt_callbacks.directory import _open as layout
from ckpt_callbacks.errors import CheckpointError

log = logging.getLogger("ckpt_callbacks")

OURS = "ckpt_callbacks"  # ``CheckpointInfo.source`` of our own checkpoints


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointInfo:
    """A committed checkpoint as ``list_checkpoints`` sees it (``source``: who wrote it, e.g.
    ``"orbax"`` for a step a ``restoring`` source lists; then ``checkpoint`` is None and
    ``restore(info.path)`` reads it through that source)."""

    path: str
    step: int | None
    timestamp: float
    is_temporary: bool = False
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The opened checkpoint: ``restore(info.checkpoint)`` reads no marker or metadata again.
    checkpoint: layout.Checkpoint | None = dataclasses.field(default=None, compare=False, repr=False)
    source: str = OURS

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]


def as_given(base: Any, loc: paths.Location) -> str:
    """A checkpoint's path in the form its base was given: a local path stays a plain path a
    user can ``os.path.join`` and ``open``; URLs (and parsed locations) stay URLs."""
    if isinstance(base, str | os.PathLike) and "://" not in os.fspath(base):
        return os.path.join(os.fspath(base), loc.name)
    return loc.url


def list_checkpoints(base: Any) -> list[CheckpointInfo]:
    """Committed checkpoints directly under ``base``, sorted by step (then name).

    Paths come back in the form ``base`` was given (a local path, or a URL).
    """
    base_loc = paths.parse(base)
    out = []
    for name in paths.list_dirs(base_loc):
        loc = base_loc.join(name)
        try:
            ckpt = layout.try_open(loc)
        except CheckpointError as e:  # committed but unreadable: say so, keep looking
            log.warning("skipping %s: %s", loc.url, e)
            continue
        if ckpt is None:
            continue
        meta = ckpt.metadata
        out.append(
            CheckpointInfo(
                path=as_given(base, loc),
                step=meta.step,
                timestamp=meta.timestamp,
                is_temporary=meta.is_temporary,
                extras=meta.extras,
                checkpoint=ckpt,
            )
        )
    return sorted(out, key=lambda c: (-1 if c.step is None else c.step, c.name))


def find_latest_checkpoint(base: Any) -> str | None:
    """The path of the committed checkpoint with the highest step, or None."""
    found = list_checkpoints(base)
    return found[-1].path if found else None
