"""Saves and restores against S3 (moto) and GCS (fake-gcs-server) through a fault-injecting proxy.

Transient faults (429/500/503 bursts, resets, truncated answers, latency) are retried and the
restore is bit-exact; persistent faults and stalls fail the save with a typed error naming the
path within the configured bound, commit nothing, and leave the previous checkpoint the latest.
"""

from __future__ import annotations

import collections
import dataclasses
import http.client
import http.server
import itertools
import re
import time
import uuid
from collections.abc import Iterator
from typing import ClassVar

import fault_proxy
import http_proxy
import jax
import mh_tasks
import multihost
import numpy as np
import object_stores
import pytest
from fault_proxy import DATA_WRITES, FaultPlan, Rule, through
from jax.sharding import PartitionSpec as P

import ckpt_callbacks as cc
from ckpt_callbacks import directory as layout
from ckpt_callbacks import storage as paths
from conftest import assert_tree_equal, make_mesh, put

# Fast backoff so faults cost milliseconds; more retries than the proxy's bursts (2) are long.
FAST = cc.StorageOptions(max_retries=6, initial_delay_s=0.01, max_delay_s=0.05, op_timeout_s=20.0)
# Give up quickly: what a persistent fault or a stall is held to.
SHORT = cc.StorageOptions(max_retries=2, initial_delay_s=0.01, max_delay_s=0.05, op_timeout_s=2.0)
_UNIQUE = itertools.count(1)
HANG_GUARD_S = 30.0  # a wall-clock cap far above every bound below: catches hangs, not speed


def _under(*parts: str) -> str:
    """A regex of a key path in a request: '/' between parts, or '%2F' (GCS object names)."""
    return "(/|%2F)".join(parts)


def _state(seed: int = 0) -> dict:
    mesh = make_mesh((4, 2))
    rng = np.random.default_rng(seed)
    return {
        "w": put(rng.standard_normal((512, 256), dtype=np.float32), mesh, P("x", "y")),  # 512 KiB, 8 chunks
        "big": put(rng.standard_normal((1024, 512), dtype=np.float32), mesh, P("x")),  # 2 MiB
        "b": put(rng.standard_normal(64, dtype=np.float32), mesh, P()),  # packed
        "host": np.arange(10, dtype=np.int64),
        "step": seed,
    }


# --------------------------------------------------------------------------------- the proxy itself
def _request(endpoint: str, method: str, path: str, body: bytes | None = None, timeout: float = 10.0) -> tuple:
    host, port = endpoint.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class _Blobs(http.server.BaseHTTPRequestHandler):
    """A minimal key-value server: PUT stores the body, GET and HEAD return it."""

    protocol_version = "HTTP/1.1"
    blobs: ClassVar[dict[str, bytes]] = {}

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_PUT(self) -> None:
        self.blobs[self.path] = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        data = self.blobs.get(self.path, b"")
        self.send_response(200 if self.path in self.blobs else 404)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(data)

    do_HEAD = do_GET


@pytest.fixture
def blobs() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Blobs)
    with http_proxy.serving(server):
        yield f"http://127.0.0.1:{server.server_address[1]}"


def test_proxy_injects_exactly_the_faults_its_rules_name(blobs):
    key = "/proxy"
    rules = (
        Rule(kind="503", method="PUT", path=r"/a$", first=3, last=4),
        Rule(kind="truncate", method="GET", path=r"/a$", first=1, last=1),
        Rule(kind="reset", method="GET", path=r"/a$", first=2, last=2),
        Rule(kind="stall", method="HEAD", seconds=30.0),
    )
    with fault_proxy.fault_proxy(blobs, FaultPlan(rules=rules)) as proxy:
        statuses = [_request(proxy.endpoint, "PUT", f"{key}/a", b"x" * 1000)[0] for _ in range(5)]
        assert statuses == [200, 200, 503, 503, 200]
        with pytest.raises(http.client.IncompleteRead):
            _request(proxy.endpoint, "GET", f"{key}/a")
        with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
            _request(proxy.endpoint, "GET", f"{key}/a")
        assert _request(proxy.endpoint, "GET", f"{key}/a") == (200, b"x" * 1000)
        with pytest.raises(TimeoutError):
            _request(proxy.endpoint, "HEAD", f"{key}/a", timeout=0.5)
        kinds = [(i.method, i.kind) for i in proxy.injected]
        assert kinds == [("PUT", "503"), ("PUT", "503"), ("GET", "truncate"), ("GET", "reset"), ("HEAD", "stall")]
        assert [i.index for i in proxy.injected] == [2, 3, 5, 6, 8]
        assert len(proxy.requests) == 9


def test_seeded_plan_injects_the_same_faults_and_caps_bursts(blobs):
    plan = FaultPlan(seed=7, rate=0.5, kinds=("429", "500", "503"), burst=2)
    runs = []
    for _ in range(2):
        key = "/seeded/k"
        with fault_proxy.fault_proxy(blobs, plan) as proxy:
            statuses = [_request(proxy.endpoint, "PUT", key, b"y")[0] for _ in range(40)]
        runs.append(statuses)
        assert 0 < statuses.count(200) < 40
        streaks = "".join("x" if s != 200 else "." for s in statuses).split(".")
        assert max(len(s) for s in streaks) <= 2  # never more than `burst` faults in a row on one key
    assert runs[0] == runs[1]


# ---------------------------------------------------------------------------------- transient faults
def test_transient_faults_are_retried_save_commits_and_restore_is_bit_exact(store):
    scheme, upstream, base = store
    state = _state(1)
    kinds = ("429", "500", "503", "reset", "truncate", "latency")
    # a seeded 25% of every request, and for sure: a 503 burst on the first two data writes and
    # on the first two chunk reads (the restore's)
    rules = (
        Rule(kind="503", method=DATA_WRITES, path=_under("state", ""), first=1, last=2),
        Rule(kind="503", method="GET", path=_under("state", ".*c"), first=1, last=2),
    )
    plan = FaultPlan(seed=11, rate=0.25, kinds=kinds, burst=2, rules=rules)
    with through(scheme, upstream, plan) as proxy:
        cc.save(f"{base}/run-1", state, step=1, storage=FAST, pack_bytes=0)
        saved_faults = len(proxy.injected)
        restored = cc.restore(cc.open_checkpoint(f"{base}/run-1", storage=FAST), template=state)
        assert cc.find_latest_checkpoint(base) == f"{base}/run-1"
    assert_tree_equal(restored, state)
    assert cc.verify(f"{base}/run-1").ok
    injected = proxy.injected_kinds()
    assert saved_faults > 0 and len(proxy.injected) > saved_faults, injected  # both the save and the restore
    assert len(set(injected) - {"latency"}) >= 3, injected
    # every failed request for the checkpoint's data (TensorStore's) was sent again: a retry (its
    # GCS driver varies a query parameter). Listings and deletes are fsspec's: gcsfs falls back
    # to other requests instead of retrying some of them.
    failed = {
        (i.method, _unique(i.path))
        for i in proxy.injected
        if i.kind != "latency" and re.search(_under("state", ""), i.path) and i.method != "DELETE"
    }
    assert failed
    seen = collections.Counter((method, _unique(path)) for method, path in proxy.requests)
    assert all(seen[r] >= 2 for r in failed), [r for r in failed if seen[r] < 2]


def _unique(path: str) -> str:
    return re.sub(r"[?&]tensorstore=[0-9a-f]+", "", path)


# --------------------------------------------------------------------------------- persistent faults
def _no_marker(url: str) -> bool:
    return layout.read_commit(paths.parse(url)) is None


def test_persistent_write_failures_raise_a_storage_error_naming_the_path(store):
    scheme, upstream, base = store
    cc.save(f"{base}/run-1", _state(1), step=1)
    rule = Rule(kind="503", method=DATA_WRITES, path=_under("run-2", "state"))  # every data write, forever
    start = time.monotonic()
    with through(scheme, upstream, FaultPlan(rules=(rule,))) as proxy:
        handle = cc.save_async(f"{base}/run-2", _state(2), step=2, storage=SHORT)
        with pytest.raises(cc.CheckpointStorageError, match=rf"{base}/run-2.*503") as info:
            handle.wait(timeout=HANG_GUARD_S)
    assert time.monotonic() - start < HANG_GUARD_S
    assert info.value.filename == f"{base}/run-2"
    assert proxy.injected_kinds()["503"] >= SHORT.max_retries + 1  # retried to the bound, then gave up
    assert _no_marker(f"{base}/run-2")
    assert cc.find_latest_checkpoint(base) == f"{base}/run-1"
    assert_tree_equal(cc.restore(f"{base}/run-1", template=_state(1)), _state(1))


def test_persistent_failure_in_a_loop_is_raised_by_wait_until_finished(store):
    scheme, upstream, base = store
    ck = cc.Checkpointer(base, step_policies=[cc.CheckpointInterval(every=2)], storage=SHORT, handle_sigterm=False)
    assert ck.on_step(_state(2), step=2)
    ck.wait_until_finished()
    rule = Rule(kind="500", method=DATA_WRITES, path=_under("run-4", "state"))
    with through(scheme, upstream, FaultPlan(rules=(rule,))) as proxy:
        assert ck.on_step(_state(4), step=4)  # async: returns once the snapshot is taken
        assert not ck.on_step(_state(5), step=5)
        with pytest.raises(cc.CheckpointStorageError, match=rf"{base}/run-4"):
            ck.wait_until_finished()
    assert proxy.injected_kinds()["500"] > 0
    assert _no_marker(f"{base}/run-4")
    assert ck.all_steps() == [2] and cc.find_latest_checkpoint(base) == f"{base}/run-2"
    assert ck.on_step(_state(6), step=6)  # storage is back: the loop goes on saving
    ck.close()
    assert ck.all_steps() == [2, 6]


# ------------------------------------------------------------------------------------------ stalls
@pytest.mark.parametrize(("layout", "stalled", "names"), [("zarr3", "big", "'big'"), ("process", "index", "index")])
def test_a_stalled_store_fails_the_restore_within_the_bound(store, layout, stalled, names):
    scheme, upstream, base = store
    cc.save(f"{base}/run-1", _state(1), step=1, layout=layout)
    rule = Rule(kind="stall", method="GET", path=_under("run-1", "state", stalled), seconds=120.0)  # chunk reads
    with through(scheme, upstream, FaultPlan(rules=(rule,))) as proxy:
        start = time.monotonic()
        # Options no other test uses: TensorStore keeps a GCS driver per spec for the process, and
        # takes the endpoint (this proxy) from the environment only when it creates one.
        fresh = dataclasses.replace(SHORT, max_delay_s=0.05 + next(_UNIQUE) / 1000)
        with pytest.raises(cc.StorageTimeoutError, match=rf"{base}/run-1.*{names}.*op_timeout_s=2s"):
            cc.restore(f"{base}/run-1", mesh=make_mesh((4, 2)), storage=fresh)
        assert time.monotonic() - start < HANG_GUARD_S
    assert proxy.injected_kinds()["stall"] > 0
    assert_tree_equal(cc.restore(f"{base}/run-1", mesh=make_mesh((4, 2))), _state(1))  # nothing harmed


def test_a_stalled_store_fails_the_save_at_the_next_save_within_the_bound(store):
    scheme, upstream, base = store
    ck = cc.Checkpointer(base, step_policies=[cc.CheckpointInterval(every=2)], storage=SHORT, handle_sigterm=False)
    assert ck.on_step(_state(2), step=2)
    ck.wait_until_finished()
    rule = Rule(kind="stall", method=DATA_WRITES, path=_under("run-4", "state"), seconds=120.0)  # sends nothing
    with through(scheme, upstream, FaultPlan(rules=(rule,))) as proxy:
        assert ck.on_step(_state(4), step=4)
        start = time.monotonic()
        with pytest.raises(cc.StorageTimeoutError, match=rf"{base}/run-4.*op_timeout_s=2s"):
            ck.on_step(_state(6), step=6)  # the next save waits for the stalled one, bounded
        assert time.monotonic() - start < HANG_GUARD_S
    assert proxy.injected_kinds()["stall"] > 0
    assert _no_marker(f"{base}/run-4") and cc.find_latest_checkpoint(base) == f"{base}/run-2"
    ck.close()


# ----------------------------------------------------------------------------------- multi-process
@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_one_failing_process_fails_the_save_on_every_process_and_nobody_commits(request, scheme):
    upstream = request.getfixturevalue("s3_endpoint" if scheme == "s3" else "gcs_endpoint")
    base = f"{scheme}://{object_stores.BUCKET}/mh-faults-{uuid.uuid4().hex[:8]}"
    rule = Rule(kind="503", method=DATA_WRITES)  # only process 1 goes through this proxy
    with fault_proxy.fault_proxy(upstream, FaultPlan(rules=(rule,))) as proxy:
        outcomes = multihost.run(
            "save_with_failing_process", 2, 2, timeout=90, path=base, proxy=proxy.endpoint, scheme=scheme
        )
    errors = {o.pid: o.result["error"] for o in outcomes}
    assert errors[1].startswith("CheckpointStorageError") and f"{base}/run-2" in errors[1], errors
    assert errors[0].startswith("PeerSaveError") and "save failed on process 1 (" in errors[0], errors
    assert "no process committed" in errors[0]
    # told at once, not after the 60 s barrier timeout
    assert all(o.result["after_s"] < mh_tasks.FAILING_SAVE_TIMEOUT_S / 2 for o in outcomes), outcomes
    assert proxy.injected_kinds()["503"] > 0
    assert _no_marker(f"{base}/run-2")
    assert cc.find_latest_checkpoint(base) == f"{base}/run-1"
    assert cc.restore(f"{base}/run-1")["step"] == 7


# ------------------------------------------------------------------------------- requests per retry
# Listing requests (fsspec's): S3 ListObjectsV2, GCS objects.list.
_LISTINGS = {"s3": r"[?&]list-type=2", "gs": r"/storage/v1/b/[^/]+/o\?"}


def _counting(max_retries: int) -> cc.StorageOptions:
    # Options of its own per test: TensorStore keeps a GCS driver per spec, with its endpoint.
    return cc.StorageOptions(
        max_retries=max_retries, initial_delay_s=0.01, max_delay_s=0.05 + next(_UNIQUE) / 1000, op_timeout_s=20.0
    )


@pytest.mark.parametrize("max_retries", [0, 1, 3])
def test_each_request_is_sent_at_most_max_retries_plus_one_times_on_every_layer(store, max_retries):
    """One retry layer per request: the library's loop for fsspec's listings (the SDK's and
    fsspec's own retries are off), TensorStore's for the reads of a key."""
    scheme, upstream, base = store
    cc.save(f"{base}/run-1", {"w": np.arange(4.0)}, step=1)
    loc = paths.parse(base, _counting(max_retries))
    listings = Rule(kind="503", method="GET", path=_LISTINGS[scheme])  # every listing request, forever
    marker = Rule(kind="503", method="GET", path=layout.COMMIT_MARKER)  # every read of run-1's marker
    with through(scheme, upstream, FaultPlan(rules=(listings, marker))) as proxy:
        with pytest.raises(cc.CheckpointStorageError, match=rf"{base} failed after {max_retries} retries: .*injected"):
            paths.list_dirs(loc)
        with pytest.raises(cc.CheckpointStorageError, match=rf"{layout.COMMIT_MARKER} failed: .*{max_retries} retry"):
            paths.read_bytes(loc.join("run-1"), layout.COMMIT_MARKER)
    sent = collections.Counter((method, _unique(path)) for method, path in proxy.requests)
    assert max(sent.values()) == max_retries + 1, sent
    assert proxy.injected_kinds()["503"] == 2 * (max_retries + 1), proxy.injected
    if max_retries:  # as many faults as retries allowed: the listing comes through
        listings = dataclasses.replace(listings, last=max_retries)
        with through(scheme, upstream, FaultPlan(rules=(listings,))) as proxy:
            assert paths.list_dirs(loc) == ["run-1"]
        assert max(collections.Counter(proxy.requests).values()) == max_retries + 1


def test_a_reader_restores_a_url_with_its_own_storage_options(store):
    scheme, upstream, base = store
    cc.save(f"{base}/run-1", {"w": np.arange(4.0)}, step=1)
    reader = cc.CheckpointReader(base, storage=_counting(0))
    once = Rule(kind="503", method="GET", path=_under("run-1", ""), first=1, last=1)  # the first read of run-1
    for path in (f"{base}/run-1", paths.parse(f"{base}/run-1")):
        # The defaults would retry it (and pass); the reader's options allow no retry.
        failed = rf"{base}/run-1.*injected fault"
        with (
            through(scheme, upstream, FaultPlan(rules=(once,))) as proxy,
            pytest.raises(cc.CheckpointStorageError, match=failed),
        ):
            reader.restore(path=path)
        assert proxy.injected_kinds()["503"] == 1
    with through(scheme, upstream, FaultPlan(rules=(once,))):
        tree, _ = reader.restore(path=f"{base}/run-1", storage=_counting(1))  # given here: it wins
    assert tree["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


# ------------------------------------------------------------------------------------------ options
def test_storage_options_go_inline_into_every_object_store_spec():
    opts = cc.StorageOptions(max_retries=3, initial_delay_s=0.25, max_delay_s=4, request_concurrency=16)
    loc = paths.parse("s3://bkt/base", opts).join("run-1")
    assert paths.kvstore_spec(loc, env={}) == {
        "driver": "s3",
        "bucket": "bkt",
        "path": "base/run-1/",
        "s3_request_retries": {"max_retries": 3, "initial_delay": "250ms", "max_delay": "4000ms"},
        "s3_request_concurrency": {"limit": 16},
    }
    gcs = paths.kvstore_spec(paths.parse("gs://bkt/x"))  # the defaults, explicit
    assert gcs["gcs_request_retries"] == {"max_retries": 8, "initial_delay": "1000ms", "max_delay": "32000ms"}
    assert paths.kvstore_spec(paths.parse("memory://x", opts)) == {"driver": "memory", "path": "x/"}
    assert cc.SaveOptions(storage=opts).storage is opts


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_retries": -1}, "max_retries"),
        ({"initial_delay_s": 0}, "initial_delay_s"),
        ({"initial_delay_s": 5, "max_delay_s": 1}, "initial_delay_s: expected at most max_delay_s"),
        ({"request_concurrency": 0}, "request_concurrency"),
        ({"op_timeout_s": 0}, "op_timeout_s"),
    ],
)
def test_storage_options_refuse_nonsense(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cc.StorageOptions(**kwargs)


def test_save_options_refuse_a_storage_that_is_not_storage_options():
    with pytest.raises(ValueError, match="storage must be a StorageOptions"):
        cc.SaveOptions(storage={"max_retries": 3})  # type: ignore[arg-type]


def test_jax_sees_eight_devices():  # the states above are sharded over them
    assert jax.device_count() == 8
