"""What a base holds: our committed checkpoints and those the registered sources list.

An orbax ``CheckpointManager`` directory's committed steps are listed beside ours (marked
``source="orbax"``, with ``checkpoint=None``; ``restore(info.path)`` reads them), so a
``Checkpointer`` of an orbax run resumes from its latest step and then saves ``run-<step>``.

>>> import jax.numpy as jnp
>>> from ckpt_callbacks.saving import save
>>> save("memory://doc/discover/run-4", {"w": jnp.zeros(2)}, step=4)
>>> [(c.step, c.source) for c in discover("memory://doc/discover")]
[(4, 'ckpt_callbacks')]
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from ckpt_callbacks import restoring
from ckpt_callbacks import storage as paths
from ckpt_callbacks.directory import CheckpointInfo, as_given, list_checkpoints


class Listing(NamedTuple):
    """What a base holds: ``found`` as ``discover`` lists it, and ``foreign``: every step a
    foreign source lists (those that share a step with one of ours too), by step."""

    found: list[CheckpointInfo]
    foreign: list[CheckpointInfo]


def foreign_steps(base: Any) -> list[CheckpointInfo]:
    """The steps the foreign sources list under ``base``, by step (ours are not listed)."""
    loc = paths.parse(base)
    return [dataclasses.replace(c, path=as_given(base, paths.parse(c.path))) for c in restoring.foreign_steps(loc)]


def listing(base: Any) -> Listing:
    """``discover(base)`` and every foreign step, from one listing of each kind."""
    ours, foreign = list_checkpoints(base), foreign_steps(base)
    taken = {c.step for c in ours}
    found = ours + [c for c in foreign if c.step not in taken]
    return Listing(sorted(found, key=lambda c: (-1 if c.step is None else c.step, c.name)), foreign)


def discover(base: Any) -> list[CheckpointInfo]:
    """Committed checkpoints under ``base`` (ours and foreign sources'), sorted by step; where
    one of ours and a foreign one share a step, ours is the one listed. Paths come back in the
    form ``base`` was given."""
    return listing(base).found


def find_latest_checkpoint(base: Any) -> str | None:
    """The path of the committed checkpoint with the highest step (ours or a source's), or None."""
    found = discover(base)
    return found[-1].path if found else None
