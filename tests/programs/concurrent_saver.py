"""Saves ``ROUNDS`` trees of value ``VALUE`` to one PATH with overwrite=True, as fast as it can.

    python concurrent_saver.py PATH VALUE ROUNDS

Run twice at once (two runs by mistake on one path): whichever commits last must be whole.
"""

import contextlib
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import numpy as np

import ckpt_callbacks as cc


def main(path: str, value: int, rounds: int) -> None:
    tree = {"big": np.full((300_000,), value, np.int32), "small": np.full((16,), value, np.int32), "v": value}
    for _ in range(rounds):
        with contextlib.suppress(cc.CheckpointExistsError):
            cc.save(path, tree, step=value, overwrite=True, pack_bytes=1 << 16)
    print("DONE", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
