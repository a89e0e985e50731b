"""How the ``ckpt-callbacks`` command shows what it found: sizes, tables, leaf lines.

Each command gathers plain dicts (what ``--json`` prints) and one function here renders them:

>>> human_size(1288490189), human_size(48), human_size(None)
('1.2 GiB', '48 B', '?')
>>> leaf_line({"key": "w", "kind": "array", "shape": [2, 3], "dtype": "float32", "stored_dtype": "float32",
...            "partition_spec": None, "chunk_shape": [2, 3], "chunks": 1, "packed": True, "bytes": 24})
'w: array [2, 3] float32, 24 B, chunk shape [2, 3] (1 chunk, packed)'
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import rich.console
from rich import box
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from ckpt_callbacks.directory import OURS

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")
_STATUS_STYLE = {"uncommitted": "yellow", "damaged": "bold red", "temporary": "cyan"}
_PROBLEM_STYLE = {"missing": "yellow", "corrupt": "bold red", "invalid": "red"}


class Console(rich.console.Console):
    """A rich console whose broken pipe (``| head``) is raised to ``main``, which exits quietly."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError


def console() -> Console:
    """Standard output: styled on a terminal; plain, unwrapped text in a pipe or a file."""
    tty = sys.stdout.isatty()  # not rich's guess: under Jupyter it takes a pipe for a terminal
    out = Console(markup=False, highlight=False, emoji=False, force_terminal=tty, force_jupyter=False, no_color=not tty)
    if not tty:
        out.width = 10_000  # tables are as wide as their content, never cut at 80 columns
    return out


def progress(out: Console, *, quiet: bool = False) -> Progress:
    """A bar of bytes re-read, on a terminal only (nothing in a pipe, a file or with ``quiet``)."""
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True), TimeRemainingColumn())
    return Progress(*columns, console=out, transient=True, disable=quiet or not out.is_terminal)


def print_table(out: Console, table: Table) -> None:
    """A table; in a pipe or a file without the padding after each line's last cell."""
    if out.is_terminal:
        out.print(table)
        return
    with out.capture() as captured:
        out.print(table)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


def _finite(data: Any) -> Any:
    """NaN and infinities as the strings "nan", "inf", "-inf": strict JSON has no spelling for them."""
    if isinstance(data, float) and not math.isfinite(data):
        return str(data)
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(v) for v in data]
    return data


def print_json(data: Any) -> None:
    # default=repr: what no JSON value spells (never written by a save) is shown, not a crash
    sys.stdout.write(json.dumps(_finite(data), indent=2, allow_nan=False, default=repr) + "\n")


def human_size(nbytes: int | None) -> str:
    """Bytes in binary units, one decimal below 100 ("1.2 GiB", "512 MiB", "48 B")."""
    if nbytes is None:
        return "?"
    if nbytes < 1024:
        return f"{nbytes} B"
    value = float(nbytes)
    for unit in _UNITS:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            break
    return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


def metric_text(value: Any) -> str:
    """A recorded metric in a table: 4 significant digits; null, a bool or a short string as in
    JSON; anything else '?'.

    >>> metric_text(0.123456), metric_text(10**400), metric_text("best"), metric_text([1, 2]), metric_text(None)
    ('0.1235', '?', '"best"', '?', 'null')
    """
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False) if len(value) <= 40 and value.isprintable() else "?"
    if not isinstance(value, int | float):
        return "?"
    try:
        return format(float(value), ".4g")
    except OverflowError:  # an int beyond any float
        return "?"


def _metrics(metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return ""
    return " ".join(f"{k}={metric_text(v)}" for k, v in sorted(metrics.items()))


def _status_cell(row: dict[str, Any]) -> Text:
    if row["status"] != "committed":
        return Text(row["status"].upper(), style=_STATUS_STYLE[row["status"]])
    kind = "temporary" if row["temporary"] else "permanent"
    return Text(kind, style=_STATUS_STYLE.get(kind, ""))


def checkpoint_table(rows: Sequence[dict[str, Any]], *, best: bool = False, action: bool = False) -> Table:
    """One row per checkpoint directory: committed ones, and the leftovers of unfinished saves."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    formats = any(row.get("format", OURS) != OURS for row in rows)  # a column only where another writer's are
    columns = [("step", "right"), ("saved (UTC)", "left")] + ([("format", "left")] if formats else [])
    columns += [("kind", "left"), ("size", "right")]
    columns += [("items", "left"), ("metrics", "left")]
    columns += [("best", "right")] if best else []
    columns += [("action", "left")] if action else []
    for name, justify in columns:
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    table.add_column("path", overflow="fold")
    for row in rows:
        cells: list[str | Text] = ["-" if row["step"] is None else str(row["step"]), row["saved"] or "-"]
        cells += [row.get("format", OURS)] if formats else []
        cells += [_status_cell(row), human_size(row["bytes"]) if row["status"] == "committed" else "-"]
        cells += [",".join(row["items"]) or "-", _metrics(row["metrics"]) or "-"]
        if best:
            cells.append(f"#{row['best']}" if row["best"] else "")
        if action:
            cells.append(Text(row["action"], style="bold red" if row["action"] == "delete" else "green"))
        table.add_row(*cells, row["path"])
    return table


def show_list(out: Console, base: str, rows: Sequence[dict[str, Any]], *, best: bool) -> None:
    committed = [r for r in rows if r["status"] == "committed"]
    if not rows:
        out.print(f"no checkpoints under {base}")
        return
    print_table(out, checkpoint_table(rows, best=best))
    for row in rows:
        if row["problem"]:
            out.print(Text(f"{row['path']}: {row['problem']}", style=_STATUS_STYLE[row["status"]]), soft_wrap=True)
    temporary = sum(1 for r in committed if r["temporary"])
    total = sum(r["bytes"] or 0 for r in committed)
    summary = f"{plural(len(committed), 'checkpoint')} ({len(committed) - temporary} permanent, {temporary} temporary)"
    unfinished = sum(1 for r in rows if r["status"] == "uncommitted")
    damaged = len(rows) - len(committed) - unfinished
    foreign = Counter(r["format"] for r in committed if r.get("format", OURS) != OURS)
    more = [f"{n} written by {name} (read, never deleted)" for name, n in sorted(foreign.items())]
    more += [plural(unfinished, "unfinished save")] if unfinished else []
    more += [f"{damaged} damaged"] if damaged else []
    out.print(f"{summary}, {human_size(total)}" + "".join(f"; {m}" for m in more))


def _spec(spec: Sequence[Any] | None) -> str:
    # Python's list repr, as inspect has always printed it: spec=['x', 'y'], spec=[None, ('x', 'y')]
    return "" if spec is None else f" spec={[tuple(e) if isinstance(e, list) else e for e in spec]}"


def leaf_line(leaf: dict[str, Any]) -> str:
    """One leaf as ``key: kind [shape] dtype spec=[...], size, chunk shape [...] (n chunks)``."""
    key = leaf["key"] or "<root>"
    if leaf["kind"] == "scalar":
        return f"{key}: {leaf['value_type']} = {leaf['value']!r}"
    dtype = (
        leaf["dtype"] if leaf["stored_dtype"] == leaf["dtype"] else f"{leaf['dtype']} stored as {leaf['stored_dtype']}"
    )
    where = ", packed" if leaf.get("packed") else ""
    chunks = f"chunk shape {leaf['chunk_shape']} ({plural(leaf['chunks'], 'chunk')}{where})"
    head = f"{key}: {leaf['kind']} {leaf['shape']} {dtype}{_spec(leaf['partition_spec'])}"
    return f"{head}, {human_size(leaf['bytes'])}, {chunks}"


def _show_leaves(out: Console, leaves: Iterable[dict[str, Any]]) -> None:
    for leaf in leaves:
        out.print("  " + leaf_line(leaf), soft_wrap=True)


def show_inspect(out: Console, data: dict[str, Any]) -> None:
    if data["kind"] == "base":
        count = plural(sum(1 for r in data["checkpoints"] if r["status"] == "committed"), "committed checkpoint")
        out.print(f"{data['path']} is a base directory holding {count}, not one checkpoint; inspect one of these:")
        show_list(out, data["path"], data["checkpoints"], best=False)
        return
    if data["kind"] == "orbax":
        out.print(f"{data['path']}: an orbax checkpoint (read without orbax; no chunk checksums to verify)")
    elif data["kind"] == "safetensors":
        total = human_size(sum(f["bytes"] for f in data["files"]))
        out.print(f"{data['path']}: safetensors, {plural(len(data['files']), 'file')}, {total}", soft_wrap=True)
        for f in data["files"]:
            out.print(f"  {f['file']}: {plural(f['tensors'], 'tensor')}, {human_size(f['bytes'])}", soft_wrap=True)
        for file, metadata in data["metadata"].items():
            out.print(f"metadata of {file}: {json.dumps(metadata)}", soft_wrap=True)
    else:
        kind = "temporary" if data["temporary"] else "permanent"
        total = human_size(sum(item["bytes"] for item in data["items"].values()))
        head = (
            f"{data['path']}: step {data['step']}, saved {data['saved']}, {kind}, {plural(len(data['items']), 'item')}"
        )
        out.print(f"{head}, {total}", soft_wrap=True)
        if data["extras"]:
            out.print(f"extras: {json.dumps(data['extras'])}", soft_wrap=True)
    for name, item in data["items"].items():
        if item.get("not_pytree"):
            out.print(f"item {name!r}: not a PyTree item (no _METADATA), not shown")
            continue
        storage = f"orbax PyTree ({item['storage']}): " if "storage" in item else ""
        out.print(
            f"item {name!r}: {storage}{plural(len(item['leaves']), 'leaf', 'leaves')}, {human_size(item['bytes'])}"
        )
        _show_leaves(out, item["leaves"])


def verify_header(report: dict[str, Any]) -> str:
    """What was re-read of one checkpoint: every leaf when it is intact; with problems, how many
    leaves came back intact (only those count as checked) or that none was re-read at all.

    >>> verify_header({"path": "r/run-3", "leaves": 2, "chunks": 1, "bytes_read": 400,
    ...                "problems": [{"kind": "missing", "leaf": "w", "message": "..."}]})
    'r/run-3: 1 of 2 leaves intact (1 chunk, 400 B checked); 1 damaged:'
    """
    leaves, chunks = report["leaves"], plural(report["chunks"], "chunk")
    checked = f"{chunks}, {human_size(report['bytes_read'])} checked"
    if not report["problems"]:
        return f"{report['path']}: {plural(leaves, 'leaf', 'leaves')}, {checked}"
    damaged = sum(1 for p in report["problems"] if p.get("leaf") is not None)
    if leaves == 0:
        return f"{report['path']}: not re-read:"
    if damaged >= leaves:
        return f"{report['path']}: {plural(leaves, 'leaf', 'leaves')} re-read, none intact:"
    intact = f"{leaves - damaged} of {plural(leaves, 'leaf', 'leaves')} intact"
    return f"{report['path']}: {intact} ({checked}); {damaged} damaged:"


def show_problems(out: Console, report: dict[str, Any]) -> None:
    out.print(verify_header(report), soft_wrap=True)
    for p in report["problems"]:
        out.print(Text(f"  {p['kind'].upper():8} {p['message']}", style=_PROBLEM_STYLE[p["kind"]]), soft_wrap=True)


def verify_summary(reports: Sequence[dict[str, Any]], *, base: bool, unverified: Sequence[dict[str, Any]] = ()) -> str:
    """The last line of ``verify``; ``unverified``: checkpoints of other writers under the base
    (orbax's), which record no checksums to re-read against."""
    problems = [p for r in reports for p in r["problems"]]
    if not problems:
        line = f"OK ({plural(len(reports), 'checkpoint')})" if base else "OK"
    else:
        kinds = ", ".join(
            f"{sum(1 for p in problems if p['kind'] == k)} {k}"
            for k in _PROBLEM_STYLE
            if any(p["kind"] == k for p in problems)
        )
        damaged = sum(1 for r in reports if r["problems"])
        line = (
            f"DAMAGED: {damaged} of {plural(len(reports), 'checkpoint')}, {plural(len(problems), 'problem')} ({kinds})"
        )
    for name, count in sorted(Counter(u["format"] for u in unverified).items()):
        steps = _steps(sorted(u["step"] for u in unverified if u["format"] == name))
        line += f"; {plural(count, f'{name} step')} not verified (steps {steps}): no checksums recorded"
    return line


def show_prune(out: Console, data: dict[str, Any]) -> None:
    rows = data["checkpoints"]
    doomed = [r for r in rows if r["action"] == "delete"]
    size = human_size(sum(r["bytes"] or 0 for r in doomed))
    out.print(f"{data['base']}: {plural(len(rows), 'checkpoint')}; keeping {data['policy']}", soft_wrap=True)
    if rows:
        print_table(out, checkpoint_table(rows, best=data["best"], action=True))
    if data["dry_run"]:
        verb = f"would delete {plural(len(doomed), 'checkpoint')} ({size})" if doomed else "nothing to delete"
        hint = "; run again with --yes to delete" if doomed else ""
        out.print(f"dry run: {verb}, keep {len(rows) - len(doomed)}{hint}")
    else:
        out.print(f"deleted {plural(len(data['deleted']), 'checkpoint')} ({size}), kept {len(rows) - len(doomed)}")
    if data.get("not_ours"):
        out.print(f"not deleted, written by another library: {', '.join(data['not_ours'])}", soft_wrap=True)
    left = data.get("leftovers") or []
    if left:
        count = plural(sum(len(d["entries"]) for d in left), "leftover entry", "leftover entries")
        verb = "would delete" if data["dry_run"] else "deleted"
        out.print(f"{verb} {count} of saves that died, in {plural(len(left), 'directory', 'directories')}:")
        for d in left:
            out.print(f"  {d['path']}: {', '.join(d['entries'])}", soft_wrap=True)


def _clock(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def show_plan(out: Console, data: dict[str, Any]) -> None:
    saves = data["saves"]
    temporary = sum(1 for s in saves if s["temporary"])
    out.print(f"{data['policy']}; {data['run']}")
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name, justify in (
        ("step", "right"),
        ("time", "right"),
        ("kind", "left"),
        ("reason", "left"),
        ("at the end", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for s in saves:
        kind = Text("temporary" if s["temporary"] else "permanent", style="cyan" if s["temporary"] else "")
        end = Text("kept", style="green") if s["kept"] else Text("deleted", style="dim")
        table.add_row(str(s["step"]), _clock(s["time_s"]), kind, s["reason"], end)
    if saves:
        print_table(out, table)
    kept = [s["step"] for s in saves if s["kept"]]
    out.print(
        f"{plural(len(saves), 'save')} ({len(saves) - temporary} permanent, {temporary} temporary); at the end, "
        f"keeping {data['keep']}: {plural(len(kept), 'checkpoint')} (steps {_steps(kept)})",
        soft_wrap=True,
    )


def _steps(steps: Sequence[int], shown: int = 12) -> str:
    text = ", ".join(str(s) for s in steps[:shown])
    return text + (f", ... ({len(steps) - shown} more)" if len(steps) > shown else "") if steps else "none"


def _shape(leaf: dict[str, Any]) -> str:
    return (
        f"{leaf['value_type']} scalar"
        if leaf["kind"] == "scalar"
        else f"{leaf['kind']} {leaf['shape']} {leaf['dtype']}"
    )


def _show_item_diff(out: Console, data: dict[str, Any], indent: str) -> None:
    for label, style in (("added", "green"), ("removed", "red")):
        for leaf in data[label]:
            out.print(Text(f"{indent}{label:9} {leaf['key']}: {_shape(leaf)}", style=style), soft_wrap=True)
    for r in data["reshaped"]:
        text = f"{indent}reshaped  {r['key']}: {_shape(r['a'])} -> {_shape(r['b'])}"
        out.print(Text(text, style="yellow"), soft_wrap=True)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column(f"{indent}leaf", overflow="fold")
    table.add_column("max |A - B|", justify="right")
    table.add_column("elements differing", justify="right")
    for c in data["compared"]:
        diff = "-" if c["max_abs_diff"] is None else format(c["max_abs_diff"], ".6g")
        style = "" if c["equal"] else "bold"
        table.add_row(Text(indent + c["key"], style=style), Text(diff, style=style), f"{c['differing']} of {c['size']}")
    if data["compared"]:
        print_table(out, table)


def show_diff(out: Console, data: dict[str, Any]) -> None:
    """Each item compared (under a heading when there are several), the items only one side
    has, and a line of totals."""
    for side in ("a", "b"):
        step = "" if data[side]["step"] is None else f" (step {data[side]['step']})"
        out.print(f"{side.upper()}: {data[side]['path']}{step}", soft_wrap=True)
    pairs = data["items"]
    sections = ("added", "removed", "reshaped", "compared")
    for pair in pairs:
        if len(pairs) > 1:
            out.print(f"item {pair['a']!r}:")
        of_item = {name: [e for e in data[name] if e["item"] == pair["a"]] for name in sections}
        _show_item_diff(out, of_item, "  " if len(pairs) > 1 else "")
    for side in ("a", "b"):
        if data[f"items_only_in_{side}"]:
            names = ", ".join(repr(n) for n in data[f"items_only_in_{side}"])
            out.print(f"only in {side.upper()}: {plural(len(data[f'items_only_in_{side}']), 'item')} {names}")
    changed = sum(1 for c in data["compared"] if not c["equal"])
    counts = f"{len(data['added'])} added, {len(data['removed'])} removed, {len(data['reshaped'])} reshaped"
    items = f" of {plural(len(pairs), 'item')}" if len(pairs) != 1 else ""
    out.print(f"{plural(len(data['compared']), 'leaf', 'leaves')} in both{items}: {changed} changed; {counts}")
