"""Peak extra RSS of two saves of a (4, 2)-sharded tree, sampled every 2 ms; prints JSON.

python memory_probe.py PATH GIB BUDGET_BYTES [LAYOUT]   (BUDGET_BYTES 0: no max_host_bytes; LAYOUT: zarr3)
"""

import json
import os
import sys
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from rss import PeakRSS

import ckpt_callbacks as cc


def main(path: str, gib: float, budget: int | None, layout: str = "zarr3") -> None:
    mesh = jax.make_mesh((4, 2), ("x", "y"))
    n_leaves = 32
    rows = int(gib * 2**30 / 4 / 4096 / n_leaves)
    tree = {}
    for i in range(n_leaves):
        spec = P() if i % 8 == 7 else (P("x", "y") if i % 2 else P("x"))
        tree[f"layer{i}"] = jax.device_put(jnp.full((rows, 4096), i, jnp.float32), NamedSharding(mesh, spec))
    jax.block_until_ready(tree)
    time.sleep(0.5)
    # Two saves of the same tree, as in a training run; extra RSS is measured against the RSS
    # before the first, so memory an allocator keeps after the first save still counts.
    with PeakRSS() as peak:
        first_stats = cc.save_async(path + "-first", tree, max_host_bytes=budget, layout=layout).wait()
        first_peak = peak.extra
        stats = cc.save_async(path, tree, max_host_bytes=budget, layout=layout).wait()
    result = {
        "bytes_written": stats.bytes_written,
        "peak_extra": peak.extra,
        "first_peak_extra": first_peak,
        "blocking_s": stats.blocking_s,
        "total_s": stats.total_s,
        "first_blocking_s": first_stats.blocking_s,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]) or None, *sys.argv[4:5])
