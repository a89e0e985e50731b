"""When to save and what to keep: pure functions of steps, times and checkpoint lists.

No I/O, no threads, no jax: the clock and the history come in as arguments, so every rule
is tested on synthetic histories.

>>> policy = SavePolicy(step_policies=(CheckpointInterval(every=100, until=1000), CheckpointInterval(every=1000)))
>>> [s for s in (100, 150, 1000, 1100, 2000) if policy.decide(s, now=0.0, last_save_step=None, last_save_time=0.0).save]
[100, 1000, 2000]
>>> SavePolicy(save_interval=datetime.timedelta(minutes=10)).decide(
...     7, now=601.0, last_save_step=None, last_save_time=0.0)
Decision(save=True, temporary=True, reason='600s since the last save')
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import numbers
from collections.abc import Collection, Iterable, Sequence
from typing import Any, Literal, Protocol


def as_interval(interval: datetime.timedelta | float | None) -> datetime.timedelta | None:
    """A ``save_interval`` as a timedelta; a count of seconds must be finite and positive."""
    if interval is None or isinstance(interval, datetime.timedelta):
        return interval
    if isinstance(interval, bool) or not isinstance(interval, numbers.Real):
        raise TypeError(f"save_interval must be seconds (a number) or a timedelta, got {interval!r}")
    if not math.isfinite(interval) or interval <= 0:
        raise ValueError(f"save_interval must be a positive, finite number of seconds, got {interval!r}")
    try:
        return datetime.timedelta(seconds=float(interval))
    except OverflowError:
        raise ValueError(f"save_interval of {interval!r} seconds is longer than a timedelta holds") from None


@dataclasses.dataclass(frozen=True)
class CheckpointInterval:
    """Save every ``every`` steps while ``step <= until`` (``until=None``: for ever)."""

    every: int
    until: int | None = None

    def __post_init__(self) -> None:
        if not _integral(self.every) or self.every <= 0:
            raise ValueError(f"CheckpointInterval.every must be a positive int, got {self.every!r}")
        if self.until is not None and not _integral(self.until):
            raise ValueError(f"CheckpointInterval.until must be an int or None, got {self.until!r}")
        _as_ints(self, ("every", "until"))
        if self.until is not None and self.until < self.every:
            raise ValueError(
                f"CheckpointInterval(every={self.every}, until={self.until}) would never save: its first due "
                f"step is {self.every}, after until={self.until}; give until >= every (or until=None: for ever)"
            )


def _integral(value: Any) -> bool:
    """An integer of any kind (``int``, ``np.int32``, any ``numbers.Integral``) but a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_ints(record: Any, names: Sequence[str]) -> None:
    """The integer fields ``names`` of a frozen ``record``, checked already, stored as Python
    ints: a numpy integer would go on into JSON and reprs as itself."""
    for name in names:
        value = getattr(record, name)
        if value is not None:
            object.__setattr__(record, name, int(value))


def _validate_intervals(intervals: Sequence[CheckpointInterval]) -> tuple[CheckpointInterval, ...]:
    if isinstance(intervals, CheckpointInterval):
        raise TypeError(f"step_policies is a single {intervals!r}; pass a list of them: step_policies=[{intervals!r}]")
    if isinstance(intervals, str | bytes) or not isinstance(intervals, Iterable):
        raise TypeError(f"step_policies must be a list of CheckpointInterval, got {intervals!r}")
    out = tuple(intervals)
    for i, interval in enumerate(out):
        if not isinstance(interval, CheckpointInterval):
            raise ValueError(f"step_policies[{i}] is {interval!r}, expected a CheckpointInterval")
        if interval.until is None and i != len(out) - 1:
            raise ValueError(
                f"step_policies[{i}] has until=None, but only the last policy may; {len(out) - i - 1} "
                "follow it and would never apply"
            )
        previous = out[i - 1].until if i else None
        if interval.until is not None and previous is not None and interval.until <= previous:
            raise ValueError(
                f"step_policies[{i}] has until={interval.until}, not after step_policies[{i - 1}]'s "
                f"until={previous}; policies must be sorted by until"
            )
        if (
            interval.until is not None
            and previous is not None
            and interval.until // interval.every <= previous // interval.every
        ):
            raise ValueError(
                f"step_policies[{i}] (every={interval.every}, until={interval.until}) governs steps "
                f"{previous + 1}..{interval.until}, which hold no multiple of {interval.every}: it would never save"
            )
    return out


@dataclasses.dataclass(frozen=True)
class Decision:
    save: bool
    temporary: bool = False
    reason: str = ""


NO_SAVE = Decision(False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SavePolicy:
    """The seed's rules: step schedules give permanent checkpoints, elapsed time temporary ones.

    - step 0 is not saved unless forced;
    - a step already saved is never saved again;
    - ``force`` gives a permanent checkpoint;
    - a step schedule hit gives a permanent one. The governing interval is the first whose
      ``until`` is None or >= step; with ``previous_step`` given, a multiple of ``every``
      crossed since then counts, so calls that skip steps still save;
    - ``save_interval`` elapsed since the last save gives a temporary one.
    """

    step_policies: Sequence[CheckpointInterval] = ()
    save_interval: datetime.timedelta | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "step_policies", _validate_intervals(self.step_policies))
        interval = self.save_interval
        if interval is not None and (not isinstance(interval, datetime.timedelta) or interval.total_seconds() <= 0):
            shown = f"{interval.total_seconds()}s" if isinstance(interval, datetime.timedelta) else repr(interval)
            raise ValueError(f"save_interval must be a positive timedelta, got {shown} ({interval!r})")

    def interval_at(self, step: int) -> CheckpointInterval | None:
        """The step interval governing ``step``, if any."""
        return next((p for p in self.step_policies if p.until is None or p.until >= step), None)

    def step_due(self, step: int, previous_step: int | None = None) -> bool:
        interval = self.interval_at(step)
        if interval is None or step <= 0:
            return False
        if previous_step is None or previous_step >= step:
            return step % interval.every == 0
        return step // interval.every > previous_step // interval.every

    def decide(
        self,
        step: int,
        *,
        now: float | None,
        last_save_step: int | None,
        last_save_time: float,
        force: bool = False,
        previous_step: int | None = None,
    ) -> Decision:
        """Whether to save at ``step``; ``now`` and ``last_save_time`` are seconds on one clock.

        ``now=None``: no clock reading at this step (with several processes, steps between
        sync steps), so the time rule does not apply.
        """
        if step == last_save_step:
            return NO_SAVE
        if force:
            return Decision(True, False, "forced")
        if step == 0:
            return NO_SAVE
        if self.step_due(step, previous_step):
            return Decision(True, False, f"every {self.interval_at(step).every} steps")  # type: ignore[union-attr]
        interval = self.save_interval
        if interval is not None and now is not None and now - last_save_time >= interval.total_seconds():
            return Decision(True, True, f"{interval.total_seconds():.0f}s since the last save")
        return NO_SAVE


class CheckpointLike(Protocol):
    """What retention needs of a checkpoint (``CheckpointInfo`` has it)."""

    @property
    def path(self) -> str: ...
    @property
    def step(self) -> int | None: ...
    @property
    def is_temporary(self) -> bool: ...
    @property
    def extras(self) -> dict[str, Any]: ...


def metric_of(checkpoint: CheckpointLike, metric: str) -> float | None:
    """The eval metric recorded with a checkpoint (``extras["metrics"][metric]``), if any."""
    metrics = checkpoint.extras.get("metrics")
    value = metrics.get(metric) if isinstance(metrics, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        value = float(value)
    except OverflowError:  # an integer too large for a float
        return None
    return value if math.isfinite(value) else None  # NaN and inf never rank


@dataclasses.dataclass(frozen=True, kw_only=True)
class KeepPolicy:
    """Which committed checkpoints retention deletes.

    Temporaries: one is deleted once a newer checkpoint (by step) has committed, and one left
    by an earlier run is deleted once this run has committed anything (it belongs to a trajectory
    this run left, so a resume must not pick it up).

    Permanent checkpoints: with no ``keep_*`` rule set, all are kept. Otherwise one is kept if
    it is among the ``keep_last`` newest, or its step is a multiple of ``keep_every``, or it is
    among the ``keep_best`` by ``metric`` (``mode`` "min" or "max"). A checkpoint without the
    metric is never counted among the best; it is kept or dropped by ``keep_last`` and
    ``keep_every`` alone, and kept if neither is set. The newest checkpoint is never deleted.
    """

    keep_last: int | None = None
    keep_every: int | None = None
    keep_best: int | None = None
    metric: str | None = None
    mode: Literal["min", "max"] = "min"

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_every", "keep_best"):
            value = getattr(self, name)
            if value is not None and (not _integral(value) or value < 1):
                raise ValueError(f"KeepPolicy.{name} must be a positive int or None, got {value!r}")
        _as_ints(self, ("keep_last", "keep_every", "keep_best"))
        if self.keep_best is not None and not self.metric:
            raise ValueError("KeepPolicy.keep_best needs metric= (the eval metric to rank by)")
        if self.mode not in ("min", "max"):
            raise ValueError(f"KeepPolicy.mode must be 'min' or 'max', got {self.mode!r}")

    def to_delete(
        self, checkpoints: Sequence[CheckpointLike], *, committed_this_run: Collection[str] | None = None
    ) -> list[Any]:
        """The checkpoints to delete, oldest first.

        Args:
          checkpoints: committed checkpoints, any order.
          committed_this_run: paths this run saved, or empty while it has committed nothing yet;
            None means "all of them" (no earlier run). A checkpoint still being written may be
            in it: it is not listed until committed.
        """
        ordered = sorted(checkpoints, key=lambda c: (-1 if c.step is None else c.step, c.path))
        if not ordered:
            return []
        newest = ordered[-1]
        this_run = None if committed_this_run is None else set(committed_this_run)
        doomed: list[Any] = []
        for i, c in enumerate(ordered):
            if not c.is_temporary:
                continue
            superseded = i < len(ordered) - 1
            stale = this_run is not None and bool(this_run) and c.path not in this_run
            if superseded or stale:
                doomed.append(c)
        permanent = [c for c in ordered if not c.is_temporary]
        if any(v is not None for v in (self.keep_last, self.keep_every, self.keep_best)):
            keep = {newest.path}
            if self.keep_last is not None:
                keep.update(c.path for c in permanent[-self.keep_last :])
            if self.keep_every is not None:
                keep.update(c.path for c in permanent if c.step is not None and c.step % self.keep_every == 0)
            scored = [(metric_of(c, self.metric), c) for c in permanent] if self.metric else []
            if self.keep_best is not None:
                ranked = sorted(
                    ((m, c) for m, c in scored if m is not None), key=lambda mc: mc[0] if self.mode == "min" else -mc[0]
                )
                keep.update(c.path for _, c in ranked[: self.keep_best])
            if self.keep_last is None and self.keep_every is None:
                keep.update(c.path for m, c in scored if m is None)
            doomed.extend(c for c in permanent if c.path not in keep)
        return sorted(doomed, key=lambda c: (-1 if c.step is None else c.step, c.path))
