"""`make bench` in a tiny size, so the benchmark cannot rot (no speed assertions)."""

from __future__ import annotations

import json

from conftest import run_python


def test_benchmark_smoke_run_writes_its_outputs(tmp_path):
    out = run_python("benchmarks/run.py", "--smoke", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    (report_path,) = tmp_path.glob("bench-*.json")
    report = json.loads(report_path.read_text())
    names = {row["name"] for row in report["model"] + report["small"]}
    assert {
        "raw: tofile+fsync (limit)",
        "orbax model: sync save",
        "ckpt_callbacks model: save_async (total)",
        "ckpt_callbacks model: restore, other mesh",
        "orbax small: sync save",
    } <= names
    assert len(report["ratios"]) == 6 and report["loop"]["callback_us"] > 0
    assert (tmp_path / "latest.md").read_text().startswith("# Benchmark")
    assert (tmp_path / "latest.png").stat().st_size > 1000
