"""The command line, run as the installed ``ckpt-callbacks`` console script on real checkpoints."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import ckpt_callbacks as cc
from ckpt_callbacks import storage as paths
from conftest import make_mesh, put

EXE = shutil.which("ckpt-callbacks", path=os.path.dirname(sys.executable))
COMMANDS = ("list", "latest", "inspect", "verify", "diff", "prune", "plan")
BIG = (512, 1024)  # float32, 2 MiB: above the 1 MiB pack limit, so a zarr3 array of its own


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    assert EXE is not None, f"ckpt-callbacks is not installed beside {sys.executable}"
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.run([EXE, *args], capture_output=True, text=True, env=env, check=False, timeout=300)


def _json(*args: str):
    out = _cli(*args, "--json")
    assert out.returncode in (0, 1), out.stderr
    return json.loads(out.stdout)


def _clean_error(out: subprocess.CompletedProcess[str], match: str) -> None:
    """Exit status 2 and one line on stderr, no traceback."""
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert re.search(match, lines[0]), lines[0]


def _run_base(tmp_path: Path) -> Path:
    """run-2 and run-10 with metrics in their metadata, run-20 (temporary) with a metrics sidecar,
    and run-30: the leftovers of a save that never committed."""
    base = tmp_path / "run"
    for step, temporary in ((2, False), (10, False), (20, True)):
        tree = {"params": {"w": np.arange(6.0).reshape(2, 3) * step, "big": np.ones(BIG, np.float32)}, "n": step}
        extras = {"metrics": {"eval_loss": 1.0 / step}} if step != 20 else None
        cc.save(base / f"run-{step}", tree, step=step, extras=extras, is_temporary=temporary)
    with cc.Checkpointer(base) as ck:
        ck.record_metrics(20, {"eval_loss": 0.3})
    (base / "run-30" / "state").mkdir(parents=True)
    (base / "run-30" / "state" / "manifest.json").write_text("{")
    return base


def test_list_latest_inspect_verify(shared_url):
    for step in (2, 10):
        cc.save(f"{shared_url}/run-{step}", {"w": np.arange(6.0).reshape(2, 3), "n": 1}, step=step)
    out = _cli("list", shared_url)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^\s*2\s.*run-2$", out.stdout, re.M) and re.search(r"^\s*10\s.*run-10$", out.stdout, re.M)
    listed = _json("list", shared_url)
    assert [r["step"] for r in listed] == [2, 10] and {r["bytes"] for r in listed} == {48}
    assert _cli("latest", shared_url).stdout.strip().endswith("run-10")
    inspect = _cli("inspect", f"{shared_url}/run-10").stdout
    assert "w: array [2, 3] float64, 48 B, chunk shape [2, 3] (1 chunk, packed)" in inspect and "n: int = 1" in inspect
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


def test_help_has_a_sentence_and_examples_per_command():
    top = _cli("--help")
    assert top.returncode == 0 and "examples:" in top.stdout
    assert "``" not in top.stdout and ">>>" not in top.stdout
    for name in COMMANDS:
        assert re.search(rf"^    {name} +[A-Z]\w+", top.stdout, re.M), name
        sub = _cli(name, "--help")
        assert sub.returncode == 0 and f"examples:\n  ckpt-callbacks {name} " in sub.stdout, sub.stdout


def test_list_table_and_json(tmp_path):
    base = _run_base(tmp_path)
    out = _cli("list", str(base), "--metric", "eval_loss")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["step", "saved", "(UTC)"] and all(line == line.rstrip() for line in lines)
    assert re.search(r"^\s*10\s.*permanent\s+2\.0 MiB\s+state\s+eval_loss=0\.1\s+#1\s+\S*run-10$", out.stdout, re.M)
    assert re.search(r"^\s*20\s.*temporary\s+2\.0 MiB\s+state\s+eval_loss=0\.3\s+#2\s", out.stdout, re.M)
    assert re.search(r"^\s*30\s.*UNCOMMITTED\s", out.stdout, re.M) and "a save that did not finish" in out.stdout
    assert "MB" not in out.stdout and "\x1b" not in out.stdout  # binary units; no styling in a pipe
    assert lines[-1] == "3 checkpoints (2 permanent, 1 temporary), 6.0 MiB; 1 unfinished save"
    rows = {r["step"]: r for r in _json("list", str(base), "--metric", "eval_loss", "--mode", "max")}
    assert rows[20]["metrics"] == {"eval_loss": 0.3} and rows[20]["temporary"] is True  # from the sidecar
    assert rows[2]["bytes"] == 4 * np.prod(BIG) + 48 and rows[2]["path"] == str(base / "run-2")
    assert [rows[s]["best"] for s in (2, 10, 20)] == [1, 3, 2]  # --mode max
    assert rows[30]["status"] == "uncommitted" and rows[30]["bytes"] is None
    assert _cli("list", str(tmp_path)).stdout.strip() == f"no checkpoints under {tmp_path}"


def test_inspect_shows_specs_sizes_and_chunk_shapes(tmp_path):
    tree = {"w": put(jnp.arange(64.0, dtype=jnp.float32).reshape(8, 8), make_mesh((4, 2)), P("x", "y")), "step": 7}
    cc.save(tmp_path / "run-5", tree, step=5, pack_bytes=0)
    out = _cli("inspect", str(tmp_path / "run-5"))
    assert out.returncode == 0, out.stderr
    assert re.search(
        r"run-5: step 5, saved \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC, permanent, 1 item, 256 B$", out.stdout, re.M
    )
    assert "  w: array [8, 8] float32 spec=['x', 'y'], 256 B, chunk shape [2, 4] (8 chunks)\n" in out.stdout
    data = _json("inspect", str(tmp_path / "run-5"))
    leaves = {leaf["key"]: leaf for leaf in data["items"]["state"]["leaves"]}
    assert data["kind"] == "ckpt_callbacks" and data["step"] == 5 and data["temporary"] is False
    assert leaves["w"]["partition_spec"] == ["x", "y"] and leaves["w"]["chunk_shape"] == [2, 4]
    assert leaves["w"]["chunks"] == 8 and leaves["w"]["bytes"] == 256 and not leaves["w"]["packed"]
    assert leaves["step"] == {"key": "step", "kind": "scalar", "value_type": "int", "value": 7}


def test_inspect_says_what_a_path_holds_instead(tmp_path):
    base = _run_base(tmp_path)
    out = _cli("inspect", str(base))
    assert out.returncode == 0 and "is a base directory holding 3 committed checkpoints" in out.stdout
    assert re.search(r"^\s*10\s.*run-10$", out.stdout, re.M)
    data = _json("inspect", str(base))
    assert data["kind"] == "base" and [r["step"] for r in data["checkpoints"]] == [2, 10, 20, 30]
    (tmp_path / "empty").mkdir()
    (tmp_path / "mine" / "data").mkdir(parents=True)
    (tmp_path / "mine" / "config.yaml").write_text("lr: 1")
    _clean_error(_cli("inspect", str(tmp_path / "empty")), r"no committed checkpoint at \S+/empty: an empty directory$")
    _clean_error(_cli("inspect", str(tmp_path / "mine")), r"it holds config\.yaml, data, and no COMMITTED")
    _clean_error(_cli("inspect", str(base / "run-30")), r"no COMMITTED marker: a save that did not finish")
    _clean_error(_cli("inspect", str(tmp_path / "mine" / "config.yaml")), r"a file, not a checkpoint directory")


def test_verify_a_base_reports_every_damaged_leaf(tmp_path):
    base = _run_base(tmp_path)
    good = _cli("verify", str(base))
    assert good.returncode == 0 and good.stdout.splitlines()[-1] == "OK (3 checkpoints)", good.stdout
    assert "\r" not in good.stdout and "\x1b" not in good.stdout  # no progress bar in a pipe
    chunk = next((base / "run-10" / "state" / "params" / "big").rglob("c/*/*"))
    chunk.unlink()  # a missing chunk file reads as zeros: told apart from damage
    pack = base / "run-20" / "state" / "pack.0-0"
    raw = bytearray(pack.read_bytes())
    raw[3] ^= 1
    pack.write_bytes(bytes(raw))
    bad = _cli("verify", str(base))
    assert bad.returncode == 1, bad.stderr
    assert re.search(r"^  MISSING +\S+run-10/state: leaf 'params/big': 1 chunk file missing: 0\.0$", bad.stdout, re.M)
    assert re.search(r"^  CORRUPT +\S+run-20/state: leaf 'params/w' chunk 0\.0 .*crc32c", bad.stdout, re.M)
    assert bad.stdout.splitlines()[-1] == "DAMAGED: 2 of 3 checkpoints, 2 problems (1 missing, 1 corrupt)"
    report = _json("verify", str(base))
    kinds = {Path(c["path"]).name: [(p["kind"], p["leaf"]) for p in c["problems"]] for c in report["checkpoints"]}
    assert report["ok"] is False
    assert kinds == {"run-2": [], "run-10": [("missing", "params/big")], "run-20": [("corrupt", "params/w")]}
    one = _cli("verify", str(base / "run-2"))
    assert one.returncode == 0 and one.stdout.splitlines() == [
        f"{paths.parse(base / 'run-2').url}: 2 leaves, 2 chunks, 2.0 MiB checked",
        "OK",
    ]
    _clean_error(_cli("verify", str(base / "run-30")), "a save that did not finish")


def test_prune_is_a_dry_run_until_yes(tmp_path):
    base = tmp_path / "run"
    for step in (1, 2, 3, 4):
        cc.save(base / f"run-{step}", {"w": np.full(3, float(step))}, step=step, extras={"metrics": {"loss": 5 - step}})
    (base / "run-2" / "notes.txt").write_text("mine")  # not ours: survives the deletion of run-2
    args = ("prune", str(base), "--keep-last", "1", "--keep-best", "1", "--metric", "loss", "--mode", "max")
    dry = _cli(*args)
    assert dry.returncode == 0, dry.stderr
    assert re.search(r"^\s*2\s.*\s#2\s+delete\s+\S+run-2$", dry.stdout, re.M)
    assert (
        dry.stdout.splitlines()[-1]
        == "dry run: would delete 2 checkpoints (48 B), keep 2; run again with --yes to delete"
    )
    assert all((base / f"run-{s}" / "COMMITTED").exists() for s in (1, 2, 3, 4))
    plan = _json(*args)
    assert plan["dry_run"] and [r["action"] for r in plan["checkpoints"]] == ["keep", "delete", "delete", "keep"]
    done = _json(*args, "--yes")
    assert [Path(p).name for p in done["deleted"]] == ["run-2", "run-3"]
    assert [c.step for c in cc.list_checkpoints(base)] == [1, 4]
    assert sorted(os.listdir(base / "run-2")) == ["notes.txt"]
    _clean_error(_cli("prune", str(base), "--keep-best", "1"), "keep_best needs metric=")
    _clean_error(_cli("prune", str(tmp_path / "nope"), "--keep-last", "1"), "no such directory")


def test_plan_simulates_the_policy():
    data = _json("plan", "--every", "1000", "--until", "100000", "--every", "500", "--until", "2000", "--steps", "5000")
    assert [(s["step"], s["reason"]) for s in data["saves"]] == [
        (500, "every 500 steps"),
        (1000, "every 500 steps"),
        (1500, "every 500 steps"),
        (2000, "every 500 steps"),
        (3000, "every 1000 steps"),
        (4000, "every 1000 steps"),
        (5000, "every 1000 steps"),
    ]
    args = (
        "plan",
        "--every",
        "300",
        "--save-interval",
        "100",
        "--step-time",
        "1",
        "--steps",
        "1050",
        "--keep-last",
        "1",
    )
    timed = _json(*args)["saves"]
    assert [(s["step"], s["temporary"]) for s in timed[:4]] == [(101, True), (201, True), (300, False), (400, True)]
    assert timed[-1] == {"step": 1050, "time_s": 1050.0, "temporary": False, "reason": "on_train_end", "kept": True}
    assert [s["step"] for s in timed if s["kept"]] == [1050]  # temporaries go once a newer one commits
    text = _cli(*args).stdout
    assert re.search(r"^ 300\s+0:05:00\s+permanent\s+every 300 steps\s+deleted$", text, re.M)
    assert (
        text.splitlines()[-1]
        == "11 saves (4 permanent, 7 temporary); at the end, keeping --keep-last 1: 1 checkpoint (steps 1050)"
    )
    _clean_error(
        _cli("plan", "--every", "5", "--until", "10", "--until", "20", "--steps", "9"), "one --until per --every"
    )
    assert _json("plan", "--steps", "9")["saves"][0]["reason"] == "on_train_end"  # no schedule: the final save
    _clean_error(_cli("plan", "--every", "0", "--steps", "9"), "every must be a positive int")


def test_diff_two_checkpoints(tmp_path):
    a = {"w": np.arange(6.0), "b": np.zeros(3, np.float32), "n": 1, "gone": np.ones(2), "name": "x"}
    b = {
        "w": np.array([0.0, 1, 2, 3, 4, 7.5]),
        "b": np.zeros(4, np.float32),
        "n": 3,
        "new": np.ones(1),
        "name": "y",
    }
    cc.save(tmp_path / "run-1", a, step=1)
    cc.save(tmp_path / "run-2", b, step=2)
    data = _json("diff", str(tmp_path / "run-1"), str(tmp_path / "run-2"))
    assert [x["key"] for x in data["added"]] == ["new"] and [x["key"] for x in data["removed"]] == ["gone"]
    assert [(r["key"], r["a"]["shape"], r["b"]["shape"]) for r in data["reshaped"]] == [("b", [3], [4])]
    compared = {c["key"]: c for c in data["compared"]}
    assert (compared["w"]["max_abs_diff"], compared["w"]["differing"], compared["w"]["size"]) == (2.5, 1, 6)
    assert compared["n"]["max_abs_diff"] == 2.0 and compared["name"] == {
        "item": "state", "key": "name", "max_abs_diff": None, "equal": False, "differing": 1, "size": 1,
    }  # fmt: skip
    out = _cli("diff", str(tmp_path / "run-1"), str(tmp_path / "run-2"))
    assert out.returncode == 0 and re.search(r"^w\s+2\.5\s+1 of 6$", out.stdout, re.M)
    assert "reshaped  b: array [3] float32 -> array [4] float32" in out.stdout
    assert out.stdout.splitlines()[-1] == "3 leaves in both: 3 changed; 1 added, 1 removed, 1 reshaped"
    _clean_error(_cli("diff", str(tmp_path / "run-1"), str(tmp_path / "run-9")), "no such directory")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("list", "ftp://host/x"), "unsupported URL scheme 'ftp'"),
        (("inspect", "gs:/bucket/x"), "malformed scheme separator"),
        (("verify", "s3://b"), "needs a bucket of 3\\+ characters"),
        (("inspect", "memory://nothing/here"), "no committed checkpoint at memory://nothing/here: nothing is stored"),
    ],
)
def test_errors_are_one_line(args, match):
    _clean_error(_cli(*args), match)


def test_a_closed_pipe_exits_quietly(tmp_path):
    base = _run_base(tmp_path)
    exe = shlex.quote(EXE or "ckpt-callbacks")
    for command in (f"{exe} plan --every 1 --steps 6000", f"{exe} list {shlex.quote(str(base))}"):
        out = subprocess.run(
            f"set -o pipefail; {command} | head -1",
            shell=True,
            executable="/bin/bash",
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=os.getcwd()),
            check=False,
            timeout=300,
        )
        assert out.returncode == 0 and out.stderr == "" and len(out.stdout.splitlines()) == 1, out


def test_interrupt_exits_130():
    code = (
        "import os, signal, sys, threading\n"
        "from ckpt_callbacks import cli\n"
        "threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGINT)).start()\n"
        "sys.exit(cli.main(['plan', '--every', '100000', '--steps', '10000000']))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
        check=False,
        timeout=300,
    )
    assert out.returncode == 130 and "Traceback" not in out.stderr, out


def test_hostile_inputs_give_one_line_errors_not_tracebacks(tmp_path):
    """Found by a hostile review: a non-UTF-8 directory name in a base, an infinite step time,
    and non-finite numbers in --json output."""
    base = tmp_path / "base"
    base.mkdir()
    os.mkdir(os.fsencode(str(base)) + b"/\xfe\xfd")
    out = subprocess.run([EXE, "list", str(base)], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "Traceback" not in out.stderr
    for bad in ("inf", "nan"):
        out = subprocess.run(
            [EXE, "plan", "--steps", "100", "--step-time", bad, "--save-interval", "5"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 2 and out.stderr.startswith("error: ") and "Traceback" not in out.stderr


def test_a_file_as_base_and_too_many_plan_steps_are_refused(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for command in ("list", "prune"):
        out = _cli(command, str(afile), *(["--keep-last", "1"] if command == "prune" else []))
        assert out.returncode == 2 and "it is a file, not a directory" in out.stderr, out.stderr
    out = _cli("plan", "--steps", "1000000000", "--every", "1000000")
    assert out.returncode == 2 and "plan simulates every step, at most 10,000,000" in out.stderr


def test_usage_errors_and_extreme_values_are_one_line(tmp_path):
    """Found by a hostile review: argparse's usage text, OverflowError from extreme floats, a
    traceback for a --leaves file that is not an object, and metrics no float can hold."""
    _clean_error(_cli("plan", "--steps", "ten"), r"^error: ckpt-callbacks plan: argument --steps: invalid int value")
    _clean_error(_cli("plan", "--steps", "10", "--save-interval", "1e308"), "--save-interval 1e\\+308: expected")
    leaves = tmp_path / "leaves.json"
    leaves.write_text("[]")
    _clean_error(_cli("plan-layout", "--leaves", str(leaves), "--hosts", "1"), "expected a JSON object, found \\[\\]")
    base = tmp_path / "run"
    cc.save(base / "run-1", {"w": np.zeros(2)}, step=1)
    (base / "metrics").mkdir()
    (base / "metrics" / "run-1.json").write_text('{"loss": ' + "9" * 400 + "}")
    out = _cli("list", str(base))
    assert out.returncode == 0 and re.search(r"^\s*1\s.*\sloss=\?\s+\S*run-1$", out.stdout, re.M), out


@pytest.mark.parametrize("marker", [b"", b"{bad", b"\xff\xfe", b"[]"])
def test_verify_a_base_reports_a_checkpoint_whose_marker_is_emptied_or_garbage(tmp_path, marker):
    """Found by a hostile review: ``verify BASE`` said OK when a run-<step>'s COMMITTED was
    truncated to nothing (the listing skips it), while ``verify BASE/run-20`` failed."""
    base = tmp_path / "run"
    for step in (10, 20):
        cc.save(base / f"run-{step}", {"w": np.ones(4)}, step=step)
    (base / "run-20" / "COMMITTED").write_bytes(marker)
    out = _cli("verify", str(base))
    assert out.returncode == 1, out.stdout + out.stderr
    assert re.search(r"run-20: not re-read:\s+INVALID\s+\S*run-20/COMMITTED", out.stdout), out.stdout
    assert "DAMAGED: 1 of 2 checkpoints" in out.stdout and "run-10: 1 leaf" in out.stdout, out.stdout
    report = _json("verify", str(base))
    assert not report["ok"] and [c["path"].endswith("run-20") for c in report["checkpoints"] if c["problems"]] == [True]
    assert (base / "run-20" / "COMMITTED").read_bytes() == marker  # verify modifies nothing
