"""What a careless user passes ``restore`` and the CLI, from issue 21's hostile review.

Arguments no checkpoint could satisfy (a regex that does not compile, a byte bound below 1,
a ``missing=`` that is no tree) are refused before anything is read, naming the argument;
``verify`` prints only what it really checked; ``plan`` tells a run of no schedule apart from
one that never saves.
"""

from __future__ import annotations

import functools
import json
import os
import re
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import ckpt_callbacks as cc
from ckpt_callbacks import storage
from ckpt_callbacks.cli._main import main as cli
from conftest import make_mesh

TREE = {"w": jnp.arange(8.0), "e": {"k": jnp.ones(8)}}


def _base(tmp_path: Path) -> str:
    base = os.fspath(tmp_path / "b")
    for step in (1, 2):
        cc.save(f"{base}/run-{step}", {"w": TREE["w"] * step, "e": {"k": TREE["e"]["k"] * step}}, step=step)
    return base


def _untouched(base: str) -> dict[str, bytes]:
    """Every file under ``base``, to show a refused call changed nothing."""
    out = {}
    for root, _, files in os.walk(base):
        for name in files:
            out[os.path.join(root, name)] = Path(root, name).read_bytes()
    return out


BAD_REGEXES = ["(", "[a-", "*x", "a{2,1}", "(?P<n>", "\\"]


@pytest.mark.parametrize("pattern", BAD_REGEXES)
def test_a_regex_that_does_not_compile_is_refused_naming_it(tmp_path, pattern):
    base = _base(tmp_path)
    template = {"w": jnp.zeros(8), "e": {"k": jnp.zeros(8)}}
    before = _untouched(base)
    ck = cc.Checkpointer(base, handle_sigterm=False)
    for kw in ({"rename": [(pattern, "x")]}, {"drop": [pattern]}, {"rename": [(pattern, "x")], "template": template}):
        with pytest.raises(ValueError, match=rf"^{next(iter(kw))}\[0\]: pattern {re.escape(repr(pattern))} is not a"):
            ck.restore(**kw)
        with pytest.raises(ValueError, match=re.escape(repr(pattern))):
            cc.restore(f"{base}/run-2", **kw)
    with pytest.raises(cc.ShardingRuleError, match=rf"rules\[1\]: pattern {re.escape(repr(pattern))} is not a valid"):
        ck.restore(mesh=make_mesh((8,), ("x",)), rules=[("w", P("x")), (pattern, P())])
    ck.close()
    assert _untouched(base) == before


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"max_host_bytes": -1}, r"max_host_bytes=-1: expected a number of bytes >= 1, or None"),
        ({"max_host_bytes": 0}, r"max_host_bytes=0: expected"),
        ({"max_host_bytes": float("nan")}, r"max_host_bytes=nan: expected"),
        ({"max_host_bytes": True}, r"max_host_bytes=True: expected"),
        ({"max_host_bytes": "1GiB"}, r"max_host_bytes='1GiB': expected"),
        ({"missing": 3, "template": {**TREE, "new": jnp.zeros(1)}}, r"missing= gives a single int, no leaf of the"),
        ({"missing": {"nope": 1}, "template": {**TREE, "new": jnp.zeros(1)}}, r"missing= gives \['nope'\], no leaf"),
        ({"missing": {"new": jnp.zeros(1)}}, r"missing= restructure a restore into template=, and no template"),
        ({"rename": [("w", "v")], "drop": True}, r"rename= and drop= restructure a restore into template="),
        ({"rename": ("w", "v"), "template": TREE}, r"rename\[0\] = 'w': expected a \(regex, replacement\) pair"),
        (
            {"drop": "aux", "template": TREE},
            r"drop='aux': expected True, False or a list of regexes \(drop=\['aux'\]\)",
        ),
        ({"rules": [("w", None)], "mesh": None}, r"rules\[0\] = \('w', None\): expected a PartitionSpec"),
    ],
)
def test_arguments_no_checkpoint_could_satisfy_are_refused_before_any_read(tmp_path, kw, match):
    base = _base(tmp_path)
    before = _untouched(base)
    with pytest.raises(ValueError, match=match):
        cc.restore(f"{base}/run-2", **kw)
    with pytest.raises(ValueError, match=match):  # a Checkpointer never falls back past them
        cc.Checkpointer(base, handle_sigterm=False).restore(**kw)
    with pytest.raises(ValueError, match=match):  # refused before the path is even looked at
        cc.restore(f"{base}/run-99", **kw)
    assert _untouched(base) == before


def test_a_missing_tree_of_the_template_s_structure_still_fills(tmp_path):
    base = _base(tmp_path)
    template = {**TREE, "new": jnp.zeros(2)}
    fresh = {"w": jnp.zeros(8), "e": {"k": jnp.zeros(8)}, "new": jnp.full(2, 7.0)}
    for missing in (fresh, {"new": jnp.full(2, 7.0)}):  # the whole fresh state, or just what is new
        restored = cc.restore(f"{base}/run-2", template=template, missing=missing)
        assert restored["new"].tolist() == [7.0, 7.0] and restored["w"].tolist() == (TREE["w"] * 2).tolist()
    assert cc.restore(f"{base}/run-2", max_host_bytes=1)["w"].tolist() == (TREE["w"] * 2).tolist()


@functools.cache
def _saved() -> str:
    url = "memory://tests/hostile21/patterns"
    cc.save(url, TREE, step=1)
    return url


@settings(max_examples=60, deadline=None)
@given(pattern=st.text(st.sampled_from("()[]{}*+?\\|^$.aw-,:<>P"), min_size=1, max_size=6))
@example(pattern="[[")  # compiles, with a FutureWarning
def test_any_pattern_restores_or_is_refused_naming_it(pattern):
    with warnings.catch_warnings():  # '[[' compiles with a FutureWarning ("possible nested set"), not an error
        warnings.simplefilter("ignore", FutureWarning)
        _pattern_restores_or_is_refused(pattern)


def _pattern_restores_or_is_refused(pattern):
    try:
        re.compile(pattern)
        compiles = True
    except re.error:
        compiles = False
    template = {"w": jnp.zeros(8), "e": {"k": jnp.zeros(8)}}
    try:
        restored = cc.restore(_saved(), template=template, drop=[pattern], rename=[(pattern, r"\g<0>")])
    except ValueError as e:
        assert not compiles and repr(pattern) in str(e), e
    else:
        assert compiles and restored["w"].tolist() == TREE["w"].tolist()


def _verify(capsys, path: str) -> tuple[int, list[str]]:
    code = cli(["verify", path])
    return code, capsys.readouterr().out.splitlines()


def test_verify_prints_only_what_it_checked(tmp_path, capsys):
    base = Path(_base(tmp_path))
    cc.save(base / "run-3", {"w": jnp.arange(100.0), "k": jnp.ones(4)}, step=3, pack_bytes=0)
    url = storage.parse(os.fspath(base / "run-3")).url
    code, lines = _verify(capsys, os.fspath(base / "run-3"))
    assert code == 0 and lines == [f"{url}: 2 leaves, 2 chunks, 416 B checked", "OK"]

    next((base / "run-3" / "state" / "w").rglob("c/*")).unlink()
    code, lines = _verify(capsys, os.fspath(base / "run-3"))
    assert code == 1 and lines[0] == f"{url}: 1 of 2 leaves intact (1 chunk, 16 B checked); 1 damaged:", lines
    assert lines[1].startswith("  MISSING") and "'w'" in lines[1]

    next((base / "run-3" / "state" / "k").rglob("c/*")).unlink()
    code, lines = _verify(capsys, os.fspath(base / "run-3"))
    assert code == 1 and lines[0] == f"{url}: 2 leaves re-read, none intact:", lines
    assert "0 chunks" not in "\n".join(lines) and "0 B checked" not in "\n".join(lines)

    (base / "run-2" / "metadata.json").write_text("{")  # nothing of it can be re-read
    code, lines = _verify(capsys, os.fspath(base / "run-2"))
    assert code == 1 and lines[0].endswith("/run-2: not re-read:"), lines
    assert cli(["verify", os.fspath(base / "run-3"), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)["checkpoints"][0]
    assert (report["leaves"], report["chunks"], report["bytes_read"]) == (2, 0, 0)


def _plan(capsys, *args: str) -> tuple[int, str]:
    code = cli(["plan", *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_plan_without_a_schedule_still_shows_the_final_save(capsys):
    code, out = _plan(capsys, "--steps", "100")
    assert code == 0 and "nothing would ever be saved" not in out, out
    assert re.search(r"^\s*100\s.*on_train_end", out, re.M), out
    assert "1 save (1 permanent, 0 temporary)" in out
    code, out = _plan(capsys, "--steps", "100", "--no-final")
    assert code == 0 and "0 saves" in out, out
    assert "no --every schedule; no --save-interval; --no-final: no on_train_end save" in out
    assert cli(["plan", "--steps", "100", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(s["step"], s["reason"]) for s in data["saves"]] == [(100, "on_train_end")]


def test_the_refused_file_is_left_as_it_was(tmp_path):
    base = _base(tmp_path)
    before = _untouched(base)
    with pytest.raises(ValueError):
        cc.restore(f"{base}/run-1", template=TREE, missing=np.float32(3))
    assert _untouched(base) == before
