"""The command line, run as a real subprocess on a real checkpoint."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np

import ckpt_callbacks as cc


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.run(
        [sys.executable, "-m", "ckpt_callbacks.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )


def test_list_latest_inspect_verify(tmp_path):
    for step in (2, 10):
        cc.save(str(tmp_path / f"run-{step}"), {"w": np.arange(6.0).reshape(2, 3), "n": 1}, step=step)
    out = _cli("list", str(tmp_path))
    assert out.returncode == 0 and out.stdout.splitlines()[0].startswith("step 2 ")
    assert _cli("latest", str(tmp_path)).stdout.strip().endswith("run-10")
    inspect = _cli("inspect", str(tmp_path / "run-10")).stdout
    assert "w: array [2, 3] float64 chunks=[2, 3]" in inspect and "n: int = 1" in inspect
    ok = _cli("verify", str(tmp_path / "run-10"))
    assert ok.returncode == 0 and ok.stdout.strip().endswith("OK")
    chunk = tmp_path / "run-10" / "state" / "w" / "c" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[3] ^= 1
    pathlib.Path(chunk).write_bytes(raw)
    bad = _cli("verify", str(tmp_path / "run-10"))
    assert bad.returncode == 1 and "CORRUPT" in bad.stdout and "leaf 'w'" in bad.stdout


def test_missing_checkpoint_is_a_clean_error(tmp_path):
    out = _cli("inspect", str(tmp_path / "nothing"))
    assert out.returncode == 2 and "no committed checkpoint" in out.stderr and "Traceback" not in out.stderr
    assert _cli("latest", str(tmp_path)).returncode == 1
