"""Median and range over several `make bench` runs, as the README shows them.

    python benchmarks/summarize.py benchmarks/results/bench-A.json bench-B.json bench-C.json

Every figure is the median of the runs' own medians, with the lowest and highest in brackets;
a target holds when its median holds, and the runs where it did not are counted.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import sys
from typing import Any


def _holds(value: float, target: str) -> bool:
    op, number = target.split()
    return value >= float(number) if op == ">=" else value <= float(number)


def _fmt(values: list[float], digits: int = 2, scale: float = 1.0) -> str:
    scaled = [v * scale for v in values]
    return f"{statistics.median(scaled):.{digits}f} ({min(scaled):.{digits}f}-{max(scaled):.{digits}f})"


def targets(reports: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| target (ratio, same run) | median (range) | target | holds (median) | runs missed |",
        "|---|---|---|---|---|",
    ]
    for name, _, target in reports[0]["ratios"]:
        values = [v for r in reports for n, v, _ in r["ratios"] if n == name]
        missed = sum(not _holds(v, target) for v in values)
        median = statistics.median(values)
        holds = "yes" if _holds(median, target) else "NO"
        lines.append(f"| {name} | {_fmt(values)} | {target} | {holds} | {missed} of {len(values)} |")
    return lines


def cases(reports: list[dict[str, Any]], key: str) -> list[str]:
    lines = ["| case | seconds | blocking s |", "|---|---|---|"]
    for row in reports[0][key]:
        same = [r2 for r in reports for r2 in r[key] if r2["name"] == row["name"]]
        blocking = _fmt([r["blocking_s"] for r in same], 3) if "blocking_s" in row else ""
        lines.append(f"| {row['name']} | {_fmt([r['seconds'] for r in same], 3)} | {blocking} |")
    return lines


def fresh(reports: list[dict[str, Any]]) -> list[str]:
    """Cases run in a fresh process each: seconds, and for restores peak extra RSS over bytes."""
    lines = ["| fresh process per run | seconds | peak extra RSS / bytes restored |", "|---|---|---|"]
    for row in reports[0].get("fresh", []):
        same = [r2 for r in reports for r2 in r.get("fresh", []) if r2["name"] == row["name"]]
        memory = _fmt([r["peak_rss"] / r["restored"] for r in same]) if "restored" in row else ""
        lines.append(f"| {row['name']} | {_fmt([r['seconds'] for r in same], 3)} | {memory} |")
    return lines


def loop(reports: list[dict[str, Any]]) -> list[str]:
    head = "| case | blocking s | first step after: excess ms | loop time lost s | extra device MiB |"
    lines = [head, "|---|---|---|---|---|"]
    for row in reports[0]["loop_save"]:
        same = [r2 for r in reports for r2 in r["loop_save"] if r2["name"] == row["name"] and "error" not in r2]
        if not same:
            continue
        lines.append(
            f"| {row['name']} | {_fmt([r['blocking_s'] for r in same], 3)} | "
            f"{_fmt([r['first_step_excess_s'] for r in same], 0, 1e3)} | {_fmt([r['lost_s'] for r in same])} | "
            f"{_fmt([r['extra_device_bytes'] for r in same], 0, 1 / 2**20)} |"
        )
    step = statistics.median(r2["step_s"] for r in reports for r2 in r["loop_save"] if "step_s" in r2)
    lines += ["", f"(a normal step: {step * 1e3:.1f} ms, median over runs and cases)"]
    return lines


def main(argv: list[str]) -> int:
    reports = [json.loads(pathlib.Path(p).read_text()) for p in argv]
    names = ", ".join(pathlib.Path(p).name for p in argv)
    print(f"Median (range) over {len(reports)} runs: {names}\n")
    print("\n".join(targets(reports)), "\n")
    rows = cases(reports, "model") + cases(reports, "small")[2:]
    if all("chunks" in r for r in reports):
        rows += cases(reports, "chunks")[2:]
    print("\n".join(rows), "\n")
    if all("fresh" in r for r in reports):
        print("\n".join(fresh(reports)), "\n")
    print("\n".join(loop(reports)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
