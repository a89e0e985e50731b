"""The Checkpointer: schedule, resume rules, retention, preemption, telemetry, no I/O when idle."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ckpt_callbacks as cc


class Clock:
    """An injected clock: tests advance it instead of sleeping."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _state(step):
    return {"w": jnp.full((4,), float(step)), "step": step}


def _run(ck, steps, clock=None, dt=1.0):
    saved = []
    for step in steps:
        if clock is not None:
            clock.now += dt
        if ck.on_step(_state(step), step=step):
            saved.append(step)
    ck.wait_until_finished()
    return saved


def test_schedule_temporaries_and_retention(url):
    clock = Clock()
    ck = cc.Checkpointer(
        url,
        save_interval=datetime.timedelta(seconds=25),
        step_policies=[cc.CheckpointInterval(every=40, until=80), cc.CheckpointInterval(every=100)],
        clock=clock,
    )
    saved = _run(ck, range(1, 131), clock)
    # the clock starts at the first call (step 1): 25 s later is step 26
    assert saved == [26, 40, 65, 80, 100, 125]
    infos = ck.checkpoints()
    # temporaries 25 and 65 were superseded and deleted; 125 is the newest and stays
    assert [(c.step, c.is_temporary) for c in infos] == [(40, False), (80, False), (100, False), (125, True)]
    ck.close()


def test_retention_running_behind_never_deletes_this_runs_checkpoints(tmp_path):
    """A retention pass that lists after newer saves committed must not take them for an earlier run's."""
    clock = Clock()
    ck = cc.Checkpointer(str(tmp_path / "ckpt"), save_interval=datetime.timedelta(seconds=1), clock=clock)
    listing = ck.retention.checkpoints

    def slow_listing():  # object stores list slowly; the loop saves again meanwhile
        time.sleep(0.3)
        return listing()

    ck.retention.checkpoints = slow_listing
    saved = _run(ck, range(1, 8), clock)
    assert saved == [2, 3, 4, 5, 6, 7]
    assert [(c.step, c.is_temporary) for c in ck.checkpoints()] == [(7, True)]
    ck.close()


def test_resume_rules_after_restore(url):
    ck = cc.Checkpointer(url, step_policies=[cc.CheckpointInterval(every=10)])
    assert _run(ck, range(1, 21)) == [10, 20]
    ck.close()
    resumed = cc.Checkpointer(url, step_policies=[cc.CheckpointInterval(every=10)])
    tree, meta = resumed.restore()
    assert meta["step"] == 20 and tree["step"] == 20 and tree["w"].tolist() == [20.0] * 4
    assert not resumed.on_step(_state(20), step=20)  # the restored step is not saved again
    assert _run(resumed, range(21, 31)) == [30]  # and the schedule continues
    assert resumed.all_steps() == [10, 20, 30] and resumed.latest_step() == 30
    resumed.close()


def test_resume_without_restore_never_overwrites(url):
    with cc.Checkpointer(url, step_policies=[cc.CheckpointInterval(every=5)]) as ck:
        _run(ck, range(1, 11))
    with cc.Checkpointer(url, step_policies=[cc.CheckpointInterval(every=5)]) as again:
        assert not again.on_step(_state(-1), step=10)  # run-10 exists: skipped, not overwritten
        assert again.restore(10)[0]["step"] == 10


def test_calls_may_skip_steps(url):
    ck = cc.Checkpointer(url, step_policies=[cc.CheckpointInterval(every=10)])
    assert _run(ck, [3, 7, 12, 14, 29, 30, 45]) == [12, 29, 30, 45]
    ck.close()


def test_force_and_request_save(url):
    ck = cc.Checkpointer(url, step_policies=[cc.CheckpointInterval(every=100)], handle_sigterm=False)
    assert ck.on_step(_state(3), step=3, force=True)
    assert not ck.on_step(_state(4), step=4)
    ck.request_save()
    assert ck.on_step(_state(5), step=5)
    assert not ck.on_step(_state(6), step=6)
    ck.wait_until_finished()
    assert [(c.step, c.is_temporary) for c in ck.checkpoints()] == [(3, False), (5, False)]
    ck.close()


def test_sigterm_saves_at_next_step_and_chains_previous_handler(url):
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        ck = cc.Checkpointer(url, step_policies=[cc.CheckpointInterval(every=1000)])
        assert not ck.on_step(_state(1), step=1)  # installs the handler
        os.kill(os.getpid(), signal.SIGTERM)
        assert ck.on_step(_state(2), step=2)
        assert seen == [signal.SIGTERM]
        ck.close()
        assert signal.getsignal(signal.SIGTERM) is not ck.preemption._on_sigterm  # restored on close
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_keep_best_with_metrics_keeps_latest(url):
    ck = cc.Checkpointer(
        url,
        step_policies=[cc.CheckpointInterval(every=10)],
        keep=cc.KeepPolicy(keep_best=1, keep_last=1, metric="loss"),
    )
    losses = {10: 0.9, 20: 0.2, 30: 0.5, 40: 0.7}
    for step in range(1, 41):
        ck.on_step(_state(step), step=step)
        if step in losses:
            ck.record_metrics(step, {"loss": losses[step]})
    ck.wait_until_finished()
    assert ck.all_steps() == [20, 40]  # best (0.2) and latest
    ck.close()


def test_telemetry_reaches_the_writer(url):
    class Writer:
        def __init__(self):
            self.rows = []

        def write_scalars(self, step, scalars):
            self.rows.append((step, scalars))

    writer = Writer()
    ck = cc.Checkpointer(url, step_policies=[cc.CheckpointInterval(every=2)], writer=writer)
    _run(ck, range(1, 5))
    assert [s for s, _ in writer.rows] == [2, 4]
    _step, scalars = writer.rows[0]
    assert scalars["checkpoint/bytes"] == 16.0
    assert set(scalars) == {"checkpoint/blocking_s", "checkpoint/write_s", "checkpoint/bytes", "checkpoint/gb_per_s"}
    assert ck.saves[0]["step"] == 2
    ck.close()


def test_init_starts_no_threads_and_touches_no_storage(tmp_path):
    before = threading.active_count()
    blocker = tmp_path / "file"
    blocker.write_text("")
    ck = cc.Checkpointer(str(blocker / "ckpts"), save_interval=1.0, step_policies=[cc.CheckpointInterval(every=3)])
    assert threading.active_count() == before
    ck.on_step(_state(1), step=1)
    assert threading.active_count() == before  # no save yet: still no worker
    with pytest.raises(ValueError, match="Not a directory"):
        ck.on_step(_state(3), step=3)
        ck.wait_until_finished()


def _io_syscalls() -> int:
    with open("/proc/self/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields["syscr"]) + int(fields["syscw"])


_FS_EVENTS: list[str] = []
_WATCH = threading.Event()
_HOOKED: list[bool] = []


def _audit(event, args):
    if _WATCH.is_set() and event in ("open", "os.scandir", "os.listdir", "os.mkdir", "os.remove", "os.rename"):
        _FS_EVENTS.append(f"{event} {args[0]!r}")


@pytest.fixture
def count_io():
    """(read/write syscalls of the whole process, Python file-system events) while ``fn`` runs.

    The audit hook is installed once, by the first test that asks (hooks cannot be removed),
    and records only while a count is running.
    """
    if not _HOOKED:
        sys.addaudithook(_audit)
        _HOOKED.append(True)

    def count(fn):
        _FS_EVENTS.clear()
        before = _io_syscalls()
        empty = _io_syscalls() - before  # reading /proc/self/io is itself a read
        before = _io_syscalls()
        _WATCH.set()
        try:
            fn()
        finally:
            _WATCH.clear()
        return _io_syscalls() - before - empty, list(_FS_EVENTS)

    return count


def test_no_io_on_non_saving_steps(tmp_path, count_io):
    ck = cc.Checkpointer(str(tmp_path), save_interval=3600.0, step_policies=[cc.CheckpointInterval(every=10**6)])
    cb = cc.CheckpointCallback(ck, state_fn=lambda: pytest.fail("state built on a non-saving step"))
    state = _state(0)
    ck.on_step(state, step=1, force=True)
    ck.wait_until_finished()
    cb(2)

    def loop():
        for step in range(3, 3003):
            ck.on_step(state, step=step)
            cb(step)

    assert count_io(loop) == (0, [])
    # The same counters see a listing, so the check above can fail.
    syscalls, events = count_io(ck.all_steps)
    assert syscalls > 0 and any(e.startswith("os.scandir") for e in events)
    ck.close()


def test_failed_save_is_raised_not_swallowed(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    ck = cc.Checkpointer(str(blocker / "ckpts"), step_policies=[cc.CheckpointInterval(every=1)])
    ck.on_step(_state(1), step=1)
    with pytest.raises(ValueError, match="Not a directory"):
        ck.wait_until_finished()


def test_failed_delete_is_logged_and_retried(tmp_path, caplog):
    base = str(tmp_path / "ck")
    ck = cc.Checkpointer(base, step_policies=[cc.CheckpointInterval(every=1)], keep=cc.KeepPolicy(keep_last=1))
    ck.on_step(_state(1), step=1)
    ck.wait_until_finished()
    pinned = tmp_path / "ck" / "run-1" / "metadata.json"
    subprocess.run(["chattr", "+i", str(pinned)], check=True)
    try:
        ck.on_step(_state(2), step=2)
        ck.wait_until_finished()
        assert "could not delete" in caplog.text and "will retry" in caplog.text
        assert ck.all_steps() == [2]  # the marker went first: run-1 no longer counts
    finally:
        subprocess.run(["chattr", "-i", str(pinned)], check=True)
    ck.on_step(_state(3), step=3)
    ck.wait_until_finished()
    assert not (tmp_path / "ck" / "run-1").exists()  # retried by the next pass
    assert ck.all_steps() == [3]
    ck.close()


def test_save_pytree_and_load_pytree_seed_names(url, mesh42):
    ck = cc.Checkpointer(url)
    ck.save_pytree({"a": np.arange(3)}, "model", step=7)
    ck.save_checkpoint({"b": np.ones(2)}, "named", step=8)
    ck.wait_until_finished()
    tree, meta = ck.load_pytree(prefix="model", path="run-7")
    assert tree["a"].tolist() == [0, 1, 2] and meta["step"] == 7
    latest, meta = ck.load_pytree(prefix="state")
    assert meta["step"] == 8 and latest["b"].tolist() == [1.0, 1.0]
    ck.close()


def test_restore_or_init(url):
    ck = cc.Checkpointer(url)
    state, meta = ck.restore_or_init(lambda: {"w": jnp.zeros(3)})
    assert meta is None and state["w"].tolist() == [0.0, 0.0, 0.0]
    ck.save_checkpoint({"w": jnp.ones(3)}, "run-5", step=5)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # 8 devices: placement must be given
    state, meta = ck.restore_or_init(lambda: {"w": jnp.zeros(3)}, shardings=one)
    assert meta["step"] == 5 and state["w"].tolist() == [1.0, 1.0, 1.0]
    assert not ck.on_step({"w": jnp.ones(3)}, step=5, force=True)
    ck.close()


def test_sigterm_with_default_action_saves_then_terminates(tmp_path):
    base = str(tmp_path / "pre")
    proc = subprocess.Popen(
        [sys.executable, "tests/programs/sigterm_loop.py", base],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
    )
    assert proc.stdout.readline().strip() == "READY"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGTERM and "NOT TERMINATED" not in out
    (info,) = cc.list_checkpoints(base)
    assert not info.is_temporary and info.step >= 5
    assert cc.restore(info.path)["w"].tolist() == [info.step] * 3
