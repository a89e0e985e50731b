"""Peak extra RSS of two saves of a (4, 2)-sharded tree, sampled every 2 ms; prints JSON.

python memory_probe.py PATH GIB BUDGET_BYTES   (BUDGET_BYTES 0: no max_host_bytes)
"""

import json
import os
import sys
import threading
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt_callbacks as cc

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def main(path: str, gib: float, budget: int | None) -> None:
    mesh = jax.make_mesh((4, 2), ("x", "y"))
    n_leaves = 32
    rows = int(gib * 2**30 / 4 / 4096 / n_leaves)
    tree = {}
    for i in range(n_leaves):
        spec = P() if i % 8 == 7 else (P("x", "y") if i % 2 else P("x"))
        tree[f"layer{i}"] = jax.device_put(jnp.full((rows, 4096), i, jnp.float32), NamedSharding(mesh, spec))
    jax.block_until_ready(tree)
    time.sleep(0.5)
    base = rss()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    # Two saves of the same tree, as in a training run; extra RSS is measured against the RSS
    # before the first, so memory an allocator keeps after the first save still counts.
    first_stats = cc.save_async(path + "-first", tree, max_host_bytes=budget).wait()
    first_peak = peak[0] - base
    stats = cc.save_async(path, tree, max_host_bytes=budget).wait()
    stop.set()
    sampler.join()
    result = {
        "bytes_written": stats.bytes_written,
        "peak_extra": peak[0] - base,
        "first_peak_extra": first_peak,
        "blocking_s": stats.blocking_s,
        "total_s": stats.total_s,
        "first_blocking_s": first_stats.blocking_s,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]) or None)
