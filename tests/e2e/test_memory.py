"""Host memory while saving: peak extra RSS against the bytes this process writes.

Each case runs in a fresh subprocess that samples its own RSS every 2 ms; the figures are
printed (run ``pytest -s tests/e2e/test_memory.py``) and bounded by the issue's budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _probe(program: str, *args: str) -> dict:
    """Runs ``tests/programs/<program>`` in a fresh process; its last line of output, as JSON."""
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    out = subprocess.run(
        [sys.executable, f"tests/programs/{program}", *args],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}


def _run(tmp_path, gib: float, budget: int, layout: str = "zarr3") -> dict:
    result = _probe("memory_probe.py", str(tmp_path / "ckpt"), str(gib), str(budget), layout)
    print(
        f"\n{gib} GiB save ({layout}), budget={budget or None}: wrote {result['bytes_written'] / 2**20:.0f} MiB, "
        f"peak extra RSS {result['peak_extra'] / 2**20:.0f} MiB (first save {result['first_peak_extra'] / 2**20:.0f}) "
        f"({result['peak_extra'] / result['bytes_written']:.2f}x), blocking {result['blocking_s']:.3f}s "
        f"(first save {result['first_blocking_s']:.3f}s), "
        f"total {result['total_s']:.2f}s"
    )
    return result


def test_peak_rss_at_most_1_25x_bytes_written(tmp_path):
    result = _run(tmp_path, float(os.environ.get("CKPT_RSS_GIB", "1")), 0)
    assert result["bytes_written"] >= 0.99 * float(os.environ.get("CKPT_RSS_GIB", "1")) * 2**30 * 0.75
    assert result["peak_extra"] <= 1.25 * result["bytes_written"]


@pytest.mark.parametrize("layout", ["zarr3", "process"])
@pytest.mark.parametrize("budget_mib", [64])
def test_peak_rss_within_max_host_bytes(tmp_path, budget_mib, layout):
    """The same bound in both layouts: the process layout's data files are assembled on the
    host and copied by TensorStore as they are written, and both count against the budget."""
    budget = budget_mib << 20
    result = _run(tmp_path, 0.5, budget, layout)
    assert result["bytes_written"] > 4 * budget  # the save really is larger than the budget
    assert result["peak_extra"] <= budget


def _extra(result: dict) -> int:
    return result["peak_extra"] - result["restored"]


def test_restore_from_local_disk_holds_nothing_beyond_the_arrays(tmp_path):
    """Each restore in a fresh process: on local disk the chunks are read straight into the
    restored arrays (on CPU host memory too), so the peak is the arrays themselves."""
    path = str(tmp_path / "ckpt")
    _probe("restore_probe.py", "save", path, "0.5")
    default = _probe("restore_probe.py", "restore", path, "0")
    bounded = _probe("restore_probe.py", "restore", path, str(16 << 20))
    print(f"\nrestore of {default['restored'] / 2**20:.0f} MiB: extra host memory {_extra(default) / 2**20:.0f} MiB")
    assert default["restored"] >= 0.99 * 2**29
    assert _extra(default) <= 64 << 20
    assert _extra(bounded) <= 64 << 20


def test_restore_staging_within_max_host_bytes():
    """From memory:// (TensorStore reads, staged before they are placed) host memory beyond the
    restored arrays is bounded by max_host_bytes, not by the checkpoint's size."""
    budget = 16 << 20
    default = _probe("restore_probe.py", "memory", "0.5", "0")
    bounded = _probe("restore_probe.py", "memory", "0.5", str(budget))
    print(
        f"\nrestore of {bounded['restored'] / 2**20:.0f} MiB from memory://: extra host memory "
        f"{_extra(default) / 2**20:.0f} MiB (default window), {_extra(bounded) / 2**20:.0f} MiB (16 MiB budget)"
    )
    assert _extra(bounded) <= 8 * budget + (64 << 20)
    assert _extra(bounded) < _extra(default)
