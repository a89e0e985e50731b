"""SIGTERM after the last step (no step follows to save at): the process must still end by
SIGTERM once the Checkpointer closes, not exit 0. Prints READY after its steps.

    python sigterm_after_loop.py BASE
"""

import os
import sys
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import numpy as np

import ckpt_callbacks as cc

if __name__ == "__main__":
    ck = cc.Checkpointer(sys.argv[1], step_policies=[cc.CheckpointInterval(every=1000)])
    for step in range(1, 3):
        ck.on_step({"w": np.ones(4)}, step=step)
    print("READY", flush=True)
    time.sleep(2)  # post-loop work; SIGTERM arrives here
    ck.close()
    print("EXITED NORMALLY", flush=True)
