"""Functions each test process runs (after jax.distributed.initialize); results are JSON."""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt_callbacks as cc

SPECS = {"w": P("x", "y"), "rep": P(), "part": P("x"), "keys": P("x")}


def _mesh(shape):
    return Mesh(np.array(jax.devices()).reshape(shape), ("x", "y"))


def expected():
    """The global values every process agrees on (no process holds them all as jax arrays)."""
    return {
        "w": np.arange(8 * 16, dtype=np.float32).reshape(8, 16),
        "rep": (np.arange(512 * 1024, dtype=np.float32) % 251).reshape(512, 1024),  # 2 MiB, replicated
        "part": np.arange(8 * 4, dtype=np.int32).reshape(8, 4),
        "keys": np.asarray(jax.random.key_data(jax.random.split(jax.random.key(3), 8))),
        "host": np.arange(10, dtype=np.float64),
    }


def _global(value, mesh, spec):
    return jax.make_array_from_callback(value.shape, NamedSharding(mesh, spec), lambda idx: value[idx])


def build_state(mesh):
    data = expected()
    state = {k: _global(data[k], mesh, SPECS[k]) for k in ("w", "rep", "part")}
    state["keys"] = jax.random.wrap_key_data(_global(data["keys"], mesh, P("x", None)), impl="threefry2x32")
    state["host"] = data["host"]
    state["step"] = 7
    return state


def save(path, mesh_shape, step=1, timeout_s=60.0, pack_bytes=1 << 20, layout="zarr3"):
    mesh = _mesh(mesh_shape)
    state = build_state(mesh)
    assert not state["w"].is_fully_addressable or jax.process_count() == 1
    stats = cc.save_async(path, state, step=step, timeout_s=timeout_s, pack_bytes=pack_bytes, layout=layout).wait()
    return {"pid": jax.process_index(), "bytes": stats.bytes_written}


def _check_local(restored):
    """Each process compares its own addressable shards with the expected global values."""
    data = expected()
    problems = []
    for name in ("w", "rep", "part", "keys"):
        value = restored[name]
        if name == "keys":
            value = jax.random.key_data(value)
        for shard in value.addressable_shards:
            if not np.array_equal(np.asarray(shard.data), data[name][shard.index]):
                problems.append(f"{name} {shard.index}")
    if not np.array_equal(restored["host"], data["host"]) or restored["step"] != 7:
        problems.append("host/step")
    return problems


def restore(path, mesh_shape, rules=None):
    mesh = _mesh(mesh_shape)
    rule_list = None if rules is None else [(pattern, P(*spec)) for pattern, spec in rules]
    try:
        restored = cc.restore(path, mesh=mesh, rules=rule_list)
    except cc.CorruptCheckpointError as e:
        return {"pid": jax.process_index(), "corrupt": str(e)}
    return {
        "pid": jax.process_index(),
        "problems": _check_local(restored),
        "spec_w": str(restored["w"].sharding.spec),
        "addressable": restored["w"].is_fully_addressable,
    }


def agreement(path, skew, steps, request_at=None, sync_every=10):
    """Skewed clocks and a preemption request on one process: do all save at the same steps?"""
    pid = jax.process_index()
    clock_now = [1000.0 + pid * skew]
    ck = cc.Checkpointer(
        path, save_interval=25.0, clock=lambda: clock_now[0], sync_every_steps=sync_every, handle_sigterm=False
    )
    saved = []
    for step in range(1, steps + 1):
        clock_now[0] += 1.0 + 0.1 * pid  # the clocks also run at different rates
        if request_at is not None and step == request_at and pid == jax.process_count() - 1:
            ck.request_save()
        if ck.on_step({"v": np.full(3, step, np.float32)}, step=step):
            saved.append(step)
    ck.close()
    return {"pid": pid, "saved": saved, "kinds": [(c.step, c.is_temporary) for c in cc.list_checkpoints(path)]}


def die_mid_save(path, timeout_s):
    """Process 1 dies right after its snapshot; the others must fail within ``timeout_s``."""
    mesh = _mesh((2, 2))
    state = build_state(mesh)
    cc.save(f"{path}/run-1", state, step=1)
    handle = cc.save_async(f"{path}/run-2", state, step=2, timeout_s=timeout_s)
    if jax.process_index() == 1:
        os._exit(17)
    start = time.monotonic()
    try:
        handle.wait()
    except Exception as e:
        return {
            "pid": jax.process_index(),
            "error": f"{type(e).__name__}: {e}",
            "after_s": time.monotonic() - start,
            "peer_died": True,
        }
    return {"pid": jax.process_index(), "error": None, "peer_died": True}


def train(path, steps, kill_after=None):
    """The demo's kind of loop in several processes: data-parallel MLP, callback, resume."""
    import linen_model

    mesh = Mesh(np.array(jax.devices()), ("data",))

    def init():
        return jax.device_put(linen_model.init_state(8, 32), NamedSharding(mesh, P()))

    def batch(step):
        x = np.asarray(jax.random.normal(jax.random.key(step), (32, 8)))
        y = np.sin(x.sum(axis=1, keepdims=True))
        sharding = NamedSharding(mesh, P("data"))
        return (
            jax.make_array_from_callback(x.shape, sharding, lambda i: x[i]),
            jax.make_array_from_callback(y.shape, sharding, lambda i: y[i]),
        )

    train_step = linen_model.train_step
    holder = {}
    cb = cc.CheckpointCallback(
        path, state_fn=lambda: holder["state"], step_policies=[cc.CheckpointInterval(every=5)], handle_sigterm=False
    )
    state, meta = cb.checkpointer.restore_or_init(init, template=init())
    start = 0 if meta is None else meta["step"]
    losses = {}
    for step in range(start + 1, steps + 1):
        state, loss = train_step(state, *batch(step))
        holder["state"] = state
        losses[step] = float(loss)
        cb(step)
        if kill_after is not None and step == kill_after:
            break
    else:
        cb.on_train_end(steps)
    cb.close()
    return {"pid": jax.process_index(), "start": start, "losses": losses, "steps": cb.checkpointer.all_steps()}


def save_unshared(path):
    """Every process saves to a path only it can see (memory:// is per process)."""
    mesh = _mesh((2, 2))
    start = time.monotonic()
    try:
        cc.save(path, build_state(mesh), step=1, timeout_s=60.0)
    except Exception as e:
        return {"pid": jax.process_index(), "error": f"{type(e).__name__}: {e}", "after_s": time.monotonic() - start}
    return {"pid": jax.process_index(), "error": None}


FAILING_SAVE_TIMEOUT_S = 60.0


def save_with_failing_process(path, proxy, scheme):
    """Process 1 sends its storage traffic through ``proxy`` (which fails its writes) for run-2."""
    mesh = _mesh((2, 2))
    state = build_state(mesh)
    opts = cc.StorageOptions(max_retries=2, initial_delay_s=0.01, max_delay_s=0.05, op_timeout_s=10.0)
    cc.save(f"{path}/run-1", state, step=1, storage=opts)
    if jax.process_index() == 1:
        for var in (
            ("AWS_ENDPOINT_URL_S3",) if scheme == "s3" else ("TENSORSTORE_GCS_HTTP_URL", "STORAGE_EMULATOR_HOST")
        ):
            os.environ[var] = proxy
    start = time.monotonic()
    try:
        cc.save(f"{path}/run-2", state, step=2, storage=opts, timeout_s=FAILING_SAVE_TIMEOUT_S)
    except Exception as e:
        return {"pid": jax.process_index(), "error": f"{type(e).__name__}: {e}", "after_s": time.monotonic() - start}
    return {"pid": jax.process_index(), "error": None, "after_s": time.monotonic() - start}


def save_golden(path, layout):
    """One of the two-process golden checkpoints (``tests/golden/make_golden.py``)."""
    from golden import state

    mesh = _mesh((2, 4))
    data = state.sharded_values()
    tree = {
        "w": _global(data["w"], mesh, P("x", "y")),
        "part": _global(data["part"], mesh, P("x")),
        "rep": _global(data["rep"], mesh, P()),
        "step": 12,
        "name": "two processes",
    }
    cc.save(path, tree, step=12, layout=layout, max_host_bytes=2048, timeout_s=60.0)
    return {"pid": jax.process_index()}


def save_steps(base, mesh_shape, steps):
    """``build_state`` saved as ``run-<step>`` for each of ``steps`` (every chunk its own file)."""
    state = build_state(_mesh(mesh_shape))
    for step in steps:
        cc.save(f"{base}/run-{step}", state, step=step, pack_bytes=0, timeout_s=60.0)
    return {"pid": jax.process_index()}


def resume_latest(base, mesh_shape, step=None, fallback=True, discard_newer=False):
    """A Checkpointer's restore of the latest (or of ``step``): what each process got."""
    ck = cc.Checkpointer(base, handle_sigterm=False)
    try:
        tree, meta = ck.restore(step, mesh=_mesh(mesh_shape), fallback=fallback, discard_newer=discard_newer)
    except cc.CheckpointError as e:
        return {"pid": jax.process_index(), "error": type(e).__name__, "message": str(e)}
    finally:
        ck.close()
    return {"pid": jax.process_index(), "step": meta["step"], "problems": _check_local(tree), "steps": ck.all_steps()}


def _host_int(value):
    """A replicated scalar as a Python int (a jax array over several processes: its local shard)."""
    if isinstance(value, jax.Array):
        return int(np.asarray(value.addressable_shards[0].data))
    return int(value)


def local_train(
    base,
    local_root,
    steps,
    mesh_shape,
    local_every=2,
    persistent_every=6,
    replicas=None,
    progress=None,
    transfer_bytes=1 << 16,
    rounds_per_step=2,
    rows=32,
    watchdog=None,
    hold=None,
    record=False,
):
    """A training loop with a LocalTier: ``local_root/p<pid>`` is this process's own directory.

    The step is ``w = w * 0.5 + mean(w) + step`` on a ``mesh_shape`` mesh (an all-reduce across
    processes), so a wrong or missing region changes every later value. Returns the step resumed
    from, its tier, and the sha256 of every addressable shard at the end (by global index).
    ``hold=[pid, step]``: that process stops after writing its progress for ``step`` (sleeps, for
    the test to kill it). ``record``: also the sha256 of the whole of ``w`` after every step.
    """
    import faulthandler
    import hashlib
    import logging
    import sys

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)  # never inside the RESULT line
    if watchdog:
        faulthandler.dump_traceback_later(watchdog, exit=True)
    mesh = _mesh(mesh_shape)
    sharding = NamedSharding(mesh, P(*mesh.axis_names))
    replicated = NamedSharding(mesh, P())

    def init():
        w = jax.device_put(jnp.arange(rows * 64, dtype=jnp.float32).reshape(rows, 64) / 7.0, sharding)
        return {"w": w, "b": jax.device_put(jnp.ones(8, jnp.bfloat16), replicated), "n": 0}

    @jax.jit
    def train_step(state, step):
        w = state["w"] * 0.5 + jnp.mean(state["w"]) + step
        return {"w": w, "b": state["b"] + jnp.bfloat16(1), "n": state["n"]}

    local = cc.LocalTier(
        f"{local_root}/p{jax.process_index()}",
        step_policies=[cc.CheckpointInterval(every=local_every)],
        replicas=replicas,
        transfer_bytes=transfer_bytes,
        rounds_per_step=rounds_per_step,
    )
    ck = cc.Checkpointer(
        base, step_policies=[cc.CheckpointInterval(every=persistent_every)], local=local, handle_sigterm=False
    )
    state, meta = ck.restore_or_init(init)
    start = 0 if meta is None else meta["step"]
    tier = None if meta is None else meta.get("tier", "persistent")
    recorded = {}
    for step in range(start + 1, steps + 1):
        state = train_step(state, step)
        state = dict(state, n=step)
        ck.on_step(state, step=step)
        if record:
            recorded[str(step)] = _global_digest(state["w"])
        if progress:
            with open(f"{progress}.{jax.process_index()}", "w") as f:
                f.write(str(step))
        if hold is not None and [jax.process_index(), step] == list(hold):
            time.sleep(3600)  # the test kills this process here
    ck.close()
    digests = {
        str([(s.start, s.stop) for s in shard.index]): hashlib.sha256(np.asarray(shard.data).tobytes()).hexdigest()
        for shard in state["w"].addressable_shards
    }
    return {
        "pid": jax.process_index(),
        "start": start,
        "tier": tier,
        "n": _host_int(state["n"]),
        "w": digests,
        "b": float(np.asarray(state["b"].addressable_shards[0].data)[0]),
        "global": recorded,
    }


def _global_digest(array):
    """The sha256 of a global array's bytes, the same on every process (a collective)."""
    import hashlib

    from jax.experimental import multihost_utils

    return hashlib.sha256(np.asarray(multihost_utils.process_allgather(array, tiled=True)).tobytes()).hexdigest()


def local_restore(base, local_root, mesh_shape, rows=32):
    """``local_train``'s state restored on ``mesh_shape`` (no training): its step, tier and the
    sha256 of the whole of ``w``."""
    import logging
    import sys

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)  # never inside the RESULT line
    mesh = _mesh(mesh_shape)

    def init():
        w = jnp.zeros((rows, 64), jnp.float32)
        return {
            "w": jax.device_put(w, NamedSharding(mesh, P(*mesh.axis_names))),
            "b": jax.device_put(jnp.zeros(8, jnp.bfloat16), NamedSharding(mesh, P())),
            "n": 0,
        }

    local = cc.LocalTier(f"{local_root}/p{jax.process_index()}", step_policies=[cc.CheckpointInterval(every=2)])
    ck = cc.Checkpointer(base, local=local, handle_sigterm=False)
    state, meta = ck.restore_or_init(init)
    ck.close()
    return {
        "pid": jax.process_index(),
        "step": None if meta is None else meta["step"],
        "tier": None if meta is None else meta.get("tier", "persistent"),
        "n": int(state["n"]),
        "global": _global_digest(state["w"]),
        "shard_shape": list(state["w"].addressable_shards[0].data.shape),
        "b": float(np.asarray(state["b"].addressable_shards[0].data)[0]),
    }


def local_shared(base, local_dir):
    """Every process gives the same ``local_dir``: the first local save must refuse it."""
    mesh = _mesh((jax.process_count(), jax.local_device_count()))
    state = {"w": jax.device_put(jnp.ones((8, 8)), NamedSharding(mesh, P("x", "y")))}
    local = cc.LocalTier(local_dir, step_policies=[cc.CheckpointInterval(every=1)])
    ck = cc.Checkpointer(base, local=local, handle_sigterm=False)
    try:
        ck.on_step(state, step=1)
    except cc.CheckpointPathError as e:
        return {"pid": jax.process_index(), "error": type(e).__name__, "message": str(e)}
    finally:
        try:
            ck.close()
        except Exception as e:  # the refusal above is what the test checks; a close error is reported too
            print(f"close: {type(e).__name__}: {e}", flush=True)
    return {"pid": jax.process_index(), "error": None}
