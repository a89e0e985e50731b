"""Format v1: key escaping, tree structure JSON, leaf records, version checks."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import ckpt_callbacks as cc
from ckpt_callbacks import format as fmt
from ckpt_callbacks import storage as paths
from conftest import assert_tree_equal, forge_committed_json

NASTY_KEYS = ["../x", "a/b", "", ".", "..", "ünïcødé ✓", "x" * 300, "%2E", "~", "manifest.json", "COMMITTED"]


def test_escaped_components_are_safe_and_distinct():
    names = [fmt.escape_component(k) for k in NASTY_KEYS]
    assert len(set(names)) == len(names)
    for name in names:
        assert name and "/" not in name and "." not in name and len(name) <= 120


def test_nasty_keys_round_trip_and_stay_inside_the_item(tmp_path):
    path = str(tmp_path / "ckpt")
    tree = {k: np.full(2, i, np.int32) for i, k in enumerate(NASTY_KEYS)}
    tree["nested"] = {"../../etc": {"a/b": np.ones(1)}, "": [np.zeros(1), {"..": np.ones(2)}]}
    cc.save(path, tree)
    assert_tree_equal(cc.restore(path), tree)
    item_dir = os.path.realpath(os.path.join(path, "state"))
    for dirpath, dirnames, files in os.walk(path):
        for name in dirnames + files:
            full = os.path.realpath(os.path.join(dirpath, name))
            assert full.startswith(os.path.realpath(path))
            if name not in ("COMMITTED", "metadata.json", "state"):
                assert full.startswith(item_dir + os.sep), full
    assert sorted(os.listdir(path)) == ["COMMITTED", "metadata.json", "state"]


def test_structure_json_keeps_containers_and_key_types():
    tree = {"a": (1, [2, None]), 3: {"b": np.zeros(1)}, "e": {}, "l": []}
    with pytest.raises((TypeError, ValueError)):  # jax cannot sort mixed str/int keys
        fmt.flatten(tree)
    tree = {"a": (1, [2, None]), "d": {"b": np.zeros(1)}, "e": {}, "l": [], "t": ()}
    structure, leaves = fmt.flatten(tree)
    assert [p for p, _ in leaves] == [("a", 0), ("a", 1, 0), ("a", 1, 1), ("d", "b")]
    rebuilt = fmt.unflatten(json.loads(json.dumps(structure)), [v for _, v in leaves])
    assert rebuilt["a"] == (1, [2, None]) and rebuilt["e"] == {} and rebuilt["l"] == [] and rebuilt["t"] == ()
    int_keys = {1: np.zeros(1), 2: np.ones(1)}
    structure, leaves = fmt.flatten(int_keys)
    assert [p for p, _ in leaves] == [(1,), (2,)]
    assert list(fmt.unflatten(json.loads(json.dumps(structure)), [v for _, v in leaves])) == [1, 2]


def test_non_string_keys_are_rejected_with_their_path():
    with pytest.raises(TypeError, match=r"key \(1, 2\) of type tuple"):
        fmt.flatten({(1, 2): np.zeros(1)})


def test_manifest_is_plain_json(url):
    cc.save(url, {"w": jnp.ones((2, 3)), "n": 5})
    ckpt = cc.open_checkpoint(url)
    raw = json.loads(paths.read_bytes(ckpt.item_loc("state"), "manifest.json"))
    assert raw["format"] == "ckpt_callbacks" and raw["version"] == 1
    leaves = {tuple(leaf["path"]): leaf for leaf in raw["leaves"]}
    assert leaves[("n",)] == {"path": ["n"], "kind": "scalar", "value": 5, "value_type": "int"}
    w = leaves[("w",)]
    assert w["shape"] == [2, 3] and w["dtype"] == "float32" and w["chunks"] == [2, 3] and "0.0" in w["crc32c"]


@pytest.mark.parametrize(
    "bad", [b"not json", b"[]", b'{"format": "other", "version": 1}', b'{"format": "ckpt_callbacks", "version": "1"}']
)
def test_malformed_marker_is_a_format_error(url, bad):
    cc.save(url, {"a": np.zeros(1)})
    paths.write_bytes(paths.parse(url), "COMMITTED", bad)
    with pytest.raises(cc.CheckpointFormatError, match="COMMITTED"):
        cc.restore(url)


def test_marker_cannot_point_outside_the_checkpoint(url):
    cc.save(url, {"a": np.zeros(1)})
    marker = {"format": "ckpt_callbacks", "version": 1, "metadata": "../metadata.json", "items": {"state": "state"}}
    paths.write_bytes(paths.parse(url), "COMMITTED", json.dumps(marker).encode())
    with pytest.raises(cc.CheckpointFormatError, match="not a plain entry"):
        cc.restore(url)


@pytest.mark.parametrize("pack", [["../../COMMITTED", 0], ["/etc/passwd", 0], ["pack.0-0", -8], ["pack.0-0"]])
def test_pack_entries_cannot_point_outside_the_item(url, pack):
    cc.save(url, {"a": np.arange(4.0)})
    ckpt = cc.open_checkpoint(url)
    manifest = json.loads(paths.read_bytes(ckpt.item_loc("state"), "manifest.json"))
    assert manifest["leaves"][0]["pack"] == {"0": ["pack.0-0", 0]}
    manifest["leaves"][0]["pack"] = {"0": pack}
    forge_committed_json(url, f"{ckpt.commit.items['state']}/manifest.json", json.dumps(manifest).encode())
    with pytest.raises(cc.CheckpointFormatError, match=r"manifest\.json"):
        cc.restore(url)


def test_unknown_dtype_name_is_refused():
    with pytest.raises(cc.CheckpointFormatError, match=r"unknown dtype 'os\.system'"):
        fmt.dtype_from_name("os.system")
    assert fmt.dtype_from_name("bfloat16").name == "bfloat16"


def test_parse_urls():
    assert paths.parse("memory://a/b/").url == "memory://a/b"
    assert paths.parse("s3://bucket/x/y").bucket == "bucket"
    assert paths.kvstore_spec(paths.parse("s3://bkt/p"), env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}) == {
        "driver": "s3",
        "bucket": "bkt",
        "path": "p/",
        "endpoint": "http://127.0.0.1:9",
        "s3_request_retries": {"max_retries": 8, "initial_delay": "1000ms", "max_delay": "32000ms"},
    }
    assert paths.kvstore_spec(paths.parse("gs://bkt/p/q")) == {
        "driver": "gcs",
        "bucket": "bkt",
        "path": "p/q/",
        "gcs_request_retries": {"max_retries": 8, "initial_delay": "1000ms", "max_delay": "32000ms"},
    }
    with pytest.raises(ValueError, match="unsupported URL scheme 'ftp'"):
        paths.parse("ftp://x/y")
    with pytest.raises(ValueError, match=r"'\.' and '\.\.' are not allowed"):
        paths.parse("memory://a/../b")
