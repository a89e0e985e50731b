"""LocalTier parts on one process under kills and hostile files: a restarted process restores
exactly the state of the step it reports, from either tier, or starts fresh; never wrong data.

A kill is ``_store.fault`` raising at its k-th call (before a data block, the manifest, the
marker or a delete) and at every call after it: the dead process writes nothing more.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import tempfile

import crc32c
import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import ckpt_callbacks as cc
from ckpt_callbacks.manager._local import _store
from conftest import assert_tree_equal, make_mesh, put

_SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class Killed(Exception):
    """The process died here."""


class Kill:
    """``_store.fault``: raises at the k-th call and every call after it."""

    def __init__(self, at: int) -> None:
        self.at, self.calls, self.ops = at, 0, []

    @property
    def dead(self) -> bool:
        return self.calls >= self.at

    def __call__(self, op: str) -> None:
        self.calls += 1
        self.ops.append(op)
        if self.dead:
            raise Killed(f"killed at {op} (call {self.calls})")


def _state(step, mesh, trajectory=0):
    """About 1.2 MiB per save: 'big' (replicated) takes two data blocks, 'w' four regions."""
    value = step + 1000 * trajectory
    return {
        "w": put(jnp.arange(64.0).reshape(8, 8) * value, mesh, P("x")),
        "big": put(jnp.full((300_000,), value, jnp.float32) + jnp.arange(300_000, dtype=jnp.float32), mesh, P()),
        "n": value,
    }


def _checkpointer(root, keep_last=2):
    return cc.Checkpointer(
        str(root / "persistent"),
        step_policies=[cc.CheckpointInterval(every=5)],
        handle_sigterm=False,
        local=cc.LocalTier(str(root / "local"), step_policies=[cc.CheckpointInterval(every=2)], keep_last=keep_last),
    )


def _restore(ck, mesh):
    return ck.restore_or_init(lambda: _state(0, mesh), template=_state(0, mesh))


def _committed_local(root, ck):
    return max((r["step"] for r in ck.local.saved if r["complete"]), default=None)


def _persistent(root):
    path = root / "persistent"
    names = os.listdir(path) if path.is_dir() else []
    return max((int(n[4:]) for n in names if n.startswith("run-") and n[4:].isdigit()), default=None)


def _run_until_killed(ck, steps, mesh, kill, states, trajectory=0):
    """Trains until the kill fires; the dead process's Checkpointer is closed with the fault
    still raising (its threads joined, its local tier writing nothing more)."""
    try:
        for step in steps:
            states[step] = _state(step, mesh, trajectory)
            try:
                ck.on_step(states[step], step=step)
            except Killed:
                break
            if kill.dead:
                break
        if not kill.dead:
            ck.wait_until_finished()
    finally:
        ck.close()


def _check_restore(root, mesh, states, floor):
    """A new process restores exactly ``states[step]`` at a step no older than ``floor``."""
    ck = _checkpointer(root)
    state, meta = _restore(ck, mesh)
    if meta is None:
        assert floor is None, f"a fresh start, yet step {floor} was committed"
        assert_tree_equal(state, _state(0, mesh))
    else:
        assert floor is None or meta["step"] >= floor, (meta, floor)
        assert_tree_equal(state, states[meta["step"]])
    return ck, meta


@_SETTINGS
@given(at=st.integers(1, 48), resume_at=st.integers(1, 48))
def test_a_kill_anywhere_never_restores_wrong_data(at, resume_at):
    mesh = make_mesh((4, 2))
    root = pathlib.Path(tempfile.mkdtemp(prefix="local-kill-"))
    states = {}
    try:
        kill = Kill(at)
        _store.fault = kill
        ck = _checkpointer(root)
        _run_until_killed(ck, range(1, 12), mesh, kill, states)
        floor = max(filter(None, [_committed_local(root, ck), _persistent(root)]), default=None)
        _store.fault = None
        ck, meta = _check_restore(root, mesh, states, floor)
        start = meta["step"] if meta else 0
        # the restarted process goes on, on another trajectory, and is killed again
        kill = Kill(resume_at)
        _store.fault = kill
        for step in [s for s in states if s > start]:
            del states[step]
        _run_until_killed(ck, range(start + 1, start + 8), mesh, kill, states, trajectory=1)
        floor = max(filter(None, [start, _committed_local(root, ck), _persistent(root)]), default=None)
        _store.fault = None
        ck, _ = _check_restore(root, mesh, states, floor)
        ck.close()
    finally:
        _store.fault = None


def test_every_kind_of_write_is_a_kill_point():
    """The seam sees every write op of a run (what the property above kills at)."""
    mesh = make_mesh((4, 2))
    root = pathlib.Path(tempfile.mkdtemp(prefix="local-ops-"))
    kill = Kill(10**9)
    try:
        _store.fault = kill
        ck = _checkpointer(root)
        _run_until_killed(ck, range(1, 12), mesh, kill, {})
    finally:
        _store.fault = None
    assert set(kill.ops) == {"data", "manifest", "commit", "delete"}
    save = ["data"] * 6 + ["manifest", "commit"]  # big's two blocks, w's four regions
    assert kill.ops == save * 3 + ["delete"] + save + ["delete"] + save + ["delete"]  # the property's 48 cover it


# -- hostile files ---------------------------------------------------------------------------


def _trained(mesh):
    """A run of 12 steps: local steps 10 and 12, persistent 5 and 10."""
    root = pathlib.Path(tempfile.mkdtemp(prefix="local-hostile-"))
    ck = _checkpointer(root)
    states = {}
    for step in range(1, 13):
        states[step] = _state(step, mesh)
        ck.on_step(states[step], step=step)
    ck.close()
    assert sorted(os.listdir(root / "local")) == [".claims", "step_10", "step_12"]
    return root, states


def _flip(path: pathlib.Path, at: int, mask: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at % len(raw)] ^= mask
    path.write_bytes(bytes(raw))


def _forge(part: pathlib.Path, edit) -> None:
    """Rewrites the manifest with ``edit`` and its crc32c in the marker, as one who knows the format."""
    manifest = json.loads((part / "manifest.json").read_bytes())
    edit(manifest)
    raw = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    (part / "manifest.json").write_bytes(raw)
    marker = json.loads((part / _store.COMMITTED).read_bytes())
    marker["manifest_crc32c"] = int(crc32c.crc32c(raw))
    (part / _store.COMMITTED).write_bytes(json.dumps(marker).encode())


def _other_region(manifest):
    manifest["pieces"][0][1][0] = [0, 1]


def _other_offset(manifest):
    manifest["pieces"][0][2] += 4


def _swap_pieces(manifest):
    a, b = manifest["pieces"][0], manifest["pieces"][1]
    a[1], b[1] = b[1], a[1]


def _damage(part: pathlib.Path, kind: str, at: int, mask: int) -> None:
    if kind in ("data.bin", "manifest.json", _store.COMMITTED):
        _flip(part / kind, at, mask)
    elif kind == "truncated data.bin":
        raw = (part / "data.bin").read_bytes()
        (part / "data.bin").write_bytes(raw[: at % len(raw)])
    elif kind == "longer data.bin":
        with open(part / "data.bin", "ab") as f:
            f.write(b"\0" * (1 + at % 64))
    elif kind == "deleted manifest":
        (part / "manifest.json").unlink()
    elif kind == "deleted data.bin":
        (part / "data.bin").unlink()
    elif kind == "emptied marker":
        (part / _store.COMMITTED).write_bytes(b"")
    elif kind == "a directory for data.bin":
        (part / "data.bin").unlink()
        (part / "data.bin").mkdir()
    else:
        _forge(
            part,
            {"forged regions": _other_region, "forged offsets": _other_offset, "swapped pieces": _swap_pieces}[kind],
        )


# Damage found reading the part (a region's crc32c, the manifest against the layout): warned of.
WARNED = ["data.bin", "forged regions", "forged offsets", "swapped pieces"]
# Damage that makes the part not count when the directory is scanned.
UNCOUNTED = [
    "manifest.json",
    _store.COMMITTED,
    "truncated data.bin",
    "longer data.bin",
    "deleted manifest",
    "deleted data.bin",
    "emptied marker",
    "a directory for data.bin",
]
KINDS = WARNED + UNCOUNTED


@_SETTINGS
@given(kind=st.sampled_from(KINDS), both=st.booleans(), at=st.integers(0, 2**31), mask=st.integers(1, 255))
def test_a_damaged_local_part_falls_back_with_a_warning(kind, both, at, mask):
    mesh = make_mesh((4, 2))
    root, states = _trained(mesh)
    for step in (12, 10) if both else (12,):
        _damage(root / "local" / f"step_{step}" / "set_0", kind, at, mask)
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("ckpt_callbacks")
    logger.addHandler(handler)
    try:
        ck = _checkpointer(root)
        state, meta = _restore(ck, mesh)
    finally:
        logger.removeHandler(handler)
    assert meta is not None and meta["step"] == 10, meta  # local 10 or the persistent tier's 10, never 12
    if both:
        assert meta.get("tier") != "local"
    assert_tree_equal(state, states[10])
    text = "\n".join(r.getMessage() for r in records)
    if kind in WARNED:
        assert "local step 12" in text, f"{kind}: no warning names the damaged step:\n{text}"
    ck.close()


@pytest.mark.parametrize("kind", UNCOUNTED)
def test_a_part_that_does_not_count_is_warned_of(kind, caplog):
    mesh = make_mesh((4, 2))
    root, states = _trained(mesh)
    _damage(root / "local" / "step_12" / "set_0", kind, 12345, 0x04)
    ck = _checkpointer(root)
    with caplog.at_level(logging.INFO, "ckpt_callbacks"):
        state, meta = _restore(ck, mesh)
    ck.close()
    assert meta is not None and meta["step"] == 10
    assert_tree_equal(state, states[10])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step_12" in w and "set_0" in w for w in warnings), warnings


def test_a_flipped_data_byte_names_the_region_and_the_older_local_step_is_used(caplog):
    mesh = make_mesh((4, 2))
    root, states = _trained(mesh)
    _flip(root / "local" / "step_12" / "set_0" / "data.bin", 4 * 64 + 100, 0x10)  # in 'big'
    ck = _checkpointer(root)
    with caplog.at_level(logging.INFO, "ckpt_callbacks"):
        state, meta = _restore(ck, mesh)
    assert meta is not None and meta["step"] == 10 and meta.get("tier") == "local"  # the newest that restores
    assert_tree_equal(state, states[10])
    assert "local step 12 could not be restored" in caplog.text
    assert "big: crc32c 0x" in caplog.text
    ck.close()


def test_a_part_that_is_not_a_directory_is_passed_over(caplog):
    mesh = make_mesh((4, 2))
    root, states = _trained(mesh)
    part = root / "local" / "step_12" / "set_0"
    for name in os.listdir(part):
        (part / name).unlink()
    part.rmdir()
    part.write_bytes(b"a file where a part goes")
    (root / "local" / "step_99").write_bytes(b"a file where a step goes")
    ck = _checkpointer(root)
    with caplog.at_level(logging.INFO, "ckpt_callbacks"):
        state, meta = _restore(ck, mesh)
    assert meta is not None and (meta["step"], meta["tier"]) == (10, "local")
    assert_tree_equal(state, states[10])
    ck.close()


@pytest.fixture(autouse=True)
def _no_fault_left():
    yield
    assert _store.fault is None
    _store.fault = None
