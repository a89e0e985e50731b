"""Eval metrics beside the checkpoints of one base directory, merged into their listing.

>>> import numpy as np
>>> from ckpt_callbacks.manager._policy import KeepPolicy
>>> from ckpt_callbacks.saving import save
>>> save("memory://doc/metrics/run-1", {"a": np.zeros(1)}, step=1)
>>> m = Metrics(paths.parse("memory://doc/metrics"), KeepPolicy())
>>> m.record_metrics(1, {"loss": 0.5})
>>> m.checkpoints()[0].extras["metrics"]
{'loss': 0.5}
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any

import numpy as np

from ckpt_callbacks import directory as layout
from ckpt_callbacks import distributed
from ckpt_callbacks import storage as paths
from ckpt_callbacks.directory import CheckpointInfo, list_checkpoints
from ckpt_callbacks.manager._discovery import discover
from ckpt_callbacks.manager._policy import KeepPolicy, metric_of

log = logging.getLogger("ckpt_callbacks")


def _metric_value(step: int, name: str, value: Any) -> float | None:
    """A metric as a float (Python, numpy or jax scalars); non-finite ones as None (logged)."""
    if isinstance(value, bool | str | bytes) or np.ndim(value) != 0:
        raise TypeError(f"metric {name!r} at step {step} is {value!r}; expected a number")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    except (TypeError, ValueError) as e:
        raise TypeError(f"metric {name!r} at step {step} is {value!r}; expected a number") from e
    if math.isfinite(number):
        return number
    log.warning("metric %r at step %d is %s: recorded as null, it never ranks for best-k", name, step, number)
    return None


class Metrics:
    """The committed checkpoints under ``base`` with the eval metrics recorded beside them
    (``<base>/metrics/run-<step>.json``): what a reader ranks by. It reads and writes only
    metrics files; deleting is ``Retention``'s."""

    def __init__(self, base: paths.Location, keep: KeepPolicy) -> None:
        self.base = base
        self.keep = keep
        self.metrics: dict[int, dict[str, float | None]] = {}
        self._warned: set[int] = set()  # steps whose damaged metrics file was logged
        self._warned_unranked = False

    @property
    def metrics_dir(self) -> paths.Location:
        return self.base.join(layout.METRICS_DIR)

    def with_recorded_metrics(self, step: int, extras: dict[str, Any] | None) -> dict[str, Any]:
        """``extras`` for the checkpoint of ``step``, with metrics recorded for it merged in."""
        merged = dict(extras or {})
        recorded = self.metrics.get(step)
        if recorded:
            given = merged.get("metrics")
            merged["metrics"] = {**recorded, **(given if isinstance(given, dict) else {})}
        return merged

    def record_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Eval metrics of ``step``; process 0 keeps them as ``<base>/metrics/run-<step>.json``.

        NaN and infinite values are kept as null: they never rank for best-k (logged).
        """
        clean = {str(k): _metric_value(step, str(k), v) for k, v in metrics.items()}
        self.metrics[step] = {**self.metrics.get(step, {}), **clean}
        if distributed.is_primary():
            raw = json.dumps(self.metrics[step], allow_nan=False).encode()
            paths.write_bytes(self.metrics_dir, layout.metrics_name(step), raw)

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints, by step, with recorded eval metrics merged into ``extras``:
        ours and the foreign ones a source lists (an orbax run's steps, ``discover``)."""
        return [self._with_metrics(info) for info in discover(self.base)]

    def own_checkpoints(self) -> list[CheckpointInfo]:
        """``checkpoints`` of ours only: what retention counts and may delete."""
        return [self._with_metrics(info) for info in list_checkpoints(self.base)]

    def _with_metrics(self, info: CheckpointInfo) -> CheckpointInfo:
        if info.step is None or "metrics" in info.extras:
            return info
        metrics = self.metrics.get(info.step) or self._read_metrics(info.step)
        return dataclasses.replace(info, extras={**info.extras, "metrics": metrics}) if metrics else info

    def _read_metrics(self, step: int) -> dict[str, Any] | None:
        """The metrics file of ``step``; a damaged one is ignored for that step (logged once)."""
        raw = paths.read_bytes(self.metrics_dir, layout.metrics_name(step))
        if not raw:
            return None
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as e:
            data = e
        if isinstance(data, dict) and all(isinstance(k, str) for k in data):
            return {k: v for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if step not in self._warned:
            self._warned.add(step)
            where = self.metrics_dir.join(layout.metrics_name(step)).url
            log.warning("retention: ignoring %s: expected a JSON object of metrics, found %.80r", where, data)
        return None

    def _warn_if_never_ranked(self, listed: list[CheckpointInfo]) -> None:
        """Once: evals report metrics, but never the one best-k ranks by (a typo, or another name)."""
        metric = self.keep.metric
        permanent = [c for c in listed if not c.is_temporary]
        reported = any(metric in m for m in self.metrics.values())
        if self._warned_unranked or not metric or not self.metrics or reported or len(permanent) < 2:
            return
        if all(metric_of(c, metric) is None for c in permanent):
            self._warned_unranked = True
            log.warning(
                "retention: KeepPolicy ranks by metric %r, but evals report only %s and none of %d checkpoints "
                "under %s has it; record it with on_eval(step, metrics={%r: ...}) (best-k keeps nothing until then)",
                metric,
                sorted({name for m in self.metrics.values() for name in m}),
                len(permanent),
                self.base.url,
                metric,
            )
