"""Verify a committed checkpoint end to end: every chunk of every item re-read against its crc32c.

>>> import jax.numpy as jnp
>>> from ckpt_callbacks.saving import save
>>> save("memory://doc/verify/run-3", {"w": jnp.zeros(2)}, step=3)
>>> verify("memory://doc/verify/run-3").ok
True
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ckpt_callbacks import directory as layout
from ckpt_callbacks import layouts
from ckpt_callbacks import storage as paths
from ckpt_callbacks.errors import CheckpointError, CheckpointNotFoundError
from ckpt_callbacks.restoring._reads import read_leaves
from ckpt_callbacks.restoring._targets import Target


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
            records, packs = layouts.locate(item_loc, manifest)
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
