"""``LocalTier``: the arguments of the per-host tier of a ``Checkpointer``, checked.

The protocol that runs it is ``_saver.LocalSaver``'s; restoring is ``_recover``'s.

>>> LocalTier("/tmp/doc-local", keep_last=3).keep_last
3
"""

from __future__ import annotations

import dataclasses
import datetime
import numbers
import os
from collections.abc import Sequence
from typing import Any

from ckpt_callbacks import storage as paths
from ckpt_callbacks.errors import CheckpointPathError
from ckpt_callbacks.manager._policy import CheckpointInterval, SavePolicy, as_interval


def _positive_int(tier: Any, name: str, minimum: int) -> None:
    """Checks ``tier.<name>`` is an integer >= ``minimum`` and keeps it as a Python int."""
    value = getattr(tier, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"LocalTier({name}=...) must be an integer >= {minimum}, got {value!r}")
    object.__setattr__(tier, name, int(value))


@dataclasses.dataclass(frozen=True)
class LocalTier:
    """A per-host tier: frequent local checkpoints, each process's set also kept by peers.

    Args:
      path: a directory of this host (RAM disk or local NVMe), never shared between processes;
        the same string on every host is fine. Object stores and ``memory://`` are refused.
      step_policies: ``CheckpointInterval``s of the local saves.
      save_interval: time between local saves (seconds or a timedelta), or None.
      keep_last: local steps kept per host (counted once every process has committed them).
      replicas: how many peers keep each process's set (process p keeps p-1's, ..., p-r's);
        None: 1 with several processes, 0 with one. Must be below the process count.
      transfer_bytes: bytes one process sends per replication round (device memory a round
        adds is a few times this, never the whole state).
      rounds_per_step: rounds dispatched per ``on_step`` call while a replication is pending;
        None: enough to finish within half the local step interval (at least 2 a step), so a
        replication is done before the next local save needs its rounds dispatched at once.
    """

    path: Any
    step_policies: Sequence[CheckpointInterval] = ()
    save_interval: datetime.timedelta | float | None = None
    keep_last: int = 2
    replicas: int | None = None
    transfer_bytes: int = 4 << 20
    rounds_per_step: int | None = None

    def __post_init__(self) -> None:
        loc = paths.parse(self.path)
        if paths.local_path(loc) is None or loc.scheme == "memory":
            raise CheckpointPathError(
                f"LocalTier({self.path!r}): a local tier is a directory of this host (a RAM disk or local NVMe), "
                f"not {loc.scheme}:// storage; the persistent tier is the Checkpointer's base"
            )
        root = os.path.abspath(str(paths.local_path(loc)))
        if os.path.exists(root) and not os.path.isdir(root):
            raise CheckpointPathError(f"LocalTier({self.path!r}): expected a directory at {root}, found a file")
        object.__setattr__(self, "step_policies", tuple(self.step_policies))
        object.__setattr__(self, "save_interval", as_interval(self.save_interval))
        _positive_int(self, "keep_last", 1)
        _positive_int(self, "transfer_bytes", 1024)
        if self.rounds_per_step is not None:
            _positive_int(self, "rounds_per_step", 1)
        if self.replicas is not None:
            _positive_int(self, "replicas", 0)
        SavePolicy(
            step_policies=self.step_policies, save_interval=as_interval(self.save_interval)
        )  # checks the intervals

    @property
    def root(self) -> str:
        return os.path.abspath(str(paths.local_path(paths.parse(self.path))))

    def resolved_replicas(self, processes: int) -> int:
        """The replica count on ``processes`` processes; refuses one that cannot be kept."""
        replicas = (1 if processes > 1 else 0) if self.replicas is None else self.replicas
        if replicas >= max(processes, 1) and replicas > 0:
            raise ValueError(
                f"LocalTier(replicas={replicas}) on {processes} process(es): a set can be kept by at most "
                f"{processes - 1} peers (replicas must be below the process count)"
            )
        return replicas


def refuse_overlap(tier: LocalTier, root: str, base: paths.Location) -> None:
    """A local tier and its persistent base never share a directory, nor one inside the other."""
    persistent = paths.local_path(base)
    if persistent is None:
        return
    a, b = os.path.realpath(root), os.path.realpath(persistent)
    if a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/"):
        raise CheckpointPathError(
            f"LocalTier({tier.path!r}): {a} and the persistent base {b} overlap (one is, or is inside, the "
            "other); give the local tier a directory of its own"
        )
