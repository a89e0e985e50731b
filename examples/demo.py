"""``make demo``: train, get killed mid-run, resume, and report.

    python examples/demo.py [--path ./checkpoints] [--steps 300] [--kill-at 180]

A Flax + Optax MLP trains on generated data with a ``CheckpointCallback`` holding a step
schedule (every 50 steps until 200, then every 100), time-based temporaries and keep-best on
the eval loss. The training process is killed with SIGKILL mid-run, a new one resumes from
the latest checkpoint, and the report shows what was saved, kept and deleted, the resume
step, whether the losses after the resume match the killed run's bit for bit, and the save
throughput. Checkpoints go to ``<path>/demo`` (cleared first); any URL but ``memory://``,
which cannot outlive the killed process.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from ckpt_callbacks import storage as paths


def _train(args: argparse.Namespace) -> None:
    """One training process; prints one JSON line per event."""
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax.training import train_state
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import ckpt_callbacks as cc

    def emit(**event: Any) -> None:
        print(json.dumps(event), flush=True)

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            for width in (512, 512):
                x = nn.relu(nn.Dense(width)(x))
            return nn.Dense(1)(x)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    data = NamedSharding(mesh, P("data"))
    true_w = jax.random.normal(jax.random.key(1234), (64, 1))

    def batch(step: int) -> tuple[jax.Array, jax.Array]:
        x = jax.random.normal(jax.random.key(step), (256, 64))
        return jax.device_put(x, data), jax.device_put(jnp.sin(x @ true_w), data)

    model = MLP()

    def create() -> train_state.TrainState:
        params = model.init(jax.random.key(0), jnp.ones((1, 64)))["params"]
        return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-3))

    # The hidden kernels (and their Adam moments) are sharded over the 8 devices, the rest
    # replicated; restore_or_init reads these shardings from the jitted init.
    rules = [("Dense_[01]/kernel", P(None, "data")), (".*", P())]
    shardings = cc.shardings_from_rules(mesh, rules, jax.eval_shape(create))
    init = jax.jit(create, out_shardings=shardings)

    def loss_fn(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        prediction: jax.Array = model.apply({"params": params}, x)  # type: ignore[assignment]
        return jnp.mean((prediction - y) ** 2)

    # The state keeps its shardings from step to step, so a resumed run compiles the same step.
    @functools.partial(jax.jit, out_shardings=(shardings, NamedSharding(mesh, P())))
    def train_step(state: train_state.TrainState, x: jax.Array, y: jax.Array) -> tuple[Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(state.params, x, y)
        return state.apply_gradients(grads=grads), loss

    eval_x, eval_y = batch(10**6)
    eval_loss = jax.jit(loss_fn)
    ck = cc.Checkpointer(
        args.ckpt,
        save_interval=args.save_interval,
        step_policies=[cc.CheckpointInterval(every=50, until=200), cc.CheckpointInterval(every=100)],
        keep=cc.KeepPolicy(keep_last=2, keep_best=2, metric="eval_loss"),
    )
    holder: dict[str, Any] = {}
    cb = cc.CheckpointCallback(ck, state_fn=lambda: holder["state"])
    state, meta = ck.restore_or_init(init)
    start = 0 if meta is None else int(meta["step"])
    kernel = state.params["Dense_1"]["kernel"]
    placed = f"{kernel.sharding.spec} over {len(kernel.sharding.device_set)} devices"
    emit(event="start", step=start, resumed=meta is not None, kernel_sharding=placed)
    for step in range(start + 1, args.steps + 1):
        state, loss = train_step(state, *batch(step))
        holder["state"] = state
        emit(event="step", step=step, loss=float(loss))
        if cb(step):
            emit(event="save", step=step)
        if step % args.eval_every == 0:
            value = float(eval_loss(state.params, eval_x, eval_y))
            emit(event="eval", step=step, eval_loss=value, saved=cb.on_eval(step, metrics={"eval_loss": value}))
        time.sleep(args.step_sleep)  # stands in for a bigger model's step time
    cb.on_train_end(args.steps)
    emit(event="end", saves=ck.saves)
    ck.close()


def _run_worker(argv: list[str], kill_at: int | None) -> tuple[list[dict[str, Any]], bool]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    events: list[dict[str, Any]] = []
    killed = False
    assert proc.stdout is not None
    for line in proc.stdout:
        if not line.startswith("{"):
            continue
        events.append(json.loads(line))
        if kill_at is not None and events[-1].get("event") == "step" and events[-1]["step"] >= kill_at:
            proc.send_signal(signal.SIGKILL)  # no chance to clean up: a real crash
            killed = True
            break
    proc.wait()
    if not killed and proc.returncode != 0:
        raise SystemExit(f"training process failed with exit code {proc.returncode}")
    return events, killed


def _report(first: list[dict[str, Any]], second: list[dict[str, Any]], ckpt: str) -> bool:
    import ckpt_callbacks as cc

    saved = [e["step"] for e in first + second if e["event"] == "save" or (e["event"] == "eval" and e["saved"])]
    end = next(e for e in second if e["event"] == "end")
    kept = cc.list_checkpoints(ckpt)
    started = next(e for e in second if e["event"] == "start")
    resume = started["step"]
    before = {e["step"]: e["loss"] for e in first if e["event"] == "step"}
    after = {e["step"]: e["loss"] for e in second if e["event"] == "step"}
    overlap = sorted(set(before) & set(after))
    continuous = bool(overlap) and all(before[s] == after[s] for s in overlap)
    print(f"\ncheckpoints saved: {len(saved)} at steps {sorted(set(saved))} (both processes)")
    print(f"checkpoints kept:  {[(c.step, 'temporary' if c.is_temporary else 'permanent') for c in kept]}")
    kept_steps = {c.step for c in kept}
    print(f"checkpoints deleted by retention: {sorted(set(saved) - kept_steps)}")
    print(f"killed at step {max(before)}, resumed from step {resume}")
    print(f"restored onto the init's shardings: params/Dense_1/kernel is {started['kernel_sharding']}")
    if overlap:
        print(
            f"loss continuity: steps {overlap[0]}..{overlap[-1]} replayed after the resume, "
            f"{'identical' if continuous else 'DIFFERENT'} to the killed run "
            f"(step {overlap[-1]}: {before[overlap[-1]]:.6f} vs {after[overlap[-1]]:.6f})"
        )
    else:
        print("loss continuity: no replayed steps (the kill came right after a save)")
        continuous = True
    saves = end["saves"]
    if saves:
        total = sum(s["checkpoint/bytes"] for s in saves)
        seconds = sum(s["checkpoint/blocking_s"] + s["checkpoint/write_s"] for s in saves)
        blocking = max(s["checkpoint/blocking_s"] for s in saves)
        print(
            f"save throughput (resumed process): {len(saves)} saves, {total / 1e6:.1f} MB, "
            f"{total / 1e9 / seconds:.2f} GB/s, loop blocked at most {blocking * 1e3:.1f} ms per save"
        )
    return continuous


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", default="./checkpoints", help="base URL: local path, file://, s3://, gs://")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--kill-at", type=int, default=None, help="step at which to kill (default: 60%% of steps)")
    parser.add_argument("--save-interval", type=float, default=0.4, help="seconds between temporary checkpoints")
    parser.add_argument("--eval-every", type=int, default=40)
    parser.add_argument("--step-sleep", type=float, default=0.005)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _train(args)
        return 0
    if args.path.startswith("memory://"):
        parser.error("memory:// lives inside one process and the demo kills its process; use a path, s3:// or gs://")
    ckpt = paths.parse(args.path).join("demo")
    paths.delete_tree(ckpt)
    kill_at = args.kill_at or int(args.steps * 0.6)
    shared = [
        "--ckpt",
        ckpt.url,
        "--steps",
        str(args.steps),
        "--save-interval",
        str(args.save_interval),
        "--eval-every",
        str(args.eval_every),
        "--step-sleep",
        str(args.step_sleep),
    ]
    print(f"training {args.steps} steps into {ckpt.url}; killing the process at step {kill_at}")
    first, killed = _run_worker(shared, kill_at)
    if not killed:
        raise SystemExit("the first training process ended before it could be killed")
    print(f"killed (SIGKILL) at step {max(e['step'] for e in first if e['event'] == 'step')}; resuming")
    second, _ = _run_worker(shared, None)
    return 0 if _report(first, second, ckpt.url) else 1


if __name__ == "__main__":
    sys.exit(main())
