"""safetensors files and directories restored through the "safetensors" source: files the
``safetensors`` package writes, sharded onto meshes bit-exact; hostile indexes, sets and
headers refused typed; reads fetch only the regions a restore needs (``READ_STATS``)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from linen_model import init_state

import ckpt_callbacks as cc
from ckpt_callbacks import storage as paths
from ckpt_callbacks.errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    RestoreMismatchError,
)
from ckpt_callbacks.interop import _safetensors_source as sts
from ckpt_callbacks.interop._safetensors_format import header_bytes
from conftest import assert_tree_equal, make_mesh

F32 = {
    "model.w": np.arange(64, dtype=np.float32).reshape(8, 8) / 3,
    "model.b": np.linspace(-1, 1, 8, dtype=np.float32),
    "model.layers.0.mu": np.arange(24, dtype=np.int32).reshape(8, 3),
}
BF16 = {"emb.table": (np.arange(32, dtype=np.float32).reshape(4, 8) / 7).astype(ml_dtypes.bfloat16)}
EXPECTED = {
    "model": {"w": F32["model.w"], "b": F32["model.b"], "layers": {"0": {"mu": F32["model.layers.0.mu"]}}},
    "emb": {"table": BF16["emb.table"]},
}
RULES = [(r"model/w", P("x", "y")), (r"emb/table", P(None, "y")), (r"model/layers/.*", P("x")), (r".*", P())]


def _write_bf16(path, tensors: dict[str, np.ndarray]) -> None:
    arrays = {n: np.ascontiguousarray(a) for n, a in tensors.items()}  # alive through the call
    specs = {
        n: safetensors.TensorSpec(dtype="bfloat16", shape=list(a.shape), data_ptr=a.ctypes.data, data_len=a.nbytes)
        for n, a in arrays.items()
    }
    safetensors.serialize_file(specs, str(path))


def _sharded(tmp_path, index: bool = True):
    """Three shards the safetensors package writes (f32/int32 by numpy.save_file, bf16 by
    serialize_file), with Hugging Face's index.json."""
    names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    safetensors.numpy.save_file({"model.w": F32["model.w"]}, str(tmp_path / names[0]))
    safetensors.numpy.save_file({k: F32[k] for k in ("model.b", "model.layers.0.mu")}, str(tmp_path / names[1]))
    _write_bf16(tmp_path / names[2], BF16)
    if index:
        weight_map = {"model.w": names[0], "model.b": names[1], "model.layers.0.mu": names[1], "emb.table": names[2]}
        total = sum(a.nbytes for a in (*F32.values(), *BF16.values()))
        _index(tmp_path, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return tmp_path


def _index(root, data) -> None:
    (root / "model.safetensors.index.json").write_text(json.dumps(data))


def _check_sharded(restored, mesh) -> None:
    assert_tree_equal(jax.tree.map(np.asarray, restored), EXPECTED)
    assert restored["model"]["w"].sharding == NamedSharding(mesh, P("x", "y"))
    assert {s.data.shape for s in restored["model"]["w"].addressable_shards} == {(2, 4)}
    assert restored["emb"]["table"].dtype == ml_dtypes.bfloat16
    assert restored["model"]["b"].sharding.is_fully_replicated


@pytest.mark.parametrize("index", [True, False])
def test_package_written_shards_onto_a_mesh(tmp_path, index):
    root = _sharded(tmp_path, index)
    mesh = make_mesh((4, 2))
    _check_sharded(cc.restore(str(root), mesh=mesh, rules=RULES), mesh)


def test_linen_params_with_a_template(tmp_path):
    params = init_state(4, 16).params
    params = {**params, "Dense_1": {**params["Dense_1"], "bias": params["Dense_1"]["bias"].astype(jax.numpy.bfloat16)}}
    flat = {".".join(k.key for k in path): np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(params)}
    safetensors.numpy.save_file(
        {k: v for k, v in flat.items() if v.dtype == np.float32}, str(tmp_path / "a.safetensors")
    )
    _write_bf16(tmp_path / "b.safetensors", {k: v for k, v in flat.items() if v.dtype != np.float32})
    mesh = make_mesh((4, 2))
    template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P())), params)
    kernel = params["Dense_1"]["kernel"]  # (4, 16)
    template["Dense_1"]["kernel"] = jax.ShapeDtypeStruct(
        kernel.shape, kernel.dtype, sharding=NamedSharding(mesh, P(None, "x"))
    )
    restored = cc.restore(str(tmp_path), template=template)
    assert_tree_equal(restored, params)
    assert restored["Dense_1"]["kernel"].sharding == NamedSharding(mesh, P(None, "x"))
    assert restored["Dense_1"]["bias"].dtype == jax.numpy.bfloat16


def test_single_file_keys_rename_strict(tmp_path):
    path = tmp_path / "one.safetensors"
    safetensors.numpy.save_file({"a.x": np.arange(4.0, dtype=np.float32), "a.y": np.ones(3, np.int32)}, str(path))
    assert sorted(cc.restore(str(path))["a"]) == ["x", "y"]
    assert list(cc.restore(str(path), keys=["a/x"])["a"]) == ["x"]
    with pytest.raises(RestoreMismatchError):
        cc.restore(str(path), template={"a": {"x": np.zeros(4)}})  # a/y unexpected
    with pytest.raises(RestoreMismatchError):
        cc.restore(str(path), template={"a": {"x": np.zeros(4), "y": np.zeros(3, np.int32), "z": np.zeros(1)}})
    loose = cc.restore(str(path), template={"a": {"x": np.zeros(4)}}, strict=False)
    np.testing.assert_array_equal(loose["a"]["x"], np.arange(4.0, dtype=np.float32))
    renamed = cc.restore(
        str(path), template={"b": {"x": np.zeros(4), "y": np.zeros(3, np.int32)}}, rename=[("a/", "b/")]
    )
    np.testing.assert_array_equal(renamed["b"]["y"], np.ones(3, np.int32))


def test_names_with_slashes_clashes_scalars_and_odd_shapes(tmp_path):
    path = tmp_path / "odd.safetensors"
    tensors = {
        "a": np.array(2.5, np.float32),
        "a.b": np.zeros((0, 3), np.float32),
        "x/y": np.arange(3, dtype=np.uint8),
    }
    safetensors.numpy.save_file(tensors, str(path))
    restored = cc.restore(str(path))  # "a" vs "a.b" clash: a flat tree
    assert sorted(restored) == ["a", "a.b", "x/y"]
    assert restored["a"].shape == () and restored["a"] == 2.5 and restored["a.b"].shape == (0, 3)
    ours = {
        "version": 1,
        "paths": {"t": ["layers", 0, "w"]},
        "scalars": {"s": {"path": ["step"], "value": 7, "value_type": "int"}},
    }
    safetensors.numpy.save_file(
        {"t": np.arange(2, dtype=np.float32)},
        str(tmp_path / "ours.safetensors"),
        metadata={"ckpt_callbacks": json.dumps(ours)},
    )
    back = cc.restore(str(tmp_path / "ours.safetensors"))
    assert back["step"] == 7 and isinstance(back["layers"], list)
    np.testing.assert_array_equal(back["layers"][0]["w"], np.arange(2, dtype=np.float32))
    bad = {"paths": {"t": ["x", True]}}
    safetensors.numpy.save_file(
        {"t": np.arange(2, dtype=np.float32)},
        str(tmp_path / "bad.safetensors"),
        metadata={"ckpt_callbacks": json.dumps(bad)},
    )
    with pytest.raises(CheckpointFormatError, match=r"bad\.safetensors"):
        cc.restore(str(tmp_path / "bad.safetensors"))


def _refused(root, error, match) -> None:
    with pytest.raises(error, match=match):
        cc.restore(str(root))


def test_hostile_indexes_and_sets(tmp_path):
    root = _sharded(tmp_path)
    good = json.loads((root / "model.safetensors.index.json").read_text())
    weight_map = good["weight_map"]
    _index(root, {**good, "weight_map": {**weight_map, "model.b": "model-00009-of-00003.safetensors"}})
    _refused(root, CheckpointFormatError, "model-00009-of-00003.safetensors")
    _index(root, {**good, "weight_map": {**weight_map, "model.b": "../x.safetensors"}})
    _refused(root, CheckpointFormatError, r"\.\./x")
    _index(root, {**good, "weight_map": {k: v for k, v in weight_map.items() if k != "model.layers.0.mu"}})
    _refused(root, CheckpointFormatError, "not in its weight_map")
    _index(root, {**good, "metadata": {"total_size": 5}})
    _refused(root, CheckpointFormatError, r"total_size is 5, the tensors hold \d+")
    (root / "model.safetensors.index.json").write_text('{"weight_map": {}, "weight_map": {}}')
    _refused(root, CheckpointFormatError, "index.json")
    os.remove(root / "model.safetensors.index.json")
    os.remove(root / "model-00002-of-00003.safetensors")
    _refused(root, CorruptCheckpointError, r"missing \[2\]")
    safetensors.numpy.save_file({"model.w": np.zeros(2, np.float32)}, str(root / "model-00002-of-00003.safetensors"))
    _refused(root, CheckpointFormatError, "in two files")


def test_not_mine_and_temporaries(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointNotFoundError):
        cc.restore(str(tmp_path))
    safetensors.numpy.save_file({"w": np.ones(2, np.float32)}, str(tmp_path / "w.safetensors"))
    (tmp_path / ".w.safetensors").write_bytes(b"junk")
    (tmp_path / "x.safetensors.tmp-1").write_bytes(b"junk")
    np.testing.assert_array_equal(cc.restore(str(tmp_path))["w"], np.ones(2, np.float32))


def test_forged_truncated_and_huge(tmp_path):
    path = tmp_path / "f.safetensors"
    path.write_bytes(header_bytes([("w", np.float32, (4,))], None)[:8] + b"{}" + bytes(16))
    _refused(path, CheckpointFormatError, "f.safetensors")
    raw = bytearray(header_bytes([("w", np.dtype(np.float32), (2**40,))], None)) + bytes(64)
    path.write_bytes(bytes(raw))
    _refused(path, CheckpointFormatError, "f.safetensors")  # refused before any allocation
    safetensors.numpy.save_file({"w": np.arange(1024, dtype=np.float32)}, str(path))
    info = sts.stf.read_header(str(path)).tensors["w"]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(CorruptCheckpointError, match=r"f\.safetensors: tensor 'w'.*truncated"):
            sts.read_region(fd, str(path), info, ((0, 1024),))
    finally:
        os.close(fd)
    _refused(path, CheckpointFormatError, "f.safetensors")  # read afresh: its header no longer fits


@settings(deadline=None, max_examples=60, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_runs_reassemble_the_slice(tmp_path_factory, data):
    shape = tuple(data.draw(st.lists(st.integers(0, 6), min_size=0, max_size=4)))
    region = tuple((a, data.draw(st.integers(a, n))) for n in shape for a in [data.draw(st.integers(0, n))])
    array = np.arange(int(np.prod(shape)), dtype=np.int16).reshape(shape)
    path = tmp_path_factory.mktemp("runs") / "t.safetensors"
    safetensors.numpy.save_file({"t": array}, str(path))
    info = sts.stf.read_header(str(path)).tensors["t"]
    sts.READ_STATS.clear()
    fd = os.open(path, os.O_RDONLY)
    try:
        got = sts.read_region(fd, str(path), info, region)
    finally:
        os.close(fd)
    want = array[tuple(slice(a, b) for a, b in region)]
    np.testing.assert_array_equal(got, want)
    starts, _ = sts.runs(shape, 2, region)
    assert sts.READ_STATS[str(path)] <= 2 * want.nbytes + 4096 * len(starts)


def test_keys_reads_only_that_tensor(tmp_path):
    big = np.arange(2 << 20, dtype=np.float32).reshape(1024, 2048)  # 8 MiB
    path = tmp_path / "big.safetensors"
    safetensors.numpy.save_file({"big": big, "small": np.ones(16, np.float32)}, str(path))
    sts.READ_STATS.clear()
    restored = cc.restore(str(path), keys=["small"])
    np.testing.assert_array_equal(restored["small"], np.ones(16, np.float32))
    assert sts.READ_STATS[str(path)] == 64
    sts.READ_STATS.clear()
    region = ((0, 1024), (0, 256))  # a column block: 1024 runs of 1 KiB with 7 KiB gaps
    fd = os.open(path, os.O_RDONLY)
    try:
        info = sts.stf.read_header(str(path)).tensors["big"]
        np.testing.assert_array_equal(sts.read_region(fd, str(path), info, region), big[:, :256])
    finally:
        os.close(fd)
    assert sts.READ_STATS[str(path)] == 1024 * 1024


def test_memory_url_restores_as_local(tmp_path):
    root = _sharded(tmp_path)
    loc = paths.parse("memory://st-set")
    for name in os.listdir(root):
        paths.write_bytes(loc, name, (root / name).read_bytes())
    mesh = make_mesh((4, 2))
    _check_sharded(cc.restore("memory://st-set", mesh=mesh, rules=RULES), mesh)
    one = cc.restore("memory://st-set/model-00001-of-00003.safetensors")
    np.testing.assert_array_equal(one["model"]["w"], F32["model.w"])
    sts.READ_STATS.clear()
    assert cc.restore("memory://st-set", keys=["model/b"])["model"]["b"].shape == (8,)
    assert sts.READ_STATS == {"memory://st-set/model-00002-of-00003.safetensors": 32}  # its bytes alone
    raw = (root / "model-00002-of-00003.safetensors").read_bytes()
    paths.write_bytes(loc, "model-00002-of-00003.safetensors", raw[:-4])  # shorter than its header says
    with pytest.raises(CheckpointFormatError, match=r"memory://st-set/model-00002-of-00003\.safetensors"):
        cc.restore("memory://st-set")


@settings(deadline=None, max_examples=40, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_bit_flips_in_a_shard_refuse_typed_or_restore(tmp_path_factory, data):
    root = _sharded(tmp_path_factory.mktemp("flip"), index=False)
    shard = root / "model-00002-of-00003.safetensors"
    raw = bytearray(shard.read_bytes())
    header_end = 8 + struct.unpack("<Q", bytes(raw[:8]))[0]
    at = data.draw(st.integers(0, len(raw) - 1))
    raw[at] ^= 1 << data.draw(st.integers(0, 7))
    shard.write_bytes(bytes(raw))
    if at >= header_end:  # a flip in the data: restored, the other shards' tensors intact
        restored = cc.restore(str(root))
        np.testing.assert_array_equal(restored["model"]["w"], F32["model.w"])
        return
    try:
        cc.restore(str(root))
    except (CheckpointFormatError, CorruptCheckpointError, RestoreMismatchError, CheckpointNotFoundError) as e:
        assert "safetensors" in str(e)


def test_inspect_a_safetensors_dir(tmp_path):
    root = _sharded(tmp_path)
    exe = os.path.join(os.path.dirname(sys.executable), "ckpt-callbacks")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    run = subprocess.run([exe, "inspect", str(root)], capture_output=True, text=True, env=env, check=False, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "safetensors, 3 files" in run.stdout and "model-00002-of-00003.safetensors: 2 tensors" in run.stdout
    assert "emb/table: array [4, 8] bfloat16" in run.stdout
    data = json.loads(
        subprocess.run(
            [exe, "inspect", str(root), "--json"], capture_output=True, text=True, env=env, check=True, timeout=300
        ).stdout
    )
    assert data["kind"] == "safetensors" and data["items"]["state"]["bytes"] == sum(f["bytes"] for f in data["files"])
