"""``ckpt-callbacks list BASE --local PATH``: both tiers, the local steps of this host, damaged parts.

Local tiers are written by a real ``Checkpointer(local=LocalTier(...))`` (one process), and,
for the views of a host of a larger run, by the local store's own part writer."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import ckpt_callbacks as cc
from ckpt_callbacks.cli._main import main
from ckpt_callbacks.manager._local import _store as store
from conftest import make_mesh, put

EXE = shutil.which("ckpt-callbacks", path=os.path.dirname(sys.executable))
W = (64, 32)  # float32: 8 KiB


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _json(capsys, *argv: str):
    code, out, err = _run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def _trained(tmp_path, steps=6):
    """Local steps every 2 (2 kept), persistent every 4, on a (4, 2) mesh: local 4 and 6, run-4."""
    mesh = make_mesh((4, 2))
    local = cc.LocalTier(tmp_path / "local", step_policies=[cc.CheckpointInterval(every=2)], keep_last=2)
    ck = cc.Checkpointer(
        tmp_path / "run", step_policies=[cc.CheckpointInterval(every=4)], local=local, handle_sigterm=False
    )
    w = put(jnp.zeros(W, jnp.float32), mesh, P("x", "y"))
    for step in range(1, steps + 1):
        ck.on_step({"w": w + step, "n": step}, step=step)
    ck.close()
    return str(tmp_path / "run"), str(tmp_path / "local")


def _part(root, step, set_index, *, processes=4, digest="d" * 64, nbytes=16):
    with store.PartWriter(root, step=step, set_index=set_index) as w:
        w.write_at(0, b"x" * nbytes)
        w.commit(
            {"digest": digest, "save": "0" * 16, "topology": {"processes": processes}, "pieces": [], "leaves": []},
            data_bytes=nbytes,
        )


def test_list_local_shows_both_tiers(tmp_path, capsys):
    base, local = _trained(tmp_path)
    code, out, err = _run(capsys, "list", base, "--local", local)
    assert code == 0 and err == "", err
    assert out.startswith(f"persistent tier: {base}\n")
    assert re.search(r"^\s*4\s.*permanent\s+8\.0 KiB\s+state\s", out, re.M), out
    assert f"local tier on this host: {os.path.abspath(local)} (process 0's directory)" in out
    for step in (4, 6):
        assert re.search(rf"^\s*{step}\s+0 \(own\)\s+8\.0 KiB\s+[0-9a-f]{{12}}\s+complete on this host$", out, re.M)
    assert not re.search(r"^\s*2\s+0 \(own\)", out, re.M)  # keep_last=2: step 2 went
    assert out.splitlines()[-1] == (
        "2 local steps, 2 complete on this host (other hosts' directories cannot be seen from here)"
    )
    data = _json(capsys, "list", base, "--local", local)
    assert [r["step"] for r in data["persistent"]] == [4]
    steps = {r["step"]: r for r in data["local"]["steps"]}
    assert sorted(steps) == [4, 6] and data["local"]["process"] == 0 and data["local"]["damaged"] == []
    digest = store.scan(local)[0].digest
    assert steps[6]["digest"] == digest[:12] and steps[6]["bytes"] == 4 * np.prod(W)
    assert steps[6]["sets"] == [{"set": 0, "role": "own", "bytes": 4 * np.prod(W)}]
    assert steps[6]["here"] == "complete" and steps[6]["expected"] == [0] and steps[6]["missing"] == []


def test_without_local_the_listing_is_unchanged(tmp_path, capsys):
    base, _ = _trained(tmp_path)
    code, out, _ = _run(capsys, "list", base)
    assert code == 0 and "local tier" not in out and not out.startswith("persistent tier")
    assert [r["step"] for r in _json(capsys, "list", base)] == [4]  # a list, as before


def test_a_damaged_part_is_a_damaged_row(tmp_path, capsys):
    base, local = _trained(tmp_path)
    with open(os.path.join(store.part_dir(local, 6, 0), "data.bin"), "ab") as f:
        f.write(b"!")
    code, out, _ = _run(capsys, "list", base, "--local", local)
    assert code == 0
    size = 4 * np.prod(W)
    assert re.search(rf"^\s*6\s+0\s+-\s+-\s+DAMAGED: .*set_0: data\.bin holds {size + 1} bytes", out, re.M), out
    assert out.splitlines()[-1].startswith("1 local step, 1 complete on this host; 1 damaged part ")
    data = _json(capsys, "list", base, "--local", local)["local"]
    assert [r["step"] for r in data["steps"]] == [4]
    assert [(d["step"], d["set"], d["status"]) for d in data["damaged"]] == [(6, 0, "damaged")]


def test_a_part_without_its_marker_is_uncommitted(tmp_path, capsys):
    base, local = _trained(tmp_path)
    os.unlink(os.path.join(store.part_dir(local, 6, 0), store.COMMITTED))
    code, out, _ = _run(capsys, "list", base, "--local", local)
    assert code == 0
    assert re.search(r"^\s*6\s+0\s+-\s+-\s+UNCOMMITTED \(a save in flight or interrupted\)$", out, re.M), out
    rows = _json(capsys, "list", base, "--local", local)["local"]["steps"]
    assert [(r["step"], r["status"]) for r in rows] == [(4, "committed"), (6, "uncommitted")]


def test_a_host_of_four_processes_complete_only_with_its_replicas(tmp_path, capsys):
    """Process 2 of 4 keeps set 2 and, with one replica, set 1; with two, set 0 as well."""
    root = str(tmp_path / "p2")
    store.claim(root, "abc", 2)
    for j in (2, 1):
        _part(root, 8, j)
    _part(root, 6, 2)
    _part(root, 4, 2, digest="e" * 64)
    _part(root, 4, 1)
    base = str(tmp_path / "nothing-yet")  # the persistent tier has no checkpoint yet: still listed
    code, out, _ = _run(capsys, "list", base, "--local", root)
    assert code == 0 and f"no checkpoints under {base}" in out
    assert re.search(r"^\s*8\s+1 \(replica\), 2 \(own\)\s+32 B\s+d{12}\s+complete on this host$", out, re.M), out
    assert re.search(r"^\s*6\s+2 \(own\)\s+16 B\s+d{12}\s+incomplete on this host: set\(s\) \[1\] missing", out, re.M)
    assert re.search(r"^\s*4\s.*mixed: d{12},e{12}\s+incomplete on this host: .*different layouts", out, re.M), out
    data = _json(capsys, "list", base, "--local", root)
    assert data["persistent"] == []
    steps = {r["step"]: r for r in data["local"]["steps"]}
    assert steps[8]["expected"] == [2, 1] and steps[8]["here"] == "complete"
    steps = {r["step"]: r for r in _json(capsys, "list", base, "--local", root, "--replicas", "2")["local"]["steps"]}
    assert steps[8]["expected"] == [2, 1, 0] and steps[8]["missing"] == [0] and steps[8]["here"] == "incomplete"


def test_a_directory_without_a_claim_or_with_two(tmp_path, capsys):
    root = str(tmp_path / "local")
    _part(root, 2, 0, processes=2)
    data = _json(capsys, "list", str(tmp_path / "run"), "--local", root)["local"]
    assert data["process"] is None and data["steps"][0]["here"] == "unknown"
    _, out, _ = _run(capsys, "list", str(tmp_path / "run"), "--local", root)
    assert "no claim: which process's directory this is is unknown" in out
    store.claim(root, "r", 0)
    store.claim(root, "r", 1)
    _, out, _ = _run(capsys, "list", str(tmp_path / "run"), "--local", root)
    assert "claimed by processes [0, 1] (a directory must not be shared)" in out


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--local", "{tmp}/absent"], r"^error: no local tier at .*absent: no such directory$"),
        (["--local", "{tmp}/file"], r"^error: no local tier at .*file: it is a file, not a directory$"),
        (["--replicas", "1"], r"^error: --replicas 1: expected a count >= 0, with --local PATH$"),
        (["--local", "{tmp}", "--replicas", "-1"], r"^error: --replicas -1: expected a count >= 0"),
    ],
)
def test_bad_local_arguments_are_one_line_errors(tmp_path, capsys, args, match):
    (tmp_path / "file").write_text("x")
    code, out, err = _run(capsys, "list", str(tmp_path), *[a.format(tmp=tmp_path) for a in args])
    assert code == 2 and out == "" and re.search(match, err.strip()) and len(err.splitlines()) == 1, err


def test_the_console_script_lists_the_local_tier(tmp_path):
    base, local = _trained(tmp_path, steps=2)
    assert EXE is not None, f"ckpt-callbacks is not installed beside {sys.executable}"
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    argv = [EXE, "list", base, "--local", local]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, check=False, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "no checkpoints under" in out.stdout  # persistent every 4: nothing yet
    assert re.search(r"^\s*2\s+0 \(own\)\s+8\.0 KiB\s+[0-9a-f]{12}\s+complete on this host$", out.stdout, re.M)
