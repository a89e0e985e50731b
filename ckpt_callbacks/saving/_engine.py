"""The save engine: plan -> snapshot (caller's thread) -> claim names -> write -> report -> agree -> commit.

``start_save`` checks and snapshots in the caller's thread and returns a ``SaveHandle``; the
names, writes, checksums and commit run in a background thread once the snapshot no longer
depends on the caller's buffers (they may be deleted or donated right away), and
``SaveHandle.wait()`` re-raises anything that failed there. What each layout writes and
reports is its ``layouts.LayoutWriter``'s business; this module never tests a layout's name.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax
import tensorstore as ts

from ckpt_callbacks import directory as commits
from ckpt_callbacks import directory as layout
from ckpt_callbacks import distributed, layouts, storage
from ckpt_callbacks import format as fmt
from ckpt_callbacks import format as planning
from ckpt_callbacks import storage as paths
from ckpt_callbacks.errors import CheckpointExistsError, PeerSaveError
from ckpt_callbacks.saving._leaves import Leaf, plan_tree
from ckpt_callbacks.saving._options import SaveHandle, SaveOptions
from ckpt_callbacks.saving._snapshot import (
    HOST_BUFFERS,
    Snapshot,
    device_budgets,
    host_resident,
    staged_bytes,
    unit_bytes,
)
from ckpt_callbacks.saving._writer import DEFAULT_WINDOW_BYTES, Writer, batches

log = logging.getLogger("ckpt_callbacks")

# Saves are numbered per process, and the number names the save's key-value exchanges between
# processes (layout, checksums, barriers). That only pairs up if every process starts the same
# saves in the same order, which is the multi-host contract: every process calls save/save_async
# (or the callback, on every step) with the same arguments, in the same order.
_SAVE_COUNTER = itertools.count()


@dataclasses.dataclass
class _Plan:
    """What one save writes: per item its tree structure and leaves, and this process's units."""

    structures: dict[str, dict[str, Any]]
    leaves_of: dict[str, list[Leaf]]
    pairs: list[tuple[Leaf, planning.WriteUnit]]

    @property
    def nbytes(self) -> int:
        return sum(unit_bytes(leaf, unit) for leaf, unit in self.pairs)

    def pack_files(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(item, pack file) -> (file size, chunks this process puts in it)."""
        packs: dict[tuple[str, str], tuple[int, int]] = {}
        for leaf, unit in self.pairs:
            if leaf.record.pack:
                name, offset = leaf.record.pack[fmt.chunk_key(unit.chunk)]
                size, count = packs.get((leaf.item, name), (0, 0))
                packs[(leaf.item, name)] = (max(size, offset + unit_bytes(leaf, unit)), count + 1)
        return packs

    def release_sources(self) -> None:
        """Drops references to the caller's arrays so donated buffers can go."""
        for leaves in self.leaves_of.values():
            for leaf in leaves:
                leaf.source = None


def _plan(items: Mapping[str, Any], options: SaveOptions) -> _Plan:
    structures, leaves_of = {}, {}
    pairs: list[tuple[Leaf, planning.WriteUnit]] = []
    for item, tree in items.items():
        structure, flat = fmt.flatten(tree)
        files = layouts.layout_for(options.layout).file_bytes(options.max_host_bytes)
        leaves = plan_tree(flat, options.cast, options.max_chunk_bytes, options.pack_bytes, files)
        for index, leaf in enumerate(leaves):
            leaf.item, leaf.index = item, index
            pairs.extend((leaf, unit) for unit in leaf.units)
        structures[item], leaves_of[item] = structure, leaves
    return _Plan(structures, leaves_of, pairs)


def _window(total: int, max_host_bytes: int | None) -> int:
    """Bytes of writes in flight: each holds an encoded copy of its chunk, so keep them to a
    fraction of the save (or of the budget, which the snapshot batches share) to stay near 1x."""
    if max_host_bytes is None:
        return min(DEFAULT_WINDOW_BYTES, max(total // 5, 1))
    return max(1, max_host_bytes // 8)


def _batches(plan: _Plan, options: SaveOptions, copy: bool) -> list[list[tuple[Leaf, planning.WriteUnit]]]:
    """The snapshot's batches: one, unless a host budget smaller than the save splits a
    host-side snapshot (on CPU, or ``snapshot="host"``) into batches of half the budget."""
    host_side = host_resident() or options.snapshot == "host"
    if not copy or options.max_host_bytes is None or not host_side:
        return [plan.pairs]
    return batches(plan.pairs, options.max_host_bytes // 2)


def _snapshot(pieces: list[list[Any]], writer: Writer, copy: bool, options: SaveOptions) -> Snapshot:
    """Takes the snapshot; with several batches, writes all but the last first (the snapshot
    cannot hold more than the budget at once). Returns the last batch."""
    if not copy:
        return Snapshot.live(pieces[0])
    if len(pieces) == 1:
        budgets = device_budgets(jax.local_devices(), options.snapshot, options.memory_stats, options.device_headroom)
        return Snapshot.copied(pieces[0], budgets)
    buffer = HOST_BUFFERS.take(max(staged_bytes(batch) for batch in pieces))
    for batch in pieces[:-1]:
        writer.write(Snapshot.staged(batch, buffer, last=False))
    return Snapshot.staged(pieces[-1], buffer, last=True)


def _create_arrays(loc: paths.Location, commit: fmt.Commit, plan: _Plan) -> None:
    """Process 0, at commit: each zarr3 array's metadata (writers never race on it)."""
    futures = []
    for item, leaves in plan.leaves_of.items():
        kvstore = paths.kvstore_spec(loc.join(commit.items[item]))
        for leaf in leaves:
            if leaf.record.kind != "scalar" and not leaf.record.pack:
                spec = fmt.zarr_spec(kvstore, leaf.record)
                futures.append(ts.open(spec, create=True, open=True, context=paths.context()))
    for future in futures:
        storage.wait(future, loc.options, loc.url, "create array")


class Renewal:
    """Process 0 renews its save's claim every third of its lease while the save runs, so no
    other save takes the claim for dead (``ckpt_callbacks.claims``)."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, loc: paths.Location, names: layout.SaveLayout) -> None:
        self._thread = threading.Thread(target=self._run, args=(loc, names), name="ckpt-claim", daemon=True)
        self._thread.start()

    def _run(self, loc: paths.Location, names: layout.SaveLayout) -> None:
        while not self._stop.wait(names.lease_s / 3):
            try:
                layout.renew(loc, names)
            except Exception as e:  # the next renewal tries again; a lapsed claim only risks a cleanup
                log.warning("could not renew the claim %s: %s", loc.join(names.claim).url, e)

    def stop(self) -> None:
        self._stop.set()


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Save:
    """One save between its snapshot and its commit (run in the background by ``finish``)."""

    loc: paths.Location
    items: list[str]
    plan: _Plan
    writer: Writer
    metadata: fmt.Metadata
    options: SaveOptions
    tag: str
    add: bool = False

    renewal: Renewal = dataclasses.field(default_factory=Renewal)

    def choose(self) -> layout.SaveLayout:
        """The save's names (process 0 decides, everyone learns them); the writer opens them.
        Process 0 renews the save's claim until the save ends."""
        lease_s = self.options.claim_lease_s
        names = layout.choose_layout(self.loc, self.items, self.options.overwrite, self.tag, self.add, lease_s=lease_s)
        if distributed.is_primary():
            self.renewal.start(self.loc, names)
        layout.check_shared(self.loc, names, self.tag, self.options.timeout_s)
        self.writer.open({item: self.loc.join(names.commit.items[item]) for item in self.items})
        return names

    def finish(self, names: layout.SaveLayout | None, last: Snapshot) -> int:
        """Names (unless chosen already), the last batch, then ``agree``. Returns the bytes this
        process wrote; raises its own failure, or ``PeerSaveError`` naming the process whose
        writes failed (then no process commits)."""
        try:
            return self._finish(names, last)
        finally:
            self.renewal.stop()

    def _finish(self, names: layout.SaveLayout | None, last: Snapshot) -> int:
        if names is None:
            names = self.choose()
        failure: BaseException | None = None
        try:
            self.writer.write(last)
            self.writer.check_complete(self.loc.url)
            item_locs = {item: self.loc.join(names.commit.items[item]) for item in self.items}
            sent = layouts.layout_for(self.options.layout).report(item_locs, self.plan.leaves_of, self.writer.crcs)
            report = {"sent": sent}
        except Exception as e:  # told to the others first, so they fail now instead of timing out
            failure = paths.as_storage_error(e, self.loc.url)
            report = {"error": f"{type(failure).__name__}: {failure}"[:2000]}
        try:
            verdict, own = self.agree(names, report)
        except BaseException:
            if distributed.is_primary():
                layout.release(self.loc, names, settled=False)
            raise
        error = failure if failure is not None else own
        if error is not None:
            raise error from None
        if verdict is not None:
            raise PeerSaveError(errno.EIO, f"save failed on {verdict}; no process committed", self.loc.url)
        return self.writer.nbytes

    def agree(self, names: layout.SaveLayout, report: dict[str, Any]) -> tuple[str | None, BaseException | None]:
        """Every process's report (what it wrote, or its error) to process 0, which commits only
        if every process wrote; then its verdict (None: committed) to every process. Also returns
        process 0's own commit failure."""
        timeout_s = self.options.timeout_s
        gathered = distributed.gather_json(f"{self.tag}/crc", report, timeout_s)
        verdict, own = None, None
        if gathered is not None:
            verdict = ", ".join(f"process {pid} ({r['error']})" for pid, r in enumerate(gathered) if "error" in r)
            settled = not verdict  # a failed write may still be retried by the store's client
            try:
                if not verdict:
                    self.commit(names, [r["sent"] for r in gathered])
            except Exception as e:
                own = paths.as_storage_error(e, self.loc.url)
                verdict = f"process 0 ({type(own).__name__}: {own})"[:2000]
                settled = isinstance(own, CheckpointExistsError)  # refused: every write had finished
            if verdict:
                layout.release(self.loc, names, settled=settled)
        return distributed.broadcast_json(f"{self.tag}/verdict", verdict or None, timeout_s), own

    def commit(self, names: layout.SaveLayout, gathered: list[Any]) -> None:
        """Process 0, once every process wrote: array metadata, manifests, metadata, marker."""
        _create_arrays(self.loc, names.commit, self.plan)
        plan = self.plan
        made = layouts.layout_for(self.options.layout).manifests(plan.structures, plan.leaves_of, gathered)
        commits.write_commit(self.loc, names, made, self.metadata)


def start_save(
    path: Any,
    items: Mapping[str, Any],
    metadata: fmt.Metadata,
    options: SaveOptions,
    *,
    copy: bool = True,
    add: bool = False,
) -> SaveHandle:
    """Checks and snapshot in the caller's thread; names, writes and commit in a background one.

    The names are chosen in the background (a write and a listing on storage, which the loop
    should not wait for), unless batches must be written before returning.
    """
    start = time.perf_counter()
    loc = paths.parse(path, options.storage)
    for item in items:
        layout.check_item_name(item)
    named = layout.step_of(loc.name)
    if named is not None and metadata.step is not None and named != metadata.step:
        raise ValueError(f"{loc.url}: step {metadata.step} saved into a directory named for step {named}")
    if named is not None and metadata.step is None:  # what listings, the latest and a resume go by
        metadata = dataclasses.replace(metadata, step=named)
    tag = f"save{next(_SAVE_COUNTER)}"
    try:
        layout.refuse_committed(loc, options.overwrite, tag, list(items) if add else None)
    except ValueError as e:
        raise paths.as_storage_error(e, loc.url) from e
    plan = _plan(items, options)
    save = _Save(
        loc=loc,
        items=list(items),
        plan=plan,
        writer=Writer(
            _window(plan.nbytes, options.max_host_bytes), plan.pack_files(), options=loc.options, where=loc.url
        ),
        metadata=metadata,
        options=options,
        tag=tag,
        add=add,
    )
    pieces = _batches(plan, options, copy)
    names = None
    try:
        names = save.choose() if len(pieces) > 1 else None
        last = _snapshot(pieces, save.writer, copy, options)
    except BaseException as e:
        save.renewal.stop()
        if names is not None and distributed.is_primary():
            layout.release(loc, names, settled=False)
        raise paths.as_storage_error(e, loc.url) from e
    plan.release_sources()
    handle = SaveHandle(loc.url, time.perf_counter() - start, metadata.to_json())
    handle._start(lambda: save.finish(names, last))
    return handle
