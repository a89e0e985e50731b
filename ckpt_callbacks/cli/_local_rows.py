"""What ``ckpt-callbacks list BASE --local PATH`` shows of one host's local tier.

Per local step: the sets committed in this host's directory (its own and the replicas it
keeps), their size and layout digest, and whether the step is complete *on this host*: the
own set and the replicas this process keeps (p-1 .. p-r). Other hosts' directories cannot
be seen from here, so a step complete here may still lack a set elsewhere. Damaged parts
(a marker that does not match its manifest or data) are rows of their own.

>>> import os, tempfile
>>> from ckpt_callbacks.manager._local import _store as store
>>> root = tempfile.mkdtemp()
>>> store.claim(root, "run", 0)
>>> with store.PartWriter(root, step=4, set_index=0) as w:
...     w.commit({"digest": "ab" * 32, "save": "5a", "topology": {"processes": 1}, "pieces": []}, data_bytes=0)
>>> data = local_data(root)
>>> [(s["step"], s["here"], s["digest"]) for s in data["steps"]], data["process"]
([(4, 'complete', 'abababababab')], 0)
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

from ckpt_callbacks.cli._render import Console, human_size, plural, print_table
from ckpt_callbacks.errors import CheckpointNotFoundError
from ckpt_callbacks.manager._local import _store as store

DIGEST_CHARS = 12
_PART = re.compile(r".*/step_(\d+)/set_(\d+)$")
_SET = re.compile(r"set_(0|[1-9][0-9]{0,8})")


def _claimed(root: str) -> list[int]:
    """The processes whose claim is in ``root`` (one run's: a claim removes earlier runs')."""
    try:
        names = os.listdir(os.path.join(root, store.CLAIMS))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = {int(p) for n in names if (p := n.rpartition("-")[2]).isdigit()}
    return sorted(found)


def _saved(part: store.Part) -> dict[str, Any]:
    try:
        with open(os.path.join(part.path, "manifest.json"), "rb") as f:
            value = json.loads(f.read(store.MAX_JSON_BYTES))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _processes(part: store.Part) -> int | None:
    """The process count the part was saved on (its manifest's topology)."""
    topo = _saved(part).get("topology")
    n = topo.get("processes") if isinstance(topo, dict) else None
    return n if isinstance(n, int) and n > 0 else None


def _recorded_replicas(parts: list[store.Part]) -> int | None:
    """The replica count the parts' manifests record (one count, or None)."""
    found = {r for p in parts if isinstance(r := _saved(p).get("replicas"), int) and not isinstance(r, bool)}
    return found.pop() if len(found) == 1 else None


def expected_sets(process: int, processes: int, replicas: int) -> list[int]:
    """The sets process ``process`` keeps: its own, then p-1 .. p-r (mod the process count).

    >>> expected_sets(0, 4, 1), expected_sets(2, 4, 2), expected_sets(0, 1, 0)
    ([0, 3], [2, 1, 0], [0])
    """
    return [(process - k) % processes for k in range(min(replicas, processes - 1) + 1)]


def _uncommitted(root: str, step: int) -> list[int]:
    try:
        names = os.listdir(store.step_dir(root, step))
    except (FileNotFoundError, NotADirectoryError):
        return []
    sets = [int(m.group(1)) for n in names if (m := _SET.fullmatch(n))]
    return sorted(j for j in sets if not os.path.exists(os.path.join(store.part_dir(root, step, j), store.COMMITTED)))


def _step_row(
    step: int, parts: list[store.Part], process: int | None, replicas: int | None, damaged: set[int]
) -> dict[str, Any]:
    counts = {n for p in parts if (n := _processes(p)) is not None}
    processes = counts.pop() if len(counts) == 1 else None
    digests = sorted({p.digest for p in parts})
    row: dict[str, Any] = {"step": step, "status": "committed", "processes": processes}
    row["sets"] = [
        {"set": p.set_index, "role": "own" if p.set_index == process else "replica", "bytes": p.data_bytes}
        for p in parts
    ]
    row["bytes"] = sum(p.data_bytes for p in parts)
    row["digest"] = digests[0][:DIGEST_CHARS] if len(digests) == 1 else None
    row["digests"] = [d[:DIGEST_CHARS] for d in digests]
    row["expected"], row["missing"] = None, None
    if process is None or processes is None:
        row["here"] = "unknown"
        row["why"] = "which process this directory is is unknown (no claim)" if process is None else "no topology"
        return row
    if replicas is None:
        replicas = _recorded_replicas(parts)
    r = (1 if processes > 1 else 0) if replicas is None else replicas
    row["expected"] = expected_sets(process, processes, r)
    held = {p.set_index for p in parts}
    row["missing"] = [j for j in row["expected"] if j not in held]
    if len(digests) > 1:
        row["here"], row["why"] = "incomplete", "its sets were saved under different layouts (digests differ)"
    elif row["missing"]:
        row["here"] = "incomplete"
        why = "damaged" if set(row["missing"]) <= damaged else "missing"
        row["why"] = f"set(s) {row['missing']} {why} on this host"
    else:
        row["here"], row["why"] = "complete", None
    return row


def _damaged_row(problem: str) -> dict[str, Any]:
    path = problem.split(": ", 1)[0]
    m = _PART.match(path)
    step, set_index = (int(m.group(1)), int(m.group(2))) if m else (None, None)
    return {"step": step, "set": set_index, "status": "damaged", "path": path, "problem": problem}


def local_data(path: str, replicas: int | None = None) -> dict[str, Any]:
    """The local tier at ``path`` on this host: its steps (newest last) and damaged parts.

    ``replicas``: the ``LocalTier``'s (None: its default, 1 with several processes).
    """
    root = os.path.abspath(path)
    if not os.path.isdir(root):
        what = "it is a file, not a directory" if os.path.exists(root) else "no such directory"
        raise CheckpointNotFoundError(f"no local tier at {root}: {what}")
    problems: list[str] = []
    parts = []
    for part in store.scan(root, problems):  # every region's crc32c read, as a restore would
        why = store.verify(part)
        if why is None:
            parts.append(part)
        else:
            problems.append(f"{part.path}: {why}")
    claimed = _claimed(root)
    process = claimed[0] if len(claimed) == 1 else None
    damaged = [_damaged_row(p) for p in problems]
    steps = []
    for step in store.steps(root):
        mine = [p for p in parts if p.step == step]
        hurt = {d["set"] for d in damaged if d["step"] == step}
        if mine:
            steps.append(_step_row(step, mine, process, replicas, hurt))
        unfinished = _uncommitted(root, step)
        if unfinished:
            steps.append({"step": step, "status": "uncommitted", "sets": [{"set": j} for j in unfinished]})
    return {
        "path": root,
        "process": process,
        "claims": claimed,
        "replicas": replicas,
        "steps": steps,
        "damaged": damaged,
    }


def _sets_cell(row: dict[str, Any]) -> str:
    if row["status"] == "uncommitted":
        return ", ".join(str(s["set"]) for s in row["sets"])
    return ", ".join(f"{s['set']} ({s['role']})" for s in row["sets"])


def _here_cell(row: dict[str, Any]) -> Text:
    if row["status"] == "uncommitted":
        return Text("UNCOMMITTED (a save in flight or interrupted)", style="yellow")
    if row["here"] == "complete":
        return Text("complete on this host", style="green")
    return Text(f"{row['here']} on this host: {row['why']}", style="yellow")


def local_table(data: dict[str, Any]) -> Table:
    """One row per local step (and per unfinished step), then one DAMAGED row per damaged part."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name, justify in (("step", "right"), ("sets here", "left"), ("size", "right"), ("digest", "left")):
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    table.add_column("status", overflow="fold")
    for row in data["steps"]:
        committed = row["status"] == "committed"
        digest = (row["digest"] or "mixed: " + ",".join(row["digests"])) if committed else "-"
        size = human_size(row["bytes"]) if committed else "-"
        table.add_row(str(row["step"]), _sets_cell(row), size, digest, _here_cell(row))
    for row in data["damaged"]:
        step = "-" if row["step"] is None else str(row["step"])
        sets = "-" if row["set"] is None else str(row["set"])
        table.add_row(step, sets, "-", "-", Text(f"DAMAGED: {row['problem']}", style="bold red"))
    return table


def _heading(data: dict[str, Any]) -> str:
    claims = data["claims"]
    if len(claims) == 1:
        who = f"process {claims[0]}'s directory"
    elif claims:
        who = f"claimed by processes {claims} (a directory must not be shared)"
    else:
        who = "no claim: which process's directory this is is unknown"
    return f"local tier on this host: {data['path']} ({who})"


def show_local(out: Console, data: dict[str, Any]) -> None:
    out.print(_heading(data), soft_wrap=True)
    committed = [r for r in data["steps"] if r["status"] == "committed"]
    if not data["steps"] and not data["damaged"]:
        out.print("no local steps")
        return
    print_table(out, local_table(data))
    complete = sum(1 for r in committed if r["here"] == "complete")
    more = f"; {plural(len(data['damaged']), 'damaged part')}" if data["damaged"] else ""
    out.print(
        f"{plural(len(committed), 'local step')}, {complete} complete on this host{more} "
        "(other hosts' directories cannot be seen from here)",
        soft_wrap=True,
    )
