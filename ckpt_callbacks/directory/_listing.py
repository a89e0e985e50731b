"""Find committed checkpoints under a base directory, and verify one end to end.

Only directories with a commit marker count; order is by step, never by timestamp.

>>> import jax.numpy as jnp
>>> from ckpt_callbacks.saving import save
>>> for step in (10, 5):
...     save(f"memory://doc/discovery/run-{step}", {"w": jnp.zeros(2)}, step=step)
>>> [c.step for c in list_checkpoints("memory://doc/discovery")]
[5, 10]
>>> find_latest_checkpoint("memory://doc/discovery")
'memory://doc/discovery/run-10'
>>> verify("memory://doc/discovery/run-10").ok
True
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from ckpt_callbacks import layouts as process_files
from ckpt_callbacks import storage as paths
from ckpt_callbacks.directory import _open as layout
from ckpt_callbacks.errors import CheckpointError, CheckpointNotFoundError
from ckpt_callbacks.restoring import Target, read_leaves

log = logging.getLogger("ckpt_callbacks")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointInfo:
    """A committed checkpoint as ``list_checkpoints`` sees it."""

    path: str
    step: int | None
    timestamp: float
    is_temporary: bool = False
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The opened checkpoint: ``restore(info.checkpoint)`` reads no marker or metadata again.
    checkpoint: layout.Checkpoint | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]


def _as_given(base: Any, loc: paths.Location) -> str:
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
                path=_as_given(base, loc),
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class VerifyReport:
    """What ``verify`` re-read and what it found wrong (an empty ``problems`` means intact)."""

    path: str
    leaves: int
    chunks: int
    bytes_read: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: Any) -> VerifyReport:
    """Re-reads every chunk of every item of a committed checkpoint and checks its crc32c.

    Everything ``restore`` would refuse is reported as a problem, never raised: a marker,
    metadata or manifest that fails validation, a missing or short file, a checksum
    mismatch. Only a path holding no committed checkpoint raises ``CheckpointNotFoundError``.
    """
    target = path if isinstance(path, layout.Checkpoint) else paths.parse(path)
    try:
        ckpt = layout.open_checkpoint(target)
    except CheckpointNotFoundError:
        raise
    except CheckpointError as e:
        return VerifyReport(path=target.url, leaves=0, chunks=0, bytes_read=0, problems=(str(e),))
    leaves = chunks = nbytes = 0
    problems = []
    for item in ckpt.items:
        try:
            manifest = ckpt.manifest(item)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        item_loc = ckpt.item_loc(item)
        try:  # each pack file read once; in the process layout, every index file (checked) first
            records, packs = process_files.item_source(item_loc, manifest)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        for record in records:
            if record.kind == "scalar":
                continue
            leaves += 1
            try:
                read_leaves(item_loc, [record], [Target(None, None)], packs=packs)
            except CheckpointError as e:
                problems.append(str(e))
                continue
            chunks += len(record.crc32c)
            nbytes += record.nbytes
    return VerifyReport(path=ckpt.url, leaves=leaves, chunks=chunks, bytes_read=nbytes, problems=tuple(problems))
