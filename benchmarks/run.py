"""`make bench`: ckpt_callbacks against orbax-checkpoint and the raw-write limit, in one run.

    python benchmarks/run.py [--gib 1.0] [--repeats 3] [--scaling] [--smoke] [--out benchmarks/results]

Every case runs on the same pytree and the same target directory tree, `--repeats` times
(median reported), each time into a fresh directory. Before each timed operation the page
cache is dropped where the OS allows it (`/proc/sys/vm/drop_caches`; the result says whether
it was) and host memory is warmed (about 4x the checkpoint touched and freed, untimed), so
neither a writer reusing memory nor one allocating fresh pages is favoured. Output: a
markdown table, JSON and a PNG chart under --out.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import pathlib
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt_callbacks as cc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loop as loop_bench  # benchmarks/loop.py, beside this script

GB = 1e9


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def warm_memory(nbytes: int) -> None:
    block = np.ones(max(nbytes, 1) // 8, np.float64)
    block += 1
    del block


def measure(fn: Callable[[], Any]) -> dict[str, Any]:
    """Seconds and peak extra RSS of one call (RSS sampled every 2 ms)."""
    base = rss()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    try:
        out = fn()
    finally:
        seconds = time.perf_counter() - start
        stop.set()
        sampler.join()
    return {"seconds": seconds, "peak_rss": peak[0] - base, "out": out}


def files_in(path: str) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


def model_layout(gib: float) -> list[tuple[str, tuple[int, int], P]]:
    """About `gib` GiB in 40 float32 leaves of mixed shapes for a (4, 2) mesh, some replicated."""
    unit = max(1, int(gib * 2**30 / 4 / 40 / 1024 / 64)) * 64  # rows per leaf of width 1024 (float32)
    kinds = [
        ((unit, 1024), P("x", "y")),
        ((1024, unit), P("y", "x")),
        ((unit * 2, 512), P("x")),
        ((unit // 2, 2048), P(None, "x")),
        ((unit, 1024), P()),  # replicated
    ]
    return [(f"layer_{i:02d}", *kinds[i % 5]) for i in range(40)]


def random_tree(layout: list[tuple[str, tuple[int, ...], P]], mesh: Mesh) -> dict[str, jax.Array]:
    tree = {}
    for i, (name, shape, spec) in enumerate(layout):
        tree[name] = jax.jit(
            lambda k, s=shape: jax.random.normal(k, s, jnp.float32), out_shardings=NamedSharding(mesh, spec)
        )(jax.random.key(i))
    jax.block_until_ready(tree)
    return tree


def model_tree(gib: float, mesh: Mesh) -> dict[str, jax.Array]:
    return random_tree(model_layout(gib), mesh)


def chunky_tree(mesh: Mesh, leaves: int = 450) -> dict[str, jax.Array]:
    """One process's share of a large model on many devices: `leaves` x 8 shards of 170 KiB each."""
    return random_tree([(f"w{i:03d}", (4 * 170, 2 * 256), P("x", "y")) for i in range(leaves)], mesh)


def small_tree(n: int, total_bytes: int) -> dict[str, jax.Array]:
    per = max(1, total_bytes // n // 4)
    device = jax.devices()[0]
    return {f"p{i:04d}": jax.device_put(jnp.full((per,), i, jnp.float32), device) for i in range(n)}


def nbytes_unique(tree: Any) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


class Bench:
    def __init__(self, root: str, repeats: int, warm_bytes: int) -> None:
        self.root = root
        self.repeats = repeats
        self.warm_bytes = warm_bytes
        self.dropped = False
        self.counter = 0

    def fresh(self, name: str) -> str:
        self.counter += 1
        path = os.path.join(self.root, f"{name}-{self.counter}")
        shutil.rmtree(path, ignore_errors=True)
        return path

    def prepare(self) -> None:
        self.dropped = drop_caches() or self.dropped
        warm_memory(self.warm_bytes)

    def run(
        self,
        name: str,
        setup: Callable[[], Any],
        op: Callable[[Any], Any],
        nbytes: int,
        extra: Callable[[Any, Any], dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        rows = []
        for _ in range(self.repeats):
            ctx = setup()
            self.prepare()
            m = measure(lambda c=ctx: op(c))
            row = {"seconds": m["seconds"], "peak_rss": m["peak_rss"]}
            if extra is not None:
                row.update(extra(ctx, m["out"]))
            rows.append(row)
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        med["gb_per_s"] = nbytes / GB / med["seconds"] if med["seconds"] > 0 else float("inf")
        med["name"] = name
        med["all_seconds"] = [r["seconds"] for r in rows]
        print(
            f"  {name:42s} {med['seconds']:8.3f}s {med['gb_per_s']:6.2f} GB/s "
            f"rss {med['peak_rss'] / 2**20:7.0f} MiB"
            + (f" blocking {med['blocking_s']:.3f}s" if "blocking_s" in med else ""),
            flush=True,
        )
        return med


def raw_cases(b: Bench, tree: dict[str, jax.Array], nbytes: int, tag: str = "") -> list[dict[str, Any]]:
    """The limit: numpy tofile + fsync of each unique shard (8 threads), and reading it back."""
    shards = []
    for name, leaf in tree.items():
        seen = set()
        for shard in leaf.addressable_shards:
            key = str(shard.index)
            if key not in seen:
                seen.add(key)
                shards.append((f"{name}-{len(seen)}", np.asarray(shard.data)))

    def write(path: str) -> None:
        os.makedirs(path)

        def one(item: tuple[str, np.ndarray]) -> None:
            with open(os.path.join(path, item[0]), "wb") as f:
                item[1].tofile(f)
                f.flush()
                os.fsync(f.fileno())

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(one, shards))

    def read(path: str) -> None:
        def one(item: tuple[str, np.ndarray]) -> np.ndarray:
            return np.fromfile(os.path.join(path, item[0]), dtype=item[1].dtype)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(one, shards))

    written = b.fresh("raw-read")
    write(written)
    label = f"raw {tag}".strip()
    return [
        b.run(f"{label}: tofile+fsync (limit)", lambda: b.fresh("raw"), write, nbytes),
        b.run(f"{label}: fromfile (limit)", lambda: written, read, nbytes),
    ]


def save_rows(
    b: Bench,
    label: str,
    names: tuple[str, str],
    save: Callable[[str], Any],
    save_async: Callable[[str], Any],
    nbytes: int,
    sync: bool,
) -> list[dict[str, Any]]:
    """A library's blocking save (if ``sync``; files counted) and async save, each into fresh directories."""
    rows = []
    name = label.replace(" ", "-")
    if sync:
        files = lambda path, _: {"files": files_in(path)}  # noqa: E731
        rows.append(b.run(f"{label}: {names[0]}", lambda: b.fresh(name), save, nbytes, files))
    rows.append(b.run(f"{label}: {names[1]}", lambda: b.fresh(f"{name}-a"), save_async, nbytes, lambda _, out: out))
    return rows


def orbax_cases(b: Bench, tree: Any, targets: Any, nbytes: int, tag: str, *, sync: bool = True) -> list[dict[str, Any]]:
    """orbax: sync save (if ``sync``), async save (blocking and total), restore with target shardings."""
    import orbax.checkpoint as ocp

    async_ckptr = ocp.StandardCheckpointer()
    sync_ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler()) if sync else None

    def sync_save(path: str) -> None:
        assert sync_ckptr is not None
        sync_ckptr.save(path, args=ocp.args.StandardSave(tree))

    def async_save(path: str) -> dict[str, float]:
        start = time.perf_counter()
        async_ckptr.save(path, tree)
        blocking = time.perf_counter() - start
        async_ckptr.wait_until_finished()
        return {"blocking_s": blocking}

    saved = b.fresh(f"orbax-{tag}-restore")
    async_ckptr.save(saved, tree)
    async_ckptr.wait_until_finished()

    def restore(_: Any) -> None:
        jax.block_until_ready(async_ckptr.restore(saved, targets))

    rows = save_rows(b, f"orbax {tag}", ("sync save", "async save (total)"), sync_save, async_save, nbytes, sync)
    rows.append(b.run(f"orbax {tag}: restore (target shardings)", lambda: None, restore, nbytes))
    async_ckptr.close()
    return rows


def ours_cases(
    b: Bench, tree: Any, mesh: Mesh, other: Mesh | None, nbytes: int, tag: str, *, sync: bool = True
) -> list[dict[str, Any]]:
    """ckpt_callbacks: save (if ``sync``), save_async (blocking and total), restore on ``mesh`` and ``other``."""

    def save(path: str) -> None:
        cc.save(path, tree)

    def save_async(path: str) -> dict[str, float]:
        handle = cc.save_async(path, tree)
        blocking = handle.blocking_s
        handle.wait()
        return {"blocking_s": blocking}

    saved = b.fresh(f"ours-{tag}-restore")
    save(saved)
    same = jax.tree.map(lambda x: x.sharding, tree)

    def restore_same(_: Any) -> None:
        jax.block_until_ready(cc.restore(saved, shardings=same))

    rows = save_rows(b, f"ckpt_callbacks {tag}", ("save", "save_async (total)"), save, save_async, nbytes, sync)
    rows.append(b.run(f"ckpt_callbacks {tag}: restore, same mesh", lambda: None, restore_same, nbytes))
    if other is not None:

        def restore_other(_: Any) -> None:
            jax.block_until_ready(cc.restore(saved, mesh=other))

        rows.append(b.run(f"ckpt_callbacks {tag}: restore, other mesh", lambda: None, restore_other, nbytes))
    return rows


def fresh_cases(b: Bench, tree: Any, gib: float, leaves: int, mib: float) -> list[dict[str, Any]]:
    """Cases in a fresh process each (benchmarks/fresh.py), `b.repeats` processes per case, median:
    first vs repeated save_async blocking of workload (b), and restore time and peak memory."""
    import fresh
    import orbax.checkpoint as ocp

    out = []
    for lib in ("ours", "orbax"):
        runs = [
            fresh.spawn("first-save", lib, str(leaves), str(mib), b.fresh(f"first-{lib}")) for _ in range(b.repeats)
        ]
        for key, label in (("first_s", "first"), ("repeat_s", "repeated")):
            seconds = [r[key] for r in runs]
            out.append(
                {
                    "name": f"fresh: {lib} {label} save_async",
                    "seconds": statistics.median(seconds),
                    "blocking_s": statistics.median(seconds),
                    "all_seconds": seconds,
                    "peak_rss": 0.0,
                    "gb_per_s": 0.0,
                }
            )
    ours, theirs = b.fresh("fresh-ours"), b.fresh("fresh-orbax")
    cc.save(ours, tree)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(theirs, tree)
    ckptr.close()
    nbytes = nbytes_unique(tree)
    for case, path, label in (
        ("ours-same", ours, "ours restore, same mesh"),
        ("ours-other", ours, "ours restore, other mesh"),
        ("orbax", theirs, "orbax restore"),
    ):
        runs = []
        for _ in range(b.repeats):
            b.prepare()
            runs.append(fresh.spawn("restore", case, path, str(gib)))
        row = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "peak_rss", "restored")}
        row.update(
            name=f"fresh: {label}", gb_per_s=nbytes / GB / row["seconds"], all_seconds=[r["seconds"] for r in runs]
        )
        print(
            f"  {row['name']:42s} {row['seconds']:8.3f}s peak extra RSS {row['peak_rss'] / 2**20:7.0f} MiB "
            f"({row['peak_rss'] / row['restored']:.2f}x the bytes restored)",
            flush=True,
        )
        out.append(row)
    for row in out[:4]:
        print(f"  {row['name']:42s} blocking {row['seconds']:.3f}s", flush=True)
    return out


def loop_overhead(steps: int) -> dict[str, float]:
    """Microseconds per call on non-saving steps: bare loop, Checkpointer.on_step, the callback."""
    state = {"w": jnp.ones(4)}
    with tempfile.TemporaryDirectory() as tmp:
        ck = cc.Checkpointer(
            tmp, save_interval=3600.0, step_policies=[cc.CheckpointInterval(every=10**9)], handle_sigterm=False
        )
        cb = cc.CheckpointCallback(ck, state_fn=lambda: state)

        def timed(fn: Callable[[int], Any]) -> float:
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                for step in range(1, steps + 1):
                    fn(step)
                best = min(best, (time.perf_counter() - start) / steps * 1e6)
            return best

        bare = timed(lambda step: None)
        on_step = timed(lambda step: ck.on_step(state, step=step))
        callback = timed(cb)
        ck.close()
    return {"bare_us": bare, "on_step_us": on_step - bare, "callback_us": callback - bare}


def ratios(rows: dict[str, dict[str, Any]], small: dict[str, dict[str, Any]] | None) -> list[tuple[str, float, str]]:
    def t(name: str) -> float:
        return rows[name]["seconds"]

    def vs(name: str, theirs: str, ours: str, target: str) -> tuple[str, float, str]:
        return name, t(theirs) / t(ours), target

    out = [
        ("save throughput vs orbax sync save", t("orbax model: sync save") / t("ckpt_callbacks model: save"), ">= 2.0"),
        ("save throughput vs raw limit", t("raw: tofile+fsync (limit)") / t("ckpt_callbacks model: save"), ">= 0.8"),
        (
            "save_async blocking vs orbax async blocking",
            rows["ckpt_callbacks model: save_async (total)"]["blocking_s"]
            / rows["orbax model: async save (total)"]["blocking_s"],
            "<= 0.5",
        ),
        vs(
            "restore (same mesh) vs orbax",
            "orbax model: restore (target shardings)",
            "ckpt_callbacks model: restore, same mesh",
            ">= 1.5",
        ),
        vs(
            "restore (other mesh) vs orbax",
            "orbax model: restore (target shardings)",
            "ckpt_callbacks model: restore, other mesh",
            ">= 1.5",
        ),
    ]
    out += [
        vs(
            "restore (same mesh) vs raw fromfile",
            "raw: fromfile (limit)",
            "ckpt_callbacks model: restore, same mesh",
            ">= 0.8",
        ),
        vs(
            "3,600 chunks of 170 KiB: save vs raw limit",
            "raw chunks: tofile+fsync (limit)",
            "ckpt_callbacks chunks: save",
            ">= 0.8",
        ),
        (
            "first save_async of 2,000 small leaves (fresh process): blocking vs orbax",
            rows["fresh: ours first save_async"]["seconds"] / rows["fresh: orbax first save_async"]["seconds"],
            "<= 0.5",
        ),
        (
            "repeated save_async of 2,000 small leaves: blocking vs orbax",
            rows["fresh: ours repeated save_async"]["seconds"] / rows["fresh: orbax repeated save_async"]["seconds"],
            "<= 0.5",
        ),
        (
            "restore peak extra RSS vs orbax (fresh process, same mesh)",
            rows["fresh: ours restore, same mesh"]["peak_rss"] / rows["fresh: orbax restore"]["peak_rss"],
            "<= 1.0",
        ),
    ]
    if small:
        ours = (
            small["ckpt_callbacks small: save"]["seconds"]
            + small["ckpt_callbacks small: restore, same mesh"]["seconds"]
        )
        theirs = (
            small["orbax small: sync save"]["seconds"] + small["orbax small: restore (target shardings)"]["seconds"]
        )
        out.append(("2,000 small leaves: save+restore vs orbax", theirs / ours, ">= 2.0"))
    return out


def holds(value: float, target: str) -> bool:
    op, number = target.split()
    return value >= float(number) if op == ">=" else value <= float(number)


def scaling(b: Bench, mesh: Mesh, sizes: list[float]) -> list[dict[str, Any]]:
    """Save and restore time from 0.25 to 4 GiB (one run each; the tree is freed before restoring)."""
    out = []
    b.warm_bytes = min(b.warm_bytes, 2 << 30)  # a 4 GiB tree replicated 8x on some leaves fills this machine
    for gib in sizes:
        tree = model_tree(gib, mesh)
        nbytes = nbytes_unique(tree)
        saved = b.fresh(f"scale-{gib}")
        b.prepare()
        save = measure(lambda s=saved, t=tree: cc.save(s, t))
        del tree
        b.prepare()
        restore = measure(lambda s=saved: jax.block_until_ready(cc.restore(s, mesh=mesh)) and None)
        out.append(
            {
                "gib": gib,
                "bytes": nbytes,
                "save_s": save["seconds"],
                "restore_s": restore["seconds"],
                "save_rss": save["peak_rss"],
                "restore_rss": restore["peak_rss"],
            }
        )
        print(f"  scaling {gib:5.2f} GiB: save {save['seconds']:.2f}s restore {restore['seconds']:.2f}s", flush=True)
        shutil.rmtree(saved, ignore_errors=True)
    return out


def case_table(rows: list[dict[str, Any]], *, files: bool, digits: int = 3) -> list[str]:
    """Markdown rows: seconds, GB/s, blocking seconds (``digits``), peak RSS and files written."""
    head = "| case | seconds | GB/s | blocking s | peak extra RSS MiB |" + (" files |" if files else "")
    lines = [head, "|---" * head.count(" |") + "|"]
    for row in rows:
        blocking = f"{row['blocking_s']:.{digits}f}" if "blocking_s" in row else ""
        cells = [row["name"], f"{row['seconds']:.3f}", f"{row['gb_per_s']:.2f}", blocking]
        # a restore's RSS in a process that saved before is an allocator artifact: see the fresh table
        cells.append("fresh table" if "restore" in row["name"] else f"{row['peak_rss'] / 2**20:.0f}")
        if files:
            cells.append(str(int(row["files"])) if "files" in row else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def fresh_table(rows: list[dict[str, Any]]) -> list[str]:
    """Cases run in a fresh process each: save_async blocking, restore time and peak memory."""
    lines = ["| fresh process per run | seconds | peak extra RSS MiB | peak / bytes restored |", "|---|---|---|---|"]
    for row in rows:
        restored = row.get("restored")
        memory = f"{row['peak_rss'] / 2**20:.0f} | {row['peak_rss'] / restored:.2f}" if restored else "| "
        lines.append(f"| {row['name']} | {row['seconds']:.3f} | {memory} |")
    return lines


def target_table(ratios: list[tuple[str, float, str]], digits: int = 2) -> list[str]:
    lines = ["| target (ratio, same run) | measured | target | holds |", "|---|---|---|---|"]
    for name, value, target in ratios:
        lines.append(f"| {name} | {value:.{digits}f} | {target} | {'yes' if holds(value, target) else 'NO'} |")
    return lines


def write_outputs(out_dir: pathlib.Path, report: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = report["date"]
    (out_dir / f"bench-{stamp}.json").write_text(json.dumps(report, indent=1))
    lines = [
        f"# Benchmark {stamp} ({report['machine']})",
        "",
        f"Workload (a): {report['model_bytes'] / GB:.2f} GB in 40 leaves on a (4, 2) mesh of 8 CPU devices; "
        f"median of {report['repeats']}; page cache dropped: {report['caches_dropped']}; memory warmed "
        "before each timed operation.",
        "",
    ]
    lines += case_table(report["model"] + report.get("small", []) + report.get("chunks", []), files=True)
    if report.get("fresh"):
        lines += ["", *fresh_table(report["fresh"])]
    lines += ["", *target_table(report["ratios"])]
    if report.get("loop_save"):
        steps = report["loop_save"][0]["steps"]
        lines += [
            "",
            f"Training loop with a save in flight ({steps} steps after the save call, then wait; median of "
            f"{report['repeats']}):",
            "",
            *loop_bench.loop_table(report["loop_save"]),
        ]
    if report.get("local_tier"):
        import local_tier

        lines += ["", "Local tier (`benchmarks/local_tier.py`; median (range) of the repeats):", ""]
        lines += local_tier.table(report["local_tier"])
    loop = report["loop"]
    lines += [
        "",
        f"Loop overhead on non-saving steps: on_step {loop['on_step_us']:.2f} us, callback "
        f"{loop['callback_us']:.2f} us per call (bare loop {loop['bare_us']:.3f} us; target < 20 us).",
    ]
    if report.get("scaling"):
        lines += ["", "| GiB | save s | restore s | save GB/s | restore GB/s |", "|---|---|---|---|---|"]
        for row in report["scaling"]:
            lines.append(
                f"| {row['gib']} | {row['save_s']:.2f} | {row['restore_s']:.2f} | "
                f"{row['bytes'] / GB / row['save_s']:.2f} | {row['bytes'] / GB / row['restore_s']:.2f} |"
            )
    text = "\n".join(lines) + "\n"
    (out_dir / f"bench-{stamp}.md").write_text(text)
    (out_dir / "latest.md").write_text(text)
    print("\n" + text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = report["model"]
        fig, ax = plt.subplots(figsize=(9, 4.5))
        ax.barh(
            [r["name"] for r in rows],
            [r["gb_per_s"] for r in rows],
            color=["#888" if r["name"].startswith("raw") else "#d62" if "orbax" in r["name"] else "#26a" for r in rows],
        )
        ax.set_xlabel("GB/s (higher is better)")
        ax.set_title(
            f"{report['model_bytes'] / GB:.2f} GB model-like tree, 8 CPU devices, median of {report['repeats']}"
        )
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(out_dir / "latest.png", dpi=110)
        fig.savefig(out_dir / f"bench-{stamp}.png", dpi=110)
    except ImportError:
        print("matplotlib not installed: no chart")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0, help="size of workload (a)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small-leaves", type=int, default=2000)
    parser.add_argument("--small-mib", type=float, default=32)
    parser.add_argument("--scaling", action="store_true", help="also time saves/restores from 0.25 to 4 GiB")
    parser.add_argument("--scaling-only", action="store_true", help="only the 0.25 to 4 GiB growth check")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (CI)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--dir", default=None, help="where checkpoints are written (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.gib, args.repeats, args.small_leaves, args.small_mib = 0.01, 1, 50, 1
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("x", "y"))
    other = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("x", "y"))
    root = tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir)
    if args.scaling_only:
        rows = scaling(Bench(root, 1, 2 << 30), mesh, [0.25, 0.5, 1.0, 2.0, 4.0])
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H%MZ")
        pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
        (pathlib.Path(args.out) / f"scaling-{stamp}.json").write_text(json.dumps(rows, indent=1))
        shutil.rmtree(root, ignore_errors=True)
        return 0
    try:
        tree = model_tree(args.gib, mesh)
        nbytes = nbytes_unique(tree)
        b = Bench(root, args.repeats, 4 * nbytes)
        print(f"workload (a): {nbytes / GB:.3f} GB, {len(tree)} leaves", flush=True)
        targets = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
        model_rows = (
            raw_cases(b, tree, nbytes)
            + orbax_cases(b, tree, targets, nbytes, "model")
            + ours_cases(b, tree, mesh, other, nbytes, "model")
        )
        fresh_rows = fresh_cases(b, tree, args.gib, args.small_leaves, args.small_mib)
        chunky = chunky_tree(mesh, 10 if args.smoke else 450)
        chunk_bytes = nbytes_unique(chunky)
        print(f"workload (d): {chunk_bytes / GB:.3f} GB in {len(chunky) * 8} chunks of 170 KiB", flush=True)
        chunk_rows = raw_cases(b, chunky, chunk_bytes, "chunks") + ours_cases(
            b, chunky, mesh, None, chunk_bytes, "chunks", sync=True
        )
        del chunky
        print("training loop with a save in flight (per snapshot mode, and orbax):", flush=True)
        loop_rows = loop_bench.loop_cases(tree, root, repeats=args.repeats, seconds=0.5 if args.smoke else 4.0)
        del tree
        import local_tier  # benchmarks/local_tier.py: the per-host tier, on moto and 4 processes

        local_rows = local_tier.cases(
            model_tree(0.004 if args.smoke else 0.125, mesh),
            repeats=args.repeats,
            window_s=0.3 if args.smoke else 2.0,
            mp_mib=1 if args.smoke else 64,
        )
        small = small_tree(args.small_leaves, int(args.small_mib * 2**20))
        small_bytes = nbytes_unique(small)
        print(f"workload (b): {small_bytes / GB:.3f} GB in {len(small)} leaves", flush=True)
        small_targets = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), small)
        small_rows = orbax_cases(b, small, small_targets, small_bytes, "small") + ours_cases(
            b, small, mesh, None, small_bytes, "small"
        )
        loop = loop_overhead(2000 if args.smoke else 100_000)
        print(f"workload (c): on_step {loop['on_step_us']:.2f} us, callback {loop['callback_us']:.2f} us", flush=True)
        report = {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H%MZ"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}",
            "repeats": args.repeats,
            "model_bytes": nbytes,
            "caches_dropped": b.dropped,
            "model": model_rows,
            "chunks": chunk_rows,
            "fresh": fresh_rows,
            "small": small_rows,
            "loop": loop,
            "loop_save": loop_rows,
            "local_tier": local_rows,
        }
        by_name = {r["name"]: r for r in model_rows}
        by_name.update({r["name"]: r for r in chunk_rows + fresh_rows})
        report["ratios"] = ratios(by_name, {r["name"]: r for r in small_rows}) + loop_bench.loop_ratios(loop_rows)
        write_outputs(pathlib.Path(args.out), report)
        if args.scaling and not args.smoke:
            report["scaling"] = scaling(b, mesh, [0.25, 0.5, 1.0, 2.0, 4.0])
            write_outputs(pathlib.Path(args.out), report)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
