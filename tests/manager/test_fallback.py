"""Resuming past a damaged latest checkpoint: each kind of damage, through the public API."""

from __future__ import annotations

import json
import logging
import pathlib
import tempfile

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckpt_callbacks as cc
from conftest import forge_committed_json


def _state(step):
    return {"w": jnp.arange(8.0) + step, "b": jnp.full(3, float(step))}


def _init():
    return _state(0)


def _resume(ck, **kwargs):
    """``restore_or_init`` of a state on one device (its template says where it goes)."""
    return ck.restore_or_init(_init, template=_init(), **kwargs)


def _train(base, steps):
    """A run that saved every step (each chunk its own file, so one can be damaged alone)."""
    ck = cc.Checkpointer(base, step_policies=[cc.CheckpointInterval(every=1)], handle_sigterm=False, pack_bytes=0)
    for step in steps:
        ck.on_step(_state(step), step=step)
    ck.close()


def _chunk(ckpt: pathlib.Path) -> pathlib.Path:
    return ckpt / "state" / "w" / "c" / "0"


def _delete_chunk(ckpt):
    _chunk(ckpt).unlink()


def _flip_chunk(ckpt):
    raw = bytearray(_chunk(ckpt).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    _chunk(ckpt).write_bytes(bytes(raw))


def _truncate_manifest(ckpt):
    manifest = ckpt / "state" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:100])


def _forge_manifest(ckpt):
    data = json.loads((ckpt / "state" / "manifest.json").read_bytes())
    data["leaves"][0]["kind"] = "forged"
    forge_committed_json(str(ckpt), "state/manifest.json", json.dumps(data).encode())


def _damage_metadata(ckpt):
    (ckpt / "metadata.json").write_bytes(b'{"step": 1, "timestamp": "not json')


def _forge_metadata(ckpt):
    forge_committed_json(str(ckpt), "metadata.json", b'{"step": "three", "timestamp": 0}')


DAMAGE = {
    "chunk deleted": _delete_chunk,
    "chunk bit-flipped": _flip_chunk,
    "manifest truncated": _truncate_manifest,
    "manifest forged": _forge_manifest,
    "metadata damaged": _damage_metadata,
    "metadata forged": _forge_metadata,
}
ERRORS = (cc.CorruptCheckpointError, cc.CheckpointFormatError)


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_restore_or_init_falls_back_past_a_damaged_latest(tmp_path, caplog, kind):
    base = tmp_path / "run"
    _train(str(base), [1, 2, 3])
    DAMAGE[kind](base / "run-3")
    ck = cc.Checkpointer(str(base), step_policies=[cc.CheckpointInterval(every=1)], handle_sigterm=False)
    with caplog.at_level(logging.WARNING, "ckpt_callbacks"):
        state, meta = _resume(ck)
    assert meta["step"] == 2
    np.testing.assert_array_equal(state["w"], np.arange(8.0) + 2)
    skipped = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "run-3" in r.getMessage()]
    assert skipped, f"no WARNING names the damaged run-3: {[r.getMessage() for r in caplog.records]}"
    ck.close()


@pytest.mark.parametrize("kind", ["chunk deleted", "manifest forged"])
def test_restore_of_the_latest_falls_back_and_fallback_false_raises(tmp_path, caplog, kind):
    base = tmp_path / "run"
    _train(str(base), [1, 2])
    DAMAGE[kind](base / "run-2")
    reader = cc.CheckpointReader(str(base))
    with caplog.at_level(logging.WARNING, "ckpt_callbacks"):
        tree, meta = reader.restore()
    assert meta["step"] == 1 and tree["b"].tolist() == [1.0, 1.0, 1.0]
    assert any(
        "skipping the damaged checkpoint" in r.getMessage() and "run-2" in r.getMessage() for r in caplog.records
    )
    with pytest.raises(ERRORS, match="run-2"):
        reader.restore(fallback=False)
    with pytest.raises(ERRORS, match="run-2"):
        _resume(cc.Checkpointer(str(base), handle_sigterm=False), fallback=False)


def test_an_explicit_step_never_falls_back(tmp_path):
    base = tmp_path / "run"
    _train(str(base), [1, 2])
    _delete_chunk(base / "run-2")
    with pytest.raises(cc.CorruptCheckpointError, match="run-2"):
        cc.CheckpointReader(str(base)).restore(step=2)
    with pytest.raises(cc.CorruptCheckpointError, match="run-2"):
        cc.CheckpointReader(str(base)).restore(path="run-2")


def test_a_template_that_does_not_fit_is_raised_at_once(tmp_path, caplog):
    base = tmp_path / "run"
    _train(str(base), [1, 2])
    with caplog.at_level(logging.WARNING, "ckpt_callbacks"), pytest.raises(cc.RestoreMismatchError, match="shape"):
        cc.CheckpointReader(str(base)).restore(template={"w": jnp.zeros(9), "b": jnp.zeros(3)})
    assert not any("skipping" in r.getMessage() for r in caplog.records)


def test_when_nothing_restores_restore_or_init_raises_listing_every_one_tried(tmp_path):
    base = tmp_path / "run"
    _train(str(base), [1, 2, 3])
    _delete_chunk(base / "run-3")
    _flip_chunk(base / "run-2")
    _truncate_manifest(base / "run-1")
    ck = cc.Checkpointer(str(base), handle_sigterm=False)
    with pytest.raises(cc.CorruptCheckpointError, match=r"no checkpoint under .* restores") as raised:
        _resume(ck)
    for name in ("run-3", "run-2", "run-1"):
        assert name in str(raised.value)
    ck.close()


def test_every_metadata_damaged_is_no_fresh_start(tmp_path):
    base = tmp_path / "run"
    _train(str(base), [1, 2])
    _damage_metadata(base / "run-1")
    _damage_metadata(base / "run-2")
    with pytest.raises(cc.CorruptCheckpointError, match="run-2"):
        _resume(cc.Checkpointer(str(base), handle_sigterm=False))
    assert _resume(cc.Checkpointer(str(tmp_path / "empty"), handle_sigterm=False))[1] is None


def test_after_a_fallback_the_schedule_resumes_and_discard_newer_replaces_the_damaged(tmp_path):
    base = tmp_path / "run"
    _train(str(base), [1, 2, 3])
    _delete_chunk(base / "run-3")
    ck = cc.Checkpointer(str(base), step_policies=[cc.CheckpointInterval(every=1)], handle_sigterm=False)
    _, meta = _resume(ck, discard_newer=True)
    assert meta["step"] == 2 and ck.all_steps() == [1, 2]
    assert ck.on_step(_state(2), step=2) is False  # the restored step is not saved again
    assert ck.on_step(_state(30), step=3) is True
    ck.close()
    tree, meta = cc.CheckpointReader(str(base)).restore()
    assert meta["step"] == 3 and tree["w"].tolist() == (np.arange(8.0) + 30).tolist()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    count=st.integers(1, 4),
    damaged=st.dictionaries(st.integers(0, 3), st.sampled_from(sorted(DAMAGE)), max_size=4),
)
def test_the_newest_checkpoint_that_restores_is_resumed(caplog, count, damaged):
    """Any kinds of damage on any of the newest checkpoints (0: the newest)."""
    damaged = {age: kind for age, kind in damaged.items() if age < count}
    steps = list(range(1, count + 1))
    intact = [s for i, s in enumerate(reversed(steps)) if i not in damaged]
    with tempfile.TemporaryDirectory() as tmp:
        base = pathlib.Path(tmp) / "run"
        _train(str(base), steps)
        for age, kind in damaged.items():
            DAMAGE[kind](base / f"run-{steps[-1 - age]}")
        ck = cc.Checkpointer(str(base), handle_sigterm=False)
        caplog.clear()
        with caplog.at_level(logging.WARNING, "ckpt_callbacks"):
            if not intact:
                with pytest.raises(ERRORS, match=f"run-{steps[-1 - min(damaged)]}"):
                    _resume(ck)
                ck.close()
                return
            state, meta = _resume(ck)
        ck.close()
    assert meta["step"] == intact[0]
    np.testing.assert_array_equal(state["w"], np.arange(8.0) + intact[0])
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for age in damaged:
        if steps[-1 - age] > intact[0]:  # tried (or skipped by the listing) before the one resumed
            assert f"run-{steps[-1 - age]}" in warned


OUTCOMES = st.sampled_from(
    [
        {"kind": "ok", "step": 3},
        {"kind": "damaged", "step": 3, "type": "CorruptCheckpointError", "error": "chunk missing"},
        {"kind": "fatal", "step": 3, "type": "RestoreMismatchError", "error": "shape"},
    ]
)


@given(st.lists(OUTCOMES, min_size=1, max_size=5))
def test_processes_act_on_the_worst_outcome_of_any_of_them(outcomes):
    """What every process does after one attempt: any fatal error stops all, any damage moves
    all to the next older checkpoint, and only where every process restored is the result kept."""
    from ckpt_callbacks.manager._fallback import verdict

    agreed = verdict(outcomes)
    kinds = [o["kind"] for o in outcomes]
    worst = "fatal" if "fatal" in kinds else "damaged" if "damaged" in kinds else "ok"
    assert agreed["kind"] == worst
    if worst != "ok":
        assert agreed["pid"] == kinds.index(worst)


def test_processes_that_listed_different_steps_fail_together():
    from ckpt_callbacks.manager._fallback import verdict

    agreed = verdict([{"kind": "ok", "step": 3}, {"kind": "ok", "step": 2}])
    assert agreed["kind"] == "fatal" and "different steps [2, 3]" in agreed["error"]


# --- damage that keeps a checkpoint out of the listing --------------------------------------


def _delete_metadata(ckpt):
    (ckpt / "metadata.json").unlink()


def _empty_marker(ckpt):
    (ckpt / "COMMITTED").write_bytes(b"")


def _garbage_marker(ckpt):
    (ckpt / "COMMITTED").write_bytes(b"xx")


def _garbage_metadata(ckpt):
    (ckpt / "metadata.json").write_bytes(b"[]")


UNLISTED = {
    "metadata deleted": _delete_metadata,
    "metadata garbage": _garbage_metadata,
    "metadata damaged": _damage_metadata,
    "metadata forged": _forge_metadata,
    "marker empty": _empty_marker,
    "marker garbage": _garbage_marker,
}


@pytest.mark.parametrize("kind", sorted(UNLISTED))
def test_a_damaged_newest_the_listing_skips_is_raised_without_fallback_and_named_with_it(tmp_path, caplog, kind):
    base = tmp_path / "run"
    _train(str(base), [1, 2])
    UNLISTED[kind](base / "run-2")
    reader = cc.CheckpointReader(str(base))
    assert reader.all_steps() == [1]
    with pytest.raises(ERRORS, match="run-2"):
        reader.restore(fallback=False)
    with pytest.raises(ERRORS, match="run-2"):
        _resume(cc.Checkpointer(str(base), handle_sigterm=False), fallback=False)
    with caplog.at_level(logging.WARNING, "ckpt_callbacks"):
        tree, meta = reader.restore()
    assert meta["step"] == 1 and tree["b"].tolist() == [1.0, 1.0, 1.0]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith("restore: skipping the damaged checkpoint") and "run-2 (step 2)" in w for w in warned)
    assert any("fell back to step 1" in w and "past damaged step 2" in w for w in warned)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    count=st.integers(1, 4),
    damaged=st.dictionaries(st.integers(0, 3), st.sampled_from(sorted(DAMAGE | UNLISTED)), max_size=4),
)
def test_without_fallback_the_newest_committed_restores_or_its_damage_is_raised(count, damaged):
    """Any kinds of damage on any of the newest checkpoints (0: the newest), listed or not."""
    damaged = {age: kind for age, kind in damaged.items() if age < count}
    steps = list(range(1, count + 1))
    with tempfile.TemporaryDirectory() as tmp:
        base = pathlib.Path(tmp) / "run"
        _train(str(base), steps)
        for age, kind in damaged.items():
            (DAMAGE | UNLISTED)[kind](base / f"run-{steps[-1 - age]}")
        reader = cc.CheckpointReader(str(base))
        if 0 in damaged:
            with pytest.raises(ERRORS, match=f"run-{steps[-1]}"):
                reader.restore(fallback=False)
            return
        tree, meta = reader.restore(fallback=False)
    assert meta["step"] == steps[-1] and tree["b"].tolist() == [float(steps[-1])] * 3


# --- the loop after a fallback past a damaged marker, and restore's arguments on a fresh base --


@pytest.mark.parametrize("marker", [b"", b"xx", b"\x00\xffzz", b"{}", b"[1, 2]"])
def test_a_due_save_at_a_step_whose_marker_is_damaged_is_skipped_and_the_loop_goes_on(tmp_path, caplog, marker):
    """A user's run: run-3's marker is damaged, the resume falls back to 2; the loop then passes
    step 3 (due) without raising, run-3 is left untouched, and step 4 is saved."""
    base = tmp_path / "run"
    _train(str(base), [1, 2, 3])
    (base / "run-3" / "COMMITTED").write_bytes(marker)
    before = {p.relative_to(base): p.read_bytes() for p in (base / "run-3").rglob("*") if p.is_file()}
    ck = cc.Checkpointer(str(base), step_policies=[cc.CheckpointInterval(every=1)], handle_sigterm=False)
    with caplog.at_level(logging.WARNING, "ckpt_callbacks"):
        _, meta = _resume(ck)
        assert meta["step"] == 2
        assert [ck.on_step(_state(step), step=step) for step in (3, 4)] == [False, True]
        ck.close()
    assert {p.relative_to(base): p.read_bytes() for p in (base / "run-3").rglob("*") if p.is_file()} == before
    skipped = [r.getMessage() for r in caplog.records if "a checkpoint is due, but skipped" in r.getMessage()]
    assert len(skipped) == 1 and skipped[0].startswith("step 3:") and "run-3 holds a damaged checkpoint" in skipped[0]
    assert "it is left as it is" in skipped[0] and "ckpt-callbacks verify" in skipped[0]
    assert cc.CheckpointReader(str(base)).all_steps() == [1, 2, 4]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rename": [("(", "x")]}, r"rename\[0\]: pattern '\('"),
        ({"drop": ["("]}, r"drop\[0\]: pattern '\('"),
        ({"max_host_bytes": 0}, "max_host_bytes=0: expected a number of bytes >= 1"),
        ({"rules": "not rules"}, "rules"),
    ],
)
def test_restore_or_init_refuses_bad_restore_arguments_on_a_fresh_base_too(tmp_path, kwargs, match):
    """The first call of a new run is where a typo must show, not at the first resume days later."""
    ck = cc.Checkpointer(str(tmp_path / "run"), handle_sigterm=False)
    with pytest.raises(ValueError, match=match):
        ck.restore_or_init(_init, **kwargs)
    ck.close()
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_restore_or_init_takes_rename_and_missing_without_a_template_on_a_fresh_base(tmp_path):
    """Its template comes from init_fn, so restructuring arguments alone are no error."""
    ck = cc.Checkpointer(str(tmp_path / "run"), handle_sigterm=False)
    state, meta = ck.restore_or_init(_init, rename=[("w", "v")], missing=_init(), drop=True)
    assert meta is None and state["b"].tolist() == [0.0, 0.0, 0.0]
    ck.close()
