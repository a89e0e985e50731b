"""The ``ckpt-callbacks`` command: what is in a checkpoint directory, from a terminal.

    ckpt-callbacks list gs://bucket/run                       # step, time, kind, size, metrics
    ckpt-callbacks list gs://bucket/run --metric eval_loss    # ... with best-k ranks
    ckpt-callbacks inspect gs://bucket/run/run-1000           # every leaf: shape, dtype, spec, chunks
    ckpt-callbacks verify gs://bucket/run                     # re-read every chunk; exit 1 if damaged
    ckpt-callbacks prune gs://bucket/run --keep-last 3        # what would be deleted (--yes: delete)
    ckpt-callbacks plan --every 500 --until 5000 --every 1000 --steps 20000
    ckpt-callbacks diff run/run-1000 run/run-2000             # leaves added, removed, changed

``--json`` prints machine-readable output. Errors are one line on stderr and exit status 2.

>>> import jax.numpy as jnp, ckpt_callbacks as cc
>>> cc.save("memory://doc/cli/run-3", {"w": jnp.zeros((2, 2))}, step=3)
>>> main(["latest", "memory://doc/cli"])
memory://doc/cli/run-3
0
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from ckpt_callbacks import cli_format as show
from ckpt_callbacks import discovery, layout, orbax_format, paths
from ckpt_callbacks import format as fmt
from ckpt_callbacks.chunk_reads import PackFiles
from ckpt_callbacks.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from ckpt_callbacks.policy import CheckpointInterval, KeepPolicy, SavePolicy, metric_of
from ckpt_callbacks.restore import read_leaves
from ckpt_callbacks.resume import CheckpointReader
from ckpt_callbacks.targets import Target

Command = Callable[[argparse.Namespace], int]


def _saved(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _shown(base: str, loc: paths.Location) -> str:
    """A checkpoint's path in the form its base was given: a local path stays a plain path."""
    return os.path.join(base, loc.name) if "://" not in base else loc.url


def _row(base: str, info: discovery.CheckpointInfo, rank: int | None = None) -> dict[str, Any]:
    ckpt = info.checkpoint
    try:
        size, problem = (sum(r.nbytes for i in ckpt.items for r in ckpt.manifest(i).leaves) if ckpt else None), None
    except CheckpointError as e:
        size, problem = None, f"committed, but a manifest cannot be read: {e}"
    metrics = info.extras.get("metrics")
    return {
        "step": info.step,
        "path": _shown(base, paths.parse(info.path)),
        "status": "committed" if problem is None else "damaged",
        "saved": _saved(info.timestamp),
        "timestamp": info.timestamp,
        "temporary": info.is_temporary,
        "bytes": size,
        "items": ckpt.items if ckpt else [],
        "metrics": metrics if isinstance(metrics, dict) else {},
        "best": rank,
        "problem": problem,
    }


def _other_row(base: str, loc: paths.Location) -> dict[str, Any] | None:
    """A directory ``list_checkpoints`` skipped: damaged, an unfinished save, or not ours (None)."""
    step = layout.step_of(loc.name)
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
        return None
    empty: dict[str, Any] = {
        "saved": None,
        "timestamp": None,
        "temporary": None,
        "bytes": None,
        "items": [],
        "metrics": {},
    }
    return {"step": step, "path": _shown(base, loc), "status": status, **empty, "best": None, "problem": problem}


def _ranks(infos: Sequence[discovery.CheckpointInfo], metric: str | None, mode: str) -> dict[str, int]:
    """Best-k rank (1 = best) of each checkpoint recording ``metric``, by path."""
    if not metric:
        return {}
    scored = [(m, c.path) for c in infos if (m := metric_of(c, metric)) is not None]
    scored.sort(key=lambda mp: mp[0] if mode == "min" else -mp[0])
    return {path: i for i, (_, path) in enumerate(scored, 1)}


def exists(loc: paths.Location) -> bool:
    return os.path.exists(loc.path) if loc.scheme == "file" else paths.has_any(loc)


def checkpoint_rows(base: str, metric: str | None = None, mode: str = "min") -> list[dict[str, Any]]:
    """Every checkpoint directory under ``base``: committed ones (recorded metrics merged), then
    damaged ones and the leftovers of unfinished saves (``run-<step>`` without a marker)."""
    loc = paths.parse(base)
    infos = CheckpointReader(loc).checkpoints()
    ranks = _ranks(infos, metric, mode)
    rows = [_row(base, info, ranks.get(info.path)) for info in infos]
    listed = {paths.parse(info.path).name for info in infos}
    for name in paths.list_dirs(loc):
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
    if not rows and (ckpt := layout.try_open(loc)) is not None:
        raise CheckpointNotFoundError(
            f"{loc.url} is a checkpoint (step {ckpt.metadata.step}), not a base directory of checkpoints; "
            f"see it with: ckpt-callbacks inspect {base}"
        )
    return rows


def _list(args: argparse.Namespace) -> int:
    rows = base_rows(args.base, args.metric, args.mode)
    if args.json:
        show.print_json(rows)
    else:
        show.show_list(show.console(), args.base, rows, best=bool(args.metric))
    return 0


def _latest(args: argparse.Namespace) -> int:
    path = discovery.find_latest_checkpoint(args.base)
    if path is None:
        print(f"no committed checkpoint under {args.base}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _leaf(r: fmt.LeafRecord) -> dict[str, Any]:
    if r.kind == "scalar":
        return {"key": r.key, "kind": "scalar", "value_type": r.value_type, "value": r.value}
    spec = None if r.partition_spec is None else [list(e) if isinstance(e, tuple) else e for e in r.partition_spec]
    return {
        "key": r.key,
        "kind": r.kind,
        "shape": list(r.shape),
        "dtype": r.dtype,
        "stored_dtype": r.stored_dtype,
        "partition_spec": spec,
        "chunk_shape": list(r.chunks),
        "chunks": math.prod(-(-n // c) for n, c in zip(r.data_shape, r.chunks, strict=True)),
        "packed": bool(r.pack),
        "bytes": r.nbytes,
    }


def _item(leaves: Sequence[fmt.LeafRecord], **more: Any) -> dict[str, Any]:
    return {**more, "bytes": sum(r.nbytes for r in leaves), "leaves": [_leaf(r) for r in leaves]}


def _orbax(loc: paths.Location, items: dict[str, paths.Location]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, item_loc in items.items():
        found = orbax_format.read_item(item_loc)
        out[name] = {"not_pytree": True} if found is None else _item(found.manifest.leaves, storage=str(found.storage))
    return {"kind": "orbax", "path": loc.url, "items": out}


def inspect_data(path: str) -> dict[str, Any]:
    """What ``inspect`` shows: our checkpoint, an orbax one, or a base directory's checkpoints."""
    try:
        ckpt = layout.open_checkpoint(path)
    except CheckpointNotFoundError:
        loc = paths.parse(path)
        items = orbax_format.find_items(loc)
        if items:
            return _orbax(loc, items)
        rows = checkpoint_rows(path)
        if rows:
            return {"kind": "base", "path": path, "checkpoints": rows}
        raise CheckpointNotFoundError(f"no committed checkpoint at {loc.url}: {found_instead(loc)}") from None
    meta = ckpt.metadata
    return {
        "kind": "ckpt_callbacks",
        "path": ckpt.url,
        "step": meta.step,
        "saved": f"{_saved(meta.timestamp)} UTC",
        "timestamp": meta.timestamp,
        "temporary": meta.is_temporary,
        "extras": meta.extras,
        "items": {item: _item(ckpt.manifest(item).leaves) for item in ckpt.items},
    }


def _inspect(args: argparse.Namespace) -> int:
    data = inspect_data(args.path)
    if args.json:
        show.print_json(data)
    else:
        show.show_inspect(show.console(), data)
    return 0


def found_instead(loc: paths.Location) -> str:
    """What a path that holds no checkpoint of ours holds instead, in a few words."""
    if loc.scheme == "file" and not os.path.isdir(loc.path):
        return "it is a file, not a checkpoint directory" if os.path.exists(loc.path) else "no such directory"
    entries = paths.list_entries(loc)
    if not entries:
        return "an empty directory" if loc.scheme == "file" else "nothing is stored there"
    listed = ", ".join(entries[:5]) + (f", ... ({len(entries) - 5} more)" if len(entries) > 5 else "")
    steps = sorted((d for d in paths.list_dirs(loc) if d.isdigit()), key=int)
    try:
        if steps and orbax_format.find_items(loc.join(steps[-1])):
            some = ", ".join(steps[-5:]) if len(steps) <= 5 else f"{steps[0]}, ..., {', '.join(steps[-3:])}"
            return f"an orbax CheckpointManager directory (steps {some}); give a step: {loc.join(steps[-1]).url}"
    except CheckpointError:
        pass
    ours = [e for e in entries if fmt.METADATA_NAME.fullmatch(e) or e.startswith(layout.CLAIM_PREFIX) or ".ckpt-" in e]
    if ours or layout.step_of(loc.name) is not None:
        return (
            f"it holds {listed} but no {layout.COMMIT_MARKER} marker: a save that did not finish (restore ignores it)"
        )
    return f"it holds {listed}, and no {layout.COMMIT_MARKER}, {layout.METADATA} or orbax {orbax_format.METADATA}"


def _problem(error: CheckpointError, leaf: str | None = None) -> dict[str, Any]:
    text = " ".join(str(error).split())
    kind = "corrupt" if isinstance(error, CorruptCheckpointError) else "invalid"
    return {"kind": "missing" if " missing" in text else kind, "leaf": leaf, "message": text}


def _absent_chunks(item_loc: paths.Location, record: fmt.LeafRecord) -> list[str]:
    """Chunks of a zarr3 leaf with no file though they are not all zeros (zarr3 stores no such chunk)."""
    spec = paths.kvstore_spec(item_loc.join(*record.array.split("/")))
    try:
        stored = {k.decode() for k in ts.KvStore.open(spec, context=paths.context()).result().list().result()}
    except ValueError:
        return []
    dtype = fmt.dtype_from_name(record.zarr_dtype)
    absent = []
    for key, crc in sorted(record.crc32c.items()):
        idx = [int(i) for i in key.split(".")] if record.data_shape else []
        if "/".join(["c", *map(str, idx)]) in stored:
            continue
        shape = tuple(min(c, n - i * c) for i, c, n in zip(idx, record.chunks, record.data_shape, strict=True))
        if fmt.crc32c_of(np.zeros(shape, dtype)) != crc:
            absent.append(key)
    return absent


def _leaf_problem(item_loc: paths.Location, record: fmt.LeafRecord, error: CheckpointError) -> dict[str, Any]:
    """A leaf that failed its re-read: a missing chunk file reads as zeros, so a checksum
    mismatch is told apart from damage by looking for the files."""
    problem = _problem(error, record.key)
    absent = _absent_chunks(item_loc, record) if problem["kind"] == "corrupt" and not record.pack else []
    if absent:
        chunks = ", ".join(absent[:8]) + (f", ... ({len(absent) - 8} more)" if len(absent) > 8 else "")
        what = show.plural(len(absent), "chunk file")
        problem |= {"kind": "missing", "message": f"{item_loc.url}: leaf {record.key!r}: {what} missing: {chunks}"}
    return problem


def _open_for_check(loc: paths.Location, shown: str) -> tuple[dict[str, Any], list[tuple[paths.Location, list[Any]]]]:
    """A checkpoint's report (problems of its marker, metadata, manifests) and the array leaves to re-read."""
    report: dict[str, Any] = {"path": shown, "leaves": 0, "chunks": 0, "bytes_read": 0, "problems": []}
    try:
        ckpt = layout.open_checkpoint(loc)
    except CheckpointError as e:
        report["problems"].append(_problem(e))
        return report, []
    items = []
    for item in ckpt.items:
        try:
            items.append((ckpt.item_loc(item), [r for r in ckpt.manifest(item).leaves if r.kind != "scalar"]))
        except CheckpointError as e:
            report["problems"].append(_problem(e))
    return report, items


def _check(report: dict[str, Any], items: list[tuple[paths.Location, list[Any]]], advance: Callable[..., Any]) -> None:
    """Re-reads every array leaf (each chunk against its crc32c), as ``discovery.verify`` does."""
    for item_loc, records in items:
        packs = PackFiles(item_loc)  # each pack file read once, however many leaves it holds
        for record in records:
            advance(0, f"{report['path']}: {record.key}")
            report["leaves"] += 1
            try:
                read_leaves(item_loc, [record], [Target(None, None)], packs=packs)
            except CheckpointError as e:
                report["problems"].append(_leaf_problem(item_loc, record, e))
            else:
                report["chunks"] += len(record.crc32c)
                report["bytes_read"] += record.nbytes
            advance(record.nbytes, None)


def _to_verify(path: str) -> tuple[list[paths.Location], bool]:
    """The checkpoints ``verify`` re-reads: the one at ``path``, or those under it (then True)."""
    loc = paths.parse(path)
    if paths.read_bytes(loc, layout.COMMIT_MARKER) is not None:
        return [loc], False
    found = [loc.join(d) for d in paths.list_dirs(loc) if paths.read_bytes(loc.join(d), layout.COMMIT_MARKER)]
    if found:
        found.sort(key=lambda c: (layout.step_of(c.name) is None, layout.step_of(c.name) or 0, c.name))
        return found, True
    if orbax_format.find_items(loc):
        raise CheckpointNotFoundError(f"{loc.url} is an orbax checkpoint: orbax records no checksums to verify against")
    raise CheckpointNotFoundError(f"no committed checkpoint at {loc.url}: {found_instead(loc)}")


def _verify(args: argparse.Namespace) -> int:
    targets, is_base = _to_verify(args.path)
    out = show.console()
    opened = [_open_for_check(loc, _shown(args.path, loc) if is_base else loc.url) for loc in targets]
    total = sum(r.nbytes for _, items in opened for _, records in items for r in records)
    with show.progress(out, quiet=args.json) as bar:
        task = bar.add_task("verifying", total=total)
        for report, items in opened:
            _check(
                report, items, lambda n, what: bar.update(task, advance=n, **({"description": what} if what else {}))
            )
            if not args.json:
                show.show_problems(out, report)
    reports = [report for report, _ in opened]
    ok = not any(r["problems"] for r in reports)
    if args.json:
        show.print_json({"ok": ok, "checkpoints": reports})
    else:
        out.print(show.verify_summary(reports, base=is_base))
    return 0 if ok else 1


def _intervals(every: Sequence[int], until: Sequence[int]) -> tuple[CheckpointInterval, ...]:
    if len(until) not in (len(every), len(every) - 1):
        raise ValueError(
            f"{len(every)} --every and {len(until)} --until: give one --until per --every "
            "(the last --every may have none: for ever)"
        )
    pairs = [CheckpointInterval(e, u) for e, u in zip(every, [*until, None], strict=False)]
    return tuple(sorted(pairs, key=lambda p: (p.until is None, p.until or 0)))


def simulate(policy: SavePolicy, steps: int, step_time: float, *, final: bool = True) -> list[dict[str, Any]]:
    """The saves a Checkpointer with ``policy`` makes when called at steps 1..``steps`` (time =
    step x ``step_time``), then ``on_train_end(steps)`` (``final``): the policy is pure, so no run.

    >>> policy = SavePolicy(step_policies=(CheckpointInterval(4),), save_interval=datetime.timedelta(seconds=5))
    >>> [(s["step"], s["temporary"]) for s in simulate(policy, 10, 1.0)]
    [(4, False), (8, False), (10, False)]
    """
    saves: list[dict[str, Any]] = []
    last_step: int | None = None
    last_time = step_time  # the Checkpointer's clock starts at its first call
    for step in range(1, steps + 1):
        now = step * step_time
        previous = step - 1 if step > 1 else None
        decision = policy.decide(
            step, now=now, last_save_step=last_step, last_save_time=last_time, previous_step=previous
        )
        if decision.save:
            saves.append({"step": step, "time_s": now, "temporary": decision.temporary, "reason": decision.reason})
            last_step, last_time = step, now
    if final and last_step != steps:
        saves.append({"step": steps, "time_s": steps * step_time, "temporary": False, "reason": "on_train_end"})
    return saves


def _plan(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.step_time <= 0:
        raise ValueError(f"--steps {args.steps} --step-time {args.step_time}: expected a positive step count and time")
    if not args.every and args.save_interval is None:
        raise ValueError(
            "nothing would ever be saved: give --every N (and --until STEP) and/or --save-interval SECONDS"
        )
    interval = None if args.save_interval is None else datetime.timedelta(seconds=args.save_interval)
    policy = SavePolicy(step_policies=_intervals(args.every, args.until), save_interval=interval)
    keep = KeepPolicy(keep_last=args.keep_last, keep_every=args.keep_every)
    saves = simulate(policy, args.steps, args.step_time, final=not args.no_final)
    infos = [
        discovery.CheckpointInfo(
            path=layout.run_name(s["step"]), step=s["step"], timestamp=s["time_s"], is_temporary=s["temporary"]
        )
        for s in saves
    ]
    doomed = {c.step for c in keep.to_delete(infos)}
    for s in saves:
        s["kept"] = s["step"] not in doomed
    every = ", then ".join(
        f"every {p.every} steps" + (f" until step {p.until}" if p.until is not None else "")
        for p in policy.step_policies
    )
    temporary = f"a temporary {args.save_interval:g} s after the last save" if interval else "no temporaries"
    run = f"steps 1..{args.steps} at {args.step_time:g} s/step" + (
        "" if args.no_final else f", then on_train_end({args.steps})"
    )
    data = {
        "policy": f"save {every or 'on no step schedule'}; {temporary}",
        "run": run,
        "keep": _keep_text(keep),
        "saves": saves,
    }
    if args.json:
        show.print_json(data)
    else:
        show.show_plan(show.console(), data)
    return 0


def _side(path: str, item: str) -> tuple[dict[str, Any], dict[str, fmt.LeafRecord], Callable[[fmt.LeafRecord], Any]]:
    """(about, records by key, host reader of one array leaf) of our checkpoint or an orbax one."""
    try:
        ckpt = layout.open_checkpoint(path)
    except CheckpointNotFoundError:
        loc = paths.parse(path)
        found = orbax_format.open_item(loc, item)
        if found is None:
            raise CheckpointNotFoundError(f"no committed checkpoint at {loc.url}: {found_instead(loc)}") from None
        about: dict[str, Any] = {"path": path, "step": None}
        records, item_loc, opener = found.manifest.leaves, found.loc, found.open_array
    else:
        about = {"path": path, "step": ckpt.metadata.step}
        records, item_loc, opener = ckpt.manifest(item).leaves, ckpt.item_loc(item), None  # type: ignore[assignment]
    packs = PackFiles(item_loc)

    def read(record: fmt.LeafRecord) -> Any:
        return read_leaves(item_loc, [record], [Target(None, None)], packs=packs, open_unchecked=opener)[0]

    return about, {r.key: r for r in records}, read


def max_abs_diff(a: Any, b: Any) -> tuple[float, int]:
    """The largest |a - b| in float64 (complex128 for complex) and how many elements differ;
    NaN equals NaN.

    >>> max_abs_diff(np.array([1.0, np.nan, 3.0]), np.array([1.5, np.nan, 3.0]))
    (0.5, 1)
    """
    wide = np.complex128 if "c" in (np.asarray(a).dtype.kind, np.asarray(b).dtype.kind) else np.float64
    x, y = np.asarray(a).astype(wide), np.asarray(b).astype(wide)
    differs = ~((x == y) | (np.isnan(x) & np.isnan(y)))
    count = int(np.count_nonzero(differs))
    gaps = np.abs(x - y)[differs]
    return (float(np.nanmax(gaps)) if count and not np.isnan(gaps).all() else (math.nan if count else 0.0)), count


def _compare(
    key: str, ra: fmt.LeafRecord, rb: fmt.LeafRecord, read_a: Callable[..., Any], read_b: Callable[..., Any]
) -> dict[str, Any]:
    if ra.kind == "scalar":
        va, vb = fmt.decode_scalar(ra.value, ra.value_type), fmt.decode_scalar(rb.value, rb.value_type)
        if not all(isinstance(v, int | float) for v in (va, vb)):
            return {"key": key, "max_abs_diff": None, "equal": va == vb, "differing": int(va != vb), "size": 1}
        a, b = np.asarray(va, dtype=object).astype(np.float64), np.asarray(vb, dtype=object).astype(np.float64)
    else:
        a, b = read_a(ra), read_b(rb)
    diff, count = max_abs_diff(a, b)
    return {"key": key, "max_abs_diff": diff, "equal": count == 0, "differing": count, "size": int(np.size(a))}


def _same_kind(ra: fmt.LeafRecord, rb: fmt.LeafRecord) -> bool:
    if ra.kind == "scalar" or rb.kind == "scalar":
        return ra.kind == rb.kind and ra.value_type == rb.value_type
    return (ra.kind, ra.shape, ra.dtype) == (rb.kind, rb.shape, rb.dtype)


def _diff(args: argparse.Namespace) -> int:
    about_a, leaves_a, read_a = _side(args.a, args.item)
    about_b, leaves_b, read_b = _side(args.b, args.item)
    both = [k for k in leaves_a if k in leaves_b]
    data: dict[str, Any] = {"a": about_a, "b": about_b, "item": args.item}
    data["added"] = [_leaf(r) for k, r in leaves_b.items() if k not in leaves_a]
    data["removed"] = [_leaf(r) for k, r in leaves_a.items() if k not in leaves_b]
    data["reshaped"] = [
        {"key": k, "a": _leaf(leaves_a[k]), "b": _leaf(leaves_b[k])}
        for k in both
        if not _same_kind(leaves_a[k], leaves_b[k])
    ]
    data["compared"] = [
        _compare(k, leaves_a[k], leaves_b[k], read_a, read_b) for k in both if _same_kind(leaves_a[k], leaves_b[k])
    ]
    if args.json:
        show.print_json(data)
    else:
        show.show_diff(show.console(), data)
    return 0


def _keep_text(keep: KeepPolicy) -> str:
    rules = [
        f"--keep-{n} {getattr(keep, f'keep_{n}')}" for n in ("last", "every", "best") if getattr(keep, f"keep_{n}")
    ]
    if keep.keep_best:
        rules.append(f"--metric {keep.metric} --mode {keep.mode}")
    return " ".join(rules) or "every permanent checkpoint and the newest temporary (no --keep-* rule)"


def _prune(args: argparse.Namespace) -> int:
    keep = KeepPolicy(
        keep_last=args.keep_last,
        keep_every=args.keep_every,
        keep_best=args.keep_best,
        metric=args.metric,
        mode=args.mode,
    )
    base_rows(args.base)  # refuses a missing base or a checkpoint path
    base = paths.parse(args.base)
    infos = CheckpointReader(base).checkpoints()
    doomed = {c.path for c in keep.to_delete(infos)}
    ranks = _ranks(infos, args.metric, args.mode)
    rows = [
        {**_row(args.base, c, ranks.get(c.path)), "action": "delete" if c.path in doomed else "keep"} for c in infos
    ]
    deleted = []
    for info, row in zip(infos, rows, strict=True):
        if args.yes and info.path in doomed:
            layout.delete_checkpoint(paths.parse(info.path), info.checkpoint.commit if info.checkpoint else None)
            if info.step is not None:  # its recorded metrics, as retention deletes them
                paths.delete_entry(base.join(layout.METRICS_DIR), layout.metrics_name(info.step))
            deleted.append(row["path"])
    data = {"base": args.base, "policy": _keep_text(keep), "dry_run": not args.yes}
    data |= {"best": bool(args.metric), "checkpoints": rows, "deleted": deleted}
    if args.json:
        show.print_json(data)
    else:
        show.show_prune(show.console(), data)
    return 0


# What ``--help`` says of each command, and its examples.
_HELP = {
    "list": (
        "Committed checkpoints under BASE: step, time saved, temporary or permanent, size, items, "
        "recorded metrics; leftovers of unfinished saves are flagged.",
        ["gs://bucket/run", "gs://bucket/run --metric eval_loss", "/ckpts/run --json"],
    ),
    "latest": ("Path of the latest committed checkpoint under BASE (exit 1 if none).", ["gs://bucket/run"]),
    "inspect": (
        "Metadata and every leaf of a checkpoint (ours or orbax's): shape, dtype, saved partition "
        "spec, size, chunk shape.",
        ["gs://bucket/run/run-1000", "ckpts/1000   # an orbax CheckpointManager step", "/ckpts/run/run-10 --json"],
    ),
    "verify": (
        "Re-read every chunk of a checkpoint, or of every checkpoint under a base, against its "
        "crc32c; report each missing or corrupt leaf; exit 1 on damage.",
        ["gs://bucket/run/run-1000", "gs://bucket/run"],
    ),
    "diff": (
        "Compare two checkpoints: leaves added, removed, reshaped, and the largest absolute change "
        "of each leaf in both.",
        ["run/run-1000 run/run-2000", "a/run-5 b/run-5 --json"],
    ),
    "prune": (
        "Apply a keep policy to the checkpoints under BASE: a dry run that shows what would be "
        "deleted and kept, unless --yes.",
        ["gs://bucket/run --keep-last 3", "gs://bucket/run --keep-best 2 --metric eval_loss --keep-last 1 --yes"],
    ),
    "plan": (
        "Simulate a save policy before a run: which steps are saved, permanent or temporary, and "
        "which a keep policy keeps at the end.",
        [
            "--every 500 --until 5000 --every 1000 --steps 20000",
            "--every 1000 --save-interval 600 --step-time 0.8 --steps 10000 --keep-last 2",
        ],
    ),
}


def _add(sub: Any, name: str, func: Command) -> argparse.ArgumentParser:
    text, examples = _HELP[name]
    epilog = "examples:\n" + "\n".join(f"  ckpt-callbacks {name} {e}" for e in examples)
    parser = sub.add_parser(
        name, help=text, description=text, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.set_defaults(func=func)
    if name != "latest":
        parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def _metric_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--metric", help=f"eval metric to rank by ({what})")
    parser.add_argument("--mode", choices=("min", "max"), default="min", help="min: lower is better (default)")


def _add_reading(sub: Any) -> None:
    p = _add(sub, "list", _list)
    p.add_argument("base", help="the directory holding run-<step> checkpoints")
    _metric_options(p, "adds a best-k rank column")
    _add(sub, "latest", _latest).add_argument("base")
    p = _add(sub, "inspect", _inspect)
    p.add_argument("path", help="a checkpoint directory (a base directory lists its checkpoints)")
    _add(sub, "verify", _verify).add_argument("path", help="a checkpoint, or a base directory of checkpoints")
    p = _add(sub, "diff", _diff)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--item", default="state", help="the item to compare (default: state)")


def _add_policies(sub: Any) -> None:
    p = _add(sub, "prune", _prune)
    p.add_argument("base")
    for name, text in (("last", "the N newest"), ("every", "steps that are multiples of N"), ("best", "the N best")):
        p.add_argument(f"--keep-{name}", type=int, metavar="N", help=f"keep {text} permanent checkpoints")
    _metric_options(p, "for --keep-best")
    p.add_argument("--yes", action="store_true", help="delete (only the library's own files)")
    p = _add(sub, "plan", _plan)
    p.add_argument("--every", type=int, action="append", default=[], metavar="N", help="save every N steps (repeat)")
    p.add_argument("--until", type=int, action="append", default=[], metavar="STEP", help="... up to STEP (repeat)")
    p.add_argument("--save-interval", type=float, metavar="SECONDS", help="a temporary checkpoint after SECONDS")
    p.add_argument("--steps", type=int, required=True, metavar="N", help="the run's last step")
    p.add_argument("--step-time", type=float, default=1.0, metavar="SECONDS", help="seconds per step (default 1)")
    p.add_argument("--no-final", action="store_true", help="no forced save at the last step (on_train_end)")
    for name in ("last", "every"):
        p.add_argument(f"--keep-{name}", type=int, metavar="N", help=f"retention at the end: --keep-{name} N")


def parser() -> argparse.ArgumentParser:
    """The command's argument parser (``ckpt-callbacks --help``)."""
    doc = (__doc__ or "").split("\n\n")
    top = argparse.ArgumentParser(
        prog="ckpt-callbacks",
        description="List, inspect, verify, prune and compare checkpoints written by ckpt_callbacks\n"
        "(local paths, file://, s3://, gs://); plan a save policy before a run.",
        epilog="examples:\n"
        + doc[1].replace("    ckpt-callbacks", "  ckpt-callbacks")
        + "\n\n"
        + doc[2].replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_reading(sub)
    _add_policies(sub)
    return top


def _quiet_stdout() -> None:
    """After ``| head`` closed the pipe: nothing more reaches it, not even the exit-time flush."""
    with contextlib.suppress(OSError, ValueError):  # no file descriptor (a doctest's stdout)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code = int(args.func(args))
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except KeyboardInterrupt:
        return 130
    except (CheckpointError, OSError, ValueError) as e:  # ValueError: TensorStore's storage errors, bad options
        print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
