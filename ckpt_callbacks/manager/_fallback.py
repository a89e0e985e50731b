"""Restoring the newest checkpoint that restores: past damaged ones, agreed by every process.

>>> verdict([{"kind": "ok", "step": 3}, {"kind": "damaged", "step": 3, "error": "chunk missing"}])["kind"]
'damaged'

Damage is what a later checkpoint does not share: a missing or corrupt chunk, a damaged or
forged manifest or metadata (``CorruptCheckpointError``, ``CheckpointFormatError``). A template
or sharding that does not fit is the caller's and would fail on every step: it is raised at
once. With several processes, each reports how its own reads went (a chunk only one of them
reads may be the damaged one) and all act on process 0's verdict, so they fall back together.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

from ckpt_callbacks import distributed
from ckpt_callbacks.directory import CheckpointInfo
from ckpt_callbacks.errors import CheckpointError, CheckpointFormatError, CorruptCheckpointError

log = logging.getLogger("ckpt_callbacks")

DAMAGE: tuple[type[CheckpointError], ...] = (CorruptCheckpointError, CheckpointFormatError)
_DAMAGE_BY_NAME = {cls.__name__: cls for cls in DAMAGE}
_ROUNDS = itertools.count()  # names of agreements: every process restores in the same order


def outcome(step: int | None, error: BaseException | None) -> dict[str, Any]:
    """What one process reports of one attempt."""
    if error is None:
        return {"kind": "ok", "step": step}
    damage = [cls.__name__ for cls in DAMAGE if isinstance(error, cls)]
    kind, name = ("damaged", damage[0]) if damage else ("fatal", type(error).__name__)
    return {"kind": kind, "step": step, "type": name, "error": str(error)}


def verdict(outcomes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What every process does after one attempt (outcomes in process order): the first
    fatal failure, else the first damage, else ok. Processes that tried different steps fail."""
    steps = sorted({o["step"] for o in outcomes}, key=lambda s: -1 if s is None else s)
    if len(steps) > 1:
        error = f"processes tried to restore different steps {steps}: their listings of the base differ"
        return {"kind": "fatal", "pid": 0, "type": "CheckpointError", "error": error}
    for kind in ("fatal", "damaged"):
        for pid, o in enumerate(outcomes):
            if o["kind"] == kind:
                return {**o, "pid": pid}
    return {"kind": "ok"}


def _agree(mine: dict[str, Any], name: str) -> dict[str, Any]:
    if distributed.process_count() == 1:
        return verdict([mine])
    gathered = distributed.gather_json(f"{name}/outcome", mine)
    return distributed.broadcast_json(f"{name}/verdict", None if gathered is None else verdict(gathered))


def _peer_error(agreed: dict[str, Any], path: str) -> CheckpointError:
    cls = _DAMAGE_BY_NAME.get(agreed.get("type", ""), CheckpointError)
    return cls(f"{path}: process {agreed['pid']} could not restore it: {agreed['error']}")


def attempt_agreed(info: CheckpointInfo, attempt: Callable[[CheckpointInfo], Any], name: str) -> Any:
    """``attempt(info)`` on every process; all raise if any failed (the failing one its own error)."""
    try:
        value, error = attempt(info), None
    except Exception as e:  # reported to the others first, then raised
        value, error = None, e
    mine = outcome(info.step, error)
    agreed = _agree(mine, name)
    if agreed["kind"] == "ok":
        return value
    if error is not None and mine["kind"] == agreed["kind"]:
        raise error
    raise _peer_error(agreed, info.path) from error  # of the verdict's kind, so every process goes on alike


def restore_one(info: CheckpointInfo, attempt: Callable[[CheckpointInfo], Any]) -> Any:
    """``attempt(info)``, agreed by every process (an explicit step: no fallback)."""
    return attempt_agreed(info, attempt, f"restore/{next(_ROUNDS)}")


Unlisted = Sequence[tuple[int | None, str, BaseException]]  # committed, but skipped by a listing: (step, path, error)


def _with_unlisted(
    candidates: Sequence[CheckpointInfo], unlisted: Unlisted
) -> tuple[list[CheckpointInfo], dict[int, BaseException]]:
    """``candidates`` with an info for each of ``unlisted`` (of a known step) among them, by
    step, and the error each of those raises (by ``id``)."""
    stand_ins = [
        (CheckpointInfo(path=path, step=step, timestamp=0.0), e) for step, path, e in unlisted if step is not None
    ]
    ordered = sorted([*candidates, *(info for info, _ in stand_ins)], key=lambda c: -1 if c.step is None else c.step)
    return ordered, {id(info): e for info, e in stand_ins}


def restore_newest(
    candidates: Sequence[CheckpointInfo],
    attempt: Callable[[CheckpointInfo], Any],
    *,
    fallback: bool,
    base: str,
    unlisted: Unlisted = (),
) -> tuple[Any, CheckpointInfo]:
    """(``attempt(info)``, info) for the newest of ``candidates`` (sorted by step) that restores.

    ``unlisted``: the committed directories the listing skipped, unreadable ((step, path,
    error)); each counts as a damaged checkpoint of its step, so a damaged newest is never
    passed over in silence. Each damaged one skipped is a WARNING; without ``fallback`` the
    newest's damage is raised. When none restores, the newest's error is raised, listing every
    one tried and the unlisted ones.
    """
    name = f"restore/{next(_ROUNDS)}"
    ordered, unreadable = _with_unlisted(candidates, unlisted)

    def attempt_or_raise(info: CheckpointInfo) -> Any:
        if id(info) in unreadable:
            raise unreadable[id(info)]
        return attempt(info)

    tried: list[tuple[CheckpointInfo, BaseException]] = []
    for info in reversed(ordered):
        try:
            value = attempt_agreed(info, attempt_or_raise, f"{name}/{len(tried)}")
        except DAMAGE as e:
            if not fallback:
                raise
            tried.append((info, e))
            log.warning("restore: skipping the damaged checkpoint %s (step %s): %s", info.path, info.step, e)
            continue
        if tried:
            skipped = ", ".join(f"step {i.step}" for i, _ in tried)
            log.warning("restore: fell back to step %s under %s, past damaged %s", info.step, base, skipped)
        return value, info
    failed = [(i.step, i.path, e) for i, e in tried] + [u for u in unlisted if u[0] is None]
    raise none_restored(failed, base) from tried[0][1]


def none_restored(failed: Sequence[tuple[int | None, str, BaseException]], base: str) -> BaseException:
    """The error when nothing restores: the newest's of ``failed`` ((step, path, error), at least
    one), listing them all, newest first."""
    ordered = sorted(failed, key=lambda f: -1 if f[0] is None else f[0], reverse=True)
    listing = "\n  ".join(f"{path} (step {step}): {e}" for step, path, e in ordered)
    newest = ordered[0][2]
    return type(newest)(f"no checkpoint under {base} restores; {len(ordered)} damaged, newest first:\n  {listing}")
