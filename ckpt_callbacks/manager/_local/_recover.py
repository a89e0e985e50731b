"""Restoring from the local tier: inventory, agreement, transfers from peers, rebuild.

The call sequence (every process, before training):

1. Each process scans its directory for committed parts and checks each against the
   template: the layout digest (paths, kinds, shapes, dtypes, every device's region, the
   process and device counts) must be the one saved, and the manifest's regions the ones the
   template gives. A part that does not fit says why.
2. Process 0 gathers every inventory and picks the newest step where every set has a holder
   whose part fits (the set's own process first); the plan, and why each newer step was
   refused, is broadcast. A plan older than the persistent tier's newest step is not used.
3. The sets a process does not hold itself come from their holders by ``ppermute``, in budget
   rounds, in calls where no process sends or receives twice. A process with nothing to send
   or receive in a call still takes part in it.
4. Each process checks every region's crc32c, places its regions on its devices and builds
   the arrays; every process agrees on the outcome: one failure anywhere, and the local tier
   is not used (the persistent tier is), never a partial restore.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np

from ckpt_callbacks import distributed
from ckpt_callbacks.errors import CorruptCheckpointError
from ckpt_callbacks.manager._local import _peers as peers
from ckpt_callbacks.manager._local import _store as store
from ckpt_callbacks.manager._local._sets import Layout, Piece, region_of, summary, topology

log = logging.getLogger("ckpt_callbacks")


def _fit(part: store.Part, template: Any, current: dict[str, Any], base: str) -> dict[str, Any]:
    """Whether ``part`` can be placed under ``template`` on this topology by a run of ``base``,
    and what it holds."""
    row: dict[str, Any] = {
        "step": part.step,
        "set": part.set_index,
        "save": part.save,
        "holder": distributed.process_index(),
        "fits": False,
    }
    try:
        man = store.manifest(part)
        host = [r for r in man["leaves"] if r.get("kind") in ("numpy", "json")]
        row["saved_at"] = float(man.get("saved_at") or 0.0)
    except Exception as e:  # a damaged manifest: this part does not count
        row["why"] = f"unreadable manifest ({type(e).__name__}: {e})"
        return row
    if man.get("base") != base:
        row["why"] = f"saved by a run of another base ({man.get('base')!r}, this run's is {base!r})"
        return row
    try:
        layout = Layout.of(template, saved=host)
    except TypeError as e:
        row["why"] = f"the template cannot be placed ({e})"
        return row
    try:
        if layout.digest() != part.digest:
            saved, now = man.get("topology") or {}, current
            why = "saved for another state or mesh"
            if saved and saved != now:
                why = f"saved on {summary(saved)}, now {summary(now)}"
            row["why"] = why
            return row
        expected = [[p.leaf, [list(r) for r in p.region], p.offset, p.nbytes] for p in layout.pieces(part.set_index)]
        if [r[:4] for r in man["pieces"]] != expected:
            row["why"] = "its manifest's regions are not the layout's"
            return row
        row.update(fits=True, host=host, extras=man.get("extras"), timestamp=man.get("timestamp"))
    except Exception as e:  # a damaged manifest: this part does not count
        row["why"] = f"a damaged manifest ({type(e).__name__}: {e})"
    return row


def _holders(table: list[list[dict[str, Any]]], n: int, step: int, save: str) -> tuple[dict[int, int], list[str]]:
    """For each set of one save of ``step``: the process to read it from (its own first)."""
    holders: dict[int, int] = {}
    whys = []
    for q in range(n):
        rows = [(p, r) for p, got in enumerate(table) for r in got if r["step"] == step and r["set"] == q]
        fit = [p for p, r in rows if r["fits"] and r["save"] == save]
        whys += [f"process {p}'s set {q}: {r['why']}" for p, r in rows if not r["fits"]]
        if fit:
            holders[q] = q if q in fit else min(fit, key=lambda p: (p - q) % n)
    return holders, whys


def _plan(table: list[list[dict[str, Any]]], n: int, unusable: list[Any] | None = None) -> dict[str, Any]:
    """Every step every set can come from, newest first (one save per step: the newest), and
    why each step that cannot be used cannot. ``unusable``: per process, why it has no
    template (then no step is used: that process could not take part in a transfer)."""
    rejected: list[list[Any]] = []
    candidates: list[dict[str, Any]] = []
    notes: list[list[Any]] = []
    lacking = [(p, why) for p, why in enumerate(unusable or []) if why]
    if lacking:
        p, why = lacking[0]
        steps = sorted({row["step"] for rows in table for row in rows}, reverse=True)
        return {"candidates": [], "rejected": [[s, f"process {p} has no template ({why})"] for s in steps], "notes": []}
    for step in sorted({row["step"] for rows in table for row in rows}, reverse=True):
        saves = {r["save"]: r.get("saved_at", 0.0) for rows in table for r in rows if r["step"] == step and r["fits"]}
        newest = max(saves, key=lambda k: (saves[k], k)) if saves else ""
        holders, whys = _holders(table, n, step, newest)
        missing = [q for q in range(n) if q not in holders]
        if missing:
            why = f"set(s) {missing} have no live holder (neither the process nor a peer's replica)"
            rejected.append([step, why + (f"; {whys[0]}" if whys else "")])
            continue
        if len(saves) > 1:  # two trajectories saved this step: only the newest save is this run's
            notes.append([step, f"{len(saves) - 1} older save(s) of this step, another trajectory's, are ignored"])
        first = next(r for rows in table for r in rows if r["step"] == step and r["fits"] and r["save"] == newest)
        candidates.append(
            {
                "step": step,
                "save": newest,
                "holders": holders,
                "host": first["host"],
                "extras": first["extras"],
                "timestamp": first["timestamp"],
            }
        )
    return {"candidates": candidates, "rejected": rejected, "notes": notes}


def _own_part(parts: list[store.Part], plan: dict[str, Any], set_index: int) -> store.Part:
    return next(p for p in parts if p.step == plan["step"] and p.set_index == set_index and p.save == plan["save"])


def _crcs(part: store.Part) -> list[int]:
    return [int(r[4]) for r in store.manifest(part)["pieces"]]


def _receive(saver: Any, plan: dict[str, Any], layout: Layout, parts: list[store.Part]) -> tuple[Any, list[int]]:
    """This process's set of the plan's step: from its disk, or from its holder (collective)."""
    me, step, digest = distributed.process_index(), plan["step"], layout.digest()
    holders = {int(q): int(h) for q, h in plan["holders"].items()}
    pairs = [(h, q) for q, h in holders.items() if h != q]
    mine: tuple[Any, list[int]] | None = None
    error: BaseException | None = None
    if holders[me] == me:
        try:  # a failure here still takes part in every round below: the others would wait for it
            part = _own_part(parts, plan, me)
            mine = store.data(part), _crcs(part)
        except Exception as e:
            error = e
    if not pairs:
        if error is not None:
            raise error
        return mine  # type: ignore[return-value]
    channel = saver.peers()
    for call in peers.pair_calls(pairs):
        sizes = [peers.frame_bytes(layout.set_bytes(q), len(layout.pieces(q))) for _, q in call]
        frame, inbox = None, None
        for h, q in call:
            if h == me:
                try:
                    part = _own_part(parts, plan, q)
                    crcs = np.asarray(_crcs(part), "<u4").tobytes()
                    frame = peers.Frame([peers.header(step, q, digest, plan["save"]), store.data(part), crcs])
                except Exception as e:  # send nothing; the receiver's check fails, every process agrees
                    error = e
            if q == me:
                inbox = np.empty(peers.frame_bytes(layout.set_bytes(q), len(layout.pieces(q))), np.uint8)
        for r in range(channel.rounds(sizes)):
            try:
                out = channel.dispatch(call, frame, r)
            except Exception as e:
                error, frame = e, None
                out = channel.dispatch(call, None, r)
            got = channel.received(out)
            if inbox is not None:
                start = r * channel.round_bytes
                take = max(0, min(len(got), len(inbox) - start))
                inbox[start : start + take] = got[:take]
        if inbox is not None:
            data_bytes = layout.set_bytes(me)
            where = f"set {me} of local step {step} from process {holders[me]}"
            peers.check_header(inbox[: peers.HEADER_BYTES].tobytes(), step, me, digest, plan["save"], where=where)
            tail = inbox[peers.HEADER_BYTES + data_bytes :]
            mine = inbox[peers.HEADER_BYTES : peers.HEADER_BYTES + data_bytes], [int(c) for c in tail.view("<u4")]
    if error is not None:
        raise error
    return mine  # type: ignore[return-value]


def _build(layout: Layout, data: Any, crcs: list[int], plan: dict[str, Any], where: str) -> Any:
    """The restored tree: this process's regions checked and placed on its devices."""
    me = distributed.process_index()
    pieces = layout.pieces(me)
    if len(crcs) != len(pieces):
        raise ValueError(f"{where}: {len(crcs)} checksums for {len(pieces)} regions")
    values = {r["path"]: r.get("value") for r in plan["host"] if r.get("kind") == "json"}
    by_leaf: dict[int, dict[Any, tuple[Piece, int]]] = {}
    for piece, crc in zip(pieces, crcs, strict=True):
        by_leaf.setdefault(piece.leaf, {})[piece.region] = (piece, crc)
    cache: dict[tuple[int, Any], np.ndarray] = {}

    def region(i: int, key: Any, dtype: str) -> np.ndarray:
        if (i, key) not in cache:
            piece, crc = by_leaf[i][key]
            raw = store.checked(data, piece.offset, piece.nbytes, crc, f"{where}, {layout.leaves[i].path}")
            extent = tuple(b - a for a, b in piece.region)
            cache[(i, key)] = np.array(raw).view(np.dtype(dtype)).reshape(extent)
        return cache[(i, key)]

    leaves: list[Any] = []
    for i, leaf in enumerate(layout.leaves):
        if leaf.kind in ("json", "numpy"):
            value = values.get(leaf.path) if leaf.kind == "json" else region(i, next(iter(by_leaf[i])), leaf.dtype)
            leaves.append(_as_template(value, leaf.template))
            continue
        indices = leaf.sharding.addressable_devices_indices_map(leaf.shape)
        arrays = [jax.device_put(region(i, region_of(ix, leaf.shape), leaf.dtype), d) for d, ix in indices.items()]
        array = jax.make_array_from_single_device_arrays(leaf.shape, leaf.sharding, arrays)
        leaves.append(jax.random.wrap_key_data(array, impl=leaf.impl) if leaf.kind == "key" else array)
    tree = jax.tree_util.tree_unflatten(layout.treedef, leaves)
    jax.block_until_ready([x for x in leaves if isinstance(x, jax.Array)])
    return tree


def _as_template(value: Any, like: Any) -> Any:
    """A host leaf as its template leaf says (as the persistent tier restores it): an array of
    the template's dtype where it is placed, else the value as saved."""
    sharding = getattr(like, "sharding", None)
    if like is not None and sharding is None and jax.device_count() == 1:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if like is None or sharding is None or value is None or isinstance(value, str):
        return value
    array = np.asarray(value, dtype=like.dtype)
    # not device_put: onto a sharding over several processes it checks the value is equal on each,
    # a collective that one process leaving a failed attempt early would leave the others waiting in
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _describe(plan: dict[str, Any]) -> str:
    moved = [
        f"set {q} from process {h}'s replica"
        for q, h in sorted(plan["holders"].items(), key=lambda x: int(x[0]))
        if int(q) != int(h)
    ]
    return ", ".join(moved) if moved else "every process from its own directory"


def plan(saver: Any, template: Any, unusable: str | None = None) -> dict[str, Any]:
    """Steps 1-2 of the call sequence (every process; no data moves): the agreed plan."""
    name = f"local-plan/{saver.tag}/{saver.next_round()}"
    problems: list[str] = []
    parts = store.scan(saver.root, problems) if os.path.isdir(saver.root) else []
    for problem in problems:  # a part a kill interrupted has no marker; these have one, damaged
        log.warning("restore: a local part is passed over: %s", problem)
    if unusable is not None:
        rows = [
            {
                "step": p.step,
                "set": p.set_index,
                "save": p.save,
                "holder": distributed.process_index(),
                "fits": False,
                "why": f"no template ({unusable})",
            }
            for p in parts
        ]
    else:
        current = topology()
        rows = [_fit(part, template, current, saver.base_url) for part in parts]
    mine = {"rows": rows, "problems": len(problems), "unusable": unusable}
    gathered = distributed.gather_json(f"{name}/inventory", mine)
    agreed = None
    if gathered is not None:
        table, unusables = [g["rows"] for g in gathered], [g["unusable"] for g in gathered]
        agreed = _plan(table, distributed.process_count(), unusables)
        agreed["seen"] = sum(len(g["rows"]) + g["problems"] for g in gathered)  # parts anywhere, usable or not
        agreed["table"], agreed["unusable"] = table, unusables
    agreed = distributed.broadcast_json(f"{name}/plan", agreed)
    agreed["parts"] = parts
    return agreed


def explain(agreed: dict[str, Any], newer_than: int | None) -> None:
    """Logs why each local step newer than ``newer_than`` (the persistent tier's newest) cannot be used."""
    for step, why in agreed["rejected"]:
        if newer_than is None or step > newer_than:
            log.warning("restore: local step %d cannot be used: %s", step, why)
    for step, why in agreed["notes"]:
        log.info("restore: local step %d: %s", step, why)
    if not agreed["candidates"] and agreed["seen"]:
        log.warning("restore: no local step can be restored on every process; using the persistent tier")


def newest(agreed: dict[str, Any]) -> int | None:
    """The plan's newest usable local step."""
    return agreed["candidates"][0]["step"] if agreed["candidates"] else None


def restore(
    saver: Any, agreed: dict[str, Any], template: Any, newer_than: int | None
) -> tuple[Any, dict[str, Any], int] | None:
    """Steps 3-4 for the newest candidate of ``agreed`` not older than ``newer_than``, until one
    restores on every process; None: use the persistent tier (logged why). A part whose data
    fails its check is left out and the step planned again (its replica may serve), every
    process alike: the table is the broadcast one."""
    table = [[dict(r) for r in rows] for rows in agreed["table"]]
    candidates = agreed["candidates"]
    while candidates:
        candidate = candidates[0]
        step = candidate["step"]
        if newer_than is not None and step < newer_than:
            log.info("restore: the persistent tier's step %d is newer than local step %d", newer_than, step)
            return None
        got, bad = _attempt(saver, candidate, template, agreed["parts"])
        if got is not None:
            return got
        for row in (r for p, rows in enumerate(table) for r in rows if r["step"] == step):
            if not bad or [row["holder"], row["set"]] in bad:  # unknown damage: the whole step is left out
                row.update(fits=False, why="its data failed the check")
        candidates = _plan(table, distributed.process_count(), agreed["unusable"])["candidates"]
    if agreed["candidates"]:
        log.warning("restore: no local step can be restored on every process; using the persistent tier")
    return None


def _attempt(saver: Any, candidate: dict[str, Any], template: Any, parts: list[store.Part]) -> tuple[Any, list[Any]]:
    """One candidate step, restored on every process or on none (agreed). Returns (the tree,
    meta and step, or None) and the [holder, set] parts whose data failed its check."""
    step, name = candidate["step"], f"local-restore/{saver.tag}/{saver.next_round()}"
    me = distributed.process_index()
    error, tree = None, None
    try:
        layout = Layout.of(template, saved=candidate["host"])
        data, crcs = _receive(saver, candidate, layout, parts)
        tree = _build(layout, data, crcs, candidate, f"{saver.root} local step {step}")
    except Exception as e:
        source = int(candidate["holders"][str(me)] if str(me) in candidate["holders"] else candidate["holders"][me])
        bad = [source, me] if isinstance(e, CorruptCheckpointError) else None
        error = {"why": f"process {me}: {type(e).__name__}: {e}", "bad": bad}
    errors = distributed.gather_json(f"{name}/outcome", error)
    failed = [e for e in errors or [] if e]
    verdict = distributed.broadcast_json(
        f"{name}/verdict", {"why": failed[0]["why"], "bad": [e["bad"] for e in failed]} if failed else None
    )
    if verdict is not None:
        log.warning("restore: local step %d could not be restored (%s)", step, verdict["why"])
        bad = verdict["bad"]
        return None, [] if any(b is None for b in bad) else bad
    log.info("restore: local tier, step %d (%s)", step, _describe(candidate))
    meta = {
        "step": step,
        "timestamp": candidate["timestamp"],
        "is_temporary": False,
        "extras": candidate["extras"],
        "tier": "local",
    }
    return (tree, meta, step), []
