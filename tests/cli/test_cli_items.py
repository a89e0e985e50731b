"""``ckpt-callbacks diff`` and ``inspect`` on checkpoints of several items and on keys that hold
a '/': every item compared, and a flat ``"a/b"`` never read as ``a -> b``."""

from __future__ import annotations

import json
import re

import numpy as np
import orbax.checkpoint as ocp
import pytest

import ckpt_callbacks as cc
from ckpt_callbacks.cli._main import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _json(capsys, *argv: str):
    code, out, err = _run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def two_runs(tmp_path):
    """A user's ``save_items`` at two steps: items ``model`` and ``opt`` in both, ``data`` in the first."""
    a, b = tmp_path / "run-1", tmp_path / "run-2"
    cc.save_items(a, {"model": {"w": np.arange(4.0)}, "opt": {"mu": np.zeros(3)}, "data": {"pos": 7}}, step=1)
    cc.save_items(b, {"model": {"w": np.arange(4.0) + 0.5}, "opt": {"mu": np.zeros(3), "nu": np.ones(2)}}, step=2)
    return str(a), str(b)


def test_diff_compares_every_item_both_checkpoints_have(two_runs, capsys):
    data = _json(capsys, "diff", *two_runs)
    assert data["items"] == [{"a": "model", "b": "model"}, {"a": "opt", "b": "opt"}]
    assert data["items_only_in_a"] == ["data"] and data["items_only_in_b"] == []
    compared = {(c["item"], c["key"]): (c["max_abs_diff"], c["differing"]) for c in data["compared"]}
    assert compared == {("model", "w"): (0.5, 4), ("opt", "mu"): (0.0, 0)}
    assert [(x["item"], x["key"]) for x in data["added"]] == [("opt", "nu")] and data["removed"] == []
    code, text, _ = _run(capsys, "diff", *two_runs)
    assert code == 0
    assert re.search(r"^item 'model':\n.*\n.*\n  w\s+0\.5\s+4 of 4$", text, re.M), text
    assert re.search(r"^item 'opt':\n  added     nu: array \[2\] float64$", text, re.M), text
    assert "only in A: 1 item 'data'" in text
    assert text.splitlines()[-1] == "2 leaves in both of 2 items: 1 changed; 1 added, 0 removed, 0 reshaped"


def test_diff_item_picks_one_and_a_wrong_one_lists_the_items(two_runs, capsys):
    data = _json(capsys, "diff", *two_runs, "--item", "opt")
    assert data["items"] == [{"a": "opt", "b": "opt"}] and [c["key"] for c in data["compared"]] == ["mu"]
    code, _, err = _run(capsys, "diff", *two_runs, "--item", "state")
    assert code == 2 and re.fullmatch(r"error: .*run-1 has no item 'state'; its items: model, opt, data\n", err), err


def test_diff_of_one_item_prints_as_it_always_has(tmp_path, capsys):
    cc.save(tmp_path / "run-1", {"w": np.arange(3.0)}, step=1)
    cc.save(tmp_path / "run-2", {"w": np.arange(3.0) * 2}, step=2)
    code, text, _ = _run(capsys, "diff", str(tmp_path / "run-1"), str(tmp_path / "run-2"))
    assert code == 0 and "item 'state'" not in text and re.search(r"^w\s+2\s+2 of 3$", text, re.M), text
    assert text.splitlines()[-1] == "1 leaf in both: 1 changed; 0 added, 0 removed, 0 reshaped"


def test_diff_pairs_our_state_with_an_orbax_default_item(tmp_path, capsys):
    cc.save(tmp_path / "ours", {"w": np.arange(3.0)}, step=1)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "theirs", {"w": np.arange(3.0) + 1})
    data = _json(capsys, "diff", str(tmp_path / "ours"), str(tmp_path / "theirs"))
    assert data["items"] == [{"a": "state", "b": "default"}]
    assert [(c["key"], c["max_abs_diff"], c["item_b"]) for c in data["compared"]] == [("w", 1.0, "default")]


@pytest.fixture
def odd_keys(tmp_path):
    """A flat key holding a '/' beside a nested pair of the same letters, and keys with '%' and ''."""
    tree = {"a/b": np.zeros(2), "a": {"b": np.ones(2)}, "100%": np.full(2, 3.0), "": {"x": np.full(2, 4.0)}}
    cc.save(tmp_path / "run-1", tree, step=1)
    cc.save(tmp_path / "run-2", {**tree, "a/b": np.full(2, 9.0)}, step=2)
    return str(tmp_path / "run-1"), str(tmp_path / "run-2")


def test_inspect_tells_a_flat_slash_key_from_a_nested_one(odd_keys, capsys):
    data = _json(capsys, "inspect", odd_keys[0])
    assert [leaf["key"] for leaf in data["items"]["state"]["leaves"]] == ["%/x", "100%25", "a/b", "a%2Fb"]
    code, text, _ = _run(capsys, "inspect", odd_keys[0])
    assert code == 0 and re.search(r"^  a%2Fb: array \[2\] float64", text, re.M)
    assert re.search(r"^  a/b: array \[2\] float64", text, re.M)


def test_restore_keys_select_what_inspect_shows(odd_keys):
    path = odd_keys[0]
    assert cc.restore(path, keys=["a%2Fb"]).keys() == {"a/b"}
    assert list(cc.restore(path, keys=["a/b"])) == ["a"]
    assert cc.restore(path, keys="100%25")["100%"].tolist() == [3.0, 3.0]
    assert cc.restore(path, keys="%/x")[""]["x"].tolist() == [4.0, 4.0]
    with pytest.raises(cc.RestoreMismatchError, match=r"no leaf under key 'a%2Fc'; top-level keys: \['%', '100%25', "):
        cc.restore(path, keys=["a%2Fc"])
    with pytest.raises(cc.RestoreMismatchError, match=r"keys: key '100%': part '100%' has a '%' that is not %25"):
        cc.restore(path, keys=["100%"])


def test_diff_compares_a_flat_slash_key_and_a_nested_one_apart(odd_keys, capsys):
    data = _json(capsys, "diff", *odd_keys)
    compared = {c["key"]: c["max_abs_diff"] for c in data["compared"]}
    assert compared == {"%/x": 0.0, "100%25": 0.0, "a/b": 0.0, "a%2Fb": 9.0}
