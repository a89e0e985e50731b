"""Orbax PyTree checkpoints as a ``restoring`` source (registered when ``interop`` is imported).

A step directory or an item directory written by orbax restores like one of ours (read
without orbax; see ``_orbax_reader``), except that orbax records no chunk checksums, so its
reads are unchecked. Under a base, the steps of an orbax ``CheckpointManager`` are listed
beside ours (``steps``), so a ``Checkpointer`` of an orbax run directory resumes from them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, ClassVar

from ckpt_callbacks import restoring
from ckpt_callbacks import storage as paths
from ckpt_callbacks.directory import COMMIT_MARKER, CheckpointInfo
from ckpt_callbacks.errors import CheckpointError, CheckpointNotFoundError
from ckpt_callbacks.interop._orbax_reader import (
    CHECKPOINT_METADATA,
    METADATA,
    finalized,
    find_items,
    has_commit_success,
    open_item,
    step_metadata,
    step_of_name,
    unfinished_step,
)

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


def _why_unreadable(loc: paths.Location) -> str:
    """What a step directory orbax lists holds instead of a checkpoint we read, in a few words."""
    entries = paths.list_entries(loc)
    if not entries:
        return "it is empty"
    listed = ", ".join(entries[:5]) + (f", ... ({len(entries) - 5} more)" if len(entries) > 5 else "")
    head = f"its {CHECKPOINT_METADATA} names no item" if CHECKPOINT_METADATA in entries else f"no {CHECKPOINT_METADATA}"
    return f"{head}, and no item directory holding {METADATA} (it holds {listed})"


@dataclasses.dataclass(frozen=True)
class Scan:
    """An orbax run directory as ``scan`` reads it: its committed steps, and the step
    directories orbax lists that hold nothing we read (name -> (step, why))."""

    steps: list[CheckpointInfo]
    skipped: dict[str, tuple[int, str]]


def scan(base: paths.Location) -> Scan:
    """The orbax steps directly under ``base``, and those orbax lists but we cannot read.

    Orbax's ``CheckpointManager`` lists every directory with a step name that is finalized
    (not a temporary; on GCS, holding ``commit_success.txt``), whatever it holds: an empty
    ``4/`` is its latest step. Such a directory holding no orbax checkpoint we read is
    ``skipped`` (and never restored) only where orbax's claim is plausible: it holds
    ``commit_success.txt`` itself, or ``base`` holds other orbax steps (readable, or broken
    ones) or an orbax temporary. A numbered directory of an unrelated folder is none of ours
    to report, nor is a checkpoint of ours so named. Broken orbax files (a malformed
    ``_CHECKPOINT_METADATA``) are skipped too.
    """
    steps: list[CheckpointInfo] = []
    unread: list[tuple[str, int, paths.Location]] = []
    skipped: dict[str, tuple[int, str]] = {}
    temporaries = False
    for name in paths.list_dirs(base):
        step = step_of_name(name)
        if step is None:
            temporaries = temporaries or unfinished_step(name) is not None
            continue
        loc = base.join(name)
        try:
            info = step_info(loc, step)
        except CheckpointError as e:  # orbax's files are there, but broken
            skipped[name] = (step, str(e))
            continue
        if info is not None:
            steps.append(info)
        elif finalized(loc) and paths.read_bytes(loc, COMMIT_MARKER) is None:  # not one of ours named "7"
            unread.append((name, step, loc))
    claimed = bool(steps or skipped or temporaries)
    for name, step, loc in unread:
        if claimed or has_commit_success(loc):
            skipped[name] = (step, _why_unreadable(loc))
    return Scan(steps, dict(sorted(skipped.items(), key=lambda kv: kv[1][0])))


def skipped_steps(base: paths.Location) -> dict[str, tuple[int, str]]:
    """The step directories under ``base`` orbax lists but we cannot read (see ``scan``):
    name -> (step, why), for listings that show them (``ckpt-callbacks list``)."""
    return scan(base).skipped


def skipped_message(step: int, why: str, url: str = "") -> str:
    """What a listing says of a step orbax lists that we cannot read (``url``: where it is).

    >>> skipped_message(4, "it is empty")
    'orbax lists step 4 but it holds no readable checkpoint: it is empty'
    """
    return f"orbax lists step {step}{f' ({url})' if url else ''} but it holds no readable checkpoint: {why}"


@functools.lru_cache(maxsize=4096)
def _warn_once(step: int, url: str, why: str) -> None:
    """Each skipped step logged once per process: a manager lists its base at every save."""
    log.warning("%s; skipping it (never resumed from)", skipped_message(step, why, url))


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
        holding an orbax checkpoint; temporaries and unfinished ones are left out. A step
        directory orbax lists that we cannot read is left out with a WARNING (``scan``)."""
        found = scan(base)
        for name, (step, why) in found.skipped.items():
            _warn_once(step, base.join(name).url, why)
        return found.steps


restoring.register_source(OrbaxSource())
