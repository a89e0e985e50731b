"""Shared fixtures: meshes over the 8 fake CPU devices (set up in the root conftest)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import jax
import numpy as np
import object_stores
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

_COUNTER = itertools.count()


def make_mesh(shape: tuple[int, ...], names: tuple[str, ...] = ("x", "y"), devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    n = int(np.prod(shape))
    return Mesh(np.array(devices[:n]).reshape(shape), names[: len(shape)])


def put(value, mesh: Mesh, spec: P) -> jax.Array:
    return jax.device_put(value, NamedSharding(mesh, spec))


def assert_tree_equal(a, b) -> None:
    """Bit-exact equality of two trees (PRNG keys compared by key data)."""
    la, ta = jax.tree_util.tree_flatten(a, is_leaf=lambda x: x is None)
    lb, tb = jax.tree_util.tree_flatten(b, is_leaf=lambda x: x is None)
    assert ta == tb, f"structure differs:\n{ta}\n{tb}"
    for left, right in zip(la, lb, strict=True):
        x, y = left, right
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert jax.random.key_impl(x) == jax.random.key_impl(y)
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        if hasattr(x, "shape") or hasattr(y, "shape"):
            hx, hy = np.asarray(x), np.asarray(y)
            assert hx.dtype == hy.dtype, (hx.dtype, hy.dtype)
            assert hx.shape == hy.shape
            assert hx.tobytes() == hy.tobytes()
        else:
            assert type(x) is type(y) and (x == y or (x != x and y != y)), (x, y)


@pytest.fixture
def mesh42() -> Mesh:
    return make_mesh((4, 2))


@pytest.fixture
def mem_url() -> str:
    """A fresh memory:// directory (the process-wide TensorStore memory store)."""
    return f"memory://tests/{next(_COUNTER)}"


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 for the whole session."""
    with object_stores.s3_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def gcs_endpoint():
    """A fake-gcs-server on 127.0.0.1 for the whole session."""
    with object_stores.gcs_server() as endpoint:
        yield endpoint


@pytest.fixture(params=["s3", "gs"])
def store(request) -> Iterator[tuple[str, str, str]]:
    """(scheme, upstream endpoint, a fresh base URL) on moto or fake-gcs-server, for a fault
    proxy in front of it (``fault_proxy.through``). ``directory/test_deletes.py`` has its own."""
    scheme = request.param
    upstream = request.getfixturevalue("s3_endpoint" if scheme == "s3" else "gcs_endpoint")
    yield scheme, upstream, f"{scheme}://{object_stores.BUCKET}/faults-{uuid.uuid4().hex[:10]}"


def _fresh_url(request, scheme: str) -> str:
    if scheme == "file":
        return str(request.getfixturevalue("tmp_path") / "ckpt")
    if scheme == "memory":
        return f"memory://tests/t{next(_COUNTER)}/ckpt"  # its own base, as on the other backends
    request.getfixturevalue("s3_endpoint" if scheme == "s3" else "gcs_endpoint")
    return f"{scheme}://{object_stores.BUCKET}/t{os.getpid()}-{next(_COUNTER)}/ckpt"


@pytest.fixture(params=["file", "memory", "s3", "gs"])
def url(request) -> str:
    """A fresh checkpoint directory on local disk, in memory://, and on real S3 and GCS servers."""
    return _fresh_url(request, request.param)


@pytest.fixture(params=["file", "s3", "gs"])
def shared_url(request) -> str:
    """Like ``url``, on the backends other processes can see (not memory://)."""
    return _fresh_url(request, request.param)


def run_python(*args: str, timeout: float = 600):
    """Runs ``python ARGS`` from the repository root with this checkout importable."""
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, check=False, timeout=timeout
    )


def forge_committed_json(url: str, name: str, data: bytes) -> None:
    """Writes ``data`` as the committed JSON file ``name`` (relative to the checkpoint) and
    updates its crc32c in the marker, as an attacker who knows the format would."""
    import crc32c

    from ckpt_callbacks import directory as layout
    from ckpt_callbacks import storage as paths

    loc = paths.parse(url)
    *dirs, base = name.split("/")
    paths.write_bytes(loc.join(*dirs) if dirs else loc, base, data)
    marker = json.loads(paths.read_bytes(loc, layout.COMMIT_MARKER))
    marker["checksums"][name] = crc32c.crc32c(data)
    paths.write_bytes(loc, layout.COMMIT_MARKER, json.dumps(marker).encode())


def start_tracing() -> None:
    """Starts tracemalloc for the rest of the session (allocation bounds are measured as peaks
    with ``reset_peak``). Never stopped: stopping it while TensorStore's threads release Python
    objects crashed the interpreter once, and a crash is worse than slower tests."""
    import tracemalloc

    if not tracemalloc.is_tracing():
        tracemalloc.start()
