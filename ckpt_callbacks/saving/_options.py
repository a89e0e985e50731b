"""What a save is asked (``SaveOptions``) and what it reports (``SaveHandle``, ``SaveStats``).

>>> SaveOptions(snapshot="host").snapshot
'host'
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

import jax
import numpy as np

from ckpt_callbacks import directory as claims
from ckpt_callbacks import distributed, layouts
from ckpt_callbacks import format as planning
from ckpt_callbacks import storage as paths
from ckpt_callbacks.saving._snapshot import MemoryStats, SnapshotMode
from ckpt_callbacks.storage import StorageOptions

log = logging.getLogger("ckpt_callbacks")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SaveOptions:
    """How a save writes; the one place these defaults are declared.

    Attributes:
      dtype: floating leaves are cast to this dtype before they are stored.
      overwrite: replace a committed checkpoint at the path; the old one stays readable until
        the new one commits. Without it a committed path raises ``CheckpointExistsError``.
      max_host_bytes: bound on host memory the save holds at once. When the shards live in
        host memory (CPU devices) and the save is larger, all but the last ``max_host_bytes``
        are written before ``save_async`` returns.
      timeout_s: how long a process waits for the others at the commit barrier.
      pack_bytes: array leaves of at most this many bytes are packed into a few shared files
        per process instead of one zarr3 array each (far fewer objects on S3/GCS); 0 stores
        every array leaf as its own zarr3 array.
      snapshot: where ``save_async`` copies the state before returning: ``"auto"`` (device
        copies while the device has room, host for the rest; host where there are no memory
        statistics, as on CPU), ``"device"`` or ``"host"`` (see ``ckpt_callbacks.snapshot``).
      device_headroom: with ``"auto"``, the fraction of each device's memory kept free.
      memory_stats: ``device -> dict`` with ``bytes_limit`` and ``bytes_in_use`` (default:
        ``device.memory_stats()``); inject one to test the ``"auto"`` branches.
      storage: retries with backoff, request concurrency and the bound on each storage
        operation (``StorageOptions``); None: those of the path if it is a ``Location`` carrying
        them, else the defaults. A write past ``storage.op_timeout_s`` fails the save.
      claim_lease_s: how long a save's claim on its names lives without renewal (process 0
        renews it every third of this while the save runs); a claim older than this, or whose
        process on this host is gone, is dead and its files are leftovers that the next save,
        retention and prune delete (see ``ckpt_callbacks.claims``).
      layout: ``"zarr3"`` (one zarr3 array per large leaf, one object per chunk) or
        ``"process"`` (each process's chunks in its own data files of at most 1 GiB plus one
        index file: objects grow with processes, not leaves x shards; see
        ``ckpt_callbacks.layouts``). ``pack_bytes`` applies to ``"zarr3"`` only. Any layout
        registered with ``layouts.register_layout`` is accepted by its ``kind``.
    """

    dtype: Any = None
    overwrite: bool = False
    max_host_bytes: int | None = None
    timeout_s: float = distributed.DEFAULT_TIMEOUT_S
    pack_bytes: int = planning.PACK_MAX_LEAF_BYTES
    snapshot: SnapshotMode = "auto"
    device_headroom: float = 0.1
    memory_stats: MemoryStats | None = None
    storage: StorageOptions | None = None
    layout: str = "zarr3"
    claim_lease_s: float = claims.DEFAULT_LEASE_S

    def __post_init__(self) -> None:
        if not isinstance(self.overwrite, bool):
            raise ValueError(f"overwrite must be True or False, got {self.overwrite!r}")
        budget = self.max_host_bytes
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 2):
            raise ValueError(f"max_host_bytes must be a positive byte count, got {budget!r}")
        if isinstance(self.pack_bytes, bool) or not isinstance(self.pack_bytes, int) or self.pack_bytes < 0:
            raise ValueError(f"pack_bytes must be a byte count >= 0 (0: no packing), got {self.pack_bytes!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be a positive number of seconds, got {self.timeout_s!r}")
        if self.dtype is not None and not jax.numpy.issubdtype(np.dtype(self.dtype), jax.numpy.floating):
            raise ValueError(f"dtype={self.dtype!r}: floating leaves are cast to it, so it must be a floating dtype")
        if not isinstance(self.layout, str):
            raise ValueError(f"layout must be one of {layouts.kinds()}, got {self.layout!r}")
        layouts.layout_for(self.layout)  # ValueError naming the registered layouts
        if self.snapshot not in ("auto", "device", "host"):
            raise ValueError(f"snapshot must be 'auto', 'device' or 'host', got {self.snapshot!r}")
        if self.storage is not None and not isinstance(self.storage, StorageOptions):
            raise ValueError(f"storage must be a StorageOptions or None, got {self.storage!r}")
        lease = self.claim_lease_s
        if isinstance(lease, bool) or not isinstance(lease, int | float) or not 0 < lease < float("inf"):
            raise ValueError(f"claim_lease_s must be a positive finite number of seconds, got {lease!r}")
        if not 0 <= self.device_headroom < 1:
            raise ValueError(f"device_headroom must be a fraction in [0, 1), got {self.device_headroom!r}")

    @property
    def cast(self) -> np.dtype | None:
        return None if self.dtype is None else np.dtype(self.dtype)

    @property
    def max_chunk_bytes(self) -> int:
        return planning.DEFAULT_MAX_CHUNK_BYTES if self.max_host_bytes is None else max(1, self.max_host_bytes // 8)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SaveStats:
    """Telemetry of one save, as seen by this process."""

    path: str
    bytes_written: int
    blocking_s: float
    write_s: float

    @property
    def total_s(self) -> float:
        return self.blocking_s + self.write_s

    @property
    def gb_per_s(self) -> float:
        return self.bytes_written / 1e9 / self.total_s if self.total_s > 0 else 0.0


class SaveHandle:
    """A save in flight: ``wait()`` blocks until it is committed and re-raises failures."""

    def __init__(self, path: str, blocking_s: float, metadata: dict[str, Any] | None = None) -> None:
        self.path = path
        self.blocking_s = blocking_s
        self.metadata = metadata or {}  # what metadata.json says, once committed
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._stats: SaveStats | None = None
        self._thread: threading.Thread | None = None
        self.raised_to: set[int] = set()  # threads whose wait() raised the failure

    def _run(self, work: Any) -> None:
        start = time.perf_counter()
        try:
            nbytes = work()
            self._stats = SaveStats(
                path=self.path, bytes_written=nbytes, blocking_s=self.blocking_s, write_s=time.perf_counter() - start
            )
            log.info(
                "saved %s: %.3f GB, blocked %.3fs, total %.2fs (%.2f GB/s)",
                self.path,
                nbytes / 1e9,
                self._stats.blocking_s,
                self._stats.total_s,
                self._stats.gb_per_s,
            )
        except BaseException as e:  # re-raised by wait(); logged so an unwaited failure is seen
            self._error = e = paths.as_storage_error(e, self.path)
            log.error("save to %s failed: %s: %s", self.path, type(e).__name__, e)
        finally:
            self._done.set()

    def _start(self, work: Any) -> None:
        # Not a daemon: an interpreter exiting mid-save finishes the save rather than dropping it.
        self._thread = threading.Thread(target=self._run, args=(work,), name="ckpt-save")
        self._thread.start()

    def done(self) -> bool:
        """Whether the save has finished (committed or failed)."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> SaveStats:
        """Blocks until committed; raises what failed, or TimeoutError after ``timeout`` seconds."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"save to {self.path} still running after {timeout}s")
        if self._error is not None:
            self.raised_to.add(threading.get_ident())
            raise self._error
        assert self._stats is not None
        return self._stats

    def outcome(self) -> SaveStats | None:
        """Blocks until done; the stats if committed, None if it failed (raises nothing, and
        leaves the failure to be raised by ``wait``)."""
        self._done.wait()
        return self._stats if self._error is None else None

    @property
    def stats(self) -> SaveStats | None:
        """Telemetry once committed, else None."""
        return self._stats
