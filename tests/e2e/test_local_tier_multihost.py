"""The local tier with real processes: kill -9, a new host, lost neighbours, a smaller cluster.

4 processes x 2 CPU devices train ``mh_tasks.local_train`` (each process's local directory is
``<root>/p<pid>``, the persistent tier a prefix on the moto S3 server). A victim is held at a
known step (after its ``on_step`` returned and its progress file was written), killed with
SIGKILL, then the survivors are killed (a scheduler would; JAX aborts them after its heartbeat
timeout anyway). Every restart must end bit-exact against one uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import uuid

import multihost
import object_stores
import pytest

import ckpt_callbacks as cc
from ckpt_callbacks.manager._local import _store as store

N, DEVICES, MESH = 4, 2, [4, 2]
STEPS, ROWS = 12, 256  # w is 256 x 64 float32: 16 KiB of it per process
WATCHDOG = 150  # seconds: a hung process dumps its threads and exits (before TIMEOUT)
TIMEOUT = 180.0


def _base() -> str:
    return f"s3://{object_stores.BUCKET}/local-mh-{uuid.uuid4().hex[:10]}"


def _train_kwargs(base, root, **kwargs):
    return dict(base=base, local_root=str(root), steps=STEPS, mesh_shape=MESH, rows=ROWS, watchdog=WATCHDOG, **kwargs)


@pytest.fixture(scope="module")
def reference(s3_endpoint, tmp_path_factory):
    """One uninterrupted run: its base, local root, final shard digests and w after every step."""
    root = tmp_path_factory.mktemp("reference")
    base = _base()
    outcomes = multihost.run(
        "local_train", N, DEVICES, timeout=TIMEOUT, **_train_kwargs(base, root, persistent_every=5, record=True)
    )
    assert all(o.result["start"] == 0 for o in outcomes)
    return {
        "base": base,
        "root": root,
        "w": _shards(outcomes),
        "global": outcomes[0].result["global"],
        "b": outcomes[0].result["b"],
    }


def _shards(outcomes) -> dict[str, str]:
    """Every shard's sha256 by global index, over every process (replicated ones agree)."""
    out: dict[str, str] = {}
    for o in outcomes:
        for index, digest in o.result["w"].items():
            assert out.setdefault(index, digest) == digest, index
    return out


def _progress(path: pathlib.Path, pid: int) -> int:
    try:
        return int((path.parent / f"{path.name}.{pid}").read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def _kill_run(tmp_path, victims, step, ready=lambda: True, **kwargs):
    """Starts ``local_train`` on N processes with ``victims[0]`` held after ``step``; once every
    process reported ``step`` and ``ready()`` holds, SIGKILLs the victims, then the survivors."""
    progress = tmp_path / "progress"
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=multihost.ROOT,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}",
    )
    task = dict(kwargs, progress=str(progress), hold=[victims[0], step])
    argv = [sys.executable, os.path.join(multihost.ROOT, "tests", "mh_worker.py"), "local_train"]
    port = str(multihost.free_port())

    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(open(tmp_path / f"killed.{p}.log", "w+")) for p in range(N)]
        procs = [
            subprocess.Popen(
                [*argv, str(p), str(N), port, json.dumps(task)],
                env=env,
                cwd=multihost.ROOT,
                stdout=logs[p],
                stderr=subprocess.STDOUT,
            )
            for p in range(N)
        ]
        try:
            deadline = time.monotonic() + TIMEOUT
            while not (all(_progress(progress, p) >= step for p in range(N)) and ready()):
                exited = [p for p, proc in enumerate(procs) if proc.poll() is not None]
                assert not exited and time.monotonic() < deadline, _tails(logs, f"exited: {exited}")
                time.sleep(0.05)
            assert _progress(progress, victims[0]) == step, _tails(logs, "not held")
            for p in victims:
                procs[p].send_signal(signal.SIGKILL)
            for p in victims:
                assert procs[p].wait(30) == -signal.SIGKILL
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(30)


def _tails(logs, why: str) -> str:
    out = [why]
    for p, f in enumerate(logs):
        f.flush()
        f.seek(0)
        out.append(f"--- process {p}:\n{f.read()[-3000:]}")
    return "\n".join(out)


def _wipe(root, *pids) -> None:
    for p in pids:
        shutil.rmtree(root / f"p{p}")


def _newest_recoverable(root, n=N, wiped=()) -> int | None:
    """The plan the restore must make, read from the markers on disk: the newest step where
    every set has a committed part in some live directory (``wiped``: directories left out)."""
    held: dict[int, set[int]] = {}
    for p in range(n):
        if p not in wiped and (root / f"p{p}").is_dir():
            for part in store.scan(str(root / f"p{p}")):
                held.setdefault(part.step, set()).add(part.set_index)
    return max((s for s, sets in held.items() if sets == set(range(n))), default=None)


def _persistent_steps(base) -> list[int]:
    return [c.step for c in cc.list_checkpoints(base)]


def _restart(base, root, **kwargs):
    outcomes = multihost.run("local_train", N, DEVICES, timeout=TIMEOUT, **_train_kwargs(base, root, **kwargs))
    return outcomes, "\n".join(o.output for o in outcomes)


def _assert_bit_exact(outcomes, reference) -> None:
    assert _shards(outcomes) == reference["w"]
    assert {o.result["n"] for o in outcomes} == {STEPS}
    assert {o.result["b"] for o in outcomes} == {reference["b"]}


def test_a_new_host_resumes_from_the_newest_local_step_through_its_peer(reference, tmp_path):
    base, root = _base(), tmp_path / "local"
    # local every 2 (one replication round each), persistent every 4; p2 is killed after step 7
    kwargs = dict(local_every=2, persistent_every=4, transfer_bytes=1 << 16)
    # killed once step 6's replica of set 2 is committed on p3: the kill loses 1 step, under one local
    # interval (a kill before it commits is test_a_kill_during_a_replication_restores_an_older_step_bit_exact)
    ready = lambda: _newest_recoverable(root, wiped=(2,)) == 6  # noqa: E731
    _kill_run(tmp_path, [2], 7, ready=ready, **_train_kwargs(base, root, **kwargs))
    _wipe(root, 2)
    expected = _newest_recoverable(root)
    assert expected == 6
    outcomes, output = _restart(base, root, **kwargs)
    assert {(o.result["start"], o.result["tier"]) for o in outcomes} == {(expected, "local")}, output[-4000:]
    assert f"local tier, step {expected} (set 2 from process 3's replica)" in output
    _assert_bit_exact(outcomes, reference)


def test_a_lost_set_and_its_replica_fall_back_to_the_persistent_tier(reference, tmp_path):
    base, root = _base(), tmp_path / "local"
    kwargs = dict(local_every=2, persistent_every=4, transfer_bytes=1 << 16)
    _kill_run(tmp_path, [2, 3], 7, ready=lambda: 4 in _persistent_steps(base), **_train_kwargs(base, root, **kwargs))
    _wipe(root, 2, 3)
    assert _newest_recoverable(root) is None
    local_steps = sorted(store.steps(str(root / "p0")))
    assert local_steps and max(local_steps) > 4, local_steps  # a local step newer than the persistent one
    assert _persistent_steps(base) == [4]
    outcomes, output = _restart(base, root, **kwargs)
    assert {(o.result["start"], o.result["tier"]) for o in outcomes} == {(4, "persistent")}, output[-4000:]
    newest = max(local_steps)
    assert f"WARNING:ckpt_callbacks:restore: local step {newest} cannot be used: set(s) [2] have no live holder" in (
        output
    )
    _assert_bit_exact(outcomes, reference)


def test_two_processes_restore_the_persistent_tier_resharded(reference):
    # the reference's local parts (of 4 processes) lie in p0 and p1: saved on another topology
    steps = _persistent_steps(reference["base"])
    assert steps == [5, 10], steps  # persistent every 5; local steps 10 and 12 are newer
    outcomes = multihost.run(
        "local_restore",
        2,
        2,
        timeout=TIMEOUT,
        base=reference["base"],
        local_root=str(reference["root"]),
        mesh_shape=[2, 2],
        rows=ROWS,
    )
    newest = 10
    for o in outcomes:
        assert (o.result["step"], o.result["tier"], o.result["n"]) == (newest, "persistent", newest), o.output[-3000:]
        assert o.result["shard_shape"] == [ROWS // 2, 64 // 2]  # saved as [ROWS // 4, 64 // 2]
        assert o.result["global"] == reference["global"][str(newest)]
        assert o.result["b"] == 1.0 + newest
    assert "cannot be used" in outcomes[0].output and "saved on" in outcomes[0].output


def test_a_kill_during_a_replication_restores_an_older_step_bit_exact(reference, tmp_path):
    base, root = _base(), tmp_path / "local"
    # a set is 16 KiB + header and checksums: 17 rounds of 1 KiB, 2 per step, so local step 8's
    # replication has dispatched 6 of them when p2 is held after step 10 (and killed there)
    kwargs = dict(local_every=4, persistent_every=STEPS, transfer_bytes=1024)
    _kill_run(tmp_path, [2], 10, **_train_kwargs(base, root, **kwargs))
    for p in (0, 1, 3):  # step 8's own parts, but no replica of it anywhere
        assert [part.set_index for part in store.scan(str(root / f"p{p}")) if part.step == 8] == [p]
    _wipe(root, 2)
    assert _newest_recoverable(root) == 4
    assert _persistent_steps(base) == []
    outcomes, output = _restart(base, root, **kwargs)
    assert {(o.result["start"], o.result["tier"]) for o in outcomes} == {(4, "local")}, output[-4000:]
    assert "local step 8 cannot be used: set(s) [2] have no live holder" in output
    assert "local tier, step 4 (set 2 from process 3's replica)" in output
    _assert_bit_exact(outcomes, reference)


def test_a_local_directory_shared_by_two_processes_is_refused_at_the_first_save(tmp_path):
    shared = tmp_path / "shared-local"
    outcomes = multihost.run("local_shared", 2, 2, timeout=TIMEOUT, base=str(tmp_path / "run"), local_dir=str(shared))
    for o in outcomes:
        assert o.result["error"] == "CheckpointPathError", o.output[-3000:]
        assert repr(str(shared)) in o.result["message"]
        assert "also written by process" in o.result["message"]
    assert not (shared / "step_1").exists()


def test_a_damaged_own_set_is_read_from_its_peer_s_replica(s3_endpoint, tmp_path):
    """2 processes: p0's own part of the newest step is bit-flipped; its intact replica on p1 serves it."""
    root = tmp_path / "local"
    kwargs = dict(base=_base(), local_root=str(root), mesh_shape=[2, 2], rows=ROWS, watchdog=WATCHDOG)
    kwargs.update(local_every=2, persistent_every=100, transfer_bytes=1 << 16)
    done = multihost.run("local_train", 2, 2, timeout=TIMEOUT, steps=6, **kwargs)
    data = root / "p0" / "step_6" / "set_0" / "data.bin"
    raw = bytearray(data.read_bytes())
    raw[5] ^= 0x20
    data.write_bytes(bytes(raw))
    again = multihost.run("local_train", 2, 2, timeout=TIMEOUT, steps=6, **kwargs)
    output = "\n".join(o.output for o in again)
    assert {(o.result["start"], o.result["tier"]) for o in again} == {(6, "local")}, output[-4000:]
    assert "local step 6 could not be restored" in output and "crc32c" in output
    assert "restore: local tier, step 6 (set 0 from process 1's replica)" in output
    assert [o.result["w"] for o in again] == [o.result["w"] for o in done]  # bit-exact: no step was taken


def test_with_two_replicas_two_neighbours_lost_still_restore_locally(s3_endpoint, tmp_path):
    """replicas=2: set q is also kept by q+1 and q+2, so wiping p2 and p3 leaves both sets on p0."""
    root = tmp_path / "local"
    kwargs = dict(base=_base(), local_root=str(root), mesh_shape=MESH, rows=ROWS, watchdog=WATCHDOG, replicas=2)
    kwargs.update(local_every=2, persistent_every=100, transfer_bytes=1 << 16)
    done = multihost.run("local_train", N, DEVICES, timeout=TIMEOUT, steps=6, **kwargs)
    assert sorted(p.set_index for p in store.scan(str(root / "p0")) if p.step == 6) == [0, 2, 3]
    _wipe(root, 2, 3)
    again = multihost.run("local_train", N, DEVICES, timeout=TIMEOUT, steps=6, **kwargs)
    output = "\n".join(o.output for o in again)
    assert {(o.result["start"], o.result["tier"]) for o in again} == {(6, "local")}, output[-4000:]
    assert "step 6 (set 2 from process 0's replica, set 3 from process 0's replica)" in output
    assert [o.result["w"] for o in again] == [o.result["w"] for o in done]
