"""Regression tests for data loss at the edges: each of these lost or corrupted data before.

User files beside checkpoints, two writers on one path, failed saves retried, NaN metrics and
damaged metrics files, non-native byte order, numpy steps, malformed paths, exiting without
``close()``, storage errors, and the clock a decision and its record use.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckpt_callbacks as cc
from ckpt_callbacks import directory as layout
from ckpt_callbacks import storage as paths
from conftest import assert_tree_equal, put, run_python

# ----------------------------------------------------------------------------- user files


def _write_user_file(url: str, name: str, data: bytes = b"lr: 0.1\n") -> None:
    paths.write_bytes(paths.parse(url), name, data)


def test_save_into_a_non_empty_directory_keeps_user_files(url):
    _write_user_file(url, "config.yaml")
    cc.save(url, {"w": np.arange(3)}, step=1)
    cc.save(url, {"w": np.arange(4)}, step=2, overwrite=True)
    assert paths.read_bytes(paths.parse(url), "config.yaml") == b"lr: 0.1\n"
    assert cc.restore(url)["w"].tolist() == [0, 1, 2, 3]
    assert set(paths.list_entries(paths.parse(url))) == {"COMMITTED", "config.yaml", *_committed_names(url)}


def _committed_names(url: str) -> set[str]:
    ckpt = cc.open_checkpoint(url)
    return {ckpt.commit.metadata, *ckpt.commit.items.values()}


def test_retention_deletes_only_what_the_library_wrote(url):
    ck = cc.Checkpointer(url, step_policies=[cc.CheckpointInterval(every=1)], keep=cc.KeepPolicy(keep_last=1))
    ck.on_step({"w": np.arange(2)}, step=1)
    ck.wait_until_finished()
    _write_user_file(f"{url}/run-1", "notes.txt")
    ck.on_step({"w": np.arange(2)}, step=2)
    ck.close()
    assert ck.all_steps() == [2]
    assert paths.list_entries(paths.parse(f"{url}/run-1")) == ["notes.txt"]


# Names a user might put beside a checkpoint (none of them is one of the library's own names).
_FOREIGN = st.from_regex(r"[a-z][a-z0-9_]{0,8}\.(yaml|txt|json|md|py)", fullmatch=True).filter(
    lambda n: n != "metadata.json"
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.sets(_FOREIGN, min_size=1, max_size=4), overwrites=st.integers(0, 2), temporary=st.booleans())
def test_foreign_files_survive_any_sequence_of_saves(tmp_path_factory, names, overwrites, temporary):
    base = tmp_path_factory.mktemp("foreign")
    target = base / "run-1"
    target.mkdir()
    for name in names:
        (target / name).write_text(name)
    cc.save(str(target), {"w": np.zeros(2)}, step=1, is_temporary=temporary)
    for i in range(overwrites):
        cc.save(str(target), {"w": np.full(2, i)}, step=1, overwrite=True)
    ck = cc.Checkpointer(str(base), step_policies=[cc.CheckpointInterval(every=1)], keep=cc.KeepPolicy(keep_last=1))
    ck.on_step({"w": np.ones(2)}, step=2)  # retention deletes run-1 (superseded / not kept)
    ck.close()
    assert {p.name for p in target.iterdir()} == names
    assert all((target / name).read_text() == name for name in names)


# ----------------------------------------------------------------------------- two writers


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_saves_in_flight_to_one_path_never_commit_a_corrupt_checkpoint(url, overwrite):
    trees = [{"big": np.full((200_000,), v, np.int32), "small": np.full((8,), v), "v": v} for v in (1, 2)]
    outcomes = []
    handles = []
    for tree in trees:
        try:  # the second is refused at once if the first has already committed
            handles.append(cc.save_async(url, tree, step=1, overwrite=overwrite, pack_bytes=1 << 12))
        except cc.CheckpointExistsError:
            outcomes.append("refused")
    for handle in handles:
        try:
            handle.wait()
            outcomes.append("committed")
        except cc.CheckpointExistsError:
            outcomes.append("refused")
    assert "committed" in outcomes
    restored = cc.restore(url)
    assert any(restored["v"] == tree["v"] for tree in trees)
    assert_tree_equal(restored, trees[restored["v"] - 1])
    assert cc.verify(url).ok
    leftovers = [n for n in paths.list_entries(paths.parse(url)) if n.startswith(layout.CLAIM_PREFIX)]
    assert leftovers == []


def test_saves_from_many_threads_to_one_path_leave_one_whole_checkpoint(tmp_path):
    path = str(tmp_path / "ckpt")
    errors: list[BaseException] = []

    def writer(value: int) -> None:
        try:
            for _ in range(3):
                cc.save(path, {"w": np.full((50_000,), value), "v": value}, step=value, overwrite=True)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(v,)) for v in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    restored = cc.restore(path)
    assert restored["w"].tolist() == [restored["v"]] * 50_000 and cc.verify(path).ok
    # Versions that lost the race are not named by the marker: the next save deletes them.
    cc.save(path, {"w": np.zeros(3)}, overwrite=True)
    assert set(paths.list_entries(paths.parse(path))) == {"COMMITTED", *_committed_names(path)}


def test_two_processes_saving_to_one_path_leave_a_whole_checkpoint(tmp_path):
    path = str(tmp_path / "ckpt")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    procs = [
        subprocess.Popen(
            [sys.executable, "tests/programs/concurrent_saver.py", path, str(v), "6"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for v in (1, 2)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "DONE" in out, err[-3000:]
    restored = cc.restore(path)
    v = restored["v"]
    assert v in (1, 2) and set(restored["big"].tolist()) == {v} and set(restored["small"].tolist()) == {v}
    assert cc.verify(path).ok


# ----------------------------------------------------------------------------- failed saves


def test_a_failed_final_save_is_retried_once_storage_is_back(tmp_path):
    blocker = tmp_path / "base"
    blocker.write_text("a file where the base directory should be")
    cb = cc.CheckpointCallback(str(blocker), state_fn=lambda: {"w": jnp.ones(2)}, handle_sigterm=False)
    with pytest.raises(cc.CheckpointStorageError) as failed:
        cb.on_train_end(50)
    assert failed.value.errno == errno.ENOTDIR and isinstance(failed.value, OSError)
    blocker.unlink()  # storage is back
    assert cb.on_train_end(50)
    assert cb.checkpointer.all_steps() == [50]
    assert not cb.on_train_end(50)  # now it is saved: never twice
    cb.close()


def test_a_failed_forced_step_is_saved_by_the_next_forced_call(tmp_path):
    blocker = tmp_path / "base"
    blocker.write_text("")
    ck = cc.Checkpointer(str(blocker), handle_sigterm=False)
    assert ck.on_step({"w": np.ones(2)}, step=7, force=True)
    with pytest.raises(OSError):
        ck.wait_until_finished()
    blocker.unlink()
    assert ck.on_step({"w": np.ones(2)}, step=7, force=True)
    ck.close()
    assert ck.all_steps() == [7]


# ----------------------------------------------------------------------------- metrics


def _ck(base: str, **keep: object) -> cc.Checkpointer:
    return cc.Checkpointer(
        base, step_policies=[cc.CheckpointInterval(every=10)], keep=cc.KeepPolicy(**keep), handle_sigterm=False
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), np.float32("nan")])
def test_a_non_finite_metric_never_evicts_the_best(tmp_path, bad, caplog):
    ck = _ck(str(tmp_path), keep_best=1, metric="loss")
    for step, loss in {10: bad, 20: 0.1, 30: 0.3, 40: 0.4}.items():
        ck.record_metrics(step, {"loss": loss})
        ck.on_step({"w": np.full(2, step)}, step=step)
        ck.wait_until_finished()
    ck.close()
    # 20 is the best, 40 the newest; 10 never ranks, so it is kept like any unranked checkpoint.
    assert ck.all_steps() == [10, 20, 40]
    assert "never ranks" in caplog.text


@pytest.mark.parametrize("damage", [b"[1, 2]", b"3.5", b'"loss"', b"{not json", b'{"loss": [1]}'])
def test_a_damaged_metrics_file_is_ignored_and_retention_goes_on(tmp_path, damage, caplog):
    ck = _ck(str(tmp_path), keep_best=1, metric="loss", keep_last=2)
    ck.on_step({"w": np.zeros(2)}, step=10)
    ck.wait_until_finished()
    paths.write_bytes(paths.parse(str(tmp_path)).join(layout.METRICS_DIR), layout.metrics_name(10), damage)
    ck.record_metrics(20, {"loss": 0.1})
    for step in (20, 30, 40):  # the damaged sidecar is met by two passes before 10 is deleted
        ck.on_step({"w": np.zeros(2)}, step=step)
        ck.wait_until_finished()
    ck.close()
    assert ck.all_steps() == [20, 30, 40]  # retention went on: 10 (unranked) deleted, best and last 2 kept
    if not damage.startswith(b"{"):
        assert caplog.text.count("retention: ignoring") == 1  # logged once, not at every pass


def test_a_metric_that_is_not_a_number_is_refused(tmp_path):
    ck = cc.Checkpointer(str(tmp_path), handle_sigterm=False)
    with pytest.raises(TypeError, match=r"metric 'loss' at step 3 is 'low'"):
        ck.record_metrics(3, {"loss": "low"})
    ck.close()


# ----------------------------------------------------------------------------- dtypes and steps


@pytest.mark.parametrize("pack_bytes", [1 << 20, 0])
@pytest.mark.parametrize("dtype", [">f4", ">i8", ">c8", ">u2", "<f8"])
def test_non_native_byte_order_round_trips(url, pack_bytes, dtype):
    value = (np.arange(12) * 3 - 5).astype(dtype).reshape(3, 4)
    cc.save(url, {"a": value}, pack_bytes=pack_bytes)
    restored = cc.restore(url)["a"]
    np.testing.assert_array_equal(restored, value)
    assert restored.dtype == value.dtype.newbyteorder("=") and cc.verify(url).ok


def test_numpy_integer_steps_are_normalised(url):
    ck = cc.Checkpointer(url, step_policies=[cc.CheckpointInterval(every=2)], handle_sigterm=False)
    for step in np.arange(1, 6):
        ck.on_step({"w": np.ones(2)}, step=step)
    ck.on_step({"w": np.ones(2)}, step=np.int32(6), force=True)
    ck.close()
    assert ck.all_steps() == [2, 4, 6]
    assert all(type(s) is int for s in ck.all_steps())
    cc.save(f"{url}-np", {"w": np.ones(1)}, step=np.uint64(9))
    assert json.loads(paths.read_bytes(paths.parse(f"{url}-np"), "metadata.json"))["step"] == 9


@pytest.mark.parametrize("step", [5.7, "5", True, np.float32(2.5), [1]])
def test_non_integral_steps_are_refused_before_any_write(url, step):
    with pytest.raises(TypeError, match="step"):
        cc.save(url, {"w": np.ones(1)}, step=step)
    assert not paths.has_any(paths.parse(url))


# ----------------------------------------------------------------------------- paths and logs


@pytest.mark.parametrize("bad", ["gs:/bucket/run", "s3:bucket/run", "file:/tmp/x", "ftp://host/x", "hdfs://n/x"])
def test_malformed_or_unknown_schemes_are_refused_with_the_supported_list(bad):
    with pytest.raises(cc.CheckpointPathError, match=r"s3://|'s3'"):
        cc.save(bad, {"w": np.ones(1)})
    with pytest.raises(cc.CheckpointPathError):
        cc.Checkpointer(bad)
    assert not os.path.exists(bad.split("/")[0])


def test_relative_paths_are_resolved_once_and_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="ckpt_callbacks")
    ck = cc.Checkpointer("runs/exp", step_policies=[cc.CheckpointInterval(every=1)], handle_sigterm=False)
    assert ck.base.path == str(tmp_path / "runs" / "exp")
    assert f"resolved to {tmp_path / 'runs' / 'exp'}" in caplog.text
    monkeypatch.chdir("/")  # the run changes directory: checkpoints still go where they were resolved
    ck.on_step({"w": np.ones(2)}, step=1)
    ck.close()
    assert (tmp_path / "runs" / "exp" / "run-1" / "COMMITTED").exists()


def test_first_save_and_restore_say_where_and_what(url, caplog):
    caplog.set_level(logging.INFO, logger="ckpt_callbacks")
    ck = cc.Checkpointer(url, step_policies=[cc.CheckpointInterval(every=1)], handle_sigterm=False)
    ck.on_step({"w": np.ones(2)}, step=1)
    ck.on_step({"w": np.ones(2)}, step=2)
    ck.close()
    assert caplog.text.count("0 committed checkpoint(s) found; starting fresh") == 1
    caplog.clear()
    resumed = cc.Checkpointer(url, handle_sigterm=False)
    resumed.restore()
    resumed.close()
    assert "2 committed checkpoint(s) found; resuming from step 2" in caplog.text


# ----------------------------------------------------------------------------- exit, storage errors


def test_exiting_without_close_commits_runs_retention_and_exits_zero(tmp_path):
    for i in range(4):  # it aborted (exit 134) in about a third of runs
        base = tmp_path / f"b{i}"
        out = run_python("tests/programs/exit_without_close.py", str(base), timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "terminate called" not in out.stderr
        assert [c.step for c in cc.list_checkpoints(str(base))] == [3]
        assert sorted(p.name for p in base.iterdir()) == ["run-3"]


def test_read_only_storage_is_an_os_error_with_errno_and_path(tmp_path):
    base = tmp_path / "ro"
    base.mkdir()
    subprocess.run(["chattr", "+i", str(base)], check=True)
    try:
        with pytest.raises(cc.CheckpointStorageError) as failed:
            cc.save(str(base / "ckpt"), {"w": np.ones(2)})
    finally:
        subprocess.run(["chattr", "-i", str(base)], check=True)
    assert failed.value.errno == errno.EPERM and str(base) in failed.value.filename
    assert isinstance(failed.value, OSError) and isinstance(failed.value, ValueError)


def test_file_too_large_is_an_os_error_with_errno(tmp_path):
    out = run_python("tests/programs/failing_write.py", str(tmp_path / "ckpt"), "0", timeout=120)
    assert f"FAILED CheckpointStorageError errno={errno.EFBIG}" in out.stdout, out.stdout + out.stderr[-2000:]


# ----------------------------------------------------------------------------- clocks


def test_clu_clock_feeds_temporaries_again_and_again(tmp_path):
    ck = cc.Checkpointer(str(tmp_path), save_interval=10.0, handle_sigterm=False)
    cb = cc.CheckpointCallback(ck, state_fn=lambda: {"w": np.ones(2)})
    saved = [step for step in range(1, 46) if cb(step, t=1000.0 + step)]  # clu passes time.monotonic()
    cb.close()
    assert saved == [11, 21, 31, 41]  # 10 s of clu's clock after the first call, and again


def test_datetime_clocks_are_accepted(tmp_path):
    now = [datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)]
    ck = cc.Checkpointer(str(tmp_path), save_interval=datetime.timedelta(minutes=1), clock=lambda: now[0])
    saved = []
    for step in range(1, 8):
        now[0] += datetime.timedelta(seconds=25)
        if ck.on_step({"w": np.ones(2)}, step=step):
            saved.append(step)
    ck.close()
    assert saved == [4, 7]  # 60 s after the first call (25 s), then 60 s after each save


# ----------------------------------------------------------------------------- found by a hostile review


@pytest.mark.parametrize("name", ["notes.20240101", "eval-results.deadbeef", "metadata.20240115.json"])
def test_user_files_that_look_like_dated_versions_survive(tmp_path, name):
    base = tmp_path / "ck"
    target = base / "run-1"
    target.mkdir(parents=True)
    (target / name).write_text("mine")
    (target / "tensorboard.20240101").mkdir()
    (target / "tensorboard.20240101" / "events").write_text("mine")
    cc.save(str(target), {"w": np.zeros(2)}, step=1)
    cc.save(str(target), {"w": np.ones(2)}, step=1, overwrite=True)
    ck = cc.Checkpointer(str(base), step_policies=[cc.CheckpointInterval(every=1)], keep=cc.KeepPolicy(keep_last=1))
    ck.on_step({"w": np.ones(2)}, step=2)
    ck.close()
    assert sorted(p.name for p in target.iterdir()) == sorted([name, "tensorboard.20240101"])


def test_a_forged_marker_cannot_get_a_user_file_deleted(tmp_path):
    path = tmp_path / "run-1"
    cc.save(str(path), {"w": np.zeros(2)}, step=1)
    (path / "config.yaml").write_text("mine")
    marker = json.loads((path / "COMMITTED").read_text())
    for forged in ({**marker, "metadata": "config.yaml"}, {**marker, "items": {"state": "config.yaml"}}):
        (path / "COMMITTED").write_text(json.dumps(forged))
        with pytest.raises(cc.CheckpointFormatError, match="expected"):
            cc.restore(str(path))
        cc.save(str(path), {"w": np.ones(2)}, step=1, overwrite=True)
        assert (path / "config.yaml").read_text() == "mine"
        marker = json.loads((path / "COMMITTED").read_text())


def test_saves_that_could_never_restore_are_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="step 9 saved into a directory named for step 8"):
        cc.save(str(tmp_path / "run-8"), {"w": np.ones(1)}, step=9)
    for step in (2**63, 1e20, -1):
        with pytest.raises(ValueError, match="out of range"):
            cc.save(str(tmp_path / "x"), {"w": np.ones(1)}, step=step)
    for dtype in ("int8", "bool", "uint32"):
        with pytest.raises(ValueError, match="must be a floating dtype"):
            cc.save(str(tmp_path / "y"), {"w": np.ones(1)}, dtype=dtype)
    for item in ("COMMITTED", "x" * 101):
        with pytest.raises(ValueError, match="item name"):
            cc.save_items(str(tmp_path / "z"), {item: {"w": np.ones(1)}})
    assert sorted(os.listdir(tmp_path)) == []
    ck = cc.Checkpointer(str(tmp_path / "base"), handle_sigterm=False)
    ck.save_checkpoint({"w": np.ones(1)}, "run-6", step=6).wait()
    with pytest.raises(ValueError, match="step 5 saved into a directory named for step 6"):
        ck.save_pytree({"x": np.ones(1)}, "extra", step=5, destination="run-6")
    assert cc.restore(str(tmp_path / "base" / "run-6"))["w"].tolist() == [1.0]
    ck.close()


@pytest.mark.parametrize("damage", [b"[" * 100_000 + b"]" * 100_000, b'{"loss": ' + b"9" * 400 + b"}"])
def test_metrics_files_that_break_the_parser_do_not_stop_retention(tmp_path, damage):
    ck = _ck(str(tmp_path), keep_last=1, keep_best=1, metric="loss")
    ck.on_step({"w": np.zeros(2)}, step=10)
    ck.wait_until_finished()
    paths.write_bytes(paths.parse(str(tmp_path)).join(layout.METRICS_DIR), layout.metrics_name(10), damage)
    for step in (20, 30):
        ck.on_step({"w": np.zeros(2)}, step=step)
        ck.wait_until_finished()
    ck.close()
    assert ck.all_steps() == [30]


def test_on_eval_takes_jax_scalars_and_huge_numbers(tmp_path):
    cb = cc.CheckpointCallback(str(tmp_path), state_fn=lambda: {"w": jnp.ones(2)}, handle_sigterm=False)
    cb.on_eval(10, metrics={"eval_loss": jnp.mean(jnp.arange(4.0)), "acc": np.float32(0.5), "big": 10**400})
    assert cb.checkpointer.retention.metrics[10] == {"eval_loss": 1.5, "acc": 0.5, "big": None}
    with pytest.raises(TypeError, match="expected a number"):
        cb.on_eval(11, metrics={"eval_loss": jnp.ones(3)})
    cb.close()


def test_a_failure_already_raised_by_the_handle_is_not_raised_again(tmp_path):
    blocker = tmp_path / "base"
    blocker.write_text("")
    ck = cc.Checkpointer(str(blocker), handle_sigterm=False)
    with pytest.raises(OSError):
        ck.save_checkpoint({"w": np.ones(1)}, "run-4", step=4).wait()
    blocker.unlink()
    ck.save_checkpoint({"w": np.ones(1)}, "run-5", step=5).wait()  # not run-4's error again
    ck.close()
    assert ck.all_steps() == [5]


@pytest.mark.parametrize("bad", ["gs:///run-1", "s3:///run-1", "file://host/tmp/x"])
def test_urls_without_a_bucket_or_with_a_host_are_refused(bad):
    with pytest.raises(cc.CheckpointPathError):
        cc.save(bad, {"w": np.ones(1)})


def test_a_restore_that_gathers_sharded_leaves_onto_one_device_says_so(url, mesh42, caplog):

    cc.save(url, {"w": put(jnp.ones((8, 4)), mesh42, jax.sharding.PartitionSpec("x"))})
    cc.restore(url)
    assert "1 leaves saved sharded (e.g. ['w']) land on one device" in caplog.text
    caplog.clear()
    cc.restore(url, mesh=mesh42)
    assert "land on one device" not in caplog.text


def test_save_async_then_a_normal_exit_still_commits(tmp_path):
    out = run_python("tests/programs/exit_after_save_async.py", str(tmp_path / "run-1"), timeout=120)
    assert out.returncode == 0 and "failed" not in out.stderr, out.stderr[-2000:]
    assert cc.restore(str(tmp_path / "run-1"))["w"].shape == (512, 1024)


def test_sigterm_after_the_last_step_still_terminates(tmp_path):
    import signal

    proc = subprocess.Popen(
        [sys.executable, "tests/programs/sigterm_after_loop.py", str(tmp_path / "b")],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
    )
    assert proc.stdout.readline().strip() == "READY"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM and "EXITED NORMALLY" not in out


def test_two_first_saves_racing_on_an_empty_directory_repeatedly(tmp_path):
    """The race a full-suite run caught once: the first save takes the plain names after its
    claim; the second must not take the first's plain item directory for a leftover."""
    trees = [{"big": np.full((100_000,), v, np.int32), "v": v} for v in (1, 2)]
    for attempt in range(15):
        path = str(tmp_path / f"p{attempt}")
        handles = [cc.save_async(path, tree, step=1, pack_bytes=1 << 12) for tree in trees]
        for handle in handles:
            with contextlib.suppress(cc.CheckpointExistsError):
                handle.wait()
        restored = cc.restore(path)
        assert_tree_equal(restored, trees[restored["v"] - 1])
