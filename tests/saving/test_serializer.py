"""Saving: leaf kinds, snapshot semantics, what each chunk holds, failures and overwrite."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import ckpt_callbacks as cc
from ckpt_callbacks import storage as paths
from conftest import assert_tree_equal, make_mesh, put


def _manifest(url, item="state"):
    return cc.open_checkpoint(url).manifest(item)


def test_every_leaf_kind_round_trips(url, mesh42):
    tree = {
        "sharded": put(jnp.arange(64.0).reshape(8, 8), mesh42, P("x", "y")),
        "replicated": put(jnp.arange(12, dtype=jnp.int32).reshape(3, 4), mesh42, P()),
        "partial": put(jnp.arange(32.0).reshape(8, 4), mesh42, P("x")),
        "bf16": put(jnp.linspace(0, 1, 16, dtype=jnp.bfloat16).reshape(4, 4), mesh42, P(None, "y")),
        "f8": np.arange(8, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn),
        "int4": np.arange(-4, 4, dtype=ml_dtypes.int4),
        "np": np.arange(10, dtype=np.uint16),
        "scalar0d": jnp.float32(3.5),
        "np0d": np.float64(2.25),
        "empty": jnp.zeros((0, 3)),
        "key": jax.random.key(7),
        "keys": put(jax.random.split(jax.random.key(1), 8), mesh42, P("x")),
        "py": [1, 2.5, True, "text", None, float("inf"), -(2**70)],
        "bool": np.array([True, False]),
        "complex": np.array([1 + 2j], dtype=np.complex64),
    }
    cc.save(url, tree, step=3)
    restored = cc.restore(url)
    expected = dict(tree, np0d=np.asarray(np.float64(2.25)))
    assert_tree_equal(restored, expected)
    assert jax.dtypes.issubdtype(restored["keys"].dtype, jax.dtypes.prng_key)


def test_manifest_records_shape_dtype_spec_mesh_chunks_and_crc(url, mesh42):
    cc.save(url, {"w": put(jnp.ones((8, 6), jnp.bfloat16), mesh42, P("x", None))}, step=1)
    (leaf,) = _manifest(url).leaves
    assert leaf.path == ("w",)
    assert leaf.shape == (8, 6)
    assert (leaf.dtype, leaf.stored_dtype) == ("bfloat16", "bfloat16")
    assert leaf.partition_spec == ("x", None)
    assert leaf.mesh == {"axis_names": ["x", "y"], "axis_sizes": [4, 2]}
    # 4 shards along x, each replicated twice over y but too small to split: one chunk per shard.
    assert leaf.chunks == (2, 6)
    assert sorted(leaf.crc32c) == ["0.0", "1.0", "2.0", "3.0"]


def test_metadata_json_has_seed_keys(url):
    cc.save(url, {"a": np.zeros(2)}, step=12, extras={"loss": 0.5}, is_temporary=True)
    loc = paths.parse(url)
    meta = json.loads(paths.read_bytes(loc, "metadata.json"))
    assert meta["step"] == 12 and meta["is_temporary"] is True and meta["extras"] == {"loss": 0.5}
    assert meta["format"] == "ckpt_callbacks" and meta["version"] == 1 and meta["items"] == ["state"]
    assert isinstance(meta["timestamp"], float)


def test_replicated_slices_are_written_once(url, mesh42):
    big = put(jnp.ones((1024, 512)), mesh42, P())  # 2 MiB, replicated on 8 devices
    stats = cc.save_async(url, {"w": big, "s": put(jnp.ones((8, 4)), mesh42, P("x"))}).wait()
    assert stats.bytes_written == big.nbytes + 8 * 4 * 4
    (leaf, _) = sorted(_manifest(url).leaves, key=lambda r: r.key != "w")
    # Large replicated leaves are split so that every replica writes a part.
    assert leaf.chunks == (128, 512) and len(leaf.crc32c) == 8


def test_dtype_casts_floating_leaves_only(url, mesh42):
    tree = {"f": put(jnp.ones((8, 2), jnp.float32), mesh42, P("x")), "i": jnp.arange(3), "n": np.ones(2)}
    cc.save(url, tree, dtype=jnp.bfloat16)
    leaves = {r.key: r for r in _manifest(url).leaves}
    assert leaves["f"].stored_dtype == "bfloat16" and leaves["f"].dtype == "float32"
    assert leaves["n"].stored_dtype == "bfloat16"
    assert leaves["i"].stored_dtype == leaves["i"].dtype
    restored = cc.restore(url)
    assert restored["f"].dtype == jnp.float32  # back to the saved tree's dtype
    assert cc.restore(url, dtype=jnp.bfloat16)["f"].dtype == jnp.bfloat16


def test_snapshot_survives_deleting_the_source(url, mesh42):
    source = put(jnp.arange(4096.0).reshape(64, 64), mesh42, P("x", "y"))
    expected = np.asarray(source).copy()
    handle = cc.save_async(url, {"w": source})
    source.delete()
    handle.wait()
    np.testing.assert_array_equal(np.asarray(cc.restore(url)["w"]), expected)


def test_snapshot_survives_donation(url, mesh42):
    state = {"w": put(jnp.ones((64, 64)), mesh42, P("x", "y"))}
    step = jax.jit(lambda s: jax.tree.map(lambda x: x * 2 + 1, s), donate_argnums=0)
    handle = cc.save_async(url, state)
    for _ in range(5):
        state = step(state)
    jax.block_until_ready(state)
    handle.wait()
    np.testing.assert_array_equal(np.asarray(cc.restore(url)["w"]), np.ones((64, 64), np.float32))


def test_save_onto_committed_checkpoint_raises(url):
    cc.save(url, {"a": np.ones(2)}, step=1)
    with pytest.raises(cc.CheckpointExistsError, match="already holds a committed checkpoint"):
        cc.save(url, {"a": np.zeros(2)}, step=2)
    np.testing.assert_array_equal(cc.restore(url)["a"], np.ones(2))


def test_overwrite_replaces_and_cleans_old_version(url):
    cc.save(url, {"a": np.ones(2)}, step=1)
    cc.save(url, {"b": np.zeros(3)}, step=2, overwrite=True)
    restored = cc.restore(url)
    assert list(restored) == ["b"]
    entries = paths.list_entries(paths.parse(url))
    assert len(entries) == 3 and "COMMITTED" in entries  # marker, metadata and one item directory


def test_half_written_directory_is_not_reused(url):
    loc = paths.parse(url)
    paths.write_bytes(loc.join("state"), "manifest.json", b"{garbage")
    paths.write_bytes(loc.join("state", "w", "c"), "0", b"junk")
    with pytest.raises(cc.CheckpointNotFoundError, match="no commit marker"):
        cc.restore(url)
    cc.save(url, {"w": np.arange(3)})
    np.testing.assert_array_equal(cc.restore(url)["w"], np.arange(3))
    assert "state" not in paths.list_entries(loc)  # the leftovers were removed after the commit


def test_max_host_bytes_streams_in_pieces(url, mesh42):
    tree = {f"w{i}": put(jnp.full((256, 256), i, jnp.float32), mesh42, P("x")) for i in range(6)}
    stats = cc.save_async(url, tree, max_host_bytes=64 << 10).wait()
    assert stats.bytes_written == 6 * 256 * 256 * 4
    for leaf in _manifest(url).leaves:
        assert np.prod(leaf.chunks) * 4 <= 32 << 10
    assert_tree_equal(cc.restore(url), tree)


def test_small_leaves_are_packed_into_few_files(url, mesh42):
    tree = {
        "small": {f"p{i:03d}": jnp.full((64,), i, jnp.float32) for i in range(300)},  # one device each
        "sharded": put(jnp.arange(64.0).reshape(8, 8), mesh42, P("x", "y")),  # packed chunk by chunk
        "big": put(jnp.ones((1024, 512)), mesh42, P("x")),  # 2 MiB: a zarr3 array of its own
        "host": np.arange(5),
        "key": jax.random.key(0),
    }
    cc.save(url, tree)
    assert paths.list_entries(cc.open_checkpoint(url).item_loc("state")) == [
        "big",
        "manifest.json",
        "pack.0-0",
        "zarr.json",
    ]
    records = {r.key: r for r in _manifest(url).leaves}
    assert records["big"].pack == {} and len(records["sharded"].pack) == 8 and records["key"].pack
    assert_tree_equal(cc.restore(url), tree)
    other = cc.restore(url, mesh=make_mesh((2, 4)))
    assert other["sharded"].sharding.spec == P("x", "y") and other["sharded"].sharding.mesh.shape["y"] == 4
    np.testing.assert_array_equal(np.asarray(other["sharded"]), np.arange(64.0).reshape(8, 8))
    assert cc.verify(url).ok

    cc.save(url + "-plain", tree, pack_bytes=0)  # every array leaf a zarr3 array, as before packing
    entries = paths.list_entries(cc.open_checkpoint(url + "-plain").item_loc("state"))
    assert not [e for e in entries if e.startswith("pack.")] and {"big", "sharded", "small", "host"} <= set(entries)
    assert_tree_equal(cc.restore(url + "-plain"), tree)


def test_pack_files_stay_within_the_host_budget(url):
    tree = {f"p{i:03d}": np.full((256,), i, np.float32) for i in range(100)}  # 1 KiB each
    cc.save(url, tree, max_host_bytes=64 << 10)  # pack files of at most 8 KiB: 8 leaves each
    records = _manifest(url).leaves
    names = {name for r in records for name, _ in r.pack.values()}
    assert len(names) == 13 and all(r.pack for r in records)
    assert_tree_equal(cc.restore(url), tree)


def test_pack_bytes_must_be_a_byte_count(url):
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="pack_bytes must be a byte count"):
            cc.save(url, {"a": np.zeros(2)}, pack_bytes=bad)
    assert not paths.has_any(paths.parse(url))


def test_repeated_saves_of_one_structure_reuse_the_plan_but_not_the_data(url, mesh42):
    """The plan is cached by tree signature; values, casts and shardings must still be honoured."""

    def tree(k, spec):
        return {
            "w": put(jnp.full((8, 4), k, jnp.float32), mesh42, spec),
            "n": np.full(3, k, np.float32),
            "key": jax.random.key(k),
            "step": k,
        }

    for k in range(3):
        cc.save(f"{url}/a{k}", tree(k, P("x")))
    cc.save(f"{url}/cast", tree(7, P("x")), dtype=jnp.bfloat16)
    cc.save(f"{url}/other", tree(9, P(None, "y")))
    for k in range(3):
        assert_tree_equal(cc.restore(f"{url}/a{k}"), tree(k, P("x")))
    cast = {r.key: r for r in _manifest(f"{url}/cast").leaves}
    assert cast["w"].stored_dtype == "bfloat16" and cast["n"].stored_dtype == "bfloat16"
    assert {r.key: r for r in _manifest(f"{url}/a2").leaves}["w"].stored_dtype == "float32"
    assert {r.key: r for r in _manifest(f"{url}/other").leaves}["w"].partition_spec == (None, "y")
    np.testing.assert_array_equal(np.asarray(cc.restore(f"{url}/other")["w"]), np.full((8, 4), 9, np.float32))


def test_unsupported_leaf_names_its_path(url):
    with pytest.raises(TypeError, match=r"leaf 'a/0': cannot save object"):
        cc.save(url, {"a": [object()]})
    with pytest.raises(TypeError, match="leaf 'b'"):
        cc.save(url, {"b": np.array(["x"])})
    assert not paths.has_any(paths.parse(url))


def _run_failing_save(path, overwrite):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    out = subprocess.run(
        [sys.executable, "tests/programs/failing_write.py", path, "1" if overwrite else "0"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    return out.stdout + out.stderr


def test_failed_write_propagates_and_never_commits(tmp_path):
    path = str(tmp_path / "ckpt")
    out = _run_failing_save(path, overwrite=False)
    assert "FAILED" in out and "SAVED" not in out, out
    assert not os.path.exists(os.path.join(path, "COMMITTED"))
    with pytest.raises(cc.CheckpointNotFoundError):
        cc.restore(path)


def test_failed_overwrite_keeps_old_checkpoint(tmp_path):
    path = str(tmp_path / "ckpt")
    cc.save(path, {"small": np.arange(4)}, step=1)
    out = _run_failing_save(path, overwrite=True)
    assert "FAILED" in out, out
    assert cc.restore(path)["small"].tolist() == [0, 1, 2, 3]
    assert cc.list_checkpoints(str(tmp_path))[0].step == 1


def test_save_handle_reports_telemetry(url):
    handle = cc.save_async(url, {"a": np.ones(1000, np.float32)})
    stats = handle.wait()
    assert handle.done() and handle.stats is stats
    assert stats.bytes_written == 4000 and stats.blocking_s >= 0 and stats.write_s > 0


def test_no_pickle_or_eval_in_package():
    sources = sorted(pathlib.Path(cc.__file__).parent.rglob("*.py"))
    assert len(sources) > 40  # every subpackage's modules, not only the root's
    for source in sources:
        text = source.read_text()
        for banned in (r"import pickle", r"cloudpickle", r"import dill", r"(?<![\w.])eval\(", r"(?<![\w.])exec\("):
            assert not re.search(banned, text), (source.name, banned)


def test_a_pack_file_left_incomplete_stops_the_commit():
    from ckpt_callbacks.saving import Writer

    writer = Writer(1 << 20, {("state", "pack.0-0"): (128, 2)})
    with pytest.raises(RuntimeError, match=r"pack files left incomplete: \['state/pack.0-0'\]"):
        writer.check_complete("memory://x")
    Writer(1 << 20, {}).check_complete("memory://x")
