"""A recording HTTP proxy on 127.0.0.1 in front of a test server (moto, fake-gcs-server).

Tests point a client at the proxy's endpoint and read back what was asked: method, path and
query of every request, in order. Requests and responses are relayed unchanged (headers
included, so signed requests still verify), one connection to the server per request.

``tests/fault_proxy.py`` builds on the same server: it subclasses ``Server`` and answers some
requests itself (``Server.intercept``) instead of relaying them.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from typing import TypeVar

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade", "trailer"}


class Handler(http.server.BaseHTTPRequestHandler):
    """Reads one request, lets the server intercept it, else relays it upstream."""

    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _relay(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        self.server.requests.append((self.command, self.path))
        if self.server.intercept(self, body):
            return
        status, reason, headers, data = self.forward(body)
        self.respond(status, reason, headers, data)

    def forward(self, body: bytes | None) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """Sends the request upstream; returns its status, reason, headers and body."""
        target = urllib.parse.urlsplit(self.server.upstream)
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.reason, response.getheaders(), response.read()
        finally:
            conn.close()

    def respond(
        self, status: int, reason: str, headers: list[tuple[str, str]], data: bytes, send: int | None = None
    ) -> None:
        """Answers with ``data`` (announcing its full length, but sending only ``send`` bytes if given)."""
        self.send_response(status, reason)
        for key, value in headers:
            if key.lower() not in _HOP and key.lower() != "content-length":
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data if send is None else data[:send])

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _relay


class Server(http.server.ThreadingHTTPServer):
    """The proxy: ``requests`` lists (method, path) of every request, in arrival order."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.upstream = upstream
        self.requests: list[tuple[str, str]] = []

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that gave up is not news
            super().handle_error(request, client_address)  # type: ignore[arg-type]

    def intercept(self, handler: Handler, body: bytes | None) -> bool:
        """Whether the request was answered here (the recording proxy answers nothing itself)."""
        return False

    @property
    def endpoint(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


S = TypeVar("S", bound=Server)


@contextlib.contextmanager
def serving(server: S) -> Iterator[S]:
    """Serves ``server`` on a thread; shuts it down (and joins the thread) on exit."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def recording_proxy(upstream: str) -> Iterator[Server]:
    """Yields the proxy (``.requests``, and its endpoint as ``endpoint(proxy)``); stops it after."""
    with serving(Server(upstream)) as server:
        yield server


def endpoint(server: Server) -> str:
    return server.endpoint
