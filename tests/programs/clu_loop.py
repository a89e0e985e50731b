"""A clu hooks loop with the callback among clu's own periodic actions; prints the saved steps."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax.numpy as jnp
from clu import periodic_actions

import ckpt_callbacks as cc


def main() -> None:
    cb = cc.CheckpointCallback(
        "memory://clu-loop", state_fn=lambda: {"w": jnp.ones(2)}, step_policies=[cc.CheckpointInterval(every=5)]
    )
    report = periodic_actions.ReportProgress(num_train_steps=12, every_steps=100)
    hooks = [report, cb]
    assert all(isinstance(h, periodic_actions.PeriodicAction) for h in hooks)
    for step in range(1, 13):
        for hook in hooks:
            hook(step)
    cb.on_train_end(12)
    print(cb.checkpointer.all_steps())


if __name__ == "__main__":
    main()
