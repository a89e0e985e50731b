"""Property: a damaged or forged checkpoint restores bit-exactly or raises a CheckpointError.

One varied checkpoint per backend is saved once; every example copies its pristine bytes,
applies one mutation (a JSON field edited, raw bytes flipped or cut, with the marker's crc32c
left stale or forged; a file deleted or two swapped), then checks ``restore`` and ``verify``.
A forged manifest can say other things than the save did (a scalar's value, a leaf's dtype):
only those leaves may then differ, every other leaf must come back bit-exact. In the process
layout the index files are mutated too (bytes, or one record's field with every checksum
re-signed), and manifests forged consistently (a chunk grid reshaped, two leaves swapped).
"""

from __future__ import annotations

import itertools
import json
import shutil
import struct
import tempfile
import tracemalloc
from typing import Any

import crc32c
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import ckpt_callbacks as cc
from ckpt_callbacks import storage as paths
from conftest import assert_tree_equal, forge_committed_json, make_mesh, put, start_tracing

MANIFEST, METADATA, MARKER = "state/manifest.json", "metadata.json", "COMMITTED"
SEMANTIC = {"value", "value_type", "dtype"}  # what a forged manifest may change undetectably
RUN = itertools.count()
COUNT = {"mutations": 0}
WEIRD = [
    "O", "U2", "V8", "M8[ns]", "[('a', '<i4')]", "float64", "int8", "bfloat16", "key<fry>", "uint32",
    "pack.0-1", "pack.0-0", "../x", "state", "jax", "numpy", "scalar", "array", "prng_key", "0.0", "",
]  # fmt: skip
INTS = [0, 1, -1, -10, 2, 3, 7, 64, 2**31, 2**32, 2**63, 10**9, 10**12, 10**300]
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(INTS),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(WEIRD),
    st.text(max_size=6),
    st.lists(st.sampled_from([0, 1, 2, -1, 8, 10**6]), max_size=3),
    st.dictionaries(st.sampled_from(["0", "0.0", "leaf", "dict", "a"]), st.sampled_from([0, 1, None]), max_size=2),
)


def _tree() -> dict[str, Any]:
    mesh = make_mesh((4, 2))
    rng = np.random.default_rng(0)
    return {
        "w": put(jnp.asarray(rng.normal(size=(8, 8)), jnp.float32), mesh, P("x", "y")),  # packed, 8 chunks
        "big": put(jnp.asarray(rng.normal(size=(16, 64)), jnp.bfloat16), mesh, P("x")),  # a zarr3 array
        "n": np.arange(1, 7, dtype=np.int16).reshape(2, 3),
        "key": jax.random.key(0),
        "s": "hi",
        "none": None,
        "i": 3,
        "f": 1.5,
        "l": [1, (2.0, True)],
    }


def _kv(url: str) -> ts.KvStore:
    return ts.KvStore.open(paths.kvstore_spec(paths.parse(url)), context=paths.context()).result()


def _files(url: str) -> dict[str, bytes]:
    kv = _kv(url)
    return {k.decode(): kv[k] for k in kv.list().result()}


class Backend:
    """A pristine checkpoint on one backend, copied afresh for every example."""

    def __init__(self, scheme: str, layout: str = "zarr3") -> None:
        self.scheme = scheme
        self.root = tempfile.mkdtemp(prefix="fuzz-") if scheme == "file" else f"memory://fuzz/{scheme}"
        self.tree = _tree()
        self.pristine = self._url("pristine")
        cc.save(self.pristine, self.tree, step=7, pack_bytes=1024, layout=layout, max_host_bytes=1 << 14)
        self.files = _files(self.pristine)
        self.stored = sum(len(v) for v in self.files.values())
        self.json = {name: json.loads(self.files[name]) for name in (MANIFEST, METADATA, MARKER)}
        assert_tree_equal(cc.restore(self.pristine), self.tree)  # warm: compiles outside tracemalloc
        assert cc.verify(self.pristine).ok

    def _url(self, name: str) -> str:
        return f"{self.root}/{name}/run-7"

    def fresh(self) -> str:
        url = self._url(f"e{next(RUN)}")
        if self.scheme == "file":
            shutil.copytree(paths.parse(self.pristine).path, paths.parse(url).path)
        else:
            kv = _kv(url)
            for name, data in self.files.items():
                kv[name] = data
        return url

    def drop(self, url: str) -> None:
        paths.delete_tree(paths.parse(url.rsplit("/", 1)[0]))

    def close(self) -> None:
        paths.delete_tree(paths.parse(self.root))


@pytest.fixture(scope="module", params=["file", "memory"])
def backend(request):
    made = Backend(request.param)
    start_tracing()
    yield made
    made.close()
    print(f"\n{request.param}: {COUNT['mutations']} mutations so far")


def _locations(value: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON document, as a key path."""
    out = [at]
    if isinstance(value, dict):
        out += [p for k, v in value.items() for p in _locations(v, (*at, k))]
    elif isinstance(value, list):
        out += [p for i, v in enumerate(value) for p in _locations(v, (*at, i))]
    return out


def _edit(doc: Any, at: tuple[Any, ...], op: str, value: Any) -> Any:
    if not at:
        return value
    parent = doc
    for key in at[:-1]:
        parent = parent[key]
    old = parent[at[-1]]
    if op == "delete" and isinstance(parent, dict):
        del parent[at[-1]]
    elif op == "bump" and isinstance(old, int) and not isinstance(old, bool):
        parent[at[-1]] = old ^ (1 << (abs(hash(str(value))) % 40))
    elif op == "char" and isinstance(old, str) and old:
        parent[at[-1]] = old[:-1] + chr(ord(old[-1]) ^ 1)
    else:
        parent[at[-1]] = value
    return doc


@st.composite
def json_mutation(draw, backend: Backend, fields: tuple[str, ...] = ()) -> tuple[str, bytes, bool]:
    """One place in a JSON file edited (with ``fields``: in the manifest, under one of them)."""
    name = MANIFEST if fields else draw(st.sampled_from([MANIFEST, MANIFEST, MANIFEST, METADATA, MARKER]))
    doc = json.loads(json.dumps(backend.json[name]))
    places = [p for p in _locations(doc) if not fields or any(f in p[:3] for f in fields)]
    at = draw(st.sampled_from(places))
    op = draw(st.sampled_from(["set", "set", "delete", "bump", "char"]))
    data = json.dumps(_edit(doc, at, op, draw(VALUES))).encode()
    return name, data, draw(st.booleans())


@st.composite
def raw_mutation(draw, backend: Backend) -> tuple[str, bytes, bool]:
    name = draw(st.sampled_from([MANIFEST, METADATA, MARKER]))
    raw = bytearray(backend.files[name])
    spot = draw(st.integers(0, len(raw) - 1))
    if draw(st.booleans()):
        raw[spot] ^= 1 << draw(st.integers(0, 7))
    else:
        raw = raw[:spot]
    return name, bytes(raw), draw(st.booleans())


def _write(url: str, name: str, data: bytes, forge: bool) -> None:
    if forge and name != MARKER:
        forge_committed_json(url, name, data)
    else:
        _kv(url)[name] = data


def _lenient(backend: Backend, name: str, data: bytes) -> set[tuple[Any, ...]]:
    """Leaves whose forged record changed only in what no check can know (value, dtype)."""
    try:
        mutated = json.loads(data)
        before, after = backend.json[MANIFEST]["leaves"], mutated["leaves"]
    except (ValueError, TypeError, KeyError):
        return set()
    if name != MANIFEST or not isinstance(after, list) or len(after) != len(before):
        return set()
    out = set()
    for old, new in zip(before, after, strict=True):
        if (
            isinstance(new, dict)
            and old != new
            and {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)} <= SEMANTIC
        ):
            out.add(tuple(old["path"]))
    return out


def _blank(tree: Any, lenient: set[tuple[Any, ...]]) -> Any:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
    keys = [tuple(getattr(k, "key", getattr(k, "idx", None)) for k in p) for p, _ in flat]
    return jax.tree_util.tree_unflatten(
        treedef, [None if k in lenient else v for k, (_, v) in zip(keys, flat, strict=True)]
    )


def _check(backend: Backend, url: str, lenient: set[tuple[Any, ...]] = frozenset()) -> None:
    COUNT["mutations"] += 1
    error: Exception | None = None
    before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    try:
        restored = cc.restore(url)
    except cc.CheckpointError as e:
        error = e
    peak = tracemalloc.get_traced_memory()[1] - before
    assert peak < 4 * backend.stored + (16 << 20), peak
    try:
        report = cc.verify(url)
    except cc.CheckpointNotFoundError:
        assert isinstance(error, cc.CheckpointNotFoundError)
        return
    if error is None:
        assert report.ok, report.problems
        assert_tree_equal(_blank(restored, lenient), _blank(backend.tree, lenient))
    elif not isinstance(error, cc.RestoreMismatchError):  # a target this jax cannot hold says nothing of integrity
        assert not report.ok, f"restore raised {error!r}, verify found nothing"


FUZZ = settings(max_examples=900, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(data=st.data())
def test_edited_json_restores_exactly_or_raises(backend, data):
    name, raw, forge = data.draw(st.one_of(json_mutation(backend), raw_mutation(backend)))
    url = backend.fresh()
    try:
        _write(url, name, raw, forge)
        _check(backend, url, _lenient(backend, name, raw) if forge else set())
    finally:
        backend.drop(url)


@settings(max_examples=150, deadline=None, database=None)
@given(data=st.data())
def test_deleted_and_swapped_files_are_caught(backend, data):
    names = sorted(backend.files)
    first = data.draw(st.sampled_from(names))
    second = data.draw(st.sampled_from(names))
    url = backend.fresh()
    try:
        kv = _kv(url)
        if first == second:
            del kv[first]
        else:
            kv[first], kv[second] = backend.files[second], backend.files[first]
        _check(backend, url)
    finally:
        backend.drop(url)


@pytest.fixture(scope="module")
def process_backend():
    """The same tree in the "process" layout (data files of at most 2 KiB, so several)."""
    made = Backend("file", layout="process")
    assert any(name.startswith("state/index.") for name in made.files)
    start_tracing()
    yield made
    made.close()


# The process layout's index files, by hand: a forger recomputes every checksum in them.
INDEX_HEADER = struct.Struct("<8sII")
INDEX_RECORDS = {b"CKPTIDX1": struct.Struct("<IIQQII"), b"CKPTIDX2": struct.Struct("<IIQQQQII")}
PROCESS_FIELDS = ("layout", "writers", "chunks", "shape", "array")


def _signed_index(data: bytes) -> tuple[bytes, int]:
    """``data`` with each record's own crc32c recomputed, and the index's crc32c (the manifest's)."""
    magic, process, count = INDEX_HEADER.unpack_from(data)
    record = INDEX_RECORDS[magic]
    out, signed = [data[: INDEX_HEADER.size]], crc32c.crc32c(data[: INDEX_HEADER.size])
    for i in range(count):
        body = data[INDEX_HEADER.size + i * record.size :][: record.size - 4]
        signed = crc32c.crc32c(body, signed)
        out.append(body + struct.pack("<I", crc32c.crc32c(body, crc32c.crc32c(struct.pack("<I", process)))))
    return b"".join(out), signed


@st.composite
def index_mutation(draw, backend: Backend) -> tuple[str, bytes, bool]:
    """One field of one record of an index set to another value, re-signed or left stale."""
    name = draw(st.sampled_from(sorted(n for n in backend.files if "/index." in n)))
    data = backend.files[name]
    magic, _, count = INDEX_HEADER.unpack_from(data)
    record = INDEX_RECORDS[magic]
    at = INDEX_HEADER.size + draw(st.integers(0, count - 1)) * record.size
    fields = list(record.unpack_from(data, at))
    field = draw(st.integers(0, len(fields) - 2))  # not its own crc32c
    bits = 8 * struct.calcsize("<" + record.format[1 + field])
    value = draw(st.one_of(st.sampled_from(INTS), st.integers(0, 2**bits - 1)))
    fields[field] = fields[field] ^ (1 << value % bits) if draw(st.booleans()) else value % 2**bits
    return name, data[:at] + record.pack(*fields) + data[at + record.size :], draw(st.booleans())


@st.composite
def forged_leaves(draw, backend: Backend) -> bytes:
    """A manifest saying other things of its leaves than the save did, consistently: one leaf's
    chunk grid reshaped (its writers to match), or two leaves' records (and tree nodes) swapped."""
    doc = json.loads(json.dumps(backend.json[MANIFEST]))
    arrays = [i for i, leaf in enumerate(doc["leaves"]) if leaf.get("writers")]
    if draw(st.booleans()):
        leaf = doc["leaves"][draw(st.sampled_from(arrays))]
        dims = [*leaf["shape"], *leaf.get("key_tail", [])]
        leaf["chunks"] = [draw(st.integers(1, max(n, 1))) for n in dims]
        grid = int(np.prod([-(-n // c) for n, c in zip(dims, leaf["chunks"], strict=True)]))
        leaf["writers"] = [[0, 0, grid, 1]]
        return json.dumps(doc).encode()
    i, j = draw(st.lists(st.sampled_from(arrays), min_size=2, max_size=2, unique=True))
    doc["leaves"][i], doc["leaves"][j] = doc["leaves"][j], doc["leaves"][i]
    text = json.dumps(doc["tree"]).replace(f'"leaf": {i}}}', '"leaf": -1}').replace(f'"leaf": {j}}}', f'"leaf": {i}}}')
    doc["tree"] = json.loads(text.replace('"leaf": -1}', f'"leaf": {j}}}'))
    return json.dumps(doc).encode()


def _with_index(backend: Backend, url: str, name: str, data: bytes) -> None:
    """Writes index ``name`` re-signed: its records, its entry in the manifest, the marker."""
    data, signed = _signed_index(data)
    _kv(url)[name] = data
    doc = json.loads(json.dumps(backend.json[MANIFEST]))
    process = int(name.rsplit(".", 1)[1])
    doc["layout"]["indexes"][process][:2] = [len(data), signed]
    _write(url, MANIFEST, json.dumps(doc).encode(), True)


@settings(max_examples=500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_process_layout_damaged_index_data_or_manifest(process_backend, data):
    """Every file of the layout: the manifest (any field, or its process-layout fields, or its
    leaves forged consistently), an index (bytes, or one record's field, re-signed or not), a
    data file (bytes); each also deleted."""
    backend = process_backend
    url = backend.fresh()
    try:
        kind = data.draw(st.sampled_from(["json", "fields", "forged", "record", "record", "bytes", "bytes", "delete"]))
        if kind in ("json", "fields"):
            name, raw, forge = data.draw(json_mutation(backend, PROCESS_FIELDS if kind == "fields" else ()))
            _write(url, name, raw, forge)
            _check(backend, url, _lenient(backend, name, raw) if forge else set())
            return
        if kind == "forged":
            _write(url, MANIFEST, data.draw(forged_leaves(backend)), True)
            _check(backend, url)
            return
        if kind == "record":
            name, raw, resign = data.draw(index_mutation(backend))
            if resign:
                _with_index(backend, url, name, raw)
            else:
                _kv(url)[name] = raw
            _check(backend, url)
            return
        name = data.draw(st.sampled_from(sorted(n for n in backend.files if "/index." in n or "/pack." in n)))
        if kind == "delete":
            del _kv(url)[name]
        else:
            raw = bytearray(backend.files[name])
            spot = data.draw(st.integers(0, len(raw) - 1))
            if data.draw(st.booleans()):
                raw[spot] ^= 1 << data.draw(st.integers(0, 7))
            else:
                raw = raw[:spot]
            _kv(url)[name] = bytes(raw)
        _check(backend, url)
    finally:
        backend.drop(url)
