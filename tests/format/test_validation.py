"""A forged manifest (valid JSON, crc32c fixed in the marker) is refused, naming leaf and field.

Each case is one an attacker found when the manifest was trusted; ``verify`` reports each.
"""

from __future__ import annotations

import json
import re
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ckpt_callbacks as cc
from ckpt_callbacks import storage as paths
from conftest import forge_committed_json, start_tracing

MANIFEST = "state/manifest.json"


def _manifest(url):
    return json.loads(paths.read_bytes(paths.parse(url).join("state"), "manifest.json"))


def _leaf(manifest, key):
    return next(leaf for leaf in manifest["leaves"] if leaf["path"] == [key])


def _forge(url, edit):
    manifest = _manifest(url)
    edit(manifest)
    forge_committed_json(url, MANIFEST, json.dumps(manifest).encode())


def _refused(url, error, match):
    with pytest.raises(error, match=match):
        cc.restore(url)
    report = cc.verify(url)
    assert not report.ok and any(re.search(match, p.message) for p in report.problems), report.problems


def _swap_indices(m):
    entries = dict(m["tree"]["dict"])
    entries["a"]["leaf"], entries["b"]["leaf"] = entries["b"]["leaf"], entries["a"]["leaf"]


def _set(key, field, value):
    return lambda m: _leaf(m, key).__setitem__(field, value)


FORGED = {
    "leaf index swap": (_swap_indices, cc.CheckpointFormatError, r"tree puts leaf 0 at 'b', but leaves\[0\] is 'a'"),
    "chunks [-10]": (_set("a", "chunks", [-10]), cc.CheckpointFormatError, r"leaf 'a': field 'chunks\[0\]'"),
    "shape [0]": (_set("a", "shape", [0]), cc.CheckpointFormatError, r"leaf 'a': field 'chunks'"),
    "stored itemsize": (
        _set("a", "stored_dtype", "float64"),
        cc.CheckpointFormatError,
        r"leaf 'a': field 'zarr_dtype'",
    ),
    "tree null": (lambda m: m.__setitem__("tree", None), cc.CheckpointFormatError, r"tree at '': expected a leaf"),
    "deep tree": (
        lambda m: m.__setitem__("tree", _nest(150)),
        cc.CheckpointFormatError,
        r"nested deeper than 100 levels",
    ),
    "big value": (
        _set("n", "value", 2**2000),
        cc.CheckpointFormatError,
        r"leaf 'n': field 'value': <an integer of 603 digits",
    ),
    "str as int": (
        _set("n", "value", "7"),
        cc.CheckpointFormatError,
        r"leaf 'n': field 'value': '7' is not a value of type int",
    ),
    "crc out of range": (
        lambda m: _leaf(m, "a")["crc32c"].__setitem__("0", 2**32),
        cc.CheckpointFormatError,
        r"leaf 'a': field \"crc32c\['0'\]\"",
    ),
    "array dir": (_set("a", "array", "b"), cc.CheckpointFormatError, r"leaf 'a': field 'array'"),
}


def _nest(depth):
    node = {"list": []}
    for _ in range(depth):
        node = {"list": [node]}
    return node


def _save(url):
    cc.save(url, {"a": np.arange(1, 5, dtype=np.float32), "b": np.arange(5, 9, dtype=np.float32), "n": 3})


@pytest.mark.parametrize("case", FORGED)
def test_forged_manifest_is_refused_by_restore_and_verify(mem_url, case):
    edit, error, match = FORGED[case]
    _save(mem_url)
    _forge(mem_url, edit)
    _refused(mem_url, error, match)


@pytest.mark.parametrize("name", ["O", "U2", "V8", "M8[ns]", "[('a', '<i4')]", "object", "key<fry>"])
@pytest.mark.parametrize("field", ["dtype", "stored_dtype", "zarr_dtype"])
def test_only_numeric_dtypes_are_accepted(mem_url, name, field):
    _save(mem_url)
    _forge(mem_url, _set("a", field, name))
    _refused(mem_url, cc.CheckpointFormatError, rf"leaf 'a': field '{field}': dtype .* is not one of")


def test_huge_shape_of_a_zarr_leaf_raises_instead_of_aborting(mem_url):
    cc.save(mem_url, {"a": np.arange(1, 5, dtype=np.float32)}, pack_bytes=0)

    def edit(m):
        _leaf(m, "a").update(shape=[10**6, 10**6], chunks=[10**6, 10**6], crc32c={"0.0": 0})

    _forge(mem_url, edit)
    _refused(mem_url, cc.CheckpointFormatError, r"leaf 'a': the manifest's shape \[1000000, 1000000\] needs")


@pytest.mark.parametrize("chunks", [[4], [10**9]])
def test_huge_shape_of_a_packed_leaf_raises_before_allocating(mem_url, chunks):
    cc.save(mem_url, {"a": np.arange(1, 5, dtype=np.float32)})

    def edit(m):
        _leaf(m, "a").update(shape=[10**9], chunks=chunks)
        if chunks == [10**9]:
            _leaf(m, "a")["crc32c"] = {"0": 0}

    _forge(mem_url, edit)
    start_tracing()
    before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    with pytest.raises(cc.CheckpointError, match=r"leaf 'a'"):
        cc.restore(mem_url)
    assert tracemalloc.get_traced_memory()[1] - before < 16 << 20
    match = r"leaf 'a': field 'crc32c'" if chunks == [4] else r"leaf 'a' chunk 0 could not be read: pack file .* holds"
    _refused(mem_url, cc.CheckpointError, match)


def test_overlapping_packed_chunks_are_refused(mem_url):
    _save(mem_url)
    _forge(mem_url, lambda m: _leaf(m, "a").update(shape=[10**3], chunks=[10**3]))
    _refused(mem_url, cc.CheckpointFormatError, r"field 'pack': leaf 'a' chunk 0 and leaf 'b' chunk 0 overlap")


def test_deeply_nested_json_and_huge_integers_are_format_errors(mem_url):
    _save(mem_url)
    raw = json.dumps(_manifest(mem_url))
    deep = raw.replace('"tree": {', '"tree": ' + "[" * 10_000 + "]" * 10_000 + ', "x": {', 1)
    forge_committed_json(mem_url, MANIFEST, deep.encode())
    _refused(mem_url, cc.CheckpointFormatError, r"manifest\.json: not valid JSON")
    huge = raw.replace('"value": 3', '"value": ' + "9" * 5000)
    forge_committed_json(mem_url, MANIFEST, huge.encode())
    _refused(mem_url, cc.CheckpointFormatError, r"manifest\.json: leaf 'n': field 'value': <an integer of 5000 digits")


def test_forged_metadata_fields_are_refused(mem_url):
    _save(mem_url)
    metadata = json.loads(paths.read_bytes(paths.parse(mem_url), "metadata.json"))
    metadata["timestamp"] = "yesterday"
    forge_committed_json(mem_url, "metadata.json", json.dumps(metadata).encode())
    _refused(mem_url, cc.CheckpointFormatError, r"metadata\.json: field 'timestamp'")


def test_strict_template_catches_kind_and_rank(mem_url):
    cc.save(mem_url, {"s": 3, "t": "text", "m": np.zeros((2, 3)), "k": jax.random.key(1)})
    cases = {
        "s": (np.zeros(3), r"kind mismatch at 's': a int scalar on disk, an array of shape \(3,\) in template"),
        "t": (np.float32(0), r"kind mismatch at 't': a str scalar on disk, an array of shape \(\) in template"),
        "m": (np.zeros(6), r"shape mismatch at 'm': \(6,\) in template, \(2, 3\) on disk \(rank 1 in template, 2"),
        "k": (jnp.zeros(()), r"kind mismatch at 'k': prng_key of shape \(\) on disk, an array of shape \(\)"),
    }
    base = {"s": 0, "t": "", "m": np.zeros((2, 3)), "k": jax.random.key(0)}
    for key, (leaf, match) in cases.items():
        with pytest.raises(cc.RestoreMismatchError, match=match):
            cc.restore(mem_url, template={**base, key: leaf})
    with pytest.raises(cc.RestoreMismatchError, match=r"kind mismatch at 't': a str scalar on disk, a float in"):
        cc.restore(mem_url, template={**base, "t": 0.5})
    loose = cc.restore(mem_url, template={**base, "t": 0.5}, strict=False)
    assert loose["t"] == 0.5 and loose["s"] == 3  # the template's value kept, as documented


def test_strict_false_never_returns_placeholders(mem_url):
    cc.save(mem_url, {"a": np.ones(2)})
    template = {"a": np.zeros(2), "gone": jax.ShapeDtypeStruct((2,), jnp.float32)}
    with pytest.raises(cc.RestoreMismatchError, match=r"ShapeDtypeStruct placeholders, not values: \['gone'\]"):
        cc.restore(mem_url, template=template, strict=False)
    assert cc.restore(mem_url, template={"a": np.zeros(2), "kept": 1.0}, strict=False)["kept"] == 1.0


def test_verify_reports_a_broken_marker_and_raises_only_without_a_checkpoint(mem_url):
    _save(mem_url)
    paths.write_bytes(paths.parse(mem_url), "COMMITTED", b"[]")
    report = cc.verify(mem_url)
    assert not report.ok and "COMMITTED: expected a JSON object" in report.problems[0].message
    with pytest.raises(cc.CheckpointNotFoundError):
        cc.verify(mem_url + "-nothing")
