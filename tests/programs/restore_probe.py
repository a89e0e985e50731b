"""Peak extra RSS of restoring a (4, 2)-sharded checkpoint, beyond the restored arrays; prints JSON.

    python restore_probe.py save PATH GIB
    python restore_probe.py restore PATH BUDGET_BYTES   (BUDGET_BYTES 0: the default window)
    python restore_probe.py memory GIB BUDGET_BYTES     (saves to memory://, then restores it)

On local disk chunks are read straight into the restored arrays; ``memory`` takes the
TensorStore read path, which stages chunks within the budget. The restore runs in a fresh
process (memory an allocator kept from a save would hide what the restore takes) and samples
RSS every 2 ms; on CPU the restored arrays are host memory too.
"""

import ctypes
import gc
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from rss import PeakRSS

import ckpt_callbacks as cc


def save(path: str, gib: float) -> None:
    mesh = jax.make_mesh((4, 2), ("x", "y"))
    n_leaves = 32
    rows = int(gib * 2**30 / 4 / 4096 / n_leaves)
    tree = {
        f"layer{i}": jax.device_put(jnp.full((rows, 4096), i, jnp.float32), NamedSharding(mesh, P("x", "y")))
        for i in range(n_leaves)
    }
    cc.save(path, tree, pack_bytes=0)


def restore(path: str, budget: int | None) -> None:
    mesh = jax.make_mesh((4, 2), ("x", "y"))
    sharding = NamedSharding(mesh, P("x", "y"))
    with PeakRSS() as peak:
        restored = cc.restore(path, shardings=sharding, max_host_bytes=budget)
        jax.block_until_ready(restored)
    restored_bytes = sum(x.nbytes for x in restored.values())
    print(json.dumps({"restored": restored_bytes, "peak_extra": peak.extra}))


if __name__ == "__main__":
    if sys.argv[1] == "save":
        save(sys.argv[2], float(sys.argv[3]))
    elif sys.argv[1] == "memory":
        save("memory://probe", float(sys.argv[2]))
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # the saved tree's memory back to the OS before the baseline
        restore("memory://probe", int(sys.argv[3]) or None)
    else:
        restore(sys.argv[2], int(sys.argv[3]) or None)
