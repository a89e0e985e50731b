"""``LocalSaver``: the running side of a ``LocalTier`` (one per ``Checkpointer``).

The protocol, per local step s (every process, in the same order; ``p`` this process, ``n``
the process count, ``r`` the replicas):

1. ``save`` (main thread, when the tier's policy says so): the rounds of the previous step are
   all dispatched first; on the first save, every process claims the local directory and all
   agree that no two share one. This process's set is copied to host: the only wait.
2. The worker thread writes ``set_p`` of step s (data, manifest, marker).
3. ``pump`` (main thread, every ``on_step``): up to ``rounds_per_step`` ppermute rounds are
   dispatched, shift k = 1..r in turn: p sends its frame to p+k and receives p-k's. The worker
   drains each round into ``set_{p-k}`` of step s, checks the header and every crc32c, and
   commits it. At most two rounds are in flight.
4. Once its own part and every replica part are committed, p publishes ``s`` (the
   coordination service's key-value store; safe from the worker). Retention deletes a step
   only once ``keep_last`` newer steps are published by every process: a kill during the
   newest save never leaves a host without a step every process can use.

Restore never trusts what was published; it reads the markers on disk (``restore``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from ckpt_callbacks import distributed
from ckpt_callbacks import storage as paths
from ckpt_callbacks.errors import CheckpointPathError
from ckpt_callbacks.manager._local import _peers as peers
from ckpt_callbacks.manager._local import _recover
from ckpt_callbacks.manager._local import _store as store
from ckpt_callbacks.manager._local._sets import Layout, Piece, raw_value, region_of, topology
from ckpt_callbacks.manager._local._tier import LocalTier, refuse_overlap
from ckpt_callbacks.manager._policy import SavePolicy, as_interval

log = logging.getLogger("ckpt_callbacks")

_ROUNDS = itertools.count()  # names of the agreements: every process makes them in the same order


@dataclasses.dataclass
class _Shift:
    """One shift of a replication: this process sends to p+k and receives p-k's set."""

    pairs: tuple[tuple[int, int], ...]
    frame: peers.Frame
    source: int  # the set received
    pieces: list[Piece]
    rounds: int
    writer: store.PartWriter | None = None
    head: bytearray = dataclasses.field(default_factory=bytearray)
    tail: bytearray = dataclasses.field(default_factory=bytearray)


class _Step:
    """One local step in flight: its own part's write and its replication."""

    def __init__(self, step: int, layout: Layout, shifts: list[_Shift], extras: Any, save: dict[str, Any]) -> None:
        self.step, self.layout, self.shifts, self.extras, self.save = step, layout, shifts, extras, save
        self.cursor = (0, 0)  # (shift, round) to dispatch next
        self.own: concurrent.futures.Future[Any] | None = None
        self.drains: collections.deque[concurrent.futures.Future[Any]] = collections.deque()
        self.failed: list[str] = []
        self.publishing = False
        self.per_step = 2  # rounds dispatched per on_step call

    def dispatched(self) -> bool:
        return self.cursor[0] >= len(self.shifts)


class LocalSaver:
    """The running side of a ``LocalTier`` for one ``Checkpointer`` (see the module's protocol)."""

    def __init__(self, tier: LocalTier, base: paths.Location) -> None:
        self.tier = tier
        self.root = tier.root
        refuse_overlap(tier, self.root, base)
        base_url = self.base_url = base.url
        self.processes = distributed.process_count()
        self.replicas = tier.resolved_replicas(self.processes)
        self.policy = SavePolicy(step_policies=tier.step_policies, save_interval=as_interval(tier.save_interval))
        self.tag = hashlib.sha1(base_url.encode()).hexdigest()[:16]  # alike on every process
        self.last_step: int | None = None
        self.last_time: float | None = None
        self._seen: float | None = None
        self.previous_step: int | None = None
        self._peers: peers.Peers | None = None
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-local")
        self._current: _Step | None = None
        self._mine: set[int] = set()  # local steps this run saved (alike on every process)
        self._claimed = False
        self._lock = threading.Lock()
        self.saved: list[dict[str, Any]] = []  # one record per local step committed here

    # -- saving -------------------------------------------------------------------------------

    def due(self, step: int, now: float | None) -> bool:
        """Whether a local step is due (``now``: the agreed clock, None between sync steps)."""
        if now is not None:
            self._seen = now
        if self.last_time is None and now is not None:
            self.last_time = now
        decision = self.policy.decide(
            step,
            now=now,
            last_save_step=self.last_step,
            last_save_time=self.last_time or 0.0,
            previous_step=self.previous_step,
        )
        self.previous_step = step
        return decision.save

    def save(self, state: Any, step: int, *, now: float, extras: Any = None) -> None:
        """Starts local step ``step`` (main thread; every process at the same step)."""
        self.flush()
        later = sorted(s for s in self._mine if s >= step)
        if later:  # steps that go backwards within a run: nothing of this run is deleted for them
            log.warning(
                "step %d: a local checkpoint is due, but skipped: this run saved local step(s) %s already "
                "(steps must increase; restore an older step first to go back)",
                step,
                later,
            )
            self.last_step = step
            return
        layout = Layout.of(state)  # an unsupported leaf is refused before anything is written
        self._claim()
        save = distributed.broadcast_json(
            f"local-save/{self.tag}/{next(_ROUNDS)}", {"id": os.urandom(8).hex(), "at": time.time()}
        )
        self._discard_from(step)
        digest = layout.digest()
        me = distributed.process_index()
        mine = layout.pieces(me)
        blobs = _snapshot(layout, jax.tree_util.tree_leaves(state, is_leaf=lambda x: x is None), mine)
        shifts = self._shifts(layout, step, digest, save["id"], blobs=blobs, mine=mine) if self.replicas else []
        current = _Step(step, layout, shifts, extras, save)
        current.per_step = self._per_step(step, sum(shift.rounds for shift in shifts))
        manifest = self._manifest(current, digest, now)
        current.own = self._worker.submit(self._write_own, step, me, manifest, mine, blobs)
        self._current = current
        self._mine.add(step)
        self.last_step, self.last_time = step, self._seen  # the agreed clock's last reading: alike everywhere
        self.pump()

    def _discard_from(self, step: int) -> None:
        """Deletes this host's local steps >= ``step``: another trajectory's (a run that restored an
        older step), or this step's from an interrupted run; their records go with them."""
        newer = [s for s in store.steps(self.root) if s >= step]
        if newer:
            log.warning("local step %d: deleting local steps %s of %s, another trajectory's", step, newer, self.root)
        for s in newer:
            distributed.unpublish(f"local/{self.tag}/{s}", distributed.process_index())
            store.delete_step(self.root, s)

    def _manifest(self, current: _Step, digest: str, now: float | None) -> dict[str, Any]:
        extra = {"save": current.save["id"], "saved_at": current.save["at"], "base": self.base_url}
        return {**_manifest(current.layout, digest, current.extras, now, self.replicas), **extra}

    def _per_step(self, step: int, rounds: int) -> int:
        """Rounds per ``on_step``: the tier's, or ``rounds`` spread over half the step interval."""
        if self.tier.rounds_per_step is not None:
            return self.tier.rounds_per_step
        interval = self.policy.interval_at(step)
        steps = max(1, interval.every // 2) if interval is not None else 1
        return max(2, -(-rounds // steps))

    def _claim(self) -> None:
        """First save: every process claims the directory; a directory two claim is refused."""
        if self._claimed:
            return
        run = distributed.broadcast_json(f"local-run/{self.tag}/{next(_ROUNDS)}", os.urandom(8).hex())
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise CheckpointPathError(
                f"LocalTier({self.tier.path!r}): cannot make the directory {self.root}: {e}"
            ) from e
        store.claim(self.root, run, distributed.process_index())
        distributed.barrier(f"local-claim/{self.tag}/{run}")
        seen = store.claimants(self.root, run)
        gathered = distributed.gather_json(f"local-claimed/{self.tag}/{run}", seen)
        shared = None
        if gathered is not None:
            shared = [[p, got] for p, got in enumerate(gathered) if got != [p]]
        shared = distributed.broadcast_json(f"local-shared/{self.tag}/{run}", shared)
        if shared:
            p, got = shared[0]
            raise CheckpointPathError(
                f"LocalTier({self.tier.path!r}): process {p}'s local directory is also written by process(es) "
                f"{[q for q in got if q != p]} (each process must have a directory no other process sees: a "
                "RAM disk or local disk of its host, or a per-process path like f'/local/ckpt/{jax.process_index()}')"
            )
        self._claimed = True

    def _shifts(
        self, layout: Layout, step: int, digest: str, save: str, *, blobs: list[np.ndarray], mine: list[Piece]
    ) -> list[_Shift]:
        channel = self.peers()
        n, me = self.processes, distributed.process_index()
        sizes = [peers.frame_bytes(layout.set_bytes(q), len(layout.pieces(q))) for q in range(n)]
        crcs: concurrent.futures.Future[bytes] = self._worker.submit(peers.crcs_of, blobs)
        trailer = peers.Lazy(crcs, 4 * len(mine))
        out = []
        for k in range(1, self.replicas + 1):
            source = (me - k) % n
            frame = peers.Frame([peers.header(step, me, digest, save), *blobs, trailer])
            pairs = tuple((q, (q + k) % n) for q in range(n))
            out.append(_Shift(pairs, frame, source, layout.pieces(source), channel.rounds(sizes)))
        return out

    def pump(self, limit: int | None = None) -> None:
        """Dispatches up to ``limit`` (default ``rounds_per_step``) pending rounds (main thread)."""
        current = self._current
        if current is None:
            return
        self._publish_once(current)
        if current.dispatched() or self._peers is None:
            return
        budget = current.per_step if limit is None else limit
        while budget > 0 and not current.dispatched():
            while len(current.drains) >= 2:  # at most two rounds in flight
                current.drains.popleft().result()
            k, r = current.cursor
            shift = current.shifts[k]
            out = self.peers().dispatch(shift.pairs, shift.frame, r)
            current.drains.append(self._worker.submit(self._drain, current, shift, r, out))
            current.cursor = (k, r + 1) if r + 1 < shift.rounds else (k + 1, 0)
            budget -= 1
        self._publish_once(current)

    def _publish_once(self, current: _Step) -> None:
        if current.dispatched() and not current.publishing:
            current.publishing = True
            self._worker.submit(self._publish, current)

    def flush(self) -> None:
        """Dispatches every pending round and waits for the local step's writes (main thread)."""
        current = self._current
        if current is None:
            return
        self.pump(limit=1 << 62)
        for future in [current.own, *current.drains]:
            if future is not None:
                future.exception()
        self._worker.submit(lambda: None).result()

    def close(self) -> None:
        self.flush()
        self._worker.shutdown(wait=True)

    # -- the worker's side ---------------------------------------------------------------------

    def _write_own(
        self, step: int, me: int, manifest: dict[str, Any], mine: list[Piece], blobs: list[np.ndarray]
    ) -> bool:
        try:
            crcs = [int(c) for c in np.frombuffer(peers.crcs_of(blobs), "<u4")]
            with store.PartWriter(self.root, step=step, set_index=me) as w:
                for piece, blob in zip(mine, blobs, strict=True):
                    w.write_at(piece.offset, blob)
                w.commit(_with_pieces(manifest, mine, crcs), data_bytes=sum(p.nbytes for p in mine))
            return True
        except Exception as e:  # the loop goes on; the step never counts here
            log.error("local step %d: writing set %d to %s failed: %s", step, me, self.root, e)
            return False

    def _drain(self, current: _Step, shift: _Shift, r: int, out: Any) -> None:
        got = peers.Peers.received(out)
        del out
        if shift.rounds == 0 or current.failed:
            return
        try:
            rb = len(got)
            start = r * rb
            data_bytes = sum(p.nbytes for p in shift.pieces)
            size = peers.frame_bytes(data_bytes, len(shift.pieces))
            if start >= size:
                return
            end = min(start + rb, size)
            lo, hi = peers.HEADER_BYTES, peers.HEADER_BYTES + data_bytes
            if start < lo:
                shift.head += got[: min(end, lo) - start].tobytes()
            if shift.writer is None:
                shift.writer = store.PartWriter(self.root, step=current.step, set_index=shift.source)
            a, b = max(start, lo), min(end, hi)
            if a < b:
                shift.writer.write_at(a - lo, got[a - start : b - start])
            a = max(start, hi)
            if a < end:
                shift.tail += got[a - start : end - start].tobytes()
            if end == size:
                self._commit_replica(current, shift, data_bytes)
        except Exception as e:
            current.failed.append(f"replica of set {shift.source}: {e}")
            log.error("local step %d: the replica of set %d did not arrive whole: %s", current.step, shift.source, e)

    def _commit_replica(self, current: _Step, shift: _Shift, data_bytes: int) -> None:
        layout = current.layout
        digest = layout.digest()
        where = f"{self.root} step {current.step} set {shift.source}"
        peers.check_header(bytes(shift.head), current.step, shift.source, digest, current.save["id"], where=where)
        crcs = [int(c) for c in np.frombuffer(bytes(shift.tail), "<u4")]
        assert shift.writer is not None
        shift.writer.flush()
        data = np.fromfile(os.path.join(shift.writer.path, "data.bin"), np.uint8, count=data_bytes)
        for piece, crc in zip(shift.pieces, crcs, strict=True):
            store.checked(data, piece.offset, piece.nbytes, crc, where)
        del data
        manifest = self._manifest(current, digest, None)
        shift.writer.commit(_with_pieces(manifest, shift.pieces, crcs), data_bytes=data_bytes)

    def _publish(self, current: _Step) -> None:
        """Once this process's parts of the step are committed: publish, then retention."""
        own_ok = current.own is not None and current.own.result()
        for d in list(current.drains):
            d.exception()
        ok = own_ok and not current.failed
        record = {"step": current.step, "complete": bool(ok), "failed": list(current.failed)}
        self.saved.append(record)
        if not ok:
            log.error(
                "local step %d is not complete on process %d: %s", current.step, distributed.process_index(), record
            )
            return
        distributed.publish(f"local/{self.tag}/{current.step}", distributed.process_index())
        self._retain(current.step)

    def _retain(self, step: int) -> None:
        """Deletes local steps older than the ``keep_last`` newest that every process committed."""
        complete = sorted(
            int(s)
            for s, got in distributed.published(f"local/{self.tag}").items()
            if len(got) == self.processes and int(s) <= step  # never a stale record of a later step
        )
        keep = complete[-self.tier.keep_last :]
        if len(keep) < self.tier.keep_last:
            return
        for old in store.steps(self.root):
            if old < keep[0]:
                store.delete_step(self.root, old)
        for old in complete:
            if old < keep[0]:  # older than every step kept anywhere: no process needs its record
                distributed.unpublish(f"local/{self.tag}/{old}", distributed.process_index())

    # -- restoring -----------------------------------------------------------------------------

    def discard_after(self, step: int) -> None:
        """``restore(..., discard_newer=True)`` of ``step``: this host's later local steps go now."""
        for s in store.steps(self.root):
            if s > step:
                distributed.unpublish(f"local/{self.tag}/{s}", distributed.process_index())
                store.delete_step(self.root, s)
        self.restored(step)

    def restored(self, step: int) -> None:
        """After a restore of ``step`` from either tier: the schedule goes on from there (this
        run's later local steps are another trajectory's now: the next save deletes them)."""
        self.last_step = self.previous_step = step
        self._mine = {s for s in self._mine if s <= step}

    def plan(self, template: Any, unusable: str | None = None) -> dict[str, Any]:
        """What the local tier can restore, agreed by every process (``_recover.plan``);
        ``unusable``: why this process has no template (no part then fits)."""
        self.flush()
        return _recover.plan(self, template, unusable)

    def restore(
        self, agreed: dict[str, Any], template: Any, newer_than: int | None
    ) -> tuple[Any, dict[str, Any], int] | None:
        """The newest step of ``agreed`` that every process rebuilds, if it is at least
        ``newer_than`` (the persistent tier's step); None otherwise (the log says why)."""
        got = _recover.restore(self, agreed, template, newer_than)
        if got is not None:
            self.restored(got[2])
        return got

    def peers(self) -> peers.Peers:
        if self._peers is None:
            self._peers = peers.Peers(self.tier.transfer_bytes)
        return self._peers

    def next_round(self) -> int:
        return next(_ROUNDS)


def _snapshot(layout: Layout, values: Sequence[Any], pieces: list[Piece]) -> list[np.ndarray]:
    """Host copies of this process's regions (the one wait of a local save)."""
    shards: dict[int, dict[Any, Any]] = {}
    raw: dict[int, Any] = {}
    for piece in pieces:
        if piece.leaf not in raw:
            leaf = layout.leaves[piece.leaf]
            raw[piece.leaf] = value = raw_value(leaf, values[piece.leaf])
            if leaf.kind in ("array", "key"):
                shards[piece.leaf] = {region_of(s.index, leaf.shape): s.data for s in value.addressable_shards}
                for data in shards[piece.leaf].values():
                    data.copy_to_host_async()
    out = []
    for piece in pieces:
        leaf = layout.leaves[piece.leaf]
        if leaf.kind == "numpy":
            out.append(np.array(raw[piece.leaf], order="C"))
        else:
            out.append(np.array(shards[piece.leaf][piece.region], order="C"))
    return out


def _manifest(layout: Layout, digest: str, extras: Any, now: float | None, replicas: int) -> dict[str, Any]:
    """A part's manifest but for its regions; ``holder`` and ``replicas`` say who keeps which set."""
    leaves = []
    for leaf in layout.leaves:
        row: dict[str, Any] = {"path": leaf.path, "kind": leaf.kind}
        if leaf.kind != "json":
            row.update(shape=list(leaf.shape), dtype=leaf.dtype)
        if leaf.kind == "key":
            row["impl"] = leaf.impl
        if leaf.kind == "json":
            row["value"] = leaf.value
        leaves.append(row)
    return {
        "digest": digest,
        "topology": topology(),
        "holder": distributed.process_index(),
        "replicas": replicas,
        "leaves": leaves,
        "extras": extras,
        "timestamp": now,
    }


def _with_pieces(manifest: dict[str, Any], pieces: list[Piece], crcs: list[int]) -> dict[str, Any]:
    rows = [[p.leaf, [list(r) for r in p.region], p.offset, p.nbytes, c] for p, c in zip(pieces, crcs, strict=True)]
    return {**manifest, "pieces": rows}
