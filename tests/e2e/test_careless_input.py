"""Careless input, refused before it does harm (hostile review of issue 21).

A save onto a base of ``run-<step>`` checkpoints or inside a committed checkpoint, a
``Checkpointer`` pointed at one checkpoint, a ``run-<N>`` directory saved without ``step=``,
item names that are no names, numpy integers and NaN intervals in the policies, and an
``init_fn`` that JAX cannot trace: each is what a user types by mistake.
"""

from __future__ import annotations

import datetime
import itertools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt_callbacks as cc
from ckpt_callbacks import directory as layout
from ckpt_callbacks import storage as paths

_FIXTURES = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _keys(url: str) -> list[str]:
    return sorted(paths.list_keys_under(paths.parse(url)))


# ------------------------------------------------------------------------- where a save goes


def test_a_save_onto_a_base_is_refused_and_writes_nothing(url):
    for step in (1, 2):
        cc.save(f"{url}/run-{step}", {"w": jnp.full(2, float(step))}, step=step)
    before = _keys(url)
    saves = [
        lambda: cc.save(url, {"w": jnp.zeros(2)}, step=99),
        lambda: cc.save(url, {"w": jnp.zeros(2)}, overwrite=True),
        lambda: cc.save_async(url, {"w": jnp.zeros(2)}, step=99).wait(),
        lambda: cc.save_items(url, {"model": {"w": jnp.zeros(2)}}, step=99),
    ]
    for save in saves:
        with pytest.raises(cc.CheckpointPathError, match=r"is a checkpoint base.*found .*run-2.*/run-<step>") as no:
            save()
        assert paths.parse(url).url in str(no.value)
    assert _keys(url) == before
    assert [c.step for c in cc.list_checkpoints(url)] == [1, 2]
    assert cc.find_latest_checkpoint(url).endswith("run-2")


def test_a_directory_of_user_files_and_uncommitted_run_dirs_is_no_base(mem_url):
    paths.write_bytes(paths.parse(mem_url), "config.yaml", b"lr: 0.1\n")
    paths.write_bytes(paths.parse(f"{mem_url}/run-7"), "notes.txt", b"mine")  # a run-<N> name, no marker
    cc.save(mem_url, {"w": jnp.ones(2)}, step=1)  # documented: a save beside the user's files
    assert cc.restore(mem_url)["w"].tolist() == [1.0, 1.0]
    cc.save_items(f"{mem_url}-items", {"run-5": {"w": jnp.ones(1)}}, step=1)  # an item named run-5
    cc.save(f"{mem_url}-items", {"w": jnp.zeros(1)}, step=1, overwrite=True)  # its run-5 holds no marker


@pytest.mark.parametrize("inner", ["state", "state/w"])
def test_a_save_inside_a_committed_checkpoint_is_refused_and_writes_nothing(url, inner):
    cc.save(f"{url}/run-2", {"w": jnp.ones(2)}, step=2)
    before = _keys(url)
    for save in (
        lambda: cc.save(f"{url}/run-2/{inner}", {"w": jnp.zeros(2)}, step=2),
        lambda: cc.save_async(f"{url}/run-2/{inner}", {"w": jnp.zeros(2)}).wait(),
    ):
        with pytest.raises(cc.CheckpointPathError, match=r"is inside the committed checkpoint .*run-2"):
            save()
    assert _keys(url) == before
    assert cc.restore(f"{url}/run-2")["w"].tolist() == [1.0, 1.0] and cc.verify(f"{url}/run-2").ok


def test_a_checkpointer_on_one_checkpoint_is_refused_naming_the_base(tmp_path):
    base = str(tmp_path / "b")
    cc.save(f"{base}/run-1", {"w": jnp.ones(2)}, step=1)
    before = _keys(f"{base}/run-1")
    with pytest.raises(
        cc.CheckpointPathError, match=rf"is a committed checkpoint.*Checkpointer\('{re.escape(base)}'\)"
    ):
        cc.Checkpointer(f"{base}/run-1", step_policies=[cc.CheckpointInterval(every=1)], handle_sigterm=False)
    assert _keys(f"{base}/run-1") == before
    with cc.Checkpointer(base, handle_sigterm=False) as ck:  # what it suggests
        assert ck.restore()[1]["step"] == 1


_BASES = itertools.count()


@_FIXTURES
@given(step=st.integers(0, 2**40))
def test_a_run_directory_saved_without_a_step_is_that_step(mem_url, step):
    base = f"{mem_url}/{next(_BASES)}"
    cc.save(f"{base}/run-{step}", {"w": jnp.ones(2)})
    assert [c.step for c in cc.list_checkpoints(base)] == [step]
    assert cc.find_latest_checkpoint(base).endswith(f"run-{step}")
    assert cc.CheckpointReader(base).latest_step() == step
    with pytest.raises(ValueError, match=f"directory named for step {step}"):
        cc.save(f"{base}/run-{step}", {"w": jnp.ones(2)}, step=step + 1, overwrite=True)


# ------------------------------------------------------------------------------- item names

_NOT_NAMES = st.text(max_size=8).filter(
    lambda s: not s or any(not (c.isascii() and (c.isalnum() or c in "_-")) for c in s)
)


@_FIXTURES
@given(name=st.one_of(_NOT_NAMES, st.sampled_from(["..", ".", "../escape", "a/b", "/abs", "metadata.json", "x" * 101])))
def test_an_invalid_item_name_is_refused_as_a_name(mem_url, name):
    with pytest.raises(ValueError, match=r"item name .*letters, digits") as refused:
        cc.save_items(mem_url, {name: {"w": jnp.ones(1)}}, step=1)
    assert "extras" not in str(refused.value)
    with pytest.raises(ValueError, match=r"item name .*letters, digits"):
        cc.save(mem_url, {"w": jnp.ones(1)}, item=name)
    assert not paths.has_any(paths.parse(mem_url))


# --------------------------------------------------------------------------- policy arguments

_NUMPY_INTS = st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64])


@given(kind=_NUMPY_INTS, every=st.integers(1, 100), extra=st.integers(0, 20))
def test_policies_take_numpy_integers_as_ints(kind, every, extra):
    interval = cc.CheckpointInterval(every=kind(every), until=kind(every + extra))
    assert interval == cc.CheckpointInterval(every=every, until=every + extra)
    assert type(interval.every) is int and type(interval.until) is int
    keep = cc.KeepPolicy(keep_last=kind(every), keep_every=kind(every), keep_best=kind(every), metric="loss")
    assert (type(keep.keep_last), type(keep.keep_every), type(keep.keep_best)) == (int, int, int)
    assert keep == cc.KeepPolicy(keep_last=every, keep_every=every, keep_best=every, metric="loss")
    for flag in (True, np.bool_(True)):
        with pytest.raises(ValueError, match="every must be a positive int"):
            cc.CheckpointInterval(every=flag)
        with pytest.raises(ValueError, match="keep_last must be a positive int"):
            cc.KeepPolicy(keep_last=flag)


@given(
    value=st.one_of(
        st.floats(max_value=0.0, allow_nan=False),
        st.integers(max_value=0),
        st.sampled_from([math.nan, math.inf, -math.inf, 1e300, np.float32("nan"), np.int64(-5)]),
    )
)
def test_save_interval_must_be_positive_finite_seconds(value):
    with pytest.raises(ValueError, match=rf"save_interval .*{re.escape(repr(value))}"):
        cc.Checkpointer("memory://tests/never-written", save_interval=value, handle_sigterm=False)


def test_a_negative_timedelta_interval_is_named_in_seconds(tmp_path):
    with pytest.raises(ValueError, match=r"save_interval must be a positive timedelta, got -5.0s"):
        cc.Checkpointer(str(tmp_path), save_interval=datetime.timedelta(seconds=-5), handle_sigterm=False)
    with pytest.raises(TypeError, match=r"save_interval must be seconds .* got '10'"):
        cc.Checkpointer(str(tmp_path), save_interval="10", handle_sigterm=False)


def test_a_single_interval_for_step_policies_is_told_to_be_a_list(tmp_path):
    with pytest.raises(TypeError, match=r"step_policies is a single CheckpointInterval.*pass a list"):
        cc.Checkpointer(str(tmp_path), step_policies=cc.CheckpointInterval(every=5), handle_sigterm=False)
    with pytest.raises(TypeError, match=r"step_policies must be a list of CheckpointInterval, got 5"):
        cc.Checkpointer(str(tmp_path), step_policies=5, handle_sigterm=False)
    ck = cc.Checkpointer(str(tmp_path), step_policies=[cc.CheckpointInterval(every=5)], handle_sigterm=False)
    assert [ck.on_step({"w": jnp.ones(1)}, step=s) for s in (4, 5)] == [False, True]
    ck.close()


# ----------------------------------------------------------------- an init JAX cannot trace


def _saved(tmp_path, mesh):
    base = str(tmp_path / "b")
    cc.save(f"{base}/run-1", {"w": jnp.ones(8), "step": 7, "name": "x"}, step=1)
    return cc.CheckpointReader(base), NamedSharding(mesh, P("x"))


def test_an_init_with_a_string_leaf_is_refused_naming_it(tmp_path, mesh42):
    reader, sharded = _saved(tmp_path, mesh42)

    def init():
        return {"w": jax.device_put(jnp.zeros(8), sharded), "step": 0, "name": "y"}

    with pytest.raises(TypeError, match=r"init_fn cannot be traced \(its leaves \['name \(str\)'\] .*template="):
        reader.restore_or_init(init)
    template = {"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=sharded), "step": 0, "name": "y"}
    state, meta = reader.restore_or_init(init, template=template)  # what it suggests
    assert (state["name"], state["step"], state["w"].sharding.spec, meta["step"]) == ("x", 7, P("x"), 1)
    state, _ = reader.restore_or_init(init, mesh=mesh42, rules=[("^w$", P("x"))])  # the other suggestion
    assert state["name"] == "x" and state["w"].sharding.spec == P("x")


@pytest.mark.parametrize(
    ("host_step", "raised"),
    [
        (lambda: np.asarray(jnp.ones(8)), "TracerArrayConversionError"),
        (lambda: np.ones(8, np.float32) * float(jnp.zeros(8).sum()), "ConcretizationTypeError"),
    ],
)
def test_an_init_with_a_host_side_step_is_refused_naming_what_failed(tmp_path, mesh42, host_step, raised):
    reader, sharded = _saved(tmp_path, mesh42)

    def init():
        return {"w": jax.device_put(host_step(), sharded), "step": 0, "name": "y"}

    with pytest.raises(TypeError, match=rf"init_fn cannot be traced \({raised}: .*Pass template=") as refused:
        reader.restore_or_init(init)
    assert isinstance(refused.value.__cause__, TypeError)
    state, _ = reader.restore_or_init(init, mesh=mesh42, rules=[("^w$", P("x"))])
    assert state["w"].tolist() == [1.0] * 8


def test_leaves_placed_nowhere_are_named_by_key_string(tmp_path, mesh42):
    cc.save(str(tmp_path / "run-1"), {"params": {"w": jnp.ones((8, 4)), "a/b": jnp.ones(2)}}, step=1)

    def init():
        return {"params": {"w": jax.device_put(jnp.zeros((8, 4)), NamedSharding(mesh42, P("x"))), "a/b": jnp.ones(2)}}

    with pytest.raises(cc.ShardingRuleError, match=r"\(e\.g\. \['params/a%2Fb'\]\)"):
        cc.CheckpointReader(str(tmp_path)).restore_or_init(init)


def _depth_inside(url: str) -> int:
    """How deep inside a checkpoint a save is still caught on ``url``'s store (its docstring)."""

    return layout.OBJECT_STORE_ANCESTORS if paths.parse(url).backend.is_object_store else 12


def test_a_save_any_depth_inside_a_committed_checkpoint_is_refused(url):
    """Found by a hostile review: one and two levels inside were refused, ``run-10/state/x/y``
    (three) was written. Every ancestor is read on local disk and memory://; the nearest 6 on
    an object store (one request each)."""
    cc.save(f"{url}/run-10", {"w": jnp.ones(2)}, step=10)
    before = _keys(url)
    deepest = _depth_inside(url)
    for depth in sorted({3, 4, deepest}):
        inner = "/".join(["state", *(f"d{i}" for i in range(depth - 1))])
        with pytest.raises(
            cc.CheckpointPathError, match=r"inside the committed checkpoint \S*run-10 \(its entry 'state'\)"
        ):
            cc.save(f"{url}/run-10/{inner}", {"w": jnp.zeros(2)}, step=1)
    assert _keys(url) == before
    assert cc.restore(f"{url}/run-10")["w"].tolist() == [1.0, 1.0] and cc.verify(f"{url}/run-10").ok


def test_the_documented_bound_on_an_object_store_and_none_on_disk(url, tmp_path):
    """Past ``OBJECT_STORE_ANCESTORS`` levels an object store's save is not caught (the bound
    the docstring states); local disk has none."""

    if not paths.parse(url).backend.is_object_store:
        url = str(tmp_path / "disk")
    cc.save(f"{url}/run-10", {"w": jnp.ones(2)}, step=10)
    inner = "/".join(f"d{i}" for i in range(layout.OBJECT_STORE_ANCESTORS + 1))  # one past the bound
    if paths.parse(url).backend.is_object_store:
        cc.save(f"{url}/run-10/{inner}", {"w": jnp.zeros(2)}, step=1)
        assert cc.restore(f"{url}/run-10")["w"].tolist() == [1.0, 1.0]
    else:
        with pytest.raises(
            cc.CheckpointPathError, match=r"inside the committed checkpoint \S*run-10 \(its entry 'd0'\)"
        ):
            cc.save(f"{url}/run-10/{inner}", {"w": jnp.zeros(2)}, step=1)


@pytest.mark.parametrize("inner", ["state", "state/x", "new/a/b"])
def test_a_checkpointer_inside_a_checkpoint_is_refused_at_construction(tmp_path, inner):
    """Found by a hostile review: ``Checkpointer(A/run-10/state)`` was accepted and failed only
    at its first save's close()."""
    base = str(tmp_path / "A")
    cc.save(f"{base}/run-10", {"w": jnp.ones(2)}, step=10)
    before = _keys(base)
    with pytest.raises(cc.CheckpointPathError, match=r"inside the committed checkpoint \S*run-10 \(its entry"):
        cc.Checkpointer(f"{base}/run-10/{inner}", step_policies=[cc.CheckpointInterval(every=1)], handle_sigterm=False)
    assert _keys(base) == before
