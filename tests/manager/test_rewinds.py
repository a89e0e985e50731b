"""Rewinds are explicit: a restore older than the latest warns, skipped saves are logged, and
newer checkpoints go only when asked (``discard_newer=True``, ``ckpt-callbacks prune --after``)."""

from __future__ import annotations

import json
import logging
import os
import uuid

import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckpt_callbacks as cc
from ckpt_callbacks.cli import main as cli


def _state(step, trajectory=0.0):
    return {"w": jnp.arange(4.0) + step + trajectory}


def _every(base, n=10):
    return cc.Checkpointer(base, step_policies=[cc.CheckpointInterval(every=n)], handle_sigterm=False)


def _train(base, last, n=10):
    with _every(base, n) as ck:
        for step in range(1, last + 1):
            ck.on_step(_state(step), step=step)


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_restore_older_than_the_latest_warns_naming_the_newer_steps(tmp_path, caplog):
    base = str(tmp_path / "run")
    _train(base, 30)
    with _every(base) as ck, caplog.at_level(logging.WARNING, "ckpt_callbacks"):
        tree, meta = ck.restore(step=10)
    assert meta["step"] == 10 and tree["w"].tolist() == [10.0, 11.0, 12.0, 13.0]
    (warning,) = [w for w in _warnings(caplog) if "newer checkpoints" in w]
    assert "steps [20, 30]" in warning and "tries step 30 first" in warning
    assert "discard_newer=True" in warning and "--after 10 --yes" in warning
    assert cc.CheckpointReader(base).all_steps() == [10, 20, 30]  # nothing deleted by default


def test_a_restore_of_the_latest_or_by_path_warns_only_when_newer_exist(tmp_path, caplog):
    base = str(tmp_path / "run")
    _train(base, 20)
    with _every(base) as ck, caplog.at_level(logging.WARNING, "ckpt_callbacks"):
        ck.restore()
        ck.restore(step=20)
        assert not [w for w in _warnings(caplog) if "newer checkpoints" in w]
        ck.restore(path="run-10")
    assert [w for w in _warnings(caplog) if "newer checkpoints" in w and "steps [20]" in w]


def test_a_reader_restoring_an_older_step_is_an_evaluation_not_a_rewind(tmp_path, caplog):
    base = str(tmp_path / "run")
    _train(base, 20)
    with caplog.at_level(logging.WARNING, "ckpt_callbacks"):
        cc.CheckpointReader(base).restore(step=10)
    assert not _warnings(caplog)


def test_each_due_save_skipped_because_its_step_exists_is_a_warning(tmp_path, caplog):
    base = str(tmp_path / "run")
    _train(base, 30)
    with _every(base) as ck:
        ck.restore(step=10)
        with caplog.at_level(logging.WARNING, "ckpt_callbacks"):
            saved = [ck.on_step(_state(step, 0.5), step=step) for step in range(11, 41)]
    assert [s for s, ok in zip(range(11, 41), saved, strict=True) if ok] == [40]
    skipped = [w for w in _warnings(caplog) if "a checkpoint is due, but skipped" in w]
    assert len(skipped) == 2 and "step 20:" in skipped[0] and "step 30:" in skipped[1]
    assert "run-20" in skipped[0] and "discard_newer=True" in skipped[0]


def test_discard_newer_deletes_them_after_the_restore_and_the_schedule_resumes(tmp_path, caplog):
    base = str(tmp_path / "run")
    _train(base, 30)
    with _every(base) as ck:
        ck.record_metrics(30, {"loss": 0.1})
        with caplog.at_level(logging.WARNING, "ckpt_callbacks"):
            tree, meta = ck.restore(step=10, discard_newer=True)
        assert meta["step"] == 10 and ck.all_steps() == [10]
        assert [w for w in _warnings(caplog) if "discard_newer: deleted 2 checkpoint(s)" in w]
        assert not (tmp_path / "run" / "metrics" / "run-30.json").exists()
        saved = [s for s in range(10, 31) if ck.on_step(_state(s, 0.5), step=s)]
    assert saved == [20, 30]  # the restored step is not saved again; 20 and 30 are this trajectory's
    tree, meta = cc.CheckpointReader(base).restore()
    assert meta["step"] == 30 and tree["w"].tolist() == [30.5, 31.5, 32.5, 33.5]


def test_a_failed_restore_discards_nothing(tmp_path):
    base = str(tmp_path / "run")
    _train(base, 30)
    with _every(base) as ck:
        with pytest.raises(cc.RestoreMismatchError):
            ck.restore(step=10, discard_newer=True, template={"w": jnp.zeros(5)})
        with pytest.raises(cc.CheckpointNotFoundError):
            ck.restore(step=15, discard_newer=True)
        assert ck.all_steps() == [10, 20, 30]


def test_a_reader_refuses_discard_newer(tmp_path):
    base = str(tmp_path / "run")
    _train(base, 20)
    with pytest.raises(ValueError, match="a reader deletes nothing"):
        cc.CheckpointReader(base).restore(step=10, discard_newer=True)
    assert cc.CheckpointReader(base).all_steps() == [10, 20]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.sets(st.integers(1, 60), min_size=1, max_size=6), data=st.data())
def test_discard_newer_keeps_exactly_the_steps_up_to_the_restored_one(caplog, steps, data):
    base = f"memory://rewinds/{uuid.uuid4().hex}"
    for step in steps:
        cc.save(f"{base}/run-{step}", _state(step), step=step)
    back = data.draw(st.sampled_from(sorted(steps)))
    discard = data.draw(st.booleans())
    caplog.clear()
    with _every(base) as ck, caplog.at_level(logging.WARNING, "ckpt_callbacks"):
        _, meta = ck.restore(step=back, discard_newer=discard)
        left = ck.all_steps()
    newer = sorted(s for s in steps if s > back)
    assert meta["step"] == back
    assert left == (sorted(s for s in steps if s <= back) if discard else sorted(steps))
    warned = [w for w in _warnings(caplog) if "newer checkpoints" in w]
    assert bool(warned) == (bool(newer) and not discard)
    if warned:
        assert f"steps {newer}" in warned[0]


def test_prune_after_lists_then_deletes_the_newer_checkpoints(tmp_path, capsys):
    base = tmp_path / "run"
    _train(str(base), 40)
    (base / "run-30" / "notes.txt").write_text("mine")  # not ours: survives the deletion of run-30
    assert cli(["prune", str(base), "--after", "20", "--json"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["dry_run"] and [(r["step"], r["action"]) for r in dry["checkpoints"]] == [
        (10, "keep"),
        (20, "keep"),
        (30, "delete"),
        (40, "delete"),
    ]
    assert cc.CheckpointReader(str(base)).all_steps() == [10, 20, 30, 40]
    assert cli(["prune", str(base), "--after", "20"]) == 0
    assert "would delete 2 checkpoints" in capsys.readouterr().out
    assert cli(["prune", str(base), "--after", "20", "--yes"]) == 0
    assert "deleted 2 checkpoints" in capsys.readouterr().out
    assert cc.CheckpointReader(str(base)).all_steps() == [10, 20]
    assert sorted(p.name for p in (base / "run-30").iterdir()) == ["notes.txt"]


def test_prune_after_combines_with_the_keep_rules(tmp_path, capsys):
    base = tmp_path / "run"
    _train(str(base), 50)
    assert cli(["prune", str(base), "--after", "30", "--keep-last", "1", "--yes", "--json"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert [r["step"] for r in done["checkpoints"] if r["action"] == "delete"] == [10, 20, 40, 50]
    assert "--after" in done["policy"] and "--keep-last 1" in done["policy"]
    assert cc.CheckpointReader(str(base)).all_steps() == [30]
    assert cli(["prune", str(base), "--after", "-1"]) == 2
    assert "--after -1" in capsys.readouterr().err


# --- a restore of a checkpoint outside the base -------------------------------------------


@pytest.mark.parametrize("form", ["path", "url", "nested"])
def test_discard_newer_refuses_a_checkpoint_outside_the_base_and_deletes_nothing(tmp_path, form):
    base, other = str(tmp_path / "A"), str(tmp_path / "B")
    _train(base, 30)
    cc.save(f"{other}/run-5", _state(5), step=5)
    cc.save(f"{base}/sub/run-5", _state(5), step=5)  # inside the base, but not one of its checkpoints
    outside = {"path": f"{other}/run-5", "url": f"file://{other}/run-5", "nested": f"{base}/sub/run-5"}[form]
    with _every(base) as ck:
        with pytest.raises(ValueError, match="discard_newer") as refused:
            ck.restore(path=outside, discard_newer=True)
        assert f"{outside.removeprefix('file://')} is not a checkpoint of the base file://{base}" in str(refused.value)
        assert ck.all_steps() == [10, 20, 30]  # nothing deleted, nothing restored
        assert [s for s in range(31, 41) if ck.on_step(_state(s), step=s)] == [40]
    assert cc.CheckpointReader(base).all_steps() == [10, 20, 30, 40]


@pytest.mark.parametrize("form", ["path", "url", "relative"])
def test_discard_newer_after_a_restore_of_one_of_the_base_s_own_checkpoints(tmp_path, form):
    base = str(tmp_path / "A")
    _train(base, 30)
    own = {"path": f"{base}/run-20", "url": f"file://{base}/run-20", "relative": "run-20"}[form]
    with _every(base) as ck:
        _, meta = ck.restore(path=own, discard_newer=True)
        assert meta["step"] == 20 and ck.all_steps() == [10, 20]


def test_a_restore_from_outside_the_base_warns_of_the_base_s_newer_steps_without_discard_newer(tmp_path, caplog):
    base, other = str(tmp_path / "A"), str(tmp_path / "B")
    _train(base, 30)
    cc.save(f"{other}/run-5", _state(5), step=5)
    with _every(base) as ck, caplog.at_level(logging.WARNING, "ckpt_callbacks"):
        _, meta = ck.restore(path=f"{other}/run-5")
    assert meta["step"] == 5
    (warning,) = [w for w in _warnings(caplog) if "newer checkpoints" in w]
    assert f"from file://{other}/run-5, outside file://{base}" in warning and "steps [10, 20, 30]" in warning
    assert f"prune file://{base} --after 5 --yes" in warning and "discard_newer=True" not in warning
    assert cc.CheckpointReader(base).all_steps() == [10, 20, 30]


# --- a forced save at a step saved already -------------------------------------------------


def test_a_forced_save_at_a_step_saved_already_is_skipped_and_logged(tmp_path, caplog):
    """Logged at INFO: the loop's ``on_train_end(total)`` after its last due save at ``total`` is
    the common case (the notebook's), and is no trajectory problem worth a WARNING."""
    base = str(tmp_path / "run")
    with _every(base) as ck:
        assert ck.on_step(_state(10), step=10)
        ck.wait_until_finished()
        with caplog.at_level(logging.INFO, "ckpt_callbacks"):
            assert ck.on_step(_state(99), step=10, force=True) is False
            assert ck.on_step(_state(99), step=10) is False  # not asked for: the resume rule, quietly
    assert not _warnings(caplog)
    (info,) = [r.getMessage() for r in caplog.records if "a checkpoint is due, but skipped" in r.getMessage()]
    assert "step 10: a checkpoint is due, but skipped" in info and "saved, restored or skipped" in info
    assert cc.CheckpointReader(base).restore()[0]["w"].tolist() == _state(10)["w"].tolist()


# --- another writer's steps under the base (orbax) -----------------------------------------


def _orbax_run(base, steps):
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(base, options=ocp.CheckpointManagerOptions(max_to_keep=None)) as mngr:
        for step in steps:
            mngr.save(step, args=ocp.args.StandardSave({"w": jnp.arange(4.0) + step}))


def test_after_a_rewind_this_run_never_writes_a_step_orbax_holds(tmp_path, caplog):
    base = str(tmp_path / "run")
    _orbax_run(base, (1, 2, 3))
    with cc.Checkpointer(base, step_policies=[cc.CheckpointInterval(every=1)], handle_sigterm=False) as ck:
        with caplog.at_level(logging.WARNING, "ckpt_callbacks"):
            _, meta = ck.restore(step=1, template={"w": jnp.zeros(4)})
            assert meta["step"] == 1
            (warning,) = [w for w in _warnings(caplog) if "newer checkpoints" in w]
            assert "steps [2, 3]" in warning and "not written by ckpt_callbacks" in warning
            assert "they stay the latest" in warning and f"move them out of file://{base}" in warning
            assert "discard_newer=True" not in warning  # it would not help
            caplog.clear()
            saved = [s for s in (2, 3, 4) if ck.on_step(_state(s, 0.5), step=s)]
        assert saved == [4]
        skipped = [w for w in _warnings(caplog) if "a checkpoint is due, but skipped" in w]
        assert len(skipped) == 2 and "step 2:" in skipped[0] and "orbax" in skipped[0]
        assert f"{base}/2" in skipped[0] and "move that checkpoint out" in skipped[0]
    assert sorted(n for n in os.listdir(base) if n.startswith("run-")) == ["run-4"]
    assert [(c.step, c.source) for c in cc.list_checkpoints(base)] == [
        (1, "orbax"),
        (2, "orbax"),
        (3, "orbax"),
        (4, "ckpt_callbacks"),
    ]


def test_discard_newer_leaves_orbax_s_steps_says_so_and_saves_none_beside_them(tmp_path, caplog):
    base = str(tmp_path / "run")
    _orbax_run(base, (1, 2, 3))
    cc.save(f"{base}/run-5", _state(5), step=5)
    with cc.Checkpointer(base, step_policies=[cc.CheckpointInterval(every=1)], handle_sigterm=False) as ck:
        with caplog.at_level(logging.WARNING, "ckpt_callbacks"):
            ck.restore(step=1, discard_newer=True, template={"w": jnp.zeros(4)})
        (left,) = [w for w in _warnings(caplog) if "discard_newer: left" in w]
        assert "Steps [2, 3]" in left and "stay the latest" in left and "move them out" in left
        assert ck.all_steps() == [1, 2, 3]
        assert not ck.on_step(_state(2), step=2) and not ck.on_step(_state(3), step=3)
        assert ck.on_step(_state(4), step=4)
    assert sorted(n for n in os.listdir(base) if n.startswith("run-")) == ["run-4"]


class _Steps:
    """Another writer's steps under one base: what a ``StepSource`` lists (``foreign-<step>``)."""

    name = "test-writer"

    def __init__(self) -> None:
        self.steps_of: dict[str, list[int]] = {}

    def open(self, loc, item):
        return None

    def steps(self, base):
        return [
            cc.CheckpointInfo(path=base.join(f"foreign-{s}").url, step=s, timestamp=0.0)
            for s in self.steps_of.get(base.url, [])
        ]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ours=st.sets(st.integers(1, 12), min_size=1, max_size=5),
    theirs=st.sets(st.integers(1, 12), max_size=5),
    data=st.data(),
)
def test_no_save_ever_lands_on_a_step_another_writer_holds(caplog, ours, theirs, data):
    from ckpt_callbacks import restoring

    base = f"memory://rewinds/{uuid.uuid4().hex}"
    for step in ours:
        cc.save(f"{base}/run-{step}", _state(step), step=step)
    back = data.draw(st.sampled_from(sorted(ours)))
    discard = data.draw(st.booleans())
    source = _Steps()
    source.steps_of[base] = sorted(theirs)
    restoring.register_source(source)
    try:
        caplog.clear()
        with _every(base, 1) as ck, caplog.at_level(logging.WARNING, "ckpt_callbacks"):
            ck.restore(step=back, discard_newer=discard)
            saved = [s for s in range(back + 1, 14) if ck.on_step(_state(s, 0.5), step=s)]
        written = sorted(c.step for c in cc.list_checkpoints(base) if c.source == "ckpt_callbacks")
    finally:
        restoring.unregister_source("test-writer")
    kept = {s for s in ours if s <= back or not discard}
    assert saved == [s for s in range(back + 1, 14) if s not in theirs and s not in kept]
    assert written == sorted(kept | set(saved))
    skipped = [w for w in _warnings(caplog) if "a checkpoint is due, but skipped" in w]
    assert len(skipped) == len(range(back + 1, 14)) - len(saved)


# --- discard_newer of a damaged checkpoint; restore(path=) of an orbax step ---------------


@pytest.mark.parametrize("marker", [b"", b"\x00\xffzz", b"{}"])
def test_discard_newer_deletes_a_damaged_checkpoint_whole_and_nothing_of_the_users(tmp_path, caplog, marker):
    base = tmp_path / "run"
    _train(str(base), 30)
    (base / "run-30" / "COMMITTED").write_bytes(marker)
    (base / "run-30" / "notes.txt").write_text("mine")
    ck = _every(str(base))
    with caplog.at_level(logging.WARNING, "ckpt_callbacks"):
        assert ck.restore(discard_newer=True)[1]["step"] == 20
    assert sorted(p.name for p in (base / "run-30").iterdir()) == ["notes.txt"]
    assert any("deleted 1 checkpoint(s)" in w and "run-30" in w for w in _warnings(caplog))
    assert ck.on_step(_state(30, 1.0), step=30)
    ck.close()
    assert cc.restore(str(base / "run-30"))["w"].tolist() == (jnp.arange(4.0) + 31.0).tolist()


def test_restore_of_an_orbax_step_by_path_is_its_restore_by_step(tmp_path, caplog):
    """``restore(path=<base>/20)`` of orbax's step 20: its step, the rewind warning, discard_newer
    and the schedule, as ``restore(step=20)``."""
    base = str(tmp_path / "run")
    _orbax_run(base, (20, 40))
    for step in (10, 30):
        cc.save(f"{base}/run-{step}", _state(step), step=step)
    ck = _every(base)
    with caplog.at_level(logging.WARNING, "ckpt_callbacks"):
        tree, meta = ck.restore(path=f"{base}/20", template=_state(0))
    assert meta["step"] == 20 and tree["w"].tolist() == (jnp.arange(4.0) + 20).tolist()
    assert any("restored step 20" in w and "steps [30, 40]" in w for w in _warnings(caplog))
    assert ck.on_step(_state(20), step=20) is False  # the restored step is not saved again
    ck.close()
    ck = _every(base)
    assert ck.restore(path="20", template=_state(0), discard_newer=True)[1]["step"] == 20
    assert sorted(os.listdir(base)) == ["20", "40", "run-10"]
    ck.close()
