"""The command line, run as a real subprocess on a real checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

import ckpt_callbacks as cc
from ckpt_callbacks import paths


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


def test_list_latest_inspect_verify(shared_url):
    for step in (2, 10):
        cc.save(f"{shared_url}/run-{step}", {"w": np.arange(6.0).reshape(2, 3), "n": 1}, step=step)
    out = _cli("list", shared_url)
    assert out.returncode == 0 and out.stdout.splitlines()[0].startswith("step 2 ")
    assert _cli("latest", shared_url).stdout.strip().endswith("run-10")
    inspect = _cli("inspect", f"{shared_url}/run-10").stdout
    assert "w: array [2, 3] float64 chunks=[2, 3]" in inspect and "n: int = 1" in inspect
    ok = _cli("verify", f"{shared_url}/run-10")
    assert ok.returncode == 0 and ok.stdout.strip().endswith("OK")
    item = paths.parse(f"{shared_url}/run-10/state")
    raw = bytearray(paths.read_bytes(item, "pack.0-0"))  # small leaves are packed: "w" is first
    raw[3] ^= 1
    paths.write_bytes(item, "pack.0-0", bytes(raw))
    bad = _cli("verify", f"{shared_url}/run-10")
    assert bad.returncode == 1 and "CORRUPT" in bad.stdout and "leaf 'w'" in bad.stdout


def test_missing_checkpoint_is_a_clean_error(tmp_path):
    out = _cli("inspect", str(tmp_path / "nothing"))
    assert out.returncode == 2 and "no committed checkpoint" in out.stderr and "Traceback" not in out.stderr
    assert _cli("latest", str(tmp_path)).returncode == 1
