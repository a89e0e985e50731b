"""``ckpt-callbacks verify`` and ``diff``: reading every chunk, per leaf.

``verify`` re-reads a checkpoint (or every checkpoint under a base) chunk by chunk, telling a
missing chunk from a corrupt one; ``diff`` compares two checkpoints leaf by leaf on the host.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from ckpt_callbacks import directory as layout
from ckpt_callbacks import format as fmt
from ckpt_callbacks import interop as orbax_format
from ckpt_callbacks import layouts as process_files
from ckpt_callbacks import restoring
from ckpt_callbacks import storage as paths
from ckpt_callbacks.cli import _render as show
from ckpt_callbacks.errors import CheckpointError, CheckpointNotFoundError
from ckpt_callbacks.layouts import PackFiles
from ckpt_callbacks.restoring import Target, VerifyProblem, read_leaves


def shown(base: str, loc: paths.Location) -> str:
    """A checkpoint's path in the form its base was given: a local path stays a plain path."""
    return os.path.join(base, loc.name) if "://" not in base else loc.url


def leaf_json(r: fmt.LeafRecord) -> dict[str, Any]:
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
        "packed": bool(r.pack or r.writers),
        "bytes": r.nbytes,
    }


def found_instead(loc: paths.Location) -> str:
    """What a path that holds no checkpoint of ours holds instead, in a few words."""
    local = paths.local_path(loc)
    if local is not None and not os.path.isdir(local):
        return "it is a file, not a checkpoint directory" if os.path.exists(local) else "no such directory"
    entries = paths.list_entries(loc)
    if not entries:
        return "an empty directory" if local is not None else "nothing is stored there"
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
    """A problem as ``--json`` prints it: the fields of ``cc.verify``'s ``VerifyProblem``."""
    return dataclasses.asdict(VerifyProblem.of(error, leaf))


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
    """A leaf that failed its re-read; a missing chunk file of a zarr3 leaf names every one of
    its chunks that has no file (not only the first a read met)."""
    problem = _problem(error, record.key)
    absent = _absent_chunks(item_loc, record) if problem["kind"] == "missing" and not record.pack else []
    if absent:
        chunks = ", ".join(absent[:8]) + (f", ... ({len(absent) - 8} more)" if len(absent) > 8 else "")
        what = show.plural(len(absent), "chunk file")
        problem |= {"kind": "missing", "message": f"{item_loc.url}: leaf {record.key!r}: {what} missing: {chunks}"}
    return problem


def _open_for_check(
    loc: paths.Location, shown: str
) -> tuple[dict[str, Any], list[tuple[paths.Location, list[Any], Any]]]:
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
            records, packs = process_files.locate(ckpt.item_loc(item), ckpt.manifest(item))
            items.append((ckpt.item_loc(item), [r for r in records if r.kind != "scalar"], packs))
        except CheckpointError as e:
            report["problems"].append(_problem(e))
    return report, items


def _check(
    report: dict[str, Any], items: list[tuple[paths.Location, list[Any], Any]], advance: Callable[..., Any]
) -> None:
    """Re-reads every array leaf (each chunk against its crc32c), as ``restoring.verify`` does."""
    for item_loc, records, packs in items:  # each pack file read once, however many leaves it holds
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


def _to_verify(path: str) -> tuple[list[paths.Location], bool, list[dict[str, Any]]]:
    """The checkpoints ``verify`` re-reads: the one at ``path``, or those under it (then True),
    and the steps of other writers under it (orbax's), which record no checksums to verify."""
    loc = paths.parse(path)
    if paths.read_bytes(loc, layout.COMMIT_MARKER) is not None:
        return [loc], False, []
    # A marker present but empty or garbage is a damaged checkpoint to report, never one to skip.
    found = [
        loc.join(d) for d in paths.list_dirs(loc) if paths.read_bytes(loc.join(d), layout.COMMIT_MARKER) is not None
    ]
    foreign = restoring.foreign_steps(loc)
    others = [{"path": shown(path, paths.parse(c.path)), "step": c.step, "format": c.source} for c in foreign]
    if found:
        found.sort(key=lambda c: (layout.step_of(c.name) is None, layout.step_of(c.name) or 0, c.name))
        return found, True, others
    if orbax_format.find_items(loc):
        raise CheckpointNotFoundError(f"{loc.url} is an orbax checkpoint: orbax records no checksums to verify against")
    if foreign:
        names = ", ".join(f"{c['step']} ({c['format']})" for c in others[:8]) + (", ..." if len(others) > 8 else "")
        raise CheckpointNotFoundError(
            f"{loc.url} holds no checkpoint of ours to verify, only steps {names}: they record no checksums to "
            "verify against"
        )
    raise CheckpointNotFoundError(f"no committed checkpoint at {loc.url}: {found_instead(loc)}")


def verify_command(args: argparse.Namespace) -> int:
    targets, is_base, unverified = _to_verify(args.path)
    out = show.console()
    opened = [_open_for_check(loc, shown(args.path, loc) if is_base else loc.url) for loc in targets]
    total = sum(r.nbytes for _, items in opened for _, records, _ in items for r in records)
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
        show.print_json({"ok": ok, "checkpoints": reports, "not_verified": unverified})
    else:
        out.print(show.verify_summary(reports, base=is_base, unverified=unverified), soft_wrap=True)
    return 0 if ok else 1


Side = tuple[dict[str, fmt.LeafRecord], Callable[[fmt.LeafRecord], Any]]


def _reader(item_loc: paths.Location, records: Any, packs: Any, opener: Any = None) -> Side:
    def read(record: fmt.LeafRecord) -> Any:
        return read_leaves(item_loc, [record], [Target(None, None)], packs=packs, open_unchecked=opener)[0]

    return {r.key: r for r in records}, read


def _orbax_item(found: Any) -> Side:
    return _reader(found.loc, found.manifest.leaves, PackFiles(found.loc), found.open_array)


def _side(path: str, item: str | None) -> tuple[dict[str, Any], dict[str, Callable[[], Side]]]:
    """(about, {item: opener of (records by key, host reader of one array leaf)}) of our
    checkpoint or an orbax one: every item, or only ``item``."""
    try:
        ckpt = layout.open_checkpoint(path)
    except CheckpointNotFoundError:
        loc = paths.parse(path)
        if item is not None:
            found = orbax_format.open_item(loc, item)
            if found is None:
                raise CheckpointNotFoundError(f"no committed checkpoint at {loc.url}: {found_instead(loc)}") from None
            return {"path": path, "step": None}, {item: functools.partial(_orbax_item, found)}
        items = orbax_format.find_items(loc)
        if not items:
            raise CheckpointNotFoundError(f"no committed checkpoint at {loc.url}: {found_instead(loc)}") from None
        pytrees = {name: tree for name, at in items.items() if (tree := orbax_format.read_item(at)) is not None}
        return {"path": path, "step": None}, {name: functools.partial(_orbax_item, t) for name, t in pytrees.items()}
    if item is not None and item not in ckpt.items:
        raise CheckpointNotFoundError(f"{ckpt.url} has no item {item!r}; its items: {', '.join(ckpt.items)}")

    def ours(name: str) -> Side:
        item_loc = ckpt.item_loc(name)
        listed, packs = process_files.locate(item_loc, ckpt.manifest(name))
        return _reader(item_loc, listed, packs)

    names = ckpt.items if item is None else [item]
    return {"path": path, "step": ckpt.metadata.step}, {name: functools.partial(ours, name) for name in names}


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


def _pairs(items_a: Sequence[str], items_b: Sequence[str]) -> list[tuple[str, str]]:
    """The items compared: those of one name on both sides; or, when no name is common and each
    side has one item (ours ``state``, orbax's ``default``), those two."""
    common = [(name, name) for name in items_a if name in items_b]
    if not common and len(items_a) == 1 and len(items_b) == 1:
        return [(items_a[0], items_b[0])]
    return common


def _diff_item(pair: tuple[str, str], side_a: Side, side_b: Side) -> dict[str, list[dict[str, Any]]]:
    (leaves_a, read_a), (leaves_b, read_b) = side_a, side_b
    tag = {"item": pair[0]} if pair[0] == pair[1] else {"item": pair[0], "item_b": pair[1]}
    both = [k for k in leaves_a if k in leaves_b]
    same = [k for k in both if _same_kind(leaves_a[k], leaves_b[k])]
    return {
        "added": [tag | leaf_json(r) for k, r in leaves_b.items() if k not in leaves_a],
        "removed": [tag | leaf_json(r) for k, r in leaves_a.items() if k not in leaves_b],
        "reshaped": [
            tag | {"key": k, "a": leaf_json(leaves_a[k]), "b": leaf_json(leaves_b[k])} for k in both if k not in same
        ],
        "compared": [tag | _compare(k, leaves_a[k], leaves_b[k], read_a, read_b) for k in same],
    }


def diff_command(args: argparse.Namespace) -> int:
    about_a, items_a = _side(args.a, args.item)
    about_b, items_b = _side(args.b, args.item)
    pairs = _pairs(list(items_a), list(items_b))
    paired_a, paired_b = {a for a, _ in pairs}, {b for _, b in pairs}
    data: dict[str, Any] = {"a": about_a, "b": about_b, "item": args.item}
    data["items"] = [{"a": a, "b": b} for a, b in pairs]
    data["items_only_in_a"] = [name for name in items_a if name not in paired_a]
    data["items_only_in_b"] = [name for name in items_b if name not in paired_b]
    data |= {"added": [], "removed": [], "reshaped": [], "compared": []}
    for a, b in pairs:
        for section, entries in _diff_item((a, b), items_a[a](), items_b[b]()).items():
            data[section] += entries
    if args.json:
        show.print_json(data)
    else:
        show.show_diff(show.console(), data)
    return 0
