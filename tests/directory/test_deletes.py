"""Deletes that keep up: batched on object stores, safe when cut short, never holding back a save."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import http.client
import http.server
import math
import os
import re
import threading
import urllib.parse
from collections.abc import Callable, Iterator

import fault_proxy
import http_proxy
import jax.numpy as jnp
import numpy as np
import object_stores
import pytest
from fault_proxy import FaultPlan, Rule
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckpt_callbacks as cc
from ckpt_callbacks import directory as deletes
from ckpt_callbacks import directory as layout
from ckpt_callbacks import storage as paths
from ckpt_callbacks.manager import KeepPolicy, Retention

_ENDPOINT_VARS = {"s3": ("AWS_ENDPOINT_URL_S3",), "gs": ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
_BATCH = {"s3": deletes.S3_BATCH, "gs": deletes.GCS_BATCH}
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade", "trailer"}


class _Faulty(http.server.ThreadingHTTPServer):
    """A relay that refuses every request from the ``cut_at``-th on (403: what a store that
    went away looks like to the client, with no retries), or holds the ones ``hold`` picks."""

    daemon_threads = True

    def __init__(self, upstream: str, cut_at: int | None = None, hold: Callable[[str, bytes], bool] | None = None):
        super().__init__(("127.0.0.1", 0), _Relay)
        self.upstream, self.cut_at, self.hold = upstream, cut_at, hold
        self.count, self.lock = 0, threading.Lock()
        self.held, self.release = threading.Event(), threading.Event()


class _Relay(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Faulty

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _relay(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with self.server.lock:
            index, self.server.count = self.server.count, self.server.count + 1
        if self.server.cut_at is not None and index >= self.server.cut_at:
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.server.hold is not None and self.server.hold(self.command, body):
            self.server.held.set()
            self.server.release.wait(300)
        target = urllib.parse.urlsplit(self.server.upstream)
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        conn.request(self.command, self.path, body=body or None, headers=headers)
        response = conn.getresponse()
        data = response.read()
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in _HOP and key.lower() != "content-length":
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _relay


@contextlib.contextmanager
def _faulty(upstream: str, **kwargs) -> Iterator[_Faulty]:
    server = _Faulty(upstream, **kwargs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def _through(scheme: str, endpoint: str) -> Iterator[None]:
    """Points this process's clients of ``scheme`` at ``endpoint`` for the block."""
    saved = {k: os.environ[k] for k in _ENDPOINT_VARS[scheme]}
    os.environ.update(dict.fromkeys(saved, endpoint))
    try:
        yield
    finally:
        os.environ.update(saved)


@pytest.fixture(params=["s3", "gs"])
def store(request) -> tuple[str, str]:
    """(scheme, server endpoint) of a real S3 or GCS test server."""
    return request.param, request.getfixturevalue("s3_endpoint" if request.param == "s3" else "gcs_endpoint")


def _base(scheme: str, name: str) -> str:
    return f"{scheme}://{object_stores.BUCKET}/deletes-{os.getpid()}-{name}"


def test_a_checkpoint_of_thousands_of_objects_goes_in_batched_calls_and_user_files_stay(store):
    scheme, upstream = store
    base = _base(scheme, "bulk")
    # 8,000 float32 in chunks of 4 (max_host_bytes // 8 = 16 bytes), no packing: 2,000 chunk objects.
    big = {"w": np.arange(8000, dtype=np.float32)}
    cc.save(f"{base}/run-1", big, step=1, pack_bytes=0, max_host_bytes=128)
    cc.save(f"{base}/run-2", {"w": np.zeros(2, np.float32)}, step=2)
    victim = paths.parse(f"{base}/run-1")
    paths.write_bytes(victim, "config.yaml", b"lr: 0.1")
    paths.write_bytes(victim.join("tensorboard.20240101"), "events", b"e")
    objects = len(deletes.list_keys(victim))
    assert objects > 2000
    with http_proxy.recording_proxy(upstream) as proxy, _through(scheme, http_proxy.endpoint(proxy)):
        Retention(paths.parse(base), KeepPolicy(keep_last=1)).apply(committed_this_run=None)
    assert [c.step for c in cc.list_checkpoints(base)] == [2]
    assert deletes.list_keys(victim) == ["config.yaml", "tensorboard.20240101/events"]
    # One listing page and one delete call per batch, plus a constant (listing the base, the
    # two markers and metadata, the delete record, the metrics file); one per object: > 2,000.
    bound = 2 * math.ceil(objects / _BATCH[scheme]) + 25
    assert len(proxy.requests) <= bound, (len(proxy.requests), bound)
    assert sum(method == "DELETE" for method, _ in proxy.requests) <= 5


@pytest.mark.parametrize("user_file", [False, True])
def test_delete_removes_our_entries_on_every_backend(url, user_file):
    cc.save(url, {"w": jnp.arange(6.0), "b": np.ones(3, np.int32)}, step=1, pack_bytes=0)
    loc = paths.parse(url)
    if user_file:
        paths.write_bytes(loc, "config.yaml", b"x")
    deletes.delete_checkpoint(loc)
    assert cc.list_checkpoints(url.rsplit("/", 1)[0]) == []
    assert paths.list_entries(loc) == (["config.yaml"] if user_file else [])
    assert paths.has_any(loc) == user_file


def _restores(base: str) -> None:
    """Every checkpoint listed under ``base``, and the latest, restores."""
    for info in cc.list_checkpoints(base):
        cc.restore(info.path)
    latest = cc.find_latest_checkpoint(base)
    if latest is not None:
        cc.restore(latest)


_EXAMPLES: dict[str, int] = {}


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cut_at=st.integers(min_value=0, max_value=12), fraction=st.floats(min_value=0, max_value=1), seed=st.integers(0, 99)
)
def test_a_delete_cut_short_leaves_nothing_unrestorable_and_a_later_pass_finishes_it(store, cut_at, fraction, seed):
    scheme, upstream = store
    _EXAMPLES[scheme] = _EXAMPLES.get(scheme, 0) + 1
    base = _base(scheme, f"cut-{_EXAMPLES[scheme]}")
    tree = {f"l{i}": jnp.full((64,), i, jnp.float32) for i in range(6)}
    cc.save(f"{base}/run-1", tree, step=1, pack_bytes=0, max_host_bytes=64)  # ~200 objects: 2-3 GCS batches
    cc.save(f"{base}/run-2", tree, step=2)
    victim = paths.parse(f"{base}/run-1")
    paths.write_bytes(victim, "config.yaml", b"x")
    # The store goes away at request ``cut_at`` of the delete: the process stops there.
    with (
        _faulty(upstream, cut_at=cut_at) as proxy,
        _through(scheme, f"http://127.0.0.1:{proxy.server_address[1]}"),
        contextlib.suppress(Exception),
    ):
        deletes.delete_checkpoint(victim)
    if paths.read_bytes(victim, layout.COMMIT_MARKER) is None:  # past the marker: a batch may have half-applied
        left = [k for k in deletes.list_keys(victim) if k not in ("config.yaml", layout.DELETING)]
        rng = np.random.default_rng(seed)
        deletes.delete_keys(victim, [k for k in left if rng.random() < fraction])
    _restores(base)
    assert [c.step for c in cc.list_checkpoints(base)] in ([1, 2], [2])
    Retention(paths.parse(base), KeepPolicy(keep_last=1)).apply(committed_this_run=None)
    assert [c.step for c in cc.list_checkpoints(base)] == [2]
    assert deletes.list_keys(victim) == ["config.yaml"]
    _restores(base)


def test_a_slow_retention_delete_holds_back_neither_the_next_save_nor_its_hooks(s3_endpoint):
    base = _base("s3", "stall")
    committed: dict[int, threading.Event] = {s: threading.Event() for s in (1, 2, 3)}
    ck = cc.Checkpointer(
        base,
        step_policies=[cc.CheckpointInterval(every=1)],
        keep=KeepPolicy(keep_last=1),
        on_commit=[lambda path, step, meta: committed[step].set()],
    )
    marker = b"/run-1/COMMITTED"  # S3 DeleteObjects bodies name their keys: hold the delete of run-1's marker
    with (
        _faulty(s3_endpoint, hold=lambda method, body: method == "POST" and marker in body) as proxy,
        _through("s3", f"http://127.0.0.1:{proxy.server_address[1]}"),
    ):
        try:
            assert ck.on_step({"w": jnp.ones(4)}, step=1)
            ck.wait_until_finished()
            assert ck.on_step({"w": jnp.ones(4)}, step=2)
            assert proxy.held.wait(120)  # retention is deleting run-1, and its first delete call hangs
            assert ck.on_step({"w": jnp.ones(4)}, step=3)  # returns: the loop goes on
            assert committed[3].wait(120)  # step 3 committed and its hooks ran while the delete hung
            assert 1 in ck.all_steps()  # run-1 is still there: the delete has not got past its marker
        finally:
            proxy.release.set()
        ck.wait_until_finished()
        assert ck.all_steps() == [3]
        ck.close()
    assert layout.try_open(paths.parse(f"{base}/run-3")) is not None


# S3 DeleteObjects (POST ?delete) and GCS batch requests: every delete call of this library.
_DELETE_CALLS = Rule(kind="stall", method="POST", path=r"\?delete|/batch/", seconds=120.0)
_OP_TIMEOUT_S = 1.5


def test_a_stalled_retention_delete_is_bounded_by_the_checkpointers_storage_options(store, caplog):
    scheme, upstream = store
    base = _base(scheme, "bounded")
    # options no other test uses: TensorStore keeps a GCS driver per spec, with its endpoint
    opts = cc.StorageOptions(max_retries=2, initial_delay_s=0.01, max_delay_s=0.0501, op_timeout_s=_OP_TIMEOUT_S)
    ck = cc.Checkpointer(
        base,
        step_policies=[cc.CheckpointInterval(every=1)],
        keep=KeepPolicy(keep_last=1),
        storage=opts,
        handle_sigterm=False,
    )
    assert ck.on_step({"w": jnp.ones(4)}, step=1)
    ck.wait_until_finished()
    gc.collect()
    with (
        fault_proxy.fault_proxy(upstream, FaultPlan(rules=(_DELETE_CALLS,))) as proxy,
        _through(scheme, proxy.endpoint),
    ):
        assert ck.on_step({"w": jnp.ones(4)}, step=2)  # commits, then retention deletes run-1: its delete call stalls
        waiting = threading.Thread(target=ck.wait_until_finished, daemon=True)
        waiting.start()
        # The save of step 2, a listing and one stalled delete call, each bounded by 1.5 s (the
        # defaults would wait 300 s, and retry): a hang guard, not a measure of speed.
        waiting.join(10 * _OP_TIMEOUT_S)
        assert not waiting.is_alive(), "wait_until_finished still blocked on the stalled delete"
    gc.collect()
    assert proxy.injected_kinds()["stall"] >= 1
    assert re.search(rf"could not delete {base}/run-1 .*op_timeout_s=1\.5s", caplog.text), caplog.text
    assert ck.all_steps() == [1, 2]  # the stalled call never reached the store: run-1 is still whole
    assert ck.on_step({"w": jnp.ones(4)}, step=3)  # the store is back: the next pass deletes both
    ck.close()
    assert ck.all_steps() == [3]


@pytest.mark.parametrize("max_retries", [0, 2])
def test_a_batched_delete_is_sent_at_most_max_retries_plus_one_times(store, max_retries):
    scheme, upstream = store
    opts = cc.StorageOptions(max_retries=max_retries, initial_delay_s=0.01, max_delay_s=0.0502, op_timeout_s=20.0)
    loc = paths.parse(_base(scheme, f"batch-retries-{max_retries}"), opts)
    keys = [f"k{i}" for i in range(3)]
    for key in keys:
        paths.write_bytes(loc, key, b"x")
    every = Rule(kind="503", method="POST", path=r"\?delete|/batch/")
    with (
        fault_proxy.fault_proxy(upstream, FaultPlan(rules=(every,))) as proxy,
        _through(scheme, proxy.endpoint),
        pytest.raises(cc.CheckpointStorageError, match=rf"delete of {loc.url} failed after {max_retries} retries"),
    ):
        deletes.delete_keys(loc, keys)
    assert [method for method, _ in proxy.requests] == ["POST"] * (max_retries + 1)
    assert deletes.list_keys(loc) == keys  # refused: nothing was deleted
    if max_retries:  # as many faults as retries allowed: the delete goes through
        with (
            fault_proxy.fault_proxy(upstream, FaultPlan(rules=(dataclasses.replace(every, last=max_retries),))) as p,
            _through(scheme, p.endpoint),
        ):
            deletes.delete_keys(loc, keys)
        assert [method for method, _ in p.requests] == ["POST"] * (max_retries + 1)
        assert deletes.list_keys(loc) == []


@pytest.mark.parametrize("marker", [b"", b"{not json", b'{"format": "other"}'])
def test_prune_never_cleans_a_checkpoint_whose_marker_it_cannot_read(tmp_path, marker):
    """A committed checkpoint whose ``COMMITTED`` is damaged is not a save that died: ``prune --yes``
    (which cleans leftovers of dead saves) leaves every file of it, for ``verify`` and the user."""
    import pathlib

    from ckpt_callbacks.cli import main

    base = tmp_path / "run"
    cc.save(str(base / "run-3"), {"w": jnp.arange(4.0)}, step=3)
    (base / "run-3" / "COMMITTED").write_bytes(marker)
    before = {p: p.read_bytes() for p in pathlib.Path(base).rglob("*") if p.is_file()}
    assert main(["prune", str(base), "--keep-last", "1", "--yes"]) == 0
    after = {p: p.read_bytes() for p in pathlib.Path(base).rglob("*") if p.is_file()}
    assert after == before
