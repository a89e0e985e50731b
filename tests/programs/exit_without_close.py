"""A training script that ends without ``close()`` or ``wait_until_finished()``.

    python exit_without_close.py BASE

Three saves with ``keep_last=1``: at exit the last save must commit, retention must run, and
the process must exit 0.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax.numpy as jnp
import numpy as np

import ckpt_callbacks as cc


def main(base: str) -> None:
    tree = {"w": jnp.ones((512, 1024)), "n": np.arange(1000)}
    ck = cc.Checkpointer(base, step_policies=[cc.CheckpointInterval(every=1)], keep=cc.KeepPolicy(keep_last=1))
    for step in range(1, 4):
        ck.on_step(tree, step=step)


if __name__ == "__main__":
    main(sys.argv[1])
