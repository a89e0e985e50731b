"""`make bench` in a tiny size, so the benchmark cannot rot (no speed assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
    assert len(report["ratios"]) == 13 and report["loop"]["callback_us"] > 0
    assert {r["name"] for r in report["chunks"]} >= {"raw chunks: fromfile (limit)", "ckpt_callbacks chunks: save"}
    fresh = {r["name"]: r for r in report["fresh"]}
    assert fresh["fresh: ours first save_async"]["seconds"] > 0 and fresh["fresh: orbax restore"]["peak_rss"] > 0
    assert fresh["fresh: ours restore, other mesh"]["restored"] == report["model_bytes"]
    loop_names = {row["name"] for row in report["loop_save"]}
    assert loop_names == {
        "ckpt_callbacks save_async, snapshot=auto",
        "ckpt_callbacks save_async, snapshot=host",
        "ckpt_callbacks save_async, snapshot=device",
        "orbax async save",
    }
    assert all(row["lost_s"] == row["lost_s"] and row["extra_device_bytes"] >= 0 for row in report["loop_save"])
    tiers = report["local_tier"]
    assert {r["name"] for r in tiers["loop"]} == {
        "local save (LocalTier, local disk)",
        "persistent save (S3 on moto)",
        "both tiers due at one step",
    }
    # each recovery is checked against the trained state inside the bench (it fails otherwise)
    assert [r["tiers"] for r in tiers["recovery"]] == [["local"], ["persistent"]]
    assert "loop time lost" in (tmp_path / "latest.md").read_text()
    assert (tmp_path / "latest.md").read_text().startswith("# Benchmark")
    assert (tmp_path / "latest.png").stat().st_size > 1000


def test_gpu_benchmark_script_runs_on_cpu(tmp_path):
    """`benchmarks/gpu.sh` is only timed on a GPU machine; here it runs tiny on CPU so it cannot rot."""
    env = dict(os.environ, PYTHON=sys.executable, GPU_BENCH_ARGS="--smoke")
    out = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "0.01", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    (report_path,) = tmp_path.glob("gpu-*-cpu.json")
    report = json.loads(report_path.read_text())
    assert [row["name"] for row in report["rows"]] == [
        "orbax gpu: async save (total)",
        "orbax gpu: restore (target shardings)",
        "ckpt_callbacks gpu: save_async (total)",
        "ckpt_callbacks gpu: restore, same mesh",
    ]
    assert report["disk"]["gb_per_s"] > 0 and len(report["ratios"]) == 5
    assert len(report["loop_save"]) == 4 and not any("error" in row for row in report["loop_save"])
    assert all(row["blocking_s"] > 0 for row in report["rows"] if "save" in row["name"])
    local = {row["name"]: row for row in report["local_tier"]}
    assert set(local) == {"local save (LocalTier)", "persistent save (same disk)"}
    assert all(row["blocking_s"] > 0 and row["device_bytes"] >= 0 for row in local.values())
    assert "Local tier (issue 22)" in next(tmp_path.glob("gpu-*-cpu.md")).read_text()
