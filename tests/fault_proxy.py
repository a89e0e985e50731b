"""A fault-injecting HTTP proxy on 127.0.0.1 in front of moto (S3) or fake-gcs-server (GCS).

>>> plan = FaultPlan(seed=1, rate=0.05, kinds=("503", "reset"))         # transient, seeded
>>> plan = FaultPlan(rules=(Rule(kind="503", method="PUT", path="/c/", first=3, last=5),))
>>> with fault_proxy(upstream, plan) as proxy:                          # doctest: +SKIP
...     os.environ["AWS_ENDPOINT_URL_S3"] = proxy.endpoint
...     ...
...     assert proxy.injected_kinds()["503"] > 0                        # the faults happened

Fault kinds: ``"latency"`` (wait ``seconds``, then relay), ``"429"``/``"500"``/``"503"`` (answer
with that status; the server never sees the request), ``"reset"`` (drop the connection without
an answer), ``"truncate"`` (relay, but send half the answer's body and close; an answer with no
body is dropped instead, recorded as ``"reset"``), ``"stall"`` (send nothing for ``seconds``,
then drop the connection). Explicit rules are checked first: the
``first``..``last`` requests (1-based, inclusive) matching a rule's method and path regexes get
its fault. Otherwise a request matching the plan's ``method``/``path`` gets a fault with
probability ``rate``, drawn from ``random.Random(seed)``; at most ``burst`` faults in a row
hit one (method, path), so a client that retries more than ``burst`` times always gets through.
Every request is recorded (``requests``), and every fault injected (``injected``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import json
import os
import random
import re
import socket
import struct
import threading
from collections.abc import Iterator

from http_proxy import Handler, Server, serving

KINDS = ("latency", "429", "500", "503", "reset", "truncate", "stall")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; expected one of {KINDS}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """The ``first``..``last`` requests matching ``method`` and ``path`` (regexes) get ``kind``."""

    kind: str
    method: str = ".*"
    path: str = ".*"
    first: int = 1
    last: int | None = None  # None: every matching request from ``first`` on
    seconds: float = 0.0  # for "latency" and "stall"

    def __post_init__(self) -> None:
        _check_kind(self.kind)
        if self.first < 1 or (self.last is not None and self.last < self.first):
            raise ValueError(f"rule range {self.first}..{self.last}: expected 1 <= first <= last")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FaultPlan:
    """Which requests get which faults: explicit ``rules`` first, then a seeded random rate."""

    seed: int = 0
    rate: float = 0.0
    kinds: tuple[str, ...] = ("503",)
    method: str = ".*"
    path: str = ".*"
    burst: int = 2
    latency_s: float = 0.05
    stall_s: float = 5.0
    rules: tuple[Rule, ...] = ()

    def __post_init__(self) -> None:
        for kind in self.kinds:
            _check_kind(kind)
        if not 0 <= self.rate <= 1:
            raise ValueError(f"rate must be in [0, 1], got {self.rate}")


@dataclasses.dataclass(frozen=True)
class Injected:
    """One fault the proxy injected: the request's arrival index, method, path and the kind."""

    index: int
    method: str
    path: str
    kind: str


@dataclasses.dataclass(frozen=True)
class _Fault:
    kind: str
    seconds: float


def _error_body(status: int, path: str) -> tuple[str, bytes]:
    if path.startswith(("/storage/", "/upload/", "/download/")):  # GCS JSON API
        return "application/json", json.dumps({"error": {"code": status, "message": "injected fault"}}).encode()
    code = {429: "SlowDown", 500: "InternalError", 503: "ServiceUnavailable"}[status]
    return "application/xml", f"<Error><Code>{code}</Code><Message>injected fault</Message></Error>".encode()


class FaultProxy(Server):
    """The proxy; ``requests``, ``injected`` and ``injected_kinds()`` tell what happened."""

    def __init__(self, upstream: str, plan: FaultPlan) -> None:
        super().__init__(upstream)
        self.plan = plan
        self.injected: list[Injected] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._rng = random.Random(plan.seed)
        self._rule_hits = [0] * len(plan.rules)
        self._streak: collections.Counter[tuple[str, str]] = collections.Counter()

    def injected_kinds(self) -> collections.Counter[str]:
        with self._lock:
            return collections.Counter(i.kind for i in self.injected)

    def _choose(self, method: str, path: str) -> _Fault | None:
        chosen = None
        for n, rule in enumerate(self.plan.rules):  # each rule counts every request it matches
            if re.search(rule.method, method) and re.search(rule.path, path):
                self._rule_hits[n] += 1
                hit = self._rule_hits[n]
                if chosen is None and hit >= rule.first and (rule.last is None or hit <= rule.last):
                    chosen = _Fault(rule.kind, rule.seconds)
        if chosen is not None:
            return chosen
        plan = self.plan
        if plan.rate and re.search(plan.method, method) and re.search(plan.path, path):
            draw, kind = self._rng.random(), self._rng.choice(plan.kinds)
            if draw < plan.rate and self._streak[(method, path)] < plan.burst:
                self._streak[(method, path)] += 1
                return _Fault(kind, plan.stall_s if kind == "stall" else plan.latency_s)
        self._streak.pop((method, path), None)
        return None

    def intercept(self, handler: Handler, body: bytes | None) -> bool:
        with self._lock:
            index = len(self.requests) - 1
            fault = self._choose(handler.command, handler.path)
            record = None if fault is None else Injected(index, handler.command, handler.path, fault.kind)
            if record is not None:
                self.injected.append(record)
        if fault is None or record is None:
            return False
        if fault.kind == "latency":
            self.stopping.wait(fault.seconds)
            return False
        if fault.kind in ("429", "500", "503"):
            content_type, data = _error_body(int(fault.kind), handler.path)
            handler.respond(int(fault.kind), "Injected", [("Content-Type", content_type)], data)
            return True
        if fault.kind == "truncate":
            status, reason, headers, data = handler.forward(body)
            if len(data) < 2:  # nothing to cut (a PUT's answer): the server applied it, the answer is lost
                self._relabel(record, "reset")
                _drop(handler, reset=True)
                return True
            handler.respond(status, reason, headers, data, send=len(data) // 2)
            _drop(handler, reset=False)
            return True
        if fault.kind == "stall":
            self.stopping.wait(fault.seconds)
        _drop(handler, reset=True)
        return True

    def _relabel(self, record: Injected, kind: str) -> None:
        with self._lock:
            at = next(n for n, i in enumerate(self.injected) if i is record)
            self.injected[at] = dataclasses.replace(record, kind=kind)

    def shutdown(self) -> None:
        self.stopping.set()  # stalled handlers give up at once
        super().shutdown()


def _drop(handler: Handler, *, reset: bool) -> None:
    """Closes the client's connection: with ``reset``, at once (RST: nothing more is delivered),
    else after what was sent (FIN: the client sees the answer end early)."""
    handler.close_connection = True
    with contextlib.suppress(OSError):
        handler.wfile.flush()
        if reset:
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            handler.connection.close()
        else:
            handler.connection.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def fault_proxy(upstream: str, plan: FaultPlan | None = None) -> Iterator[FaultProxy]:
    """Runs a ``FaultProxy`` in front of ``upstream`` (no faults without a plan); stops it after."""
    with serving(FaultProxy(upstream, plan or FaultPlan())) as proxy:
        yield proxy


# --- clients pointed at a fault proxy (e2e/test_faults.py, directory/test_commit_protocol.py)

DATA_WRITES = r"PUT|POST"  # S3 puts objects with PUT, GCS uploads with POST
ENDPOINT_VARS = {"s3": ("AWS_ENDPOINT_URL_S3",), "gs": ("TENSORSTORE_GCS_HTTP_URL", "STORAGE_EMULATOR_HOST")}


@contextlib.contextmanager
def through(scheme: str, upstream: str, plan: FaultPlan | None = None) -> Iterator[FaultProxy]:
    """Points TensorStore and fsspec at a fault proxy in front of ``upstream`` while inside."""
    # TensorStore keeps a GCS driver, with the endpoint the environment named when it was
    # created, for as long as something references it: drop unreferenced ones on the way in and out.
    gc.collect()
    saved = {var: os.environ[var] for var in ENDPOINT_VARS[scheme]}
    with fault_proxy(upstream, plan) as proxy:
        os.environ.update(dict.fromkeys(ENDPOINT_VARS[scheme], proxy.endpoint))
        try:
            yield proxy
        finally:
            os.environ.update(saved)
            gc.collect()
