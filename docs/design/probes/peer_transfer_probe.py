"""Probe for issue 22: move one process's shards to a peer process with JAX's own collectives.

4 processes x 2 CPU devices, gloo collectives, one launcher per question:

  python peer_transfer_probe.py q1 VARIANT [--payload-mib 64] [--budget-mib 8]
      VARIANT: ppermute | device_put_rolled | jit_rolled | allgather | device_put_remote
  python peer_transfer_probe.py q2 [collective|local|between]   # transfer in a thread while steps run
  python peer_transfer_probe.py q2kv [BUDGET_MIB]     # same, bytes through the jax.distributed KV store
  python peer_transfer_probe.py q3mid DIR  # same, but kill -9 p2 in the middle of a replication
  python peer_transfer_probe.py q3 DIR     # save+replicate, kill -9 one, restart all, recover via peer

Each worker prints one ``RESULT {json}`` line; the launcher prints them and exits non-zero on failure.
Every run is bounded (watchdog in each worker, timeout in the launcher), and every process it
started is killed by pid when it ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

N = 4  # processes
L = 2  # CPU devices per process
MiB = 1 << 20
HERE = os.path.abspath(__file__)


# ----------------------------------------------------------------------------- helpers (worker side)
class RssSampler:
    """Peak RSS (bytes) above a baseline, sampled every 2 ms from /proc/self/statm."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()
        self.base = self.rss()

    def rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def __enter__(self):
        self.base = self.rss()
        self.peak = self.base
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join()

    @property
    def delta_mib(self):
        return round((self.peak - self.base) / MiB, 1)


def watchdog(seconds, tag):
    def fire():
        import faulthandler

        print(f"RESULT {json.dumps({'pid': PID, 'error': f'HANG: watchdog {seconds}s in {tag}'})}", flush=True)
        faulthandler.dump_traceback(all_threads=True)
        os._exit(3)

    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()
    return t


PID = -1


def init(pid, port, heartbeat=100):
    global PID
    PID = pid
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=N,
        process_id=pid,
        initialization_timeout=40,
        heartbeat_timeout_seconds=heartbeat,
    )
    return jax


def proc_mesh():
    """Mesh ('proc', 'dev'): row i = the L devices of process i (ordered by process index, then id)."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    devs = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devs).reshape(N, L), ("proc", "dev"))


def payload_for(p, nbytes):
    import numpy as np

    return np.random.default_rng(1000 + p).integers(0, 256, nbytes, dtype=np.uint8)


class PeerTransfer:
    """Chunked byte transfer over a ('proc','dev') mesh using only JAX collectives.

    Every process contributes ``budget`` bytes per round (``budget // L`` per local device); one jitted
    program moves them along ``perm`` (pairs of process indices). Device memory per round is about
    2 x budget (staging + output; the staging buffer is donated).
    """

    def __init__(self, mesh, budget, perm, how="ppermute"):
        import jax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        self.jax, self.mesh, self.how = jax, mesh, how
        self.piece = budget // L
        self.budget = self.piece * L
        self.spec = P("proc", "dev")
        self.sharding = NamedSharding(mesh, self.spec)
        self.shape = (N, L, self.piece)
        self.me = jax.process_index()
        self.local_devs = list(mesh.devices[self.me])
        if how == "ppermute":
            from jax import shard_map

            def body(x):
                return jax.lax.ppermute(x, "proc", perm)

            self.fn = jax.jit(shard_map(body, mesh=mesh, in_specs=self.spec, out_specs=self.spec), donate_argnums=0)
        elif how in ("device_put_rolled", "jit_rolled"):
            # Same devices, rows rolled: global row i lives on process (i+1)%N's devices.
            import numpy as np
            from jax.sharding import Mesh

            assert sorted(perm) == sorted((i, (i + 1) % N) for i in range(N)), "rolled = ring +1 only"
            rolled = Mesh(np.roll(mesh.devices, -1, axis=0), ("proc", "dev"))  # row i on process i+1
            self.out_sharding = NamedSharding(rolled, self.spec)
            if how == "jit_rolled":
                self.fn = jax.jit(lambda x: x, out_shardings=self.out_sharding, donate_argnums=0)
            else:
                self.fn = lambda x: jax.device_put(x, self.out_sharding, donate=True)
        elif how == "allgather":
            from jax.experimental import multihost_utils as mhu

            self.src = {dst: src for src, dst in perm}
            self.fn = lambda x: mhu.process_allgather(x, tiled=True)
        else:
            raise ValueError(how)

    def round(self, chunk):
        """chunk: np.uint8[budget] of this process. Returns np.uint8[budget] received (zeros if none)."""
        import numpy as np

        jax = self.jax
        pieces = chunk.reshape(L, 1, 1, self.piece)
        arrs = [jax.device_put(pieces[j], d) for j, d in enumerate(self.local_devs)]
        x = jax.make_array_from_single_device_arrays(self.shape, self.sharding, arrs)
        y = self.fn(x)
        if self.how == "allgather":
            src = self.src.get(self.me)
            y = np.asarray(y)
            return y[src].reshape(-1) if src is not None else np.zeros(self.budget, np.uint8)
        out = np.empty(self.budget, np.uint8)
        for s in y.addressable_shards:  # shard index (row, dev, :) -> local piece number dev
            j = s.index[1].start
            out[j * self.piece : (j + 1) * self.piece] = np.asarray(s.data).reshape(-1)
        return out

    def send(self, buf, nbytes_max, on_chunk=None):
        """Send buf (np.uint8, this process's bytes) in budget rounds; nbytes_max: agreed max over processes.
        Without on_chunk the received bytes are accumulated and returned; with on_chunk(k, bytes) each
        round's bytes are handed over (e.g. appended to a file) and nothing is accumulated."""
        import numpy as np

        rounds = -(-nbytes_max // self.budget)
        recv = None if on_chunk else np.empty(rounds * self.budget, np.uint8)
        chunk = np.zeros(self.budget, np.uint8)
        for k in range(rounds):
            part = buf[k * self.budget : (k + 1) * self.budget]
            chunk[: len(part)] = part
            chunk[len(part) :] = 0
            got = self.round(chunk)
            if on_chunk:
                on_chunk(k, got)
            else:
                recv[k * self.budget : (k + 1) * self.budget] = got
        return recv, rounds


def agreed_max(n):
    import numpy as np
    from jax.experimental import multihost_utils as mhu

    return int(np.asarray(mhu.process_allgather(np.array([n], np.int64))).max())


# ----------------------------------------------------------------------------- Q1
def q1_worker(pid, port, how, payload_mib, budget_mib):
    wd = watchdog(55, f"q1 {how}")
    jax = init(pid, port)
    import numpy as np

    mesh = proc_mesh()
    res = {"pid": pid, "how": how}
    if pid == 0:
        res["mesh"] = [[f"{d.id}@p{d.process_index}" for d in row] for row in mesh.devices]
    nbytes = payload_mib * MiB
    payload = payload_for(pid, nbytes)
    if how == "device_put_remote":
        # Put a host array directly on another process's device (no collective): expected refusal.
        other = mesh.devices[(pid + 1) % N][0]
        for name, f in [
            ("device_put(np, remote_device)", lambda: jax.device_put(payload[:16], other)),
            (
                "device_put(np, SingleDeviceSharding(remote))",
                lambda: jax.device_put(payload[:16], jax.sharding.SingleDeviceSharding(other)),
            ),
            (
                "device_put(local jax.Array, remote_device)",
                lambda: jax.device_put(jax.device_put(payload[:16], mesh.devices[pid][0]), other),
            ),
        ]:
            try:
                r = f()
                res[name] = f"no error: {type(r).__name__} devices={[str(d) for d in r.devices()]}"
            except Exception as e:
                res[name] = f"{type(e).__name__}: {str(e)[:300]}"
        wd.cancel()
        return res
    perm = [(i, (i + 1) % N) for i in range(N)]
    t = time.perf_counter()
    xfer = PeerTransfer(mesh, budget_mib * MiB, perm, how)
    # warm-up (compile) with one round of zeros, not measured
    try:
        xfer.round(np.zeros(xfer.budget, np.uint8))
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {str(e)[:600]}"
        wd.cancel()
        return res
    res["setup_compile_s"] = round(time.perf_counter() - t, 3)
    mx = agreed_max(nbytes)
    src = (pid - 1) % N
    expect = payload_for(src, nbytes)
    good = []
    B = xfer.budget

    def check(k, got):  # streamed: compare each round, keep nothing (as a writer to disk would)
        good.append(bool(np.array_equal(got[: len(expect[k * B : (k + 1) * B])], expect[k * B : (k + 1) * B])))

    with RssSampler() as rs:
        t = time.perf_counter()
        _, rounds = xfer.send(payload, mx, on_chunk=check)
        dt = time.perf_counter() - t
    ok = all(good) and len(good) == rounds
    res.update(
        rounds=rounds,
        budget_mib=budget_mib,
        received_from=src,
        bytes_received=int(rounds * xfer.budget),
        bit_exact=ok,
        transfer_s=round(dt, 3),
        MiB_per_s=round(rounds * xfer.budget / MiB / dt, 1),
        peak_rss_delta_mib=rs.delta_mib,
        rss_base_mib=round(rs.base / MiB, 1),
    )
    wd.cancel()
    return res


# ----------------------------------------------------------------------------- Q2
def q2_worker(pid, port, mode, payload_mib=64, budget_mib=8, steps=150):
    wd = watchdog(35, f"q2 {mode}")
    jax = init(pid, port)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = proc_mesh()
    wsh = NamedSharding(mesh, P(("proc", "dev")))
    shape = (N * L, 128, 128)
    w0 = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) / 1e6

    if mode == "local":  # no cross-process collective in the step

        @jax.jit
        def step(w):
            return jnp.sin(w) * 0.5 + 0.25

    else:  # data-parallel style: an all-reduce over every device of every process

        @jax.jit
        def step(w):
            return jnp.sin(w) * 0.5 + jnp.mean(w)

    def run_steps(k, between=None):
        w = jax.make_array_from_callback(shape, wsh, lambda i: w0[i])
        times = []
        for s in range(k):
            t = time.perf_counter()
            w = step(w)
            w.block_until_ready()
            times.append(time.perf_counter() - t)
            if between is not None:
                between(s)
        digest = [float(np.asarray(x.data, np.float64).sum()) for x in w.addressable_shards]
        return digest, times

    print("PHASE start ref", flush=True)
    ref, ref_times = run_steps(steps)  # reference: steps alone (also compiles)
    print("PHASE ref done", flush=True)
    nbytes = payload_mib * MiB
    payload = payload_for(pid, nbytes)
    perm = [(i, (i + 1) % N) for i in range(N)]
    xfer = PeerTransfer(mesh, budget_mib * MiB, perm)
    xfer.round(np.zeros(xfer.budget, np.uint8))  # compile
    mx = agreed_max(nbytes)
    res = {"pid": pid, "mode": mode, "steps": steps}
    box = {}
    if mode == "between":  # one transfer round after each step, on the main thread
        rounds = -(-mx // xfer.budget)
        recv = np.zeros(rounds * xfer.budget, np.uint8)
        chunk = np.zeros(xfer.budget, np.uint8)
        rt = []

        def between(s):
            if s < rounds:
                t = time.perf_counter()
                part = payload[s * xfer.budget : (s + 1) * xfer.budget]
                chunk[: len(part)] = part
                chunk[len(part) :] = 0
                recv[s * xfer.budget : (s + 1) * xfer.budget] = xfer.round(chunk)
                rt.append(time.perf_counter() - t)

        t = time.perf_counter()
        got, times = run_steps(steps, between)
        res["wall_s"] = round(time.perf_counter() - t, 3)
        box["recv"] = recv
        res["round_s_mean"] = round(float(np.mean(rt)), 4)
    elif mode == "dispatch":  # main thread only DISPATCHES one round after each step; a thread drains it
        import queue

        rounds = -(-mx // xfer.budget)
        recv = np.zeros(rounds * xfer.budget, np.uint8)
        q = queue.Queue()
        ht = []

        def drain():
            while True:
                item = q.get()
                if item is None:
                    return
                k, y = item
                for sh in y.addressable_shards:
                    j = sh.index[1].start
                    o = k * xfer.budget + j * xfer.piece
                    recv[o : o + xfer.piece] = np.asarray(sh.data).reshape(-1)

        def between(s):
            if s < rounds:
                t = time.perf_counter()
                chunk = np.zeros(xfer.budget, np.uint8)  # fresh buffer: a host buffer may be aliased
                part = payload[s * xfer.budget : (s + 1) * xfer.budget]
                chunk[: len(part)] = part
                pieces = chunk.reshape(L, 1, 1, xfer.piece)
                arrs = [jax.device_put(pieces[j], d) for j, d in enumerate(xfer.local_devs)]
                x = jax.make_array_from_single_device_arrays(xfer.shape, xfer.sharding, arrs)
                q.put((s, xfer.fn(x)))  # async dispatch: returns before the transfer is done
                ht.append(time.perf_counter() - t)

        th = threading.Thread(target=drain)
        th.start()
        t = time.perf_counter()
        got, times = run_steps(steps, between)
        q.put(None)
        th.join()
        res["wall_s"] = round(time.perf_counter() - t, 3)
        box["recv"] = recv
        res["hook_ms_mean"] = round(1e3 * float(np.mean(ht)), 2)
        res["hook_ms_max"] = round(1e3 * float(np.max(ht)), 2)
    else:  # background thread transfers while the main thread steps

        def bg():
            try:
                t = time.perf_counter()
                box["recv"], _ = xfer.send(payload, mx)
                box["bg_s"] = time.perf_counter() - t
            except Exception as e:
                box["err"] = f"{type(e).__name__}: {str(e)[:400]}"

        th = threading.Thread(target=bg)
        print("PHASE concurrent start", flush=True)
        t = time.perf_counter()
        th.start()
        got, times = run_steps(steps)
        th.join()
        res["wall_s"] = round(time.perf_counter() - t, 3)
        res["bg_transfer_s"] = round(box.get("bg_s", -1), 3)
        if "err" in box:
            res["bg_error"] = box["err"]
    src = (pid - 1) % N
    res["transfer_bit_exact"] = bool("recv" in box and np.array_equal(box["recv"][:nbytes], payload_for(src, nbytes)))
    res["steps_equal_reference"] = got == ref
    res["step_ms_alone_median"] = round(1e3 * float(np.median(ref_times[5:])), 2)
    res["step_ms_with_transfer_median"] = round(1e3 * float(np.median(times[5:])), 2)
    res["step_ms_with_transfer_max"] = round(1e3 * float(np.max(times)), 2)
    wd.cancel()
    return res


# ----------------------------------------------------------------------------- Q2b: coordination-service KV
def q2kv_worker(pid, port, budget_mib, payload_mib=64, steps=150):
    """Alternative to collectives: bytes through the jax.distributed key-value store (gRPC to the
    coordinator, which runs inside process 0), from a background thread while steps with an
    all-reduce run on the main thread. Every chunk is deleted by its receiver once read."""
    wd = watchdog(50, "q2kv")
    jax = init(pid, port)
    import jax.numpy as jnp
    import numpy as np
    from jax._src import distributed
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    client = distributed.global_state.client
    mesh = proc_mesh()
    wsh = NamedSharding(mesh, P(("proc", "dev")))
    shape = (N * L, 128, 128)
    w0 = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) / 1e6
    step = jax.jit(lambda w: jnp.sin(w) * 0.5 + jnp.mean(w))

    def run_steps(k):
        w = jax.make_array_from_callback(shape, wsh, lambda i: w0[i])
        ts = []
        for _ in range(k):
            t = time.perf_counter()
            w = step(w)
            w.block_until_ready()
            ts.append(time.perf_counter() - t)
        return [float(np.asarray(x.data, np.float64).sum()) for x in w.addressable_shards], ts

    ref, ref_t = run_steps(steps)
    nbytes, B = payload_mib * MiB, budget_mib * MiB
    payload = payload_for(pid, nbytes)
    src, dst = (pid - 1) % N, (pid + 1) % N
    expect = payload_for(src, nbytes)
    box = {"good": []}
    rs = RssSampler()

    def bg():
        try:
            t = time.perf_counter()
            rounds = -(-nbytes // B)
            for k in range(rounds):
                client.key_value_set_bytes(f"probe/x/{pid}->{dst}/{k}", payload[k * B : (k + 1) * B].tobytes())
                got = client.blocking_key_value_get_bytes(f"probe/x/{src}->{pid}/{k}", 30000)
                client.key_value_delete(f"probe/x/{src}->{pid}/{k}")
                box["good"].append(got == expect[k * B : (k + 1) * B].tobytes())
            box["s"] = time.perf_counter() - t
            box["rounds"] = rounds
        except Exception as e:
            box["err"] = f"{type(e).__name__}: {str(e)[:400]}"

    th = threading.Thread(target=bg)
    with rs:
        t = time.perf_counter()
        th.start()
        got, ts = run_steps(steps)
        th.join()
        wall = time.perf_counter() - t
    res = {
        "pid": pid,
        "budget_mib": budget_mib,
        "wall_s": round(wall, 3),
        "kv_transfer_s": round(box.get("s", -1), 3),
        "bit_exact": bool(box["good"]) and all(box["good"]) and len(box["good"]) == box.get("rounds"),
        "steps_equal_reference": got == ref,
        "step_ms_alone_median": round(1e3 * float(np.median(ref_t[5:])), 2),
        "step_ms_with_transfer_median": round(1e3 * float(np.median(ts[5:])), 2),
        "peak_rss_delta_mib": rs.delta_mib,
        "note": "process 0 hosts the coordinator (KV store)" if pid == 0 else "",
    }
    if "err" in box:
        res["error"] = box["err"]
    wd.cancel()
    return res


# ----------------------------------------------------------------------------- Q3 (+Q4 naming)
def make_state(mesh, step):
    """A small train state: one sharded leaf over all 8 devices, one sharded over 'dev' only
    (so replicated across processes), one fully replicated scalar."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    specs = {"w": P(("proc", "dev")), "b": P("dev"), "step": P()}
    cols = int(os.environ.get("PROBE_W_COLS", "1024"))  # q3mid: a bigger w, so replication takes many rounds
    shapes = {"w": (N * L * 4, cols), "b": (L * 2, 8), "step": ()}
    rng = np.random.default_rng(step)
    host = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    state = {
        k: jax.make_array_from_callback(shapes[k], NamedSharding(mesh, specs[k]), lambda i, k=k: host[k][i])
        for k in shapes
    }
    return state, host


def idx_key(index, shape):
    return tuple((sl.start or 0, shape[d] if sl.stop is None else sl.stop) for d, sl in enumerate(index))


def shard_set(state, p):
    """Process p's shard set, computed from shardings alone (any process can compute anyone's):
    [(leaf, index-key)] over p's devices, each distinct index once (replicated copies deduped)."""
    out = []
    for name in sorted(state):
        a = state[name]
        seen = set()
        for d, index in sorted(a.sharding.devices_indices_map(a.shape).items(), key=lambda kv: kv[0].id):
            if d.process_index != p:
                continue
            k = idx_key(index, a.shape)
            if k not in seen:
                seen.add(k)
                out.append((name, k))
    return out


def pack(state, host_shards):
    """Concatenate host_shards[(leaf, key)] in shard_set order into one uint8 buffer + manifest."""
    import numpy as np

    bufs, man, off = [], [], 0
    for (name, k), arr in host_shards:
        b = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
        man.append(
            {"leaf": name, "index": k, "dtype": str(arr.dtype), "shape": list(arr.shape), "off": off, "n": b.size}
        )
        bufs.append(b)
        off += b.size
    return (np.concatenate(bufs) if bufs else np.zeros(0, np.uint8)), man


def own_host_shards(state):
    import numpy as np

    me = __import__("jax").process_index()
    want = shard_set(state, me)
    got = {}
    for name in state:
        a = state[name]
        for s in a.addressable_shards:
            got.setdefault((name, idx_key(s.index, a.shape)), np.asarray(s.data))
    return [((n, k), got[(n, k)]) for n, k in want]


def write_part(root, step, kind, buf, man, meta):
    """Data first, then the commit marker (atomic rename)."""
    d = os.path.join(root, f"step_{step:08d}", kind)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "data.bin"), "wb") as f:
        f.write(buf.tobytes())
        f.flush()
        os.fsync(f.fileno())
    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump({"shards": man, **meta}, f)
    tmp = os.path.join(d, ".COMMIT.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(meta))
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, os.path.join(d, "COMMIT"))


def inventory(root):
    """{step: {'own': bool, 'replica_of': int|None}} of committed parts under this process's root."""
    inv = {}
    if not os.path.isdir(root):
        return inv
    for sd in sorted(os.listdir(root)):
        if not sd.startswith("step_"):
            continue
        step = int(sd[5:])
        e = {"own": False, "replica_of": None}
        for kind in os.listdir(os.path.join(root, sd)):
            c = os.path.join(root, sd, kind, "COMMIT")
            if os.path.exists(c):
                if kind == "own":
                    e["own"] = True
                elif kind.startswith("replica_of_"):
                    e["replica_of"] = int(kind[len("replica_of_") :])
        inv[step] = e
    return inv


def topo(mesh):
    import jax

    return {
        "process_count": jax.process_count(),
        "devices_per_process": jax.local_device_count(),
        "mesh_shape": dict(mesh.shape),
        "mesh_devices": [[int(d.id) for d in row] for row in mesh.devices],
        "device_process": [[int(d.process_index) for d in row] for row in mesh.devices],
    }


def q3_save_worker(pid, port, root, budget_mib=1):
    """Save steps 10, 20 (own + replica of p-1 via ppermute), then keep stepping until killed."""
    init(pid, port, heartbeat=10)
    import jax
    import jax.numpy as jnp
    import numpy as np

    mesh = proc_mesh()
    me = os.path.join(root, f"proc{pid}")
    budget = int(os.environ.get("PROBE_BUDGET_KIB", str(budget_mib * 1024))) * 1024
    xfer = PeerTransfer(mesh, budget, [(i, (i + 1) % N) for i in range(N)])
    slow = os.environ.get("PROBE_SLOW_ROUNDS")  # q3mid: announce + stretch each round of step 20
    info = {"pid": pid, "topology": topo(mesh), "shard_set_own": shard_set(make_state(mesh, 0)[0], pid)}
    for step in (10, 20):
        state, _ = make_state(mesh, step)
        if slow and step == 20:
            orig, count = xfer.round, [0]

            def announced(chunk, orig=orig, count=count):
                print(f"ROUND 20 {count[0]}", flush=True)
                count[0] += 1
                time.sleep(0.05)
                return orig(chunk)

            xfer.round = announced
        buf, man = pack(state, own_host_shards(state))
        meta = {"step": step, "process": pid, "topology": topo(mesh)}
        write_part(me, step, "own", buf, man, meta)
        recv, rounds = xfer.send(buf, agreed_max(buf.size))
        src = (pid - 1) % N
        # receiver knows the sender's shard set from the shardings: rebuild the manifest, no metadata sent
        sman, off = [], 0
        for name, k in shard_set(state, src):
            a = state[name]
            shp = [hi - lo for lo, hi in k]
            n = int(np.prod(shp, dtype=np.int64)) * a.dtype.itemsize
            sman.append({"leaf": name, "index": k, "dtype": str(a.dtype), "shape": shp, "off": off, "n": n})
            off += n
        write_part(me, step, f"replica_of_{src}", recv[:off], sman, {**meta, "replica_of": src})
        info[f"step{step}_rounds"] = rounds
    from jax.experimental import multihost_utils as mhu

    mhu.sync_global_devices("saved")
    print("SAVED " + json.dumps(info), flush=True)
    # keep "training" (steps with an all-reduce) until the launcher kills one of us
    w = make_state(mesh, 0)[0]["w"]
    f = jax.jit(lambda w: jnp.sin(w) + jnp.mean(w))
    t0 = time.time()
    k = 0
    try:
        while time.time() - t0 < 30:
            w = f(w)
            w.block_until_ready()
            k += 1
        return {"pid": pid, "survivor": "loop ended without error", "steps": k}
    except Exception as e:
        return {
            "pid": pid,
            "survivor_error_after_s": round(time.time() - t0, 1),
            "steps": k,
            "error": f"{type(e).__name__}: {str(e)[:500]}",
            "peer_died": True,
        }


def q3_recover_worker(pid, port, root, budget_mib=1):
    wd = watchdog(55, "q3 recover")
    init(pid, port)
    import numpy as np
    from jax.experimental import multihost_utils as mhu

    mesh = proc_mesh()
    me = os.path.join(root, f"proc{pid}")
    inv = inventory(me)
    # 1. agreement: every process publishes (step, own?, replica_of) for its committed parts
    steps_all = sorted({10, 20})  # candidate steps (would come from the union of inventories)
    row = np.array(
        [[s, int(inv.get(s, {}).get("own", False)), inv.get(s, {}).get("replica_of") or -1] for s in steps_all],
        np.int64,
    )
    table = np.asarray(mhu.process_allgather(row))  # [process, step, (step, own, replica_of)]
    chosen, plan = None, None
    for j in reversed(range(len(steps_all))):
        own = table[:, j, 1].astype(bool)
        holders = {int(table[q, j, 2]): q for q in range(N) if table[q, j, 2] >= 0}
        p_plan = {}
        for q in range(N):
            if own[q]:
                continue
            if q in holders:  # every restarted process is live
                p_plan[q] = holders[q]  # q receives from the process that holds its replica
            else:
                p_plan = None
                break
        if p_plan is not None:
            chosen, plan = steps_all[j], p_plan
            break
    res = {
        "pid": pid,
        "inventory": {str(k): v for k, v in inv.items()},
        "chosen_step": chosen,
        "plan_receiver_from_holder": {str(k): v for k, v in (plan or {}).items()},
    }
    if chosen is None:
        res["decision"] = "no local step recoverable -> persistent tier"
        wd.cancel()
        return res
    ref_state, _ = make_state(mesh, chosen)
    want = shard_set(ref_state, pid)
    # 2. transfer: one ppermute with only the needed pairs (holder -> receiver); others send nothing
    pairs = sorted((h, r) for r, h in plan.items())
    if pairs:
        sizes = 0
        send = np.zeros(0, np.uint8)
        for r, h in plan.items():
            if h == pid:
                d = os.path.join(me, f"step_{chosen:08d}", f"replica_of_{r}")
                send = np.fromfile(os.path.join(d, "data.bin"), np.uint8)
        sizes = agreed_max(send.size)
        xfer = PeerTransfer(mesh, budget_mib * MiB, pairs)
        t = time.perf_counter()
        recv, rounds = xfer.send(send, sizes)
        res["recovery_transfer"] = {"pairs": pairs, "rounds": rounds, "s": round(time.perf_counter() - t, 3)}
    # 3. rebuild this process's shards from own dir or from what it received
    if pid in plan:
        buf = recv
        man, off = [], 0
        for name, k in want:
            a = ref_state[name]
            shp = [hi - lo for lo, hi in k]
            n = int(np.prod(shp, dtype=np.int64)) * a.dtype.itemsize
            man.append({"leaf": name, "index": k, "dtype": "float32", "shape": shp, "off": off, "n": n})
            off += n
        res["source"] = f"peer process {plan[pid]}"
    else:
        d = os.path.join(me, f"step_{chosen:08d}", "own")
        buf = np.fromfile(os.path.join(d, "data.bin"), np.uint8)
        with open(os.path.join(d, "manifest.json")) as f:
            man = json.load(f)["shards"]
        res["source"] = "own local path"
    pieces = {
        (m["leaf"], tuple(map(tuple, m["index"]))): buf[m["off"] : m["off"] + m["n"]]
        .view(m["dtype"])
        .reshape(m["shape"])
        for m in man
    }
    import jax

    restored = {}
    for name, a in ref_state.items():
        arrs = [jax.device_put(pieces[(name, idx_key(s.index, a.shape))], s.device) for s in a.addressable_shards]
        restored[name] = jax.make_array_from_single_device_arrays(a.shape, a.sharding, arrs)
    exact = all(
        np.array_equal(np.asarray(x.data), np.asarray(y.data))
        for name in ref_state
        for x, y in zip(restored[name].addressable_shards, ref_state[name].addressable_shards, strict=True)
    )
    res["bit_exact_local"] = bool(exact)
    res["bit_exact_all"] = bool(np.asarray(mhu.process_allgather(np.array([exact]))).all())
    res["topology"] = topo(mesh)
    wd.cancel()
    return res


# ----------------------------------------------------------------------------- launcher
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args, port):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={L}")
    return [
        subprocess.Popen(
            [sys.executable, HERE, "--worker", str(i), str(port), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(N)
    ]


def collect(procs, timeout=58):
    deadline = time.monotonic() + timeout
    outs = []
    for p in procs:
        try:
            o, _ = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()  # by pid: only processes this launcher started
            o, _ = p.communicate()
            o += "\n[launcher] TIMEOUT, killed"
        outs.append((p.returncode, o))
    ok = True
    for i, (rc, o) in enumerate(outs):
        res = [ln[7:] for ln in o.splitlines() if ln.startswith("RESULT ")]
        print(f"[proc {i}] rc={rc} " + (res[0] if res else "NO RESULT\n" + "\n".join(o.splitlines()[-25:])), flush=True)
        if res and "HANG" in res[0]:  # show where it hung (faulthandler dump), main + other threads
            print(
                "\n".join(ln for ln in o.splitlines() if ln.startswith(("PHASE", "Thread", "Current", "  File")))[
                    -3000:
                ]
            )
        ok = ok and bool(res) and "error" not in json.loads(res[0])
    return ok, outs


def main():
    a = sys.argv[1:]
    if a[0] == "--worker":
        pid, port, q = int(a[1]), int(a[2]), a[3]
        rest = a[4:]
        if q == "q1":
            r = q1_worker(pid, port, rest[0], int(rest[1]), int(rest[2]))
        elif q == "q2":
            r = q2_worker(pid, port, rest[0])
        elif q == "q2kv":
            r = q2kv_worker(pid, port, int(rest[0]))
        elif q == "q3save":
            r = q3_save_worker(pid, port, rest[0])
        elif q == "q3recover":
            r = q3_recover_worker(pid, port, rest[0])
        print("RESULT " + json.dumps(r), flush=True)
        if isinstance(r, dict) and r.get("peer_died"):
            os._exit(0)
        import jax

        jax.distributed.shutdown()
        return 0
    t0 = time.time()
    q = a[0]
    if q == "q1":
        how = a[1]
        pm = int(a[a.index("--payload-mib") + 1]) if "--payload-mib" in a else 64
        bm = int(a[a.index("--budget-mib") + 1]) if "--budget-mib" in a else 8
        ok, _ = collect(spawn(["q1", how, str(pm), str(bm)], free_port()))
    elif q == "q2":
        ok, _ = collect(spawn(["q2", a[1] if len(a) > 1 else "collective"], free_port()))
    elif q == "q2kv":
        ok, _ = collect(spawn(["q2kv", a[1] if len(a) > 1 else "8"], free_port()))
    elif q in ("q3", "q3mid"):
        root = a[1]
        shutil.rmtree(root, ignore_errors=True)
        if q == "q3mid":  # kill p2 in the middle of step 20's replication (round 5 of 32)
            os.environ.update(PROBE_W_COLS="65536", PROBE_BUDGET_KIB="64", PROBE_SLOW_ROUNDS="1")
        procs = spawn(["q3save", root], free_port())
        # q3: wait for process 2 to report SAVED, then kill -9 it mid-loop
        for line in procs[2].stdout:
            if line.startswith("SAVED ") or (q == "q3mid" and line.startswith("ROUND 20 5")):
                print("[proc 2] " + line.strip()[:300])
                break
        time.sleep(1.0 if q == "q3" else 0.0)
        t_kill = time.time()
        os.kill(procs[2].pid, signal.SIGKILL)
        print(f"[launcher] kill -9 process 2 (os pid {procs[2].pid})", flush=True)
        collect(procs, timeout=40)  # survivors: expected to be terminated by JAX
        print(f"[launcher] survivors done {time.time() - t_kill:.1f}s after the kill", flush=True)
        wipe = a[2] if len(a) > 2 else "2"
        for w in wipe.split(","):
            shutil.rmtree(os.path.join(root, f"proc{w}"), ignore_errors=True)
            print(f"[launcher] wiped {root}/proc{w} (a new host)", flush=True)
        ok, _ = collect(spawn(["q3recover", root], free_port()))
    print(f"[launcher] {q} total {time.time() - t0:.1f}s ok={ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
