"""LocalTier on one process: careless arguments, the schedule of both tiers, retention, the
tier a restore picks, every kind of leaf, a changed layout, a rewound trajectory, resume rules.

Kills and damaged files are in ``test_local_store.py``.
"""

from __future__ import annotations

import datetime
import logging
import os
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import ckpt_callbacks as cc
from ckpt_callbacks.errors import CheckpointPathError
from conftest import assert_tree_equal, make_mesh, put


def _state(step, mesh):
    return {
        "w": put(jnp.arange(32.0).reshape(8, 4) + step, mesh, P("x", "y")),
        "b": put(jnp.full((4,), step, jnp.int32), mesh, P()),
        "step": step,
    }


def _checkpointer(tmp_path, *, every=5, local_every=2, keep_last=2, **local_kwargs):
    return cc.Checkpointer(
        str(tmp_path / "persistent"),
        step_policies=[cc.CheckpointInterval(every=every)],
        handle_sigterm=False,
        local=cc.LocalTier(
            str(tmp_path / "local"),
            step_policies=[cc.CheckpointInterval(every=local_every)],
            keep_last=keep_last,
            **local_kwargs,
        ),
    )


def _train(ck, steps, mesh, offset=0):
    saved = [step for step in steps if ck.on_step(_state(step + offset, mesh), step=step)]
    ck.wait_until_finished()
    return saved


def _local_steps(root):
    return sorted(int(m.group(1)) for n in os.listdir(root) if (m := re.fullmatch(r"step_(0|[1-9][0-9]*)", n)))


def _persistent_steps(root):
    return sorted(int(n[4:]) for n in os.listdir(root) if n.startswith("run-"))


def _restore(ck, mesh, **kwargs):
    return ck.restore_or_init(lambda: _state(0, mesh), template=_state(0, mesh), **kwargs)


# -- careless input ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["s3://bucket/x", "gs://bucket/x", "memory://x", "memory://bucket/run"])
def test_local_tier_on_shared_or_memory_storage_is_refused(path):
    with pytest.raises(CheckpointPathError, match="a local tier is a directory of this host"):
        cc.LocalTier(path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"keep_last": 0}, r"keep_last=\.\.\.\) must be an integer >= 1, got 0"),
        ({"keep_last": True}, r"keep_last=\.\.\.\) must be an integer >= 1, got True"),
        ({"keep_last": np.bool_(True)}, r"keep_last=\.\.\.\) must be an integer >= 1, got np.True_"),
        ({"keep_last": 2.0}, r"keep_last=\.\.\.\) must be an integer >= 1, got 2.0"),
        ({"keep_last": np.float32(2)}, r"keep_last=\.\.\.\) must be an integer >= 1"),
        ({"transfer_bytes": 0}, r"transfer_bytes=\.\.\.\) must be an integer >= 1024, got 0"),
        ({"transfer_bytes": 1023}, r"transfer_bytes=\.\.\.\) must be an integer >= 1024, got 1023"),
        ({"rounds_per_step": 0}, r"rounds_per_step=\.\.\.\) must be an integer >= 1, got 0"),
        ({"replicas": -1}, r"replicas=\.\.\.\) must be an integer >= 0, got -1"),
        ({"replicas": np.bool_(True)}, r"replicas=\.\.\.\) must be an integer >= 0, got np.True_"),
        ({"save_interval": -1}, r"save_interval must be a positive, finite number of seconds, got -1"),
        ({"save_interval": 0}, r"save_interval must be a positive, finite number of seconds, got 0"),
        ({"save_interval": float("nan")}, r"save_interval must be a positive, finite number of seconds, got nan"),
        ({"save_interval": float("inf")}, r"save_interval must be a positive, finite number of seconds, got inf"),
        ({"save_interval": 1e300}, r"save_interval of 1e\+300 seconds is longer than a timedelta holds"),
        ({"step_policies": [5]}, r"step_policies\[0\] is 5, expected a CheckpointInterval"),
    ],
)
def test_careless_local_tier_arguments_are_refused(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cc.LocalTier(str(tmp_path / "local"), **kwargs)


def test_numpy_integers_and_seconds_are_accepted(tmp_path, mesh42):
    ck = _checkpointer(tmp_path, keep_last=np.int64(1), transfer_bytes=np.int32(4096))
    assert ck.local is not None
    _train(ck, range(1, 7), mesh42)
    assert _local_steps(tmp_path / "local") == [6]
    ck.close()
    tier = cc.LocalTier(str(tmp_path / "local"), save_interval=np.float64(2.5))
    assert tier.save_interval == datetime.timedelta(seconds=2.5)


def test_replicas_on_one_process_is_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match=r"replicas=1\) on 1 process\(es\): a set can be kept by at most 0 peers"):
        cc.Checkpointer(str(tmp_path / "p"), local=cc.LocalTier(str(tmp_path / "l"), replicas=1), handle_sigterm=False)
    assert not (tmp_path / "l").exists()


@pytest.mark.parametrize("local", ["/local/ckpt", {"path": "/local/ckpt"}, 3])
def test_local_of_another_type_is_refused(tmp_path, local):
    with pytest.raises(TypeError, match=f"Checkpointer\\(local=...\\) takes a LocalTier, got {type(local).__name__}"):
        cc.Checkpointer(str(tmp_path / "p"), local=local, handle_sigterm=False)


def test_a_relative_local_path_is_under_the_working_directory(tmp_path, mesh42, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ck = cc.Checkpointer(
        str(tmp_path / "p"),
        handle_sigterm=False,
        local=cc.LocalTier("rel/local", step_policies=[cc.CheckpointInterval(every=2)]),
    )
    _train(ck, range(1, 5), mesh42)
    ck.close()
    assert _local_steps(tmp_path / "rel" / "local") == [2, 4]
    monkeypatch.chdir("/")  # the tier's directory was fixed at construction; a new one reads it as given
    monkeypatch.chdir(tmp_path)
    ck = cc.Checkpointer(
        str(tmp_path / "p"),
        handle_sigterm=False,
        local=cc.LocalTier("rel/local", step_policies=[cc.CheckpointInterval(every=2)]),
    )
    state, meta = _restore(ck, mesh42)
    assert meta is not None and (meta["step"], meta["tier"]) == (4, "local")
    assert_tree_equal(state, _state(4, mesh42))
    ck.close()


def test_a_local_path_that_is_a_file_is_refused_naming_it(tmp_path, mesh42):
    (tmp_path / "local").write_text("not a directory")
    with pytest.raises(cc.CheckpointPathError, match=r"expected a directory at .*local, found a file"):
        _checkpointer(tmp_path)
    assert (tmp_path / "local").read_text() == "not a directory"


def test_a_file_put_there_after_construction_is_refused_at_the_first_save(tmp_path, mesh42):
    ck = _checkpointer(tmp_path)
    (tmp_path / "local").write_text("not a directory")
    with pytest.raises(cc.CheckpointPathError, match="cannot make the directory"):
        _train(ck, range(1, 3), mesh42)
    assert (tmp_path / "local").read_text() == "not a directory"


@pytest.mark.parametrize("where", ["base", "base/sub", "base/run-5/x", "."])
def test_a_local_tier_overlapping_the_persistent_base_is_refused(tmp_path, where):
    base = tmp_path / "base"
    local = tmp_path if where == "." else tmp_path / where
    with pytest.raises(cc.CheckpointPathError, match="overlap"):
        cc.Checkpointer(str(base), local=cc.LocalTier(str(local)), handle_sigterm=False)
    assert not (tmp_path / "base").exists() or not any((tmp_path / "base").iterdir())


def test_foreign_files_in_the_local_directory_are_left_alone(tmp_path, mesh42):
    root = tmp_path / "local"
    (root / "notes").mkdir(parents=True)
    foreign = {
        "notes/a.txt": b"mine",
        "README": b"keep",
        "step_x": b"not a step",
        "step_007": b"not a step either",
        "step_2.bak": b"a backup",
    }
    for name, data in foreign.items():
        (root / name).write_bytes(data)
    ck = _checkpointer(tmp_path, keep_last=1)
    _train(ck, range(1, 9), mesh42)
    ck.close()
    for name, data in foreign.items():
        assert (root / name).read_bytes() == data
    assert _local_steps(root) == [8]
    ck = _checkpointer(tmp_path)
    state, meta = _restore(ck, mesh42)
    assert meta is not None and (meta["step"], meta["tier"]) == (8, "local")
    assert_tree_equal(state, _state(8, mesh42))
    ck.close()


# -- the schedule and retention --------------------------------------------------------------


def test_both_tiers_due_at_one_step_save_both(tmp_path, mesh42):
    ck = _checkpointer(tmp_path, keep_last=10)
    assert _train(ck, range(1, 11), mesh42) == [5, 10]
    ck.close()
    assert _local_steps(tmp_path / "local") == [2, 4, 6, 8, 10]
    assert _persistent_steps(tmp_path / "persistent") == [5, 10]
    for name in ("data.bin", "manifest.json", "COMMITTED"):
        assert (tmp_path / "local" / "step_10" / "set_0" / name).is_file()


@pytest.mark.parametrize("keep_last", [1, 2, 3])
def test_keep_last_keeps_exactly_the_newest_local_steps(tmp_path, mesh42, keep_last):
    ck = _checkpointer(tmp_path, every=100, keep_last=keep_last)
    for steps in (range(1, 3), range(3, 9), range(9, 14)):
        _train(ck, steps, mesh42)
        done = list(range(2, steps[-1] + 1, 2))
        assert _local_steps(tmp_path / "local") == done[-keep_last:]
    ck.close()


# -- the tier a restore picks ----------------------------------------------------------------


def test_restore_picks_the_newer_local_step(tmp_path, mesh42, caplog):
    ck = _checkpointer(tmp_path)
    _train(ck, range(1, 13), mesh42)
    ck.close()
    ck = _checkpointer(tmp_path)
    with caplog.at_level(logging.INFO, "ckpt_callbacks"):
        state, meta = _restore(ck, mesh42)
    assert meta is not None and (meta["step"], meta["tier"]) == (12, "local")
    assert_tree_equal(state, _state(12, mesh42))
    assert "restore: local tier, step 12 (every process from its own directory)" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    ck.close()


def test_restore_picks_the_newer_persistent_step(tmp_path, mesh42, caplog):
    ck = _checkpointer(tmp_path)
    _train(ck, range(1, 16), mesh42)
    ck.close()
    assert (_local_steps(tmp_path / "local"), _persistent_steps(tmp_path / "persistent")) == ([12, 14], [5, 10, 15])
    ck = _checkpointer(tmp_path)
    with caplog.at_level(logging.INFO, "ckpt_callbacks"):
        state, meta = _restore(ck, mesh42)
    assert meta is not None and meta["step"] == 15 and meta.get("tier") != "local"
    assert_tree_equal(state, _state(15, mesh42))
    assert "the persistent tier's step 15 is newer than local step 14" in caplog.text
    ck.close()


def test_restore_at_a_step_both_tiers_hold_is_the_same_state(tmp_path, mesh42):
    ck = _checkpointer(tmp_path)
    _train(ck, range(1, 11), mesh42)
    ck.close()
    ck = _checkpointer(tmp_path)
    state, meta = _restore(ck, mesh42)
    assert meta is not None and (meta["step"], meta["tier"]) == (10, "local")  # at least the persistent's newest
    assert_tree_equal(state, _state(10, mesh42))
    ck.close()


def test_restore_options_skip_the_local_tier(tmp_path, mesh42, caplog):
    ck = _checkpointer(tmp_path)
    _train(ck, range(1, 13), mesh42)
    ck.close()
    ck = _checkpointer(tmp_path)

    def init():  # placed nowhere: mesh= and rules= say where it goes
        return {"w": jnp.zeros((8, 4)), "b": jnp.zeros(4, jnp.int32), "step": 0}

    with caplog.at_level(logging.INFO, "ckpt_callbacks"):
        state, meta = ck.restore_or_init(init, mesh=mesh42, rules=[("w", P("x", "y")), ("b", P())])
    assert meta is not None and meta["step"] == 10 and meta.get("tier") != "local"
    expected = _state(10, mesh42)
    assert_tree_equal((state["w"], state["b"]), (expected["w"], expected["b"]))
    assert "restore options ['mesh', 'rules'] apply to the persistent tier only; the local tier is not read" in (
        caplog.text
    )
    ck.close()


def test_no_checkpoint_in_either_tier_is_a_fresh_start(tmp_path, mesh42):
    ck = _checkpointer(tmp_path)
    state, meta = _restore(ck, mesh42)
    assert meta is None
    assert_tree_equal(state, _state(0, mesh42))
    assert _train(ck, range(1, 6), mesh42) == [5]
    assert _local_steps(tmp_path / "local") == [2, 4]
    ck.close()


# -- every kind of leaf ----------------------------------------------------------------------


def _kinds(step, mesh):
    key = jax.random.key(step)
    return {
        "bf16": put(jnp.arange(16, dtype=jnp.bfloat16).reshape(4, 4) + step, mesh, P("x")),
        "int8": put(jnp.arange(-8, 8, dtype=jnp.int8) * (step % 3), mesh, P(("x", "y"))),
        "bool": put(jnp.arange(8) % (step + 2) == 0, mesh, P("y")),
        "scalar": put(jnp.float32(step) / 3, mesh, P()),
        "empty": put(jnp.zeros((0, 4), jnp.float32), mesh, P(None, "x")),
        "key": key,
        "keys": put(jax.random.key_data(jax.random.split(key, 8)), mesh, P("x")),
        "typed_keys": jax.device_put(jax.random.split(key, 8), jax.sharding.NamedSharding(mesh, P("x"))),
        "numpy": np.arange(6, dtype=np.float64).reshape(2, 3) * step,
        "numpy_bf16": np.full((3,), step, ml_dtypes.bfloat16),
        "numpy_scalar": np.int16(step),
        "int": step,
        "float": step / 7,
        "text": f"step {step} \u00e9",
        "none": None,
        "nested": [put(jnp.ones((2, 2)) * step, mesh, P()), (step, None)],
    }


def test_every_kind_of_leaf_comes_back_bit_exact(tmp_path, mesh42):
    ck = cc.Checkpointer(
        str(tmp_path / "p"),
        handle_sigterm=False,
        local=cc.LocalTier(str(tmp_path / "l"), step_policies=[cc.CheckpointInterval(every=3)]),
    )
    for step in range(1, 7):
        ck.on_step(_kinds(step, mesh42), step=step)
    ck.close()
    ck = cc.Checkpointer(
        str(tmp_path / "p"),
        handle_sigterm=False,
        local=cc.LocalTier(str(tmp_path / "l"), step_policies=[cc.CheckpointInterval(every=3)]),
    )
    state, meta = ck.restore_or_init(lambda: _kinds(0, mesh42), template=_kinds(0, mesh42))
    assert meta is not None and (meta["step"], meta["tier"]) == (6, "local")
    expected = _kinds(6, mesh42)
    assert_tree_equal(state, expected)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(expected), strict=True):
        if isinstance(b, jax.Array):
            assert isinstance(a, jax.Array) and a.sharding == b.sharding
        else:
            assert type(a) is type(b) or isinstance(b, np.ndarray | np.generic)
    ck.close()


_DTYPES = ["float32", "bfloat16", "int8", "bool", "uint16", "float16", "int64"]
_SPECS = [P(), P("x"), P(None, "y"), P("x", "y"), P("y", "x"), P(("x", "y")), P(None, ("y", "x"))]


@st.composite
def _arrays(draw):
    """A leaf over the (4, 2) mesh: its dtype, a shape each sharded dimension divides, a spec."""
    spec = draw(st.sampled_from(_SPECS))
    dims = []
    for i in range(2):
        axes = spec[i] if i < len(spec) else None
        size = {None: 1, "x": 4, "y": 2}.get(axes, 8) if not isinstance(axes, tuple) else 8
        dims.append(size * draw(st.integers(0 if i else 1, 3)))
    return draw(st.sampled_from(_DTYPES)), tuple(dims), spec


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(leaves=st.lists(_arrays(), min_size=1, max_size=4), data=st.data())
def test_sharded_and_replicated_leaves_round_trip(tmp_path_factory, leaves, data):
    mesh = make_mesh((4, 2))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    root = tmp_path_factory.mktemp("leaves")

    def state(step):
        out = {}
        for i, (dtype, shape, spec) in enumerate(leaves):
            raw = rng.integers(
                0,
                256,
                size=int(np.prod(shape)) * np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype).itemsize,
                dtype=np.uint8,
            )
            value = raw.view(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)).reshape(shape)
            if dtype == "bool":
                value = raw.reshape(shape) % 2 == 1
            out[f"leaf{i}"] = put(value, mesh, spec)
        out["step"] = step
        return out

    saved = state(2)
    ck = cc.Checkpointer(
        str(root / "p"),
        handle_sigterm=False,
        local=cc.LocalTier(str(root / "l"), step_policies=[cc.CheckpointInterval(every=2)]),
    )
    ck.on_step(state(1), step=1)
    ck.on_step(saved, step=2)
    ck.close()
    ck = cc.Checkpointer(
        str(root / "p"),
        handle_sigterm=False,
        local=cc.LocalTier(str(root / "l"), step_policies=[cc.CheckpointInterval(every=2)]),
    )
    template = state(0)
    got, meta = ck.restore_or_init(lambda: template, template=template)
    assert meta is not None and (meta["step"], meta["tier"]) == (2, "local")
    assert_tree_equal(got, saved)
    ck.close()


# -- a changed layout ------------------------------------------------------------------------


def _changed_template(mesh, change):
    template = _state(0, mesh)
    if change == "sharding":
        template["w"] = put(jnp.zeros((8, 4)), mesh, P("y", "x"))
    elif change == "dtype":
        template["b"] = put(jnp.zeros((4,), jnp.int16), mesh, P())
    elif change == "mesh":
        template["w"] = put(jnp.zeros((8, 4)), make_mesh((2, 4)), P("x", "y"))
    return template


@pytest.mark.parametrize("change", ["sharding", "mesh", "dtype"])
def test_a_changed_sharding_falls_back_to_the_persistent_tier(tmp_path, mesh42, caplog, change):
    ck = _checkpointer(tmp_path)
    _train(ck, range(1, 13), mesh42)
    ck.close()
    ck = _checkpointer(tmp_path)
    template = _changed_template(mesh42, change)
    with caplog.at_level(logging.INFO, "ckpt_callbacks"):
        state, meta = ck.restore_or_init(lambda: template, template=template)
    assert meta is not None and meta["step"] == 10 and meta.get("tier") != "local"
    expected = _state(10, mesh42)
    if change == "dtype":  # the persistent tier casts to the template's dtype
        expected["b"] = expected["b"].astype(jnp.int16)
    assert_tree_equal(state, expected)
    assert state["w"].sharding == template["w"].sharding
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("local step 12 cannot be used" in w and "saved for another state or mesh" in w for w in warnings)
    assert any("no local step can be restored on every process; using the persistent tier" in w for w in warnings)
    ck.close()


def test_a_changed_structure_falls_back_to_the_persistent_tier(tmp_path, mesh42, caplog):
    ck = _checkpointer(tmp_path)
    _train(ck, range(1, 13), mesh42)
    ck.close()
    ck = _checkpointer(tmp_path)
    template = {k: v for k, v in _state(0, mesh42).items() if k != "b"}
    mismatch = pytest.raises(cc.RestoreMismatchError, match="unexpected on disk \\(not in template\\): 'b'")
    with caplog.at_level(logging.INFO, "ckpt_callbacks"), mismatch:  # the persistent tier says what differs
        ck.restore_or_init(lambda: template, template=template)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("local step 12 cannot be used" in w and "saved for another state or mesh" in w for w in warnings)
    ck.close()


# -- rewinds and resume rules -----------------------------------------------------------------


def test_local_steps_newer_than_the_restored_step_go_at_the_next_local_save(tmp_path, mesh42, caplog):
    ck = _checkpointer(tmp_path)
    _train(ck, range(1, 15), mesh42)
    ck.close()
    assert _local_steps(tmp_path / "local") == [12, 14]
    ck = _checkpointer(tmp_path)

    def init():
        return {"w": jnp.zeros((8, 4)), "b": jnp.zeros(4, jnp.int32), "step": 0}

    _, meta = ck.restore_or_init(init, mesh=mesh42, rules=[("w", P("x", "y")), ("b", P())])  # the persistent tier's 10
    assert meta is not None and meta["step"] == 10
    assert _local_steps(tmp_path / "local") == [12, 14]  # nothing deleted by a restore
    with caplog.at_level(logging.WARNING, "ckpt_callbacks"):
        _train(ck, range(11, 13), mesh42, offset=100)  # another trajectory from step 10
    assert "local step 12: deleting local steps [12, 14]" in caplog.text
    assert _local_steps(tmp_path / "local") == [12]
    ck.close()
    ck = _checkpointer(tmp_path)
    state, meta = _restore(ck, mesh42)
    assert meta is not None and (meta["step"], meta["tier"]) == (12, "local")
    assert_tree_equal(state, _state(112, mesh42))
    ck.close()


def test_a_local_restore_resumes_the_local_schedule(tmp_path, mesh42):
    ck = _checkpointer(tmp_path)
    _train(ck, range(1, 13), mesh42)
    ck.close()
    ck = _checkpointer(tmp_path)
    _, meta = _restore(ck, mesh42)
    assert meta is not None and (meta["step"], meta["tier"]) == (12, "local")
    # resume at 12, call at 12 then 13: the restored step is saved by neither tier again
    assert _train(ck, [12, 13], mesh42, offset=500) == []
    assert _local_steps(tmp_path / "local") == [10, 12]
    ck.close()
    ck = _checkpointer(tmp_path)
    state, meta = _restore(ck, mesh42)
    assert meta is not None and (meta["step"], meta["tier"]) == (12, "local")
    assert_tree_equal(state, _state(12, mesh42))  # the first run's, not rewritten
    assert _train(ck, [13, 14, 15], mesh42) == [15]  # the schedules go on from 12
    assert _local_steps(tmp_path / "local") == [12, 14]
    ck.close()


@pytest.mark.parametrize(
    ("given", "every", "rounds", "expected"),
    [(None, 10, 17, 4), (None, 10, 3, 2), (None, 1, 17, 17), (None, None, 9, 9), (3, 10, 17, 3)],
)
def test_rounds_per_step_by_default_finish_a_replication_within_half_the_interval(
    tmp_path, given, every, rounds, expected
):
    from ckpt_callbacks.manager._local import LocalSaver
    from ckpt_callbacks.storage import parse

    policies = [cc.CheckpointInterval(every=every)] if every else []
    tier = cc.LocalTier(
        str(tmp_path / "local"), step_policies=policies, save_interval=None if every else 60, rounds_per_step=given
    )
    saver = LocalSaver(tier, parse(str(tmp_path / "base")))
    try:
        assert saver._per_step(20, rounds) == expected
    finally:
        saver.close()


@pytest.mark.parametrize("interval", [True, "60", [60]])
def test_a_save_interval_that_is_no_number_is_a_type_error(tmp_path, interval):
    with pytest.raises(TypeError, match="save_interval must be seconds"):
        cc.LocalTier(str(tmp_path / "local"), save_interval=interval)


def test_numpy_integers_are_kept_as_python_ints(tmp_path):
    tier = cc.LocalTier(str(tmp_path / "l"), keep_last=np.int64(3), transfer_bytes=np.int32(4096), replicas=np.int8(0))
    assert (type(tier.keep_last), type(tier.transfer_bytes), type(tier.replicas)) == (int, int, int)
