"""The commit protocol under attack: late writes, concurrent adds, many waiters, dead saves.

- A save that reported failure never commits later, and no later commit is ever undone, with a
  stall at each request of the commit (S3 and GCS through the fault proxy).
- Two item adds in flight to one step both end up committed (every backend).
- Every thread waiting on a failed save raises, and the loop still learns of it.
- Leftovers of saves that died are deleted by the next save, by retention and by prune, once
  their claims are dead; a live claim's names never are.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest
from fault_proxy import DATA_WRITES, FaultPlan, Rule, through
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckpt_callbacks as cc
from ckpt_callbacks import directory as claims
from ckpt_callbacks import directory as layout
from ckpt_callbacks import directory as leftovers
from ckpt_callbacks import storage as paths
from conftest import assert_tree_equal

QUICK = cc.StorageOptions(max_retries=2, initial_delay_s=0.01, max_delay_s=0.05, op_timeout_s=1.0)
STALL_S = 2.5  # longer than op_timeout_s: the stalled request is answered by a dropped connection


def _tree(v: int) -> dict:
    return {"w": np.full((64, 64), v, np.float32), "small": np.full((4,), v, np.int32), "v": v}


# ---------------------------------------------------------------- 1: a failure is never undone
# Each request of a save's commit phase, by method and object name, stalled once.
COMMIT_REQUESTS = [
    ("GET", "COMMITTED", 1),  # refuse_committed's read
    ("GET", "COMMITTED", 2),  # the claim's check and the read the marker is built on (one request)
    (DATA_WRITES, r"\.claim\.", 1),
    (DATA_WRITES, "zarr.json", 1),
    (DATA_WRITES, "manifest.json", 1),
    (DATA_WRITES, "metadata", 1),
    (DATA_WRITES, "COMMITTED", 1),
    ("DELETE|POST", r"\.claim\.", 1),
]


# The marker's own upload: S3 names the key in the path; gcsfs uploads it in a multipart body
# (the only multipart upload a save sends: TensorStore's are media uploads).
_MARKER_UPLOAD = {"s3": "COMMITTED", "gs": "uploadType=multipart"}


def _marker_items(loc: paths.Location) -> dict[str, str] | None:
    raw = paths.read_bytes(loc, layout.COMMIT_MARKER)
    return None if raw is None else json.loads(raw)["items"]


@pytest.mark.parametrize(("method", "name", "nth"), COMMIT_REQUESTS)
def test_a_save_that_reported_failure_never_commits_later(store, method, name, nth):
    scheme, upstream, base = store
    url = f"{base}/run-1"
    cc.save(url, _tree(1), step=1, storage=QUICK)  # the checkpoint the failed overwrite must not harm
    loc = paths.parse(url, QUICK)
    path = _MARKER_UPLOAD[scheme] if name == "COMMITTED" and method == DATA_WRITES else f"run-1.*{name}"
    rule = Rule(kind="stall", method=method, path=path, first=nth, last=nth, seconds=STALL_S)
    with through(scheme, upstream, FaultPlan(rules=(rule,))) as proxy:
        try:
            cc.save(url, _tree(2), step=1, overwrite=True, storage=QUICK)
            failed = False
        except cc.StorageTimeoutError:
            failed = True
        time.sleep(STALL_S + 1.5)  # every stalled request has been dropped and any retry sent
        stalled = proxy.injected_kinds().get("stall", 0)
        if failed:
            assert _marker_items(loc) == {"state": "state"}, "a marker landed after the save failed"
        expected = _tree(2) if not failed else _tree(1)
        assert_tree_equal(cc.restore(url, storage=QUICK), expected)
        # The next overwrite commits, and nothing of the earlier save undoes it afterwards.
        cc.save(url, _tree(3), step=1, overwrite=True, storage=QUICK)
        time.sleep(STALL_S)
    assert stalled == 1 or not failed
    assert_tree_equal(cc.restore(url, storage=QUICK), _tree(3))
    assert cc.verify(url).ok


def test_a_stalled_marker_fails_the_save_and_never_lands(store):
    scheme, upstream, base = store
    url = f"{base}/run-7"
    path = "run-7.*COMMITTED" if scheme == "s3" else _MARKER_UPLOAD[scheme]
    rule = Rule(kind="stall", method=DATA_WRITES, path=path, first=1, last=1, seconds=STALL_S)
    with through(scheme, upstream, FaultPlan(rules=(rule,))) as proxy:
        with pytest.raises(cc.StorageTimeoutError, match=r"COMMITTED.*not sent again"):
            cc.save(url, _tree(7), step=7, storage=QUICK)
        time.sleep(STALL_S + 1.5)
        assert proxy.injected_kinds()["stall"] == 1
    assert paths.read_bytes(paths.parse(url, QUICK), layout.COMMIT_MARKER) is None
    assert cc.list_checkpoints(base) == []


def test_a_marker_whose_answer_was_lost_counts_as_committed(store):
    """The store applied the marker but the answer never came (a truncated answer): the next
    attempt finds the marker it sent and reports the commit, instead of a failure."""
    scheme, upstream, base = store
    url = f"{base}/run-8"
    path = "run-8.*COMMITTED" if scheme == "s3" else _MARKER_UPLOAD[scheme]
    rule = Rule(kind="truncate", method=DATA_WRITES, path=path, first=1, last=1)
    with through(scheme, upstream, FaultPlan(rules=(rule,))) as proxy:
        cc.save(url, _tree(8), step=8, storage=QUICK)
        assert proxy.injected_kinds()
    assert_tree_equal(cc.restore(url), _tree(8))


# ------------------------------------------------------------------ 2: concurrent adds lose nothing
def test_two_adds_in_flight_to_one_step_both_commit(url):
    trials = 3 if url.startswith(("s3://", "gs://")) else 10
    for trial in range(trials):
        path = f"{url}/run-{trial}"
        handles = [
            cc.save_items_async(path, {name: {"x": np.full(1000, i)}}, step=trial, add=True)
            for i, name in enumerate(("model", "optimizer"))
        ]
        for handle in handles:
            handle.wait()
        ckpt = cc.open_checkpoint(path)
        assert sorted(ckpt.items) == ["model", "optimizer"]
        for i, name in enumerate(("model", "optimizer")):
            np.testing.assert_array_equal(cc.restore(path, item=name)["x"], np.full(1000, i))
        assert cc.verify(path).ok


def test_adds_from_many_threads_to_a_committed_step_keep_every_item(tmp_path):
    path = str(tmp_path / "run-1")
    cc.save(path, {"w": np.ones(3)}, step=1)
    names = [f"item{i}" for i in range(6)]
    errors: list[BaseException] = []

    def add(name: str) -> None:
        try:
            cc.save_items(path, {name: {"v": np.full(10, len(name))}}, step=1, add=True)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=add, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(cc.open_checkpoint(path).items) == sorted(["state", *names])
    assert cc.verify(path).ok


# ----------------------------------------------------------------- 3: every waiter learns of it
def _failing_checkpointer(tmp_path) -> tuple[cc.Checkpointer, object]:
    blocker = tmp_path / "base"
    blocker.write_text("")  # a file where the base directory should be: every save fails
    return cc.Checkpointer(str(blocker), handle_sigterm=False), blocker


def test_every_thread_waiting_on_a_failed_save_raises_and_the_loop_learns_of_it(tmp_path):
    ck, blocker = _failing_checkpointer(tmp_path)
    ck.save_checkpoint({"w": np.ones(1)}, "run-4", step=4)
    outcomes: list[str] = []
    barrier = threading.Barrier(3)

    def waiter() -> None:
        barrier.wait()
        try:
            ck.wait_until_finished()
            outcomes.append("returned")
        except OSError:
            outcomes.append("raised")

    threads = [threading.Thread(target=waiter) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes == ["raised"] * 3
    with pytest.raises(OSError):  # the loop (the thread that started the save) still learns of it
        ck.on_step({"w": np.ones(1)}, step=5, force=True)
    blocker.unlink()
    ck.on_step({"w": np.ones(1)}, step=6, force=True)  # raised there once: not again
    ck.close()
    assert ck.all_steps() == [6]


def test_a_failure_raised_to_a_thread_is_still_raised_to_the_loop(tmp_path):
    ck, blocker = _failing_checkpointer(tmp_path)
    handle = ck.save_checkpoint({"w": np.ones(1)}, "run-4", step=4)
    seen: list[BaseException] = []

    def other_thread() -> None:
        try:
            handle.wait()
        except OSError as e:
            seen.append(e)

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert seen
    blocker.unlink()
    with pytest.raises(OSError):
        ck.wait_until_finished()
    ck.wait_until_finished()  # reported to the loop: once
    ck.close()


# ---------------------------------------------------------------- 8: leftovers of dead saves go
_KILL_MID_SAVE = """
import os, signal, sys, time
import numpy as np
import ckpt_callbacks as cc
path = sys.argv[1]
tree = {f"w{i}": np.full((256, 1024), i, np.float32) for i in range(48)}
handle = cc.save_async(path, tree, step=int(sys.argv[2]), overwrite=True, pack_bytes=0)
before = set(os.listdir(path)) if os.path.isdir(path) else set()
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    names = set(os.listdir(path)) if os.path.isdir(path) else set()
    fresh = [n for n in names - before if not n.endswith(".__lock")]
    items = [n for n in fresh if not n.startswith((".", "COMMITTED", "metadata"))]
    if any(n.startswith(".claim.") for n in fresh) and items and os.listdir(os.path.join(path, items[0])):
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.001)
"""


def _killed_mid_save(path: str, step: int) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_MID_SAVE, path, str(step)],
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return sorted(os.listdir(path))


def _ours_left(path: str) -> list[str]:
    loc = paths.parse(path)
    commit = layout.read_commit(loc)
    named = {layout.COMMIT_MARKER, commit.metadata, *commit.items.values()} if commit else set()
    return [n for n in paths.list_entries(loc) if n not in named]


def test_the_next_save_removes_what_a_killed_save_left(tmp_path):
    path = str(tmp_path / "run-3")
    left = _killed_mid_save(path, 3)
    assert any(n.startswith(layout.CLAIM_PREFIX) for n in left)
    assert layout.read_commit(paths.parse(path)) is None
    cc.save(path, {"w": np.ones(3)}, step=3)
    assert _ours_left(path) == []
    assert_tree_equal(cc.restore(path), {"w": np.ones(3)})


def test_an_overwrite_killed_inside_a_committed_checkpoint_is_cleaned_by_the_next_save(tmp_path):
    path = str(tmp_path / "run-3")
    cc.save(path, {"w": np.ones(3)}, step=3)
    _killed_mid_save(path, 3)
    assert len(_ours_left(path)) >= 2  # its claim and item directory
    assert_tree_equal(cc.restore(path), {"w": np.ones(3)})  # the committed one is untouched
    cc.save(path, {"w": np.zeros(3)}, step=3, overwrite=True)
    assert _ours_left(path) == []


def test_retention_removes_leftovers_of_killed_saves(tmp_path):
    base = tmp_path / "base"
    _killed_mid_save(str(base / "run-2"), 2)  # never committed
    cc.save(str(base / "run-1"), {"w": np.ones(3)}, step=1)
    _killed_mid_save(str(base / "run-1"), 1)  # an overwrite of a committed one, killed
    with cc.Checkpointer(str(base), step_policies=[cc.CheckpointInterval(every=1)], handle_sigterm=False) as ck:
        ck.on_step({"w": np.ones(3)}, step=5)
    assert not (base / "run-2").exists()
    ck2 = cc.CheckpointReader(str(base))
    assert ck2.all_steps() == [1, 5]
    # run-1 is not this run's: its leftovers wait for prune
    assert len(_ours_left(str(base / "run-1"))) >= 2
    out = subprocess.run(
        [sys.executable, "-m", "ckpt_callbacks.cli", "prune", str(base), "--keep-last", "5", "--yes"],
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "leftover" in out.stdout
    assert _ours_left(str(base / "run-1")) == []
    assert_tree_equal(cc.restore(str(base / "run-1")), {"w": np.ones(3)})


def test_a_failed_saves_claim_ages_out_and_retention_then_cleans_up(store):
    """A failed save leaves its claim (its writes may still land): no later save reuses its
    names until the claim is dead; then the next retention pass deletes its files."""
    scheme, upstream, base = store
    rule = Rule(kind="503", method=DATA_WRITES, path="run-2(/|%2F)state")
    ck = cc.Checkpointer(base, handle_sigterm=False, storage=QUICK, claim_lease_s=1.0)
    with through(scheme, upstream, FaultPlan(rules=(rule,))):
        ck.save_checkpoint(_tree(2), "run-2", step=2)
        with pytest.raises(cc.CheckpointStorageError):
            ck.wait_until_finished()
        run2 = paths.parse(f"{base}/run-2", QUICK)
        assert any(n.startswith(layout.CLAIM_PREFIX) for n in paths.list_entries(run2))
        assert leftovers.find(run2) == []  # its claim is live for a lease: nothing is taken
        time.sleep(1.5)
        ck.save_checkpoint(_tree(3), "run-3", step=3)
        ck.wait_until_finished()  # the commit's retention pass finds run-2's claim dead
    ck.close()
    assert paths.list_entries(run2) == []
    assert ck.all_steps() == [3]


def test_a_live_claim_is_never_taken_for_leftovers(tmp_path):
    path = tmp_path / "run-1"
    cc.save(str(path), {"w": np.ones(3)}, step=1)
    loc = paths.parse(str(path))
    live = claims.new_claim(["state.ckpt-0000aaaa", "opt", "tensorboard"], lease_s=60.0)
    paths.write_bytes(loc, ".claim.0000aaaa", live.to_bytes())
    paths.write_bytes(loc.join("state.ckpt-0000aaaa"), "x", b"1")
    paths.write_bytes(loc.join("opt", "mu", "c", "0"), "1", b"1")  # a killed save's chunk
    paths.write_bytes(loc.join("tensorboard"), "events.out.tfevents.1", b"mine")  # a user's
    assert leftovers.find(loc) == []
    dead = claims.Claim(names=live.names, owner=live.owner, renewed=time.time() - 120, lease_s=60.0)
    paths.write_bytes(loc, ".claim.0000aaaa", dead.to_bytes())
    assert leftovers.clean(loc) == [".claim.0000aaaa", "opt", "state.ckpt-0000aaaa"]
    assert (path / "tensorboard" / "events.out.tfevents.1").read_bytes() == b"mine"  # a claim's word is not enough
    assert_tree_equal(cc.restore(str(path)), {"w": np.ones(3)})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    content=st.one_of(
        st.binary(max_size=64),
        st.recursive(
            st.none() | st.integers() | st.floats() | st.text(max_size=8),
            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
            max_leaves=8,
        ).map(lambda v: json.dumps(v).encode()),
    )
)
def test_a_claim_of_any_content_never_gets_committed_or_user_files_deleted(tmp_path, content):
    path = tmp_path / uuid.uuid4().hex
    cc.save(str(path), {"w": np.ones(3)}, step=None)
    loc = paths.parse(str(path))
    paths.write_bytes(loc, ".claim.0badc0de", content)
    (path / "notes.txt").write_text("mine")
    leftovers.clean(loc)
    assert (path / "notes.txt").read_text() == "mine"
    assert_tree_equal(cc.restore(str(path)), {"w": np.ones(3)})


def test_a_forged_claim_is_parsed_without_trusting_it():
    assert claims.Claim.from_bytes(b"not json", "x").dead()
    assert claims.Claim.from_bytes(b'["state"]', "x").dead()  # the old list form: no owner
    forged = json.dumps({"names": ["state"], "owner": {}, "renewed": 1e300, "lease_s": 1e300}).encode()
    assert not claims.Claim.from_bytes(forged, "x").dead()  # live: its names are kept, the safe side


# ------------------------------------------------------------- 5: no read blocks on a special file
@pytest.mark.parametrize("name", ["COMMITTED", "metadata.json", "state/manifest.json"])
def test_a_fifo_in_place_of_a_json_file_is_refused_at_once(tmp_path, name):
    path = tmp_path / "run-1"
    cc.save(str(path), {"w": np.ones(3)}, step=1)
    os.remove(path / name)
    os.mkfifo(path / name)
    outcomes: list[BaseException | None] = []

    def attempt() -> None:
        for call in (
            lambda: cc.restore(str(path)),
            lambda: cc.verify(str(path)),
            lambda: cc.list_checkpoints(tmp_path),
        ):
            try:
                call()
                outcomes.append(None)
            except BaseException as e:
                outcomes.append(e)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(20.0)  # a hang guard far above the milliseconds this takes: never a timing assert
    assert not thread.is_alive(), f"a FIFO at {name} blocked a read"
    assert isinstance(outcomes[0], cc.CheckpointError) and "not a regular file" in str(outcomes[0])


def test_a_background_refusal_is_raised_by_the_next_step_not_taken_for_its_own(tmp_path):
    """The previous save's CheckpointExistsError must reach the loop; the due step still saves."""
    base = str(tmp_path / "base")
    ck = cc.Checkpointer(base, step_policies=[cc.CheckpointInterval(every=10)], handle_sigterm=False)
    ck.save_checkpoint({"w": np.ones(2)}, "best", step=4).wait()
    ck.save_pytree({"m": np.ones(2)}, "opt", step=5, destination="best")  # fails at commit: best holds step 4
    with pytest.raises(cc.CheckpointExistsError, match="holds step 4"):
        ck.on_step({"w": np.ones(2)}, step=10)
    assert ck.on_step({"w": np.ones(2)}, step=10)  # raised once; then the due step saves
    ck.close()
    assert ck.all_steps() == [4, 10]  # "best" (step 4) and run-10


@pytest.mark.parametrize("backend", ["file", "memory"])
def test_a_local_marker_write_past_the_deadline_is_reported_as_it_ends(tmp_path, backend, monkeypatch):
    """A slow disk uses up op_timeout_s before the marker: the save either fails with no marker
    ever appearing, or reports the commit; never a failure whose marker lands."""
    path = (str(tmp_path) if backend == "file" else f"memory://slow-{uuid.uuid4().hex}") + "/run-1"
    real = paths.write_bytes

    def slow(loc, name, data):
        if name.startswith("metadata"):
            time.sleep(0.3)
        return real(loc, name, data)

    monkeypatch.setattr(paths, "write_bytes", slow)  # the storage facade the commit writes through
    try:
        cc.save(path, {"w": np.ones(4)}, step=1, storage=cc.StorageOptions(op_timeout_s=0.25))
        committed = True
    except cc.StorageTimeoutError:
        committed = False
    time.sleep(0.5)
    assert (paths.read_bytes(paths.parse(path), layout.COMMIT_MARKER) is not None) == committed


def test_careless_overwrite_values_and_empty_paths_are_refused():
    with pytest.raises(ValueError, match="overwrite must be True or False"):
        cc.save("memory://careless/run-1", {"w": np.ones(1)}, overwrite="no")
    for empty in ("", "   "):
        with pytest.raises(cc.CheckpointPathError, match="non-empty"):
            cc.save(empty, {"w": np.ones(1)})


def test_extras_a_reader_would_refuse_are_refused_before_anything_is_written(tmp_path):
    path = tmp_path / "run-1"
    with pytest.raises(TypeError, match="451 digits"):
        cc.save(str(path), {"w": np.ones(1)}, step=1, extras={"n": 10**450})
    assert not path.exists()
