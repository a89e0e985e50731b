"""The hostile review of the local tier, as tests: each once broke a promise of the README."""

from __future__ import annotations

import logging
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import ckpt_callbacks as cc
from ckpt_callbacks.cli import main as cli_main
from ckpt_callbacks.manager._local import _recover
from conftest import assert_tree_equal, make_mesh, put


def _state(step, mesh, trajectory=0):
    value = step + 1000 * trajectory
    return {"w": put(jnp.arange(64.0).reshape(8, 8) * value, mesh, P("x")), "n": value}


def _ck(root, base="persistent", persistent_every=100, local_every=2):
    return cc.Checkpointer(
        str(root / base),
        step_policies=[cc.CheckpointInterval(every=persistent_every)],
        local=cc.LocalTier(str(root / "local"), step_policies=[cc.CheckpointInterval(every=local_every)]),
        handle_sigterm=False,
    )


def _train(ck, steps, mesh, trajectory=0):
    states = {}
    for step in steps:
        states[step] = _state(step, mesh, trajectory)
        ck.on_step(states[step], step=step)
    ck.close()
    return states


def _restore(ck, mesh):
    return ck.restore_or_init(lambda: _state(0, mesh), template=_state(0, mesh))


def _flip_data(part):
    raw = bytearray((part / "data.bin").read_bytes())
    raw[3] ^= 0x40
    (part / "data.bin").write_bytes(bytes(raw))


def test_another_base_local_steps_are_never_restored_into_a_new_run(tmp_path):
    mesh = make_mesh((4, 2))
    _train(_ck(tmp_path, base="run-a"), range(1, 7), mesh)
    ck = _ck(tmp_path, base="run-b")
    with pytest.raises(cc.RestoreMismatchError, match="another base") as e:
        _restore(ck, mesh)
    assert "not starting fresh" in str(e.value)
    ck.close()


def test_a_damaged_newest_local_step_falls_back_to_the_older_local_step(tmp_path):
    mesh = make_mesh((4, 2))
    states = _train(_ck(tmp_path), range(1, 7), mesh)
    _flip_data(tmp_path / "local" / "step_6" / "set_0")
    ck = _ck(tmp_path)
    state, meta = _restore(ck, mesh)
    assert (meta["step"], meta["tier"]) == (4, "local")
    assert_tree_equal(state, states[4])
    ck.close()


def test_a_damaged_persistent_step_never_outranks_a_newer_local_one(tmp_path, caplog):
    mesh = make_mesh((4, 2))
    states = _train(_ck(tmp_path, persistent_every=4), range(1, 9), mesh)  # persistent 4, 8; local 6, 8
    _flip_data(tmp_path / "local" / "step_8" / "set_0")
    pack = tmp_path / "persistent" / "run-8" / "state" / "pack.0-0"  # small leaves are packed in one file
    pack.write_bytes(b"\0" * len(pack.read_bytes()))
    ck = _ck(tmp_path, persistent_every=4)
    with caplog.at_level(logging.INFO, "ckpt_callbacks"):
        state, meta = _restore(ck, mesh)
    assert (meta["step"], meta["tier"]) == (6, "local"), caplog.text
    assert_tree_equal(state, states[6])
    assert "the persistent tier restored step 4 only; trying local step 8" in caplog.text
    ck.close()


def test_a_step_that_goes_backwards_deletes_nothing_of_this_run(tmp_path, mesh42, caplog):
    ck = _ck(tmp_path)
    for step in (2, 4, 6):
        ck.on_step(_state(step, mesh42), step=step)
    with caplog.at_level(logging.WARNING, "ckpt_callbacks"):
        ck.on_step(_state(2, mesh42), step=2)
    ck.close()
    assert sorted(os.listdir(tmp_path / "local")) == [".claims", "step_4", "step_6"]
    assert "this run saved local step(s) [2, 4, 6] already" in caplog.text


@pytest.mark.parametrize("dtype", [object, "U3", "S4", [("a", "<i4")]])
def test_numpy_leaves_without_plain_bytes_are_refused_naming_the_leaf(tmp_path, mesh42, dtype):
    ck = _ck(tmp_path)
    state = {**_state(2, mesh42), "odd": np.zeros(2, dtype=dtype)}
    with pytest.raises(TypeError, match=r"leaf odd: a numpy array of dtype .* cannot be saved to the local tier"):
        ck.on_step(state, step=2)
    ck.close()
    assert not os.path.exists(tmp_path / "local" / "step_2")


def test_local_steps_no_template_can_restore_never_become_a_silent_fresh_start(tmp_path, mesh42):
    _train(_ck(tmp_path), range(1, 5), mesh42)

    def untraceable():
        return {"w": np.asarray(_state(0, mesh42)["w"]).tolist(), "n": "x"}  # str leaves: eval_shape refuses

    ck = _ck(tmp_path)
    with pytest.raises(cc.RestoreMismatchError, match="no template"):
        ck.restore_or_init(untraceable)
    ck.close()


def test_list_local_reports_a_bit_flipped_part_damaged(tmp_path, mesh42, capsys):
    _train(_ck(tmp_path), range(1, 7), mesh42)
    _flip_data(tmp_path / "local" / "step_6" / "set_0")
    code = cli_main(["list", str(tmp_path / "persistent"), "--local", str(tmp_path / "local")])
    out = capsys.readouterr().out
    assert code == 0
    assert "DAMAGED" in out and "crc32c" in out, out
    assert not any(line.split()[:1] == ["6"] and "complete" in line for line in out.splitlines()), out


def _row(step, set_index, save, at, fits=True):
    return {"step": step, "set": set_index, "save": save, "saved_at": at, "fits": fits, "host": [], "extras": None,
            "timestamp": None}  # fmt: skip


def test_two_trajectories_at_one_step_are_never_mixed():
    # p0 holds trajectory B's step 4 (set 0 and the replica of set 1); p1 holds A's (set 1, replica of set 0)
    table = [
        [_row(4, 0, "b", 20.0), _row(4, 1, "b", 20.0), _row(2, 0, "b", 10.0), _row(2, 1, "b", 10.0)],
        [_row(4, 1, "a", 5.0), _row(4, 0, "a", 5.0)],
    ]
    plan = _recover._plan(table, 2)
    first = plan["candidates"][0]
    assert (first["step"], first["save"], first["holders"]) == (4, "b", {0: 0, 1: 0})  # all of B, from p0
    assert any(step == 4 and "another trajectory" in why for step, why in plan["notes"])
    assert plan["rejected"] == []
    # only A's set 1 left: step 4 has no whole save, never A's set 1 with B's set 0
    table = [[_row(4, 0, "b", 20.0)], [_row(4, 1, "a", 5.0)]]
    assert _recover._plan(table, 2)["candidates"] == []


def test_a_copied_back_host_directory_of_another_trajectory_is_not_mixed_in(tmp_path, mesh42):
    _train(_ck(tmp_path), range(1, 5), mesh42, trajectory=1)
    shutil.copytree(tmp_path / "local", tmp_path / "old")
    shutil.rmtree(tmp_path / "local")
    _train(_ck(tmp_path), range(1, 5), mesh42, trajectory=2)
    shutil.copytree(tmp_path / "old" / "step_4", tmp_path / "local" / "step_4", dirs_exist_ok=True)  # over B's
    ck = _ck(tmp_path)
    state, meta = _restore(ck, mesh42)
    ck.close()
    step, n = meta["step"], int(state["n"])
    assert n in (step + 1000, step + 2000)  # one trajectory's state at that step, exactly
    assert_tree_equal(state, _state(step, mesh42, n // 1000))


def test_a_process_without_a_template_means_no_local_step_for_anyone():
    table = [[_row(4, 0, "b", 2.0), _row(4, 1, "b", 2.0)], [_row(4, 1, "b", 2.0, fits=False)]]
    plan = _recover._plan(table, 2, [None, "FileNotFoundError: no data on this host"])
    assert plan["candidates"] == []
    assert plan["rejected"] == [[4, "process 1 has no template (FileNotFoundError: no data on this host)"]]


def test_discard_newer_deletes_the_newer_local_steps_too(tmp_path, mesh42):
    _train(_ck(tmp_path, persistent_every=4), range(1, 13), mesh42)  # persistent 4, 8, 12; local 10, 12
    ck = _ck(tmp_path, persistent_every=4)
    _, meta = ck.restore(step=4, discard_newer=True, template=_state(0, mesh42))
    assert meta["step"] == 4
    assert sorted(os.listdir(tmp_path / "local")) == [".claims"]
    _, meta = _restore(ck, mesh42)  # a crash now resumes the kept trajectory, never the discarded one
    assert meta["step"] == 4
    ck.close()


@pytest.mark.parametrize(("saved", "template"), [("hello", 0.5), (None, 7), (3, "x"), (3, None), ("s", jnp.zeros(()))])
def test_a_host_leaf_of_another_kind_than_the_template_s_does_not_fit(saved, template):
    from ckpt_callbacks.manager._local._sets import Layout

    row = {"path": "n", "kind": "json", "value": saved}
    with pytest.raises(TypeError, match="leaf n: saved as"):
        Layout.of({"n": template}, saved=[row])
    assert Layout.of({"n": 1.5}, saved=[{**row, "value": 2}]).leaves[0].kind == "json"  # numbers fit numbers


def test_deleting_a_step_leaves_foreign_files_in_its_directory(tmp_path, mesh42):
    ck = _ck(tmp_path)
    ck.on_step(_state(4, mesh42), step=4)
    ck.close()
    (tmp_path / "local" / "step_4" / "notes").mkdir()
    (tmp_path / "local" / "step_4" / "notes" / "precious.txt").write_text("mine")
    ck = _ck(tmp_path)
    ck.on_step(_state(2, mesh42), step=2)  # a new trajectory: step 4's parts go, the notes stay
    ck.close()
    assert (tmp_path / "local" / "step_4" / "notes" / "precious.txt").read_text() == "mine"
    assert not (tmp_path / "local" / "step_4" / "set_0").exists()
