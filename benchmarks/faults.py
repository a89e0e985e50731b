"""Save and restore time on moto (S3) through the fault proxy: 5% transient faults vs none.

Run by hand (not by ``make test`` or ``make bench``)::

    .venv/bin/python benchmarks/faults.py [--mib 128] [--runs 3] [--rate 0.05]

Each run saves and restores the same state twice through a fresh proxy in front of one moto
server: once with no faults, once with ``--rate`` of requests getting a seeded transient fault
(429/500/503, a reset, a truncated answer). Prints each run and the median and range of the
ratio (faulty / clean) of save and of restore times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import fault_proxy
import jax
import numpy as np
import object_stores
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt_callbacks as cc

# The backoff a deployment would use against S3; retries beyond the proxy's bursts of 2.
OPTIONS = cc.StorageOptions(max_retries=6, initial_delay_s=0.05, max_delay_s=1.0, op_timeout_s=120.0)
KINDS = ("429", "500", "503", "reset", "truncate")


def _state(mib: int) -> dict:
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("x", "y"))
    rows = mib * (1 << 20) // (4 * 2048 * 4)
    rng = np.random.default_rng(0)
    return {
        f"layer{i}": jax.device_put(
            rng.standard_normal((rows, 2048), dtype=np.float32), NamedSharding(mesh, P("x", "y"))
        )
        for i in range(4)
    }


def _timed(upstream: str, state: dict, plan: fault_proxy.FaultPlan) -> tuple[float, float, int]:
    """(save s, restore s, faults injected) through a proxy with ``plan``."""
    url = f"s3://{object_stores.BUCKET}/bench-faults-{uuid.uuid4().hex[:8]}/run-1"
    with fault_proxy.fault_proxy(upstream, plan) as proxy:
        os.environ["AWS_ENDPOINT_URL_S3"] = proxy.endpoint
        try:
            start = time.perf_counter()
            cc.save(url, state, step=1, storage=OPTIONS)
            saved = time.perf_counter() - start
            start = time.perf_counter()
            restored = cc.restore(cc.open_checkpoint(url, storage=OPTIONS), template=state)
            jax.block_until_ready(restored)
            read = time.perf_counter() - start
        finally:
            os.environ["AWS_ENDPOINT_URL_S3"] = upstream
    assert all(np.array_equal(np.asarray(restored[k]), np.asarray(state[k])) for k in state)
    return saved, read, len(proxy.injected)


def _summary(name: str, ratios: list[float]) -> str:
    return f"{name}: median {statistics.median(ratios):.2f}x, range {min(ratios):.2f}-{max(ratios):.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=0.05)
    args = parser.parse_args()
    state = _state(args.mib)
    save_ratios, restore_ratios = [], []
    with object_stores.s3_server() as upstream:
        _timed(upstream, state, fault_proxy.FaultPlan())  # warm-up (connections, jit of the state)
        for run in range(args.runs):
            clean = _timed(upstream, state, fault_proxy.FaultPlan())
            faulty = _timed(upstream, state, fault_proxy.FaultPlan(seed=run, rate=args.rate, kinds=KINDS))
            save_ratios.append(faulty[0] / clean[0])
            restore_ratios.append(faulty[1] / clean[1])
            print(
                f"run {run}: clean save {clean[0]:.2f}s restore {clean[1]:.2f}s | "
                f"{args.rate:.0%} faults ({faulty[2]} injected) save {faulty[0]:.2f}s restore {faulty[1]:.2f}s",
                flush=True,
            )
    print(f"{args.mib} MiB on moto through the proxy, {args.runs} runs")
    print(_summary("save time, faulty / clean", save_ratios))
    print(_summary("restore time, faulty / clean", restore_ratios))


if __name__ == "__main__":
    main()
