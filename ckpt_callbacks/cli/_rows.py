"""What ``ckpt-callbacks list`` shows of a base: one row per checkpoint (ours, foreign, unfinished
or damaged), the best-k ranks, and the refusal of a path that is not a base."""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from typing import Any

from ckpt_callbacks import directory as discovery
from ckpt_callbacks import directory as layout
from ckpt_callbacks import interop as orbax_format
from ckpt_callbacks import storage as paths
from ckpt_callbacks.cli._checks import shown
from ckpt_callbacks.errors import CheckpointError, CheckpointNotFoundError
from ckpt_callbacks.manager import CheckpointReader, metric_of


def saved_at(timestamp: float) -> str:
    try:
        return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):  # finite, but past year 9999 or the platform's time_t
        return f"{timestamp:.6g} s"


def row_of(base: str, info: discovery.CheckpointInfo, rank: int | None = None) -> dict[str, Any]:
    ckpt = info.checkpoint
    try:
        size, problem = (sum(r.nbytes for i in ckpt.items for r in ckpt.manifest(i).leaves) if ckpt else None), None
        items = ckpt.items if ckpt else sorted(orbax_format.find_items(paths.parse(info.path)))
    except CheckpointError as e:
        size, problem, items = None, f"committed, but a manifest cannot be read: {e}", []
    metrics = info.extras.get("metrics")
    return {
        "step": info.step,
        "path": shown(base, paths.parse(info.path)),
        "format": info.source,
        "status": "committed" if problem is None else "damaged",
        "saved": saved_at(info.timestamp),
        "timestamp": info.timestamp,
        "temporary": info.is_temporary,
        "bytes": size,
        "items": items,
        "metrics": metrics if isinstance(metrics, dict) else {},
        "best": rank,
        "problem": problem,
    }


def _no_details() -> dict[str, Any]:
    """The columns of a row for a directory we cannot open: all empty."""
    return {"saved": None, "timestamp": None, "temporary": None, "bytes": None, "items": [], "metrics": {}}


def _other_row(base: str, loc: paths.Location) -> dict[str, Any] | None:
    """A directory the listing skipped: damaged, an unfinished save (ours or orbax's), or
    neither (None)."""
    step, source = layout.step_of(loc.name), discovery.OURS
    try:
        if layout.try_open(loc) is not None:  # committed while we listed
            return None
        status, problem = (
            "uncommitted",
            "files but no COMMITTED marker: a save that did not finish (restore ignores it)",
        )
    except CheckpointError as e:
        status, problem = "damaged", f"committed, but cannot be opened: {e}"
    if status == "uncommitted" and step is None:
        step, source = orbax_format.unfinished_step(loc.name), orbax_format.OrbaxSource.name
        problem = "an orbax save that did not finish (a temporary directory; restore ignores it)"
        if step is None:
            return None
    row = {"step": step, "path": shown(base, loc), "format": source, "status": status, **_no_details()}
    return {**row, "best": None, "problem": problem}


def _skipped_row(base: str, loc: paths.Location, step: int, why: str) -> dict[str, Any]:
    """A step directory orbax lists that holds nothing we read (``interop.scan``)."""
    row = {"step": step, "path": shown(base, loc), "format": orbax_format.OrbaxSource.name, "status": "damaged"}
    problem = orbax_format.skipped_message(step, why) + " (resume skips it)"
    return {**row, **_no_details(), "best": None, "problem": problem}


def best_ranks(infos: Sequence[discovery.CheckpointInfo], metric: str | None, mode: str) -> dict[str, int]:
    """Best-k rank (1 = best) of each checkpoint recording ``metric``, by path."""
    if not metric:
        return {}
    scored = [(m, c.path) for c in infos if (m := metric_of(c, metric)) is not None]
    scored.sort(key=lambda mp: mp[0] if mode == "min" else -mp[0])
    return {path: i for i, (_, path) in enumerate(scored, 1)}


def exists(loc: paths.Location) -> bool:
    local = paths.local_path(loc)
    return os.path.exists(local) if local is not None else paths.has_any(loc)


def checkpoint_rows(base: str, metric: str | None = None, mode: str = "min") -> list[dict[str, Any]]:
    """Every checkpoint directory under ``base``: committed ones, ours and an orbax run's steps
    (recorded metrics merged; ``format`` says whose), then damaged ones and the leftovers of
    unfinished saves (``run-<step>`` without a marker, orbax's temporaries)."""
    loc = paths.parse(base)
    infos = CheckpointReader(loc).checkpoints()
    ranks = best_ranks(infos, metric, mode)
    rows = [row_of(base, info, ranks.get(info.path)) for info in infos]
    listed = {paths.parse(info.path).name for info in infos}
    skipped = orbax_format.skipped_steps(loc)  # orbax lists them, we cannot read them
    for name in paths.list_dirs(loc):
        if name in skipped:
            other: dict[str, Any] | None = _skipped_row(base, loc.join(name), *skipped[name])
        else:
            other = None if name in listed else _other_row(base, loc.join(name))
        if other is not None:
            rows.append(other)
    return sorted(rows, key=lambda r: (-1 if r["step"] is None else r["step"], r["path"]))


def base_rows(base: str, metric: str | None = None, mode: str = "min") -> list[dict[str, Any]]:
    """``checkpoint_rows``, refusing a base that does not exist or is itself a checkpoint."""
    loc = paths.parse(base)
    rows = checkpoint_rows(base, metric, mode)
    if not rows and not exists(loc):
        raise CheckpointNotFoundError(f"no checkpoints at {loc.url}: no such directory")
    if not rows and (local := paths.local_path(loc)) is not None and not os.path.isdir(local):
        raise CheckpointNotFoundError(f"no checkpoints at {loc.url}: it is a file, not a directory")
    if not rows and (ckpt := layout.try_open(loc)) is not None:
        raise CheckpointNotFoundError(
            f"{loc.url} is a checkpoint (step {ckpt.metadata.step}), not a base directory of checkpoints; "
            f"see it with: ckpt-callbacks inspect {base}"
        )
    if not rows and orbax_format.find_items(loc):
        raise CheckpointNotFoundError(
            f"{loc.url} is an orbax checkpoint, not a base directory of checkpoints; "
            f"see it with: ckpt-callbacks inspect {base}"
        )
    return rows
