"""Small leaves on object stores: packed against one zarr3 array per leaf, on the test servers.

    python benchmarks/object_stores.py [--leaves 2000] [--repeats 3]

Starts moto (S3) and fake-gcs-server (GCS) on 127.0.0.1, as the tests do, and times `save`
and `restore` of N small leaves (32 MiB in all by default) with packing (the default) and
without (`pack_bytes=0`), plus the same bytes in 8 large leaves for scale. Both servers keep
objects in memory on this machine: the figures show request counts, not cloud bandwidth.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import jax
import jax.numpy as jnp
import object_stores

import ckpt_callbacks as cc


def timed(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--leaves", type=int, default=2000)
    parser.add_argument("--mib", type=float, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    per_leaf = int(args.mib * 2**20 / args.leaves / 4)
    small = {f"p{i:04d}": jnp.full((per_leaf,), i, jnp.float32) for i in range(args.leaves)}
    large = {f"w{i}": jnp.ones((int(args.mib * 2**20 / 8 / 4),), jnp.float32) for i in range(8)}
    cases = [("small, packed", small, {}), ("small, pack_bytes=0", small, {"pack_bytes": 0}), ("8 large", large, {})]
    print(f"{args.leaves} leaves of {per_leaf * 4} bytes; median of {args.repeats}")
    print("| store | tree | save s | restore s |\n|---|---|---|---|")
    with object_stores.s3_server(), object_stores.gcs_server():
        for scheme in ("s3", "gs"):
            for name, tree, kwargs in cases:

                def save(tree: dict = tree, kwargs: dict = kwargs, scheme: str = scheme) -> None:
                    cc.save(f"{scheme}://{object_stores.BUCKET}/{uuid.uuid4().hex}", tree, **kwargs)

                saved = f"{scheme}://{object_stores.BUCKET}/restore-{uuid.uuid4().hex}"
                cc.save(saved, tree, **kwargs)
                save_s = timed(save, args.repeats)
                restore_s = timed(lambda s=saved: jax.block_until_ready(cc.restore(s)), args.repeats)
                print(f"| {scheme} | {name} | {save_s:.2f} | {restore_s:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
