"""What a training loop really loses to an async save, per snapshot mode, against orbax.

A jitted train step of about ``step_ms`` (a matmul chain on a small leaf, the whole state
donated, as real steps donate it) runs in a loop over a model-like state. At one step the
save is started; the loop goes on for a fixed number of steps, then waits for the save. Per
case, median of ``repeats``:

- ``blocking_s``: how long the save call took;
- ``first_step_excess_s``: how much longer the first step after it took than a normal step
  (a snapshot copied asynchronously is paid here);
- ``lost_s``: loop time lost over the whole save: (save call + the steps + the final wait)
  minus the same number of normal steps;
- ``extra_device_bytes``: device-resident bytes the save added, measured when the call returns
  (when its copies are all alive).
"""

from __future__ import annotations

import functools
import os
import shutil
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import ckpt_callbacks as cc


def device_bytes() -> int:
    """Bytes of device memory held by live jax arrays (each buffer once: views of one shard,
    such as ``shard.data``, share it; host memory kinds are not counted)."""
    buffers = {}
    for array in jax.live_arrays():
        if array.sharding.memory_kind not in (None, "device") or array.is_deleted():
            continue
        for shard in array.addressable_shards:
            buffers[(shard.device.id, shard.data.unsafe_buffer_pointer())] = shard.data.nbytes
    return sum(buffers.values())


def _train_step(matmuls: int) -> Callable[[dict[str, jax.Array]], dict[str, jax.Array]]:
    @functools.partial(jax.jit, donate_argnums=0)
    def step(state: dict[str, jax.Array]) -> dict[str, jax.Array]:
        w = state["step_w"]
        for _ in range(matmuls):
            w = jnp.tanh(w @ w * 0.01)
        return {**state, "step_w": w}

    return step


def _calibrate(state: dict[str, jax.Array], step_ms: float) -> tuple[Callable[..., Any], dict[str, jax.Array], float]:
    """A step of about ``step_ms`` (more matmuls until it takes that long); returns its time."""
    matmuls = 1
    while True:
        step = _train_step(matmuls)
        state = jax.block_until_ready(step(state))  # compile
        times = []
        for _ in range(5):
            start = time.perf_counter()
            state = jax.block_until_ready(step(state))
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        if seconds * 1000 >= step_ms or matmuls >= 256:
            return step, state, seconds
        matmuls = max(matmuls + 1, int(matmuls * step_ms / 1000 / max(seconds, 1e-4)))


def _one(
    state: dict[str, jax.Array], step: Callable[..., Any], save: Callable[..., Any], steps: int
) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    normal = []
    for _ in range(10):
        start = time.perf_counter()
        state = jax.block_until_ready(step(state))
        normal.append(time.perf_counter() - start)
    baseline = statistics.median(normal)
    before = device_bytes()
    start = time.perf_counter()
    finish = save(state)
    blocking = time.perf_counter() - start
    extra = device_bytes() - before
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state = jax.block_until_ready(step(state))
        times.append(time.perf_counter() - t0)
    finish()
    total = time.perf_counter() - start
    row = {
        "blocking_s": blocking,
        "first_step_excess_s": times[0] - baseline,
        "lost_s": total - steps * baseline,
        "extra_device_bytes": max(extra, 0),
        "step_s": baseline,
    }
    return row, state


def loop_cases(
    state: dict[str, jax.Array], root: str, *, repeats: int, step_ms: float = 15.0, seconds: float = 3.0
) -> list[dict[str, Any]]:
    """One row per case: ckpt_callbacks per snapshot mode, and orbax's async save."""
    import orbax.checkpoint as ocp

    mesh = next(iter(state.values())).sharding.mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = {**state, "step_w": jax.device_put(jnp.eye(256, dtype=jnp.float32), replicated)}
    step, state, step_s = _calibrate(state, step_ms)
    steps = max(20, int(seconds / step_s))
    orbax = ocp.StandardCheckpointer()
    counter = [0]

    def fresh() -> str:
        counter[0] += 1
        path = os.path.join(root, f"loop-{counter[0]}")
        shutil.rmtree(path, ignore_errors=True)
        return path

    def ours(mode: str) -> Callable[..., Any]:
        def save(s: Any) -> Callable[[], Any]:
            return cc.save_async(fresh(), s, snapshot=mode).wait

        return save

    def theirs(s: Any) -> Callable[[], Any]:
        orbax.save(fresh(), s)
        return orbax.wait_until_finished

    # One untimed save of each kind first, so that no case pays another's first-use costs (host
    # buffers, compilation of copies, orbax's thread pools): every case below is a repeated save.
    ours("auto")(state)()
    theirs(state)()
    # "device" last: on an accelerator filled to 85% it is expected to run out of memory.
    cases = [("ckpt_callbacks save_async, snapshot=" + m, ours(m)) for m in ("auto", "host")]
    cases += [("orbax async save", theirs), ("ckpt_callbacks save_async, snapshot=device", ours("device"))]
    rows = []
    for name, save in cases:
        runs = []
        try:
            for _ in range(repeats):
                row, state = _one(state, step, save, steps)
                runs.append(row)
        except Exception as e:  # an out-of-memory is a result here, not a crash of the benchmark
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            print(f"  {name:44s} FAILED: {type(e).__name__}: {str(e)[:200]}", flush=True)
            rows.append({"name": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            break
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        med.update(name=name, steps=steps, all_lost_s=[r["lost_s"] for r in runs])
        print(
            f"  {name:44s} blocking {med['blocking_s']:.3f}s, first step +{med['first_step_excess_s'] * 1e3:.0f} ms"
            f" (step {med['step_s'] * 1e3:.0f} ms), lost {med['lost_s']:.3f}s, "
            f"device +{med['extra_device_bytes'] / 2**20:.0f} MiB",
            flush=True,
        )
        rows.append(med)
    orbax.close()
    return rows


def loop_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| case | blocking s | first step after, excess ms | step ms | loop time lost s | extra device MiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:80]} | | | | |")
            continue
        lines.append(
            f"| {r['name']} | {r['blocking_s']:.3f} | {r['first_step_excess_s'] * 1e3:.0f} | {r['step_s'] * 1e3:.1f} "
            f"| {r['lost_s']:.3f} | {r['extra_device_bytes'] / 2**20:.0f} |"
        )
    return lines


def loop_ratios(rows: list[dict[str, Any]]) -> list[tuple[str, float, str]]:
    by = {r["name"]: r for r in rows}
    ours, theirs = by["ckpt_callbacks save_async, snapshot=auto"], by["orbax async save"]
    if "error" in ours or "error" in theirs:
        return []
    return [
        ("loop time lost during a save (auto) vs orbax", ours["lost_s"] / max(theirs["lost_s"], 1e-9), "<= 0.5"),
        (
            "first step after save_async (auto) vs a normal step",
            (ours["step_s"] + ours["first_step_excess_s"]) / ours["step_s"],
            "<= 2.0",
        ),
    ]
