"""A loop that saves only when preempted: prints READY at step 5, then runs until terminated."""

import os
import sys
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import numpy as np

import ckpt_callbacks as cc


def main(base: str) -> None:
    ck = cc.Checkpointer(base, step_policies=[cc.CheckpointInterval(every=10**6)])
    for step in range(1, 100000):
        ck.on_step({"w": np.full(3, step)}, step=step)
        if step == 5:
            print("READY", flush=True)
        time.sleep(0.01)
    print("NOT TERMINATED", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
