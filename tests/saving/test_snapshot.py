"""Snapshot modes: device copies within a budget, host copies for the rest, nothing beyond
what this process writes, and the caller's buffers free to donate once ``save_async`` returns.

The branches an accelerator takes are forced on CPU: memory statistics are injected, and the
``pinned_host`` memory kind (which JAX exposes on CPU too) is used explicitly.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import ckpt_callbacks as cc
from ckpt_callbacks import saving as serializer
from ckpt_callbacks.saving import HOST_BUFFERS, Snapshot, device_budgets, unit_bytes
from conftest import assert_tree_equal, put

MiB = 1 << 20


def _tree(mesh):
    return {
        "sharded": put(jnp.arange(1024 * 256, dtype=jnp.float32).reshape(1024, 256), mesh, P("x", "y")),
        "rows": put(jnp.ones((512, 512), jnp.float32), mesh, P("x")),  # replicated over "y"
        "replicated": put(jnp.full((2048, 256), 3.0, jnp.float32), mesh, P()),  # over all 8 devices
        "host": np.arange(1000, dtype=np.int64),
    }


def _pairs(tree):
    plan = serializer._plan({"state": tree}, cc.SaveOptions(pack_bytes=0))
    return plan.pairs


def _device_bytes(copies) -> dict:
    """Bytes of the snapshot's copies that live in device memory, per device."""
    out = collections.Counter()
    for copy in copies.values():
        if isinstance(copy, jax.Array) and copy.sharding.memory_kind in (None, "device"):
            (device,) = copy.devices()
            out[device] += copy.nbytes
    return out


def _unique_device_bytes(snapshot) -> dict:
    seen, out = set(), collections.Counter()
    for copy in snapshot.copies.values():
        if isinstance(copy, jax.Array) and id(copy) not in seen and copy.sharding.memory_kind in (None, "device"):
            seen.add(id(copy))
            (device,) = copy.devices()
            out[device] += copy.nbytes
    return out


def _written_per_device(pairs) -> dict:
    out = collections.Counter()
    for leaf, unit in pairs:
        if leaf.record.source == "jax":
            out[unit.device] += unit_bytes(leaf, unit)
    return out


@pytest.mark.parametrize("free_mib", [0, 0.3, 1, 64])
def test_auto_copies_on_device_only_within_the_free_memory(mesh42, free_mib):
    tree = _tree(mesh42)
    pairs = _pairs(tree)
    limit = 256 * MiB

    def stats(device):
        return {"bytes_limit": limit, "bytes_in_use": limit - int(free_mib * MiB) - int(0.1 * limit)}

    budgets = device_budgets(jax.local_devices(), "auto", stats, 0.1)
    assert set(budgets.values()) == {int(free_mib * MiB)}
    snapshot = Snapshot.copied(pairs, dict(budgets), pinned=True)
    on_device = _unique_device_bytes(snapshot)
    written = _written_per_device(pairs)
    for device, nbytes in on_device.items():
        assert nbytes <= budgets[device]
    if free_mib >= 64:
        assert on_device == written  # room for everything: all on device
    if free_mib == 0:
        assert not on_device  # no room: all to pinned host memory
    pinned = sum(
        c.nbytes
        for c in snapshot.copies.values()
        if getattr(c, "sharding", None) is not None and c.sharding.memory_kind == "pinned_host"
    )
    assert (pinned > 0) == any(written[d] > budgets[d] for d in written)
    for n in range(len(pairs)):  # every unit comes back exactly
        leaf, unit = pairs[n]
        expected = np.asarray(leaf.source if leaf.record.source == "numpy" else unit_source_host(leaf, unit))
        np.testing.assert_array_equal(snapshot.host_array(n), expected)
    snapshot.release()


def unit_source_host(leaf, unit):
    from ckpt_callbacks.format import slices

    return np.asarray(leaf.source)[slices(unit.region)]


def test_no_mode_copies_more_than_this_process_writes(mesh42):
    """A leaf replicated over 8 devices is written once, split over replicas: its copies are
    the written slices, not 8 whole replicas (256 MiB instead of 32 MiB at 64 MiB x 4)."""
    tree = _tree(mesh42)
    pairs = _pairs(tree)
    written = sum(_written_per_device(pairs).values())
    replicated = tree["replicated"].nbytes
    for budgets, pinned in ((None, False), (None, True), ({d: 0 for d in jax.local_devices()}, True)):
        snapshot = Snapshot.copied(pairs, budgets, pinned=pinned)
        copied = sum(c.nbytes for c in {id(c): c for c in snapshot.copies.values()}.values())
        assert copied <= written + tree["host"].nbytes
        assert copied < written + replicated  # not one whole replica per device
        snapshot.release()


def test_budgets_from_memory_statistics():
    devices = jax.local_devices()[:2]
    assert device_budgets(devices, "device", None, 0.1) is None
    assert device_budgets(devices, "host", lambda d: {"bytes_limit": 10**9}, 0.1) == {d: 0 for d in devices}
    assert device_budgets(devices, "auto", None, 0.1) == {d: 0 for d in devices}  # CPU: no statistics
    stats = {"bytes_limit": 1000, "bytes_in_use": 850}
    assert device_budgets(devices, "auto", lambda d: stats, 0.1) == {d: 50 for d in devices}
    assert device_budgets(devices, "auto", lambda d: {"bytes_limit": 1000, "bytes_in_use": 990}, 0.1) == {
        d: 0 for d in devices
    }


@pytest.mark.parametrize(
    "options",
    [
        {"snapshot": "device"},
        {"snapshot": "host"},
        {"snapshot": "auto"},
        {"snapshot": "auto", "memory_stats": lambda d: {"bytes_limit": 64 * MiB, "bytes_in_use": 60 * MiB}},
        {"snapshot": "host", "max_host_bytes": 2 * MiB},
    ],
    ids=["device", "host", "auto", "auto-tight", "host-budget"],
)
def test_donating_right_after_return_is_safe_in_every_mode(tmp_path, mesh42, options):
    tree = _tree(mesh42)
    expected = jax.tree.map(np.array, tree)

    @jax.jit
    def step(state):
        return jax.tree.map(lambda x: x * 0 - 1, state)

    donating = jax.jit(step, donate_argnums=0)
    handle = cc.save_async(str(tmp_path / "ck"), tree, **options)
    device_tree = {k: v for k, v in tree.items() if isinstance(v, jax.Array)}
    clobbered = donating(device_tree)  # the source buffers are reused right away
    jax.block_until_ready(clobbered)
    handle.wait()
    restored = cc.restore(str(tmp_path / "ck"))
    assert_tree_equal(jax.tree.map(np.asarray, restored), expected)


def test_host_buffer_is_reused_between_saves_and_never_shared(tmp_path, mesh42):
    HOST_BUFFERS.drop()
    tree = {"w": put(jnp.ones((512, 512)), mesh42, P("x"))}
    cc.save_async(str(tmp_path / "a"), tree, snapshot="host").wait()
    kept = HOST_BUFFERS._free
    assert kept is not None and kept.nbytes >= tree["w"].nbytes
    first = cc.save_async(str(tmp_path / "b"), tree, snapshot="host")
    second = cc.save_async(str(tmp_path / "c"), {"w": tree["w"] * 2}, snapshot="host")  # the buffer is taken
    first.wait()
    second.wait()
    assert cc.restore(str(tmp_path / "b"))["w"].tolist() == np.ones((512, 512)).tolist()
    assert cc.restore(str(tmp_path / "c"))["w"].tolist() == (2 * np.ones((512, 512))).tolist()


def test_snapshot_mode_is_checked_and_reaches_the_checkpointer(tmp_path):
    with pytest.raises(ValueError, match="snapshot must be 'auto', 'device' or 'host'"):
        cc.SaveOptions(snapshot="gpu")
    ck = cc.Checkpointer(str(tmp_path), snapshot="host", handle_sigterm=False)
    assert ck.options.snapshot == "host"
    cb = cc.CheckpointCallback(str(tmp_path), snapshot="device", handle_sigterm=False)
    assert cb.checkpointer.options.snapshot == "device"
    ck.close()
    cb.close()
