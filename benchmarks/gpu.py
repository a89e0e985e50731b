"""GPU benchmark: ckpt_callbacks against orbax on one accelerator, and the disk's direct-I/O write rate.

    python benchmarks/gpu.py [--gib 8] [--repeats 3] [--out benchmarks/results] [--dir /tmp] [--smoke]

Run by `benchmarks/gpu.sh` on a GPU machine. In one run, on the same state (the model-like tree of
`make bench`, on one device) and the same directory: the disk's write rate with O_DIRECT (16 MiB
aligned blocks, then fsync), orbax's async save (blocking and total) and restore with target
shardings, and ckpt_callbacks' `save_async` (blocking and total) and restore. Median of
`--repeats`; page cache dropped before each timed operation where the OS allows it. Targets
(issue 5): blocking <= 0.1x orbax's, save throughput >= 0.9x the direct-I/O rate, restore >=
orbax's. Then the case that matters on an accelerator (issue 11): a state filling `--fill`
(0.85) of device memory, a jitted donating train step between saves, and per snapshot mode
(auto, host, device) and orbax: blocking, the first step's excess, loop time lost and the
device memory the save added (`benchmarks/loop.py`); an out-of-memory is reported as such.
Last, the local-tier case (issue 22): a ``LocalTier`` save against a persistent save to the
same disk, in the loop: loop time lost, blocking ``on_step``, device memory added.
Runs on CPU too (`--smoke`, as CI does), where the figures mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import mmap
import os
import pathlib
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import numpy as np
from jax.sharding import Mesh
from loop import loop_cases, loop_ratios, loop_table
from run import (
    GB,
    Bench,
    case_table,
    drop_caches,
    model_tree,
    nbytes_unique,
    orbax_cases,
    ours_cases,
    target_table,
)

BLOCK = 16 << 20


def direct_write_rate(directory: str, nbytes: int) -> dict[str, Any]:
    """GB/s of writing ``nbytes`` with O_DIRECT in 16 MiB blocks plus fsync (buffered if O_DIRECT is refused)."""
    path = os.path.join(directory, "direct-io.bin")
    buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT needs
    buf.write(np.random.default_rng(0).integers(0, 255, BLOCK, dtype=np.uint8).tobytes())
    blocks = max(1, nbytes // BLOCK)
    mode = "O_DIRECT"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0), 0o644)
        try:
            os.write(fd, buf)
        except OSError:  # EINVAL: this filesystem (tmpfs, some sandboxes) has no direct I/O
            os.close(fd)
            raise
    except OSError:
        mode = "buffered + fsync (O_DIRECT refused)"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, buf)
    try:
        drop_caches()
        start = time.perf_counter()
        for _ in range(blocks):
            os.write(fd, buf)
        os.fsync(fd)
        seconds = time.perf_counter() - start
    finally:
        os.close(fd)
        os.unlink(path)
    return {"mode": mode, "bytes": blocks * BLOCK, "seconds": seconds, "gb_per_s": blocks * BLOCK / GB / seconds}


def gpu_ratios(rows: dict[str, dict[str, Any]], disk_gb_s: float, nbytes: int) -> list[tuple[str, float, str]]:
    ours_async = rows["ckpt_callbacks gpu: save_async (total)"]
    orbax_async = rows["orbax gpu: async save (total)"]
    return [
        ("save_async blocking vs orbax async blocking", ours_async["blocking_s"] / orbax_async["blocking_s"], "<= 0.1"),
        ("save_async throughput vs disk direct-I/O write", nbytes / GB / ours_async["seconds"] / disk_gb_s, ">= 0.9"),
        (
            "restore vs orbax",
            rows["orbax gpu: restore (target shardings)"]["seconds"]
            / rows["ckpt_callbacks gpu: restore, same mesh"]["seconds"],
            ">= 1.0",
        ),
    ]


def filled_loop(device: Any, mesh: Mesh, args: argparse.Namespace, root: str) -> list[dict[str, Any]]:
    """The loop case on a state filling ``args.fill`` of the device's memory (``--gib`` where
    the device reports no memory statistics, as on CPU)."""
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit")
    nbytes = int(args.fill * limit) - int(stats.get("bytes_in_use", 0)) if limit and not args.smoke else None
    gib = nbytes / 2**30 if nbytes else args.gib
    state = model_tree(gib, mesh)
    used = (device.memory_stats() or {}).get("bytes_in_use")
    print(f"loop case: {nbytes_unique(state) / GB:.2f} GB state; device memory in use: {used}", flush=True)
    return loop_cases(state, root, repeats=args.repeats, seconds=0.5 if args.smoke else 4.0)


class _DevicePeak:
    """Peak device memory in use above the level at start, sampled every 2 ms (None: no statistics)."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.base = self.peak = self._used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _used(self) -> int | None:
        return (self.device.memory_stats() or {}).get("bytes_in_use")

    def _sample(self) -> None:
        while not self._stop.is_set() and self.base is not None:
            self.peak = max(self.peak or 0, self._used() or 0)
            time.sleep(0.002)

    def stop(self) -> int | None:
        self._stop.set()
        self._thread.join()
        return None if self.base is None else max(self.peak or 0, self._used() or 0) - self.base


def local_tier_case(device: Any, mesh: Mesh, args: argparse.Namespace, root: str) -> list[dict[str, Any]]:
    """Issue 22's case: a ``LocalTier`` save on this device's state (a local directory; one
    process, so no replicas) against a persistent save to the same disk, in a training loop:
    loop time lost per save, the blocking ``on_step``, and the device memory a save adds."""
    import local_tier
    import loop as loop_bench

    import ckpt_callbacks as cc

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    eye = jax.device_put(np.eye(256, dtype=np.float32), replicated)
    state = {**model_tree(min(args.gib, 2.0), mesh), "step_w": eye}  # the loop's step matmuls with step_w
    step, state, step_s = loop_bench._calibrate(state, 15.0)
    window = max(10, int((0.5 if args.smoke else 4.0) / step_s))
    every, never = [cc.CheckpointInterval(every=window)], [cc.CheckpointInterval(every=10**9)]
    makers = {
        "local save (LocalTier)": lambda: cc.Checkpointer(
            os.path.join(root, "lt-base"),
            step_policies=never,
            handle_sigterm=False,
            local=cc.LocalTier(os.path.join(root, "lt-local"), step_policies=every, keep_last=1),
        ),
        "persistent save (same disk)": lambda: cc.Checkpointer(
            os.path.join(root, "lt-persistent"), step_policies=every, handle_sigterm=False
        ),
    }
    rows = []
    for name, make in makers.items():
        ck, runs = make(), []
        for k in range(1, args.repeats + 2):  # the first window is a warm-up
            normal_s, state = local_tier._normal_step(step, state)
            peak = _DevicePeak(device)
            row, state = local_tier._window(ck, step, state, k * window, window, normal_s)
            row["device_bytes"] = peak.stop()
            if k > 1:
                runs.append(row)
        ck.close()
        med = {key: float(np.median([r[key] or 0 for r in runs])) for key in ("lost_s", "blocking_s", "device_bytes")}
        rows.append({"name": name, "window": window, **med})
        print(
            f"  {name}: lost {med['lost_s']:.3f}s, blocking {med['blocking_s']:.3f}s, "
            f"device +{med['device_bytes'] / 2**20:.0f} MiB",
            flush=True,
        )
    return rows


def write_report(out_dir: pathlib.Path, report: dict[str, Any]) -> str:
    disk = report["disk"]
    lines = [
        f"# GPU benchmark {report['date']} on {report['device']}",
        "",
        f"{report['bytes'] / GB:.2f} GB model-like state (40 float32 leaves) on one device; {report['machine']}; "
        f"median of {report['repeats']}; page cache dropped: {report['caches_dropped']}.",
        f"Disk write, {disk['mode']}: {disk['gb_per_s']:.2f} GB/s ({disk['bytes'] / GB:.2f} GB in "
        f"{disk['seconds']:.2f} s).",
        "",
    ]
    lines += case_table(report["rows"], files=False, digits=4)
    if report.get("loop_save"):
        lines += ["", "Training loop with a save in flight, state filling the device:", ""]
        lines += loop_table(report["loop_save"])
    if report.get("local_tier"):
        lines += ["", "Local tier (issue 22), one process, state on the device:", ""]
        lines += ["| case | loop time lost per save (s) | blocking on_step (s) | device memory added (MiB) |"]
        lines += ["|---|---|---|---|"]
        lines += [
            f"| {r['name']} | {r['lost_s']:.3f} | {r['blocking_s']:.3f} | {r['device_bytes'] / 2**20:.0f} |"
            for r in report["local_tier"]
        ]
    lines += ["", *target_table(report["ratios"], digits=3)]
    text = "\n".join(lines) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"gpu-{report['date']}-{report['device_kind']}"
    (out_dir / f"{stem}.md").write_text(text)
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--dir", default=None, help="where checkpoints are written (default: a temp dir)")
    parser.add_argument("--smoke", action="store_true", help="tiny size, one repeat (CI, on CPU)")
    parser.add_argument("--fill", type=float, default=0.85, help="device memory the loop case's state fills")
    args = parser.parse_args(argv)
    if args.smoke:
        args.gib, args.repeats = 0.01, 1
    device = jax.devices()[0]
    mesh = Mesh(np.array([device]).reshape(1, 1), ("x", "y"))
    root = tempfile.mkdtemp(prefix="ckpt-gpu-", dir=args.dir)
    try:
        tree = model_tree(args.gib, mesh)
        nbytes = nbytes_unique(tree)
        print(f"{device.device_kind}: {nbytes / GB:.2f} GB in {len(tree)} leaves", flush=True)
        disk = direct_write_rate(root, nbytes)
        print(f"disk write ({disk['mode']}): {disk['gb_per_s']:.2f} GB/s", flush=True)
        b = Bench(root, args.repeats, nbytes)
        targets = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
        rows = orbax_cases(b, tree, targets, nbytes, "gpu", sync=False)
        rows += ours_cases(b, tree, mesh, None, nbytes, "gpu", sync=False)
        report = {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H%MZ"),
            "device": f"{device.platform}:{device.device_kind}",
            "device_kind": "".join(c if c.isalnum() else "-" for c in device.device_kind).strip("-"),
            "machine": f"{os.cpu_count()} CPU cores, jax {jax.__version__}",
            "repeats": args.repeats,
            "bytes": nbytes,
            "caches_dropped": b.dropped,
            "disk": disk,
            "rows": rows,
        }
        report["ratios"] = gpu_ratios({r["name"]: r for r in rows}, disk["gb_per_s"], nbytes)
        del tree
        report["loop_save"] = filled_loop(device, mesh, args, root)
        report["ratios"] += loop_ratios(report["loop_save"])
        report["local_tier"] = local_tier_case(device, mesh, args, root)
        print("\n" + write_report(pathlib.Path(args.out), report))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
