"""Save a pytree: snapshot this process's shards, stream them to TensorStore, then commit.

>>> import jax.numpy as jnp
>>> save("memory://doc/serializer", {"w": jnp.arange(3.0)}, step=1)
>>> handle = save_async("memory://doc/serializer-async", {"w": jnp.ones(2)})
>>> handle.wait().bytes_written
8

``save_async`` returns once the snapshot no longer depends on the caller's buffers (they may
be deleted or donated right away); the write, checksums and commit run in a background
thread, and ``SaveHandle.wait()`` re-raises anything that failed there.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorstore as ts

from ckpt_callbacks import distributed, paths, planning
from ckpt_callbacks import format as fmt
from ckpt_callbacks.errors import CheckpointExistsError
from ckpt_callbacks.leaves import Leaf, plan_tree
from ckpt_callbacks.staging import DEFAULT_WINDOW_BYTES, Snapshot, Writer, batches, unit_bytes

__all__ = ["SaveHandle", "SaveStats", "read_commit", "save", "save_async"]

log = logging.getLogger("ckpt_callbacks")

_SAVE_COUNTER = itertools.count()


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

    def __init__(self, path: str, blocking_s: float) -> None:
        self.path = path
        self.blocking_s = blocking_s
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._stats: SaveStats | None = None
        self._thread: threading.Thread | None = None

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
            self._error = e
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
            raise self._error
        assert self._stats is not None
        return self._stats

    @property
    def stats(self) -> SaveStats | None:
        """Telemetry once committed, else None."""
        return self._stats


def read_commit(loc: paths.Location) -> fmt.Commit | None:
    """The commit marker of the checkpoint at ``loc``, or None if it is not committed."""
    raw = paths.read_bytes(loc, fmt.COMMIT_MARKER)
    if raw is None:
        return None
    where = loc.join(fmt.COMMIT_MARKER).url
    return fmt.Commit.from_json(fmt.loads(raw, where), where)


def _choose_layout(loc: paths.Location, items: list[str], overwrite: bool, tag: str) -> fmt.Commit:
    """Names for this save: plain ones in a fresh directory, suffixed ones beside anything old."""
    decision = None
    if distributed.is_primary():
        committed = read_commit(loc) is not None
        decision = {"committed": committed, "occupied": committed or paths.has_any(loc), "nonce": uuid.uuid4().hex[:8]}
    decision = distributed.broadcast_json(f"{tag}/layout", decision)
    if decision["committed"] and not overwrite:
        raise CheckpointExistsError(
            f"{loc.url} already holds a committed checkpoint; pass overwrite=True "
            "to replace it (the old one stays valid until the new one commits)"
        )
    if not decision["occupied"]:
        return fmt.Commit(metadata="metadata.json", items={item: item for item in items})
    nonce = decision["nonce"]
    return fmt.Commit(metadata=f"metadata.{nonce}.json", items={item: f"{item}.{nonce}" for item in items})


def _commit(
    loc: paths.Location,
    commit: fmt.Commit,
    manifests: dict[str, fmt.Manifest],
    metadata: fmt.Metadata,
    leaves_of: dict[str, list[Leaf]],
) -> None:
    """Process 0: array metadata, manifests, metadata.json, then the marker; then old files go."""
    futures = []
    for item, leaves in leaves_of.items():
        kvstore = paths.kvstore_spec(loc.join(commit.items[item]))
        for leaf in leaves:
            if leaf.record.kind != "scalar" and not leaf.record.pack:
                spec = fmt.zarr_spec(kvstore, leaf.record)
                futures.append(ts.open(spec, create=True, open=True, context=paths.context()))
    for future in futures:
        future.result()
    for item, manifest in manifests.items():
        paths.write_bytes(loc.join(commit.items[item]), "manifest.json", fmt.dumps(manifest.to_json()))
    paths.write_bytes(loc, commit.metadata, fmt.dumps(metadata.to_json()))
    paths.write_bytes(loc, fmt.COMMIT_MARKER, fmt.dumps(commit.to_json()))
    if commit.metadata == "metadata.json":  # plain names: the directory was empty, nothing is stale
        return
    keep = {fmt.COMMIT_MARKER, commit.metadata, *commit.items.values()}
    for name in paths.list_entries(loc):
        if name not in keep:
            try:
                paths.delete_entry(loc, name)
            except Exception as e:  # best effort: the new checkpoint is already committed
                log.warning("could not delete stale %s: %s", loc.join(name).url, e)


def _start_save(
    path: Any,
    items: Mapping[str, Any],
    *,
    step: int | None,
    extras: dict[str, Any] | None,
    dtype: Any,
    overwrite: bool,
    max_host_bytes: int | None,
    is_temporary: bool,
    timeout_s: float,
    pack_bytes: int = planning.PACK_MAX_LEAF_BYTES,
    copy: bool = True,
) -> SaveHandle:
    start = time.perf_counter()
    loc = paths.parse(path)
    for item in items:
        if not item or not all(c.isalnum() or c in "_-" for c in item):
            raise ValueError(f"item name {item!r}: use letters, digits, '_' and '-'")
    if max_host_bytes is not None and max_host_bytes < 2:
        raise ValueError(f"max_host_bytes must be a positive byte count, got {max_host_bytes}")
    if isinstance(pack_bytes, bool) or not isinstance(pack_bytes, int) or pack_bytes < 0:
        raise ValueError(f"pack_bytes must be a byte count >= 0 (0: no packing), got {pack_bytes!r}")
    tag = f"save{next(_SAVE_COUNTER)}"
    cast = None if dtype is None else np.dtype(dtype)
    commit = _choose_layout(loc, list(items), overwrite, tag)
    max_chunk = planning.DEFAULT_MAX_CHUNK_BYTES if max_host_bytes is None else max(1, max_host_bytes // 8)
    structures, leaves_of, item_of = {}, {}, {}
    pairs: list[tuple[Leaf, planning.WriteUnit]] = []
    for item, tree in items.items():
        structure, flat = fmt.flatten(tree)
        leaves = plan_tree(flat, cast, max_chunk, pack_bytes)
        structures[item], leaves_of[item] = structure, leaves
        for index, leaf in enumerate(leaves):
            item_of[id(leaf)] = (item, index)
            pairs.extend((leaf, unit) for unit in leaf.units)
    metadata = fmt.Metadata(
        step=step, timestamp=time.time(), is_temporary=is_temporary, extras=dict(extras or {}), items=tuple(items)
    )
    # Writes in flight hold an encoded copy of their chunk: keep them to a fraction of the save
    # (or of the budget, which the snapshot batches share) so the total stays near 1x.
    total = sum(unit_bytes(leaf, unit) for leaf, unit in pairs)
    window = min(DEFAULT_WINDOW_BYTES, max(total // 5, 1)) if max_host_bytes is None else max(1, max_host_bytes // 8)
    packs: dict[tuple[str, str], tuple[int, int]] = {}  # (item, pack file) -> (size, chunks written here)
    for leaf, unit in pairs:
        if leaf.record.pack:
            name, offset = leaf.record.pack[fmt.chunk_key(unit.chunk)]
            key = (item_of[id(leaf)][0], name)
            size, count = packs.get(key, (0, 0))
            packs[key] = (max(size, offset + unit_bytes(leaf, unit)), count + 1)
    writer = Writer({item: paths.kvstore_spec(loc.join(commit.items[item])) for item in items}, window, packs)
    pieces = batches(pairs, None if max_host_bytes is None or not copy else max_host_bytes // 2)
    # With a host-memory budget smaller than the save, all but the last batch are written
    # before returning: the snapshot cannot hold more than the budget at once.
    staging = None
    if len(pieces) > 1:  # one buffer, reused by every batch, instead of fresh copies per batch
        staging = np.empty(max(sum(-(-unit_bytes(*p) // 64) * 64 for p in b) for b in pieces), np.uint8)
    for batch in pieces[:-1]:
        writer.write(item_of, Snapshot(batch, staging))
    last = Snapshot(pieces[-1], staging, copy=copy)
    # The tree is not needed past this point; drop references so donated buffers can go.
    for leaves in leaves_of.values():
        for leaf in leaves:
            leaf.source = None

    def finish() -> int:
        writer.write(item_of, last)
        writer.check_complete(loc.url)
        gathered = distributed.gather_json(
            f"{tag}/crc", {i: {str(k): v for k, v in c.items()} for i, c in writer.crcs.items()}, timeout_s
        )
        distributed.barrier(f"{tag}/written", timeout_s)
        if gathered is not None:
            manifests = {}
            for item, leaves in leaves_of.items():
                crcs: dict[int, dict[str, int]] = collections.defaultdict(dict)
                for per_process in gathered:
                    for index, chunk_crcs in per_process.get(item, {}).items():
                        crcs[int(index)].update(chunk_crcs)
                records = tuple(
                    dataclasses.replace(leaf.record, crc32c=dict(sorted(crcs[i].items())))
                    for i, leaf in enumerate(leaves)
                )
                manifests[item] = fmt.Manifest(tree=structures[item], leaves=records)
            _commit(loc, commit, manifests, metadata, leaves_of)
        distributed.barrier(f"{tag}/committed", timeout_s)
        return writer.nbytes

    handle = SaveHandle(loc.url, time.perf_counter() - start)
    handle._start(finish)
    return handle


def save_async(
    path: Any,
    tree: Any,
    *,
    step: int | None = None,
    extras: dict[str, Any] | None = None,
    dtype: Any = None,
    item: str = "state",
    overwrite: bool = False,
    max_host_bytes: int | None = None,
    is_temporary: bool = False,
    timeout_s: float = distributed.DEFAULT_TIMEOUT_S,
    pack_bytes: int = planning.PACK_MAX_LEAF_BYTES,
) -> SaveHandle:
    """Starts saving ``tree`` to the checkpoint directory ``path``; returns after the snapshot.

    Args:
      path: checkpoint directory URL (local path, ``file://``, ``memory://``, ``s3://``, ``gs://``).
      tree: pytree of jax arrays (any sharding), numpy arrays, typed PRNG keys, Python scalars,
        strings and None.
      step: recorded in ``metadata.json``.
      extras: JSON-serializable dict recorded in ``metadata.json``.
      dtype: floating leaves are cast to this dtype before they are stored.
      item: name of the item directory.
      overwrite: replace a committed checkpoint at ``path``; the old one stays readable until the
        new one commits. Without it a committed ``path`` raises ``CheckpointExistsError``.
      max_host_bytes: bound on host memory the save holds at once. When the shards live in host
        memory (CPU devices) and the save is larger, all but the last ``max_host_bytes`` are
        written before this returns.
      is_temporary: recorded in ``metadata.json`` (retention deletes superseded temporaries).
      timeout_s: how long a process waits for the others at the commit barrier.
      pack_bytes: array leaves of at most this many bytes (1 MiB by default) are packed into a
        few shared files per process instead of one zarr3 array each: far fewer objects on
        S3/GCS. 0 stores every array leaf as its own zarr3 array.

    Returns:
      A ``SaveHandle``; ``wait()`` returns ``SaveStats`` once committed or raises the failure.
    """
    return _start_save(
        path,
        {item: tree},
        step=step,
        extras=extras,
        dtype=dtype,
        overwrite=overwrite,
        max_host_bytes=max_host_bytes,
        is_temporary=is_temporary,
        timeout_s=timeout_s,
        pack_bytes=pack_bytes,
    )


def save(path: Any, tree: Any, *, item: str = "state", **kwargs: Any) -> None:
    """Saves ``tree`` to ``path`` and returns once it is committed; arguments as ``save_async``.

    The caller waits anyway, so the shards are written straight from its buffers: no
    snapshot copy, and no host memory beyond the writes in flight.
    """
    kwargs = {
        "step": None,
        "extras": None,
        "dtype": None,
        "overwrite": False,
        "max_host_bytes": None,
        "is_temporary": False,
        "timeout_s": distributed.DEFAULT_TIMEOUT_S,
        "pack_bytes": planning.PACK_MAX_LEAF_BYTES,
        **kwargs,
    }
    _start_save(path, {item: tree}, copy=False, **kwargs).wait()
