"""``cc.save_async`` and a normal exit, no ``wait()``: the save must still commit.

python exit_after_save_async.py PATH
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax.numpy as jnp

import ckpt_callbacks as cc

if __name__ == "__main__":
    cc.save_async(sys.argv[1], {"w": jnp.full((512, 1024), 7.0)}, step=1)
