"""The per-host tier (``LocalTier``): what a local save costs the loop against a persistent one,
and how fast a run recovers through a peer against the persistent tier. Run by ``run.py``
(its last part), or alone:

    python benchmarks/local_tier.py [--mib 128] [--mp-mib 64] [--repeats 3] [--smoke]

Part 1, this process (8 CPU devices, a (4, 2) mesh, the bench's model-like tree of ``--mib``):
a jitted ~15 ms step donating the state, a ``Checkpointer`` saving at one step of a window of
steps that then go on, and ``wait_until_finished`` at the window's end. Loop time lost per
save = the window's time minus its steps' normal time, for a local save (``LocalTier`` on this
disk) and a persistent one (S3 on moto, started here as the tests start it); and the peak host
RSS the window adds. One untimed window first (its RSS reported apart: later windows reuse
what the allocator kept), then ``--repeats`` timed ones.

Part 2, 4 real processes x 2 CPU devices (``jax.distributed`` on 127.0.0.1, gloo): a
``--mp-mib`` state saved at step 4 by both tiers (local every 2, replicas=1); then, each
``--repeats`` times, the recovery time (``restore_or_init`` until every process holds the
state) with process 2's local directory wiped (its set comes from process 3's replica), and
with every local directory wiped (the persistent tier). Each recovery is checked against the
trained state's checksum.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _object_stores() -> Any:
    """tests/object_stores.py (moto on 127.0.0.1), by path: benchmarks/ has a module of that name."""
    spec = importlib.util.spec_from_file_location(
        "tests_object_stores", os.path.join(ROOT, "tests", "object_stores.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Peak:
    """Peak RSS above the level at start, sampled every 2 ms."""

    def __init__(self) -> None:
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _rss()) - self.base


# -- part 1: loop time lost per save, one process ------------------------------------------------


def _window(ck: Any, step: Callable[..., Any], state: Any, first: int, window: int, normal_s: float) -> tuple:
    """One save at ``first``, ``window - 1`` more steps, then the wait: (row, state)."""
    import jax

    state = jax.block_until_ready(step(state))
    peak = _Peak()
    start = time.perf_counter()
    ck.on_step(state, step=first)
    blocking = time.perf_counter() - start
    for s in range(first + 1, first + window):
        state = jax.block_until_ready(step(state))
        ck.on_step(state, step=s)
    ck.wait_until_finished()
    total = time.perf_counter() - start
    rss = peak.stop()
    return {"lost_s": total - (window - 1) * normal_s, "blocking_s": blocking, "peak_rss": rss}, state


def _normal_step(step: Callable[..., Any], state: Any) -> tuple[float, Any]:
    import jax

    times = []
    for _ in range(10):
        start = time.perf_counter()
        state = jax.block_until_ready(step(state))
        times.append(time.perf_counter() - start)
    return statistics.median(times), state


def loop_cases(tree: dict[str, Any], root: str, s3_base: str, *, repeats: int, window_s: float) -> list[dict]:
    """Loop time lost per local save and per persistent save (S3), and the RSS each adds."""
    import jax
    import jax.numpy as jnp
    import loop as loop_bench

    import ckpt_callbacks as cc

    mesh = next(iter(tree.values())).sharding.mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = {**tree, "step_w": jax.device_put(jnp.eye(256, dtype=jnp.float32), replicated)}
    step, state, step_s = loop_bench._calibrate(state, 15.0)
    window = max(10, int(window_s / step_s))
    every = [cc.CheckpointInterval(every=window)]
    never = [cc.CheckpointInterval(every=10**9)]
    cases = [
        (
            "local save (LocalTier, local disk)",
            lambda: cc.Checkpointer(
                f"{s3_base}/with-local",
                step_policies=never,
                local=cc.LocalTier(os.path.join(root, "local"), step_policies=every, keep_last=2),
                handle_sigterm=False,
            ),
        ),
        (
            "persistent save (S3 on moto)",
            lambda: cc.Checkpointer(f"{s3_base}/persistent", step_policies=every, handle_sigterm=False),
        ),
        (  # two snapshots at one step: what promoting a local step instead of a second snapshot could save
            "both tiers due at one step",
            lambda: cc.Checkpointer(
                f"{s3_base}/both",
                step_policies=every,
                local=cc.LocalTier(os.path.join(root, "local-both"), step_policies=every, keep_last=2),
                handle_sigterm=False,
            ),
        ),
    ]
    rows = []
    for name, make in cases:
        ck = make()
        runs = []
        for k in range(1, repeats + 2):  # the first window is a warm-up
            normal_s, state = _normal_step(step, state)
            row, state = _window(ck, step, state, k * window, window, normal_s)
            if k == 1:  # later saves reuse the memory the allocator kept: their RSS may show nothing
                first_rss = row["peak_rss"]
            else:
                runs.append({**row, "step_s": normal_s})
        ck.close()
        med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        med.update(name=name, window=window, all_lost_s=[r["lost_s"] for r in runs])
        med["all_rss"], med["first_rss"] = [r["peak_rss"] for r in runs], first_rss
        print(
            f"  {name:42s} lost {med['lost_s']:.3f}s per save (blocking {med['blocking_s']:.3f}s, "
            f"{window} steps of {med['step_s'] * 1e3:.0f} ms), rss +{med['peak_rss'] / 2**20:.0f} MiB "
            f"(first save +{first_rss / 2**20:.0f} MiB)",
            flush=True,
        )
        rows.append(med)
    return rows


# -- part 2: recovery, 4 processes x 2 devices ----------------------------------------------------


def _tree(mesh: Any, mib: float) -> Callable[[], dict[str, Any]]:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    rows = max(8, int(mib * 2**20 / 8 / 1024 / 4) // 8 * 8)  # 8 leaves of (rows, 1024) float32
    sharding = NamedSharding(mesh, P("x", "y"))

    def init() -> dict[str, Any]:
        make = jax.jit(lambda: jnp.zeros((rows, 1024), jnp.float32), out_shardings=sharding)
        return {f"w{i}": make() for i in range(8)}

    return init


def _checksum(state: dict[str, Any]) -> float:
    import jax.numpy as jnp

    return float(sum(jnp.sum(v * (i + 1)) for i, v in enumerate(state.values())))


def worker(pid: int, n: int, port: int, opts: dict[str, Any]) -> dict[str, Any]:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=n, process_id=pid, initialization_timeout=60
    )
    import numpy as np
    from jax.sharding import Mesh

    import ckpt_callbacks as cc
    from ckpt_callbacks import distributed

    mesh = Mesh(np.array(jax.devices()).reshape(n, -1), ("x", "y"))
    init = _tree(mesh, opts["mib"])
    own = os.path.join(opts["local"], f"p{pid}")

    def checkpointer() -> Any:
        local = cc.LocalTier(own, step_policies=[cc.CheckpointInterval(every=2)], replicas=1)
        return cc.Checkpointer(
            opts["base"], step_policies=[cc.CheckpointInterval(every=4)], local=local, handle_sigterm=False
        )

    train = jax.jit(lambda s, k: {name: v * 0.5 + k + i for i, (name, v) in enumerate(s.items())})
    ck = checkpointer()
    state, _ = ck.restore_or_init(init)
    for step in range(1, 5):
        state = train(state, step)
        ck.on_step(state, step=step)
    ck.close()
    expected = _checksum(state)
    del state
    out: dict[str, Any] = {"pid": pid}
    for case, wiped in (("peer", (2,)), ("persistent", tuple(range(n)))):
        seconds, tiers = [], []
        for r in range(opts["repeats"]):
            distributed.barrier(f"bench-{case}-{r}-wipe")
            if pid in wiped:
                shutil.rmtree(own, ignore_errors=True)
            distributed.barrier(f"bench-{case}-{r}-start")
            start = time.perf_counter()
            ck = checkpointer()
            state, meta = ck.restore_or_init(init)
            jax.block_until_ready(state)
            distributed.barrier(f"bench-{case}-{r}-done")
            seconds.append(time.perf_counter() - start)
            tiers.append((meta or {}).get("tier", "persistent"))
            ok = _checksum(state) == expected
            ck.close()
            if not ok:
                raise AssertionError(f"{case} recovery {r}: the state differs from the trained one")
            del state
        out[case] = {"seconds": seconds, "tiers": tiers}
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(n: int, devices: int, opts: dict[str, Any], timeout: float = 170.0) -> list[dict[str, Any]]:
    """``n`` worker processes on 127.0.0.1; every one's result (raises with its output if one fails)."""
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )
    port = _free_port()
    argv = [sys.executable, os.path.abspath(__file__), "--worker"]
    procs = [
        subprocess.Popen(
            [*argv, str(i), str(n), str(port), json.dumps(opts)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(n)
    ]
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    results = []
    for proc, text in zip(procs, outputs, strict=True):
        lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"a local-tier bench process failed ({proc.returncode}):\n{text[-3000:]}")
        results.append(json.loads(lines[-1][len("RESULT ") :]))
    return results


def recovery_cases(root: str, s3_base: str, *, repeats: int, mib: float) -> list[dict[str, Any]]:
    """Recovery on 4 processes x 2 devices: one host's local directory wiped, and every one."""
    opts = {"base": f"{s3_base}/mp", "local": os.path.join(root, "mp-local"), "repeats": repeats, "mib": mib}
    results = launch(4, 2, opts)
    first = results[0]
    rows = []
    for case, name in (
        ("peer", "recover: local + peer (p2 wiped)"),
        ("persistent", "recover: persistent tier (S3, all wiped)"),
    ):
        seconds = first[case]["seconds"]
        row = {"name": name, "seconds": statistics.median(seconds), "all_seconds": seconds}
        row["tiers"] = sorted({t for r in results for t in r[case]["tiers"]})
        print(f"  {name:42s} {row['seconds']:8.3f}s (tier {','.join(row['tiers'])}, {mib:.0f} MiB)", flush=True)
        rows.append(row)
    return rows


# -- both parts -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _s3() -> Iterator[str]:
    stores = _object_stores()
    with stores.s3_server():
        yield f"s3://{stores.BUCKET}/local-tier-bench-{os.getpid()}"


def cases(tree: dict[str, Any], *, repeats: int, window_s: float, mp_mib: float) -> dict[str, list[dict]]:
    """Both parts, on moto; ``tree`` is part 1's state (on a mesh of this process's devices)."""
    root = tempfile.mkdtemp(prefix="ckpt-bench-local-")
    try:
        with _s3() as s3_base:
            print("local tier: loop time lost per save, one process:", flush=True)
            loop = loop_cases(tree, root, s3_base, repeats=repeats, window_s=window_s)
            print("local tier: recovery, 4 processes x 2 devices:", flush=True)
            recovery = recovery_cases(root, s3_base, repeats=repeats, mib=mp_mib)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"loop": loop, "recovery": recovery}


def _range(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    med, lo, hi = (v * scale for v in (statistics.median(values), min(values), max(values)))
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def table(report: dict[str, list[dict]]) -> list[str]:
    """Markdown rows: median (range) of the repeats."""
    lines = [
        "| local tier case | loop time lost s / recovery s | blocking s | peak extra RSS MiB | first save MiB |",
        "|---|---|---|---|---|",
    ]
    for r in report["loop"]:
        rss, first = _range(r["all_rss"], 1 / 2**20, 0), f"{r.get('first_rss', 0) / 2**20:.0f}"
        lines.append(f"| {r['name']} | {_range(r['all_lost_s'])} | {r['blocking_s']:.3f} | {rss} | {first} |")
    for r in report["recovery"]:
        lines.append(f"| {r['name']} | {_range(r['all_seconds'])} | | | |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=float, default=128, help="part 1's model-like tree")
    parser.add_argument("--mp-mib", type=float, default=64, help="part 2's state, over 4 processes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window", type=float, default=2.0, help="part 1: seconds of steps per save")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--out", default=None, help="also write local-tier-<date>.json there")
    args = parser.parse_args(argv)
    if args.smoke:
        args.mib, args.mp_mib, args.repeats, args.window = 4, 1, 1, 0.3
    import jax
    import numpy as np
    import run
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("x", "y"))
    tree = run.model_tree(args.mib / 1024, mesh)
    print(f"local tier: {run.nbytes_unique(tree) / 2**20:.0f} MiB tree, {len(tree)} leaves", flush=True)
    report = cases(tree, repeats=args.repeats, window_s=args.window, mp_mib=args.mp_mib)
    print("\n" + "\n".join(table(report)))
    if args.out:
        stamp = time.strftime("%Y-%m-%dT%H%MZ", time.gmtime())
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"local-tier-{stamp}.json"), "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        pid, n, port, opts = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
        result = worker(pid, n, port, opts)
        print("RESULT " + json.dumps(result), flush=True)
        import jax

        jax.distributed.shutdown()
        sys.exit(0)
    sys.path.insert(0, HERE)
    sys.exit(main())
