"""Readable without this library: every leaf of every dtype a save accepts, opened with
zarr-python 3 itself (or, for the dtypes zarr-python has no data type for, with TensorStore or
numpy + ml_dtypes from the raw chunk files), bit-exact; the item directory is a zarr group."""

from __future__ import annotations

import json
import pathlib
import re

import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts
import zarr  # the dev extra installs zarr>=3: a missing zarr fails, never skips
from jax.sharding import PartitionSpec as P

import ckpt_callbacks as cc
from ckpt_callbacks import format as fmt
from conftest import make_mesh, put

# zarr-python 3's own data types among ours: a leaf stored as one of these opens with zarr.open_array.
ZARR_PYTHON = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}
ZARR_PYTHON |= {"float16", "float32", "float64", "complex64", "complex128"}
# What zarr-python cannot open (TensorStore stores these under their own names): the README's list.
NOT_ZARR_PYTHON = {"bfloat16", "int2", "int4", "float4_e2m1fn"}
NOT_ZARR_PYTHON |= {f"float8_{k}" for k in ("e3m4", "e4m3fn", "e4m3fnuz", "e4m3b11fnuz", "e5m2", "e5m2fnuz", "e8m0fnu")}


# The README's how-to, verbatim: one zarr3 leaf read with numpy + ml_dtypes (no zarr-python).
def _readme_how_to() -> str:
    """The README's numpy + ml_dtypes snippet (the python block defining ``read_leaf``), as printed there."""
    text = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "def read_leaf" in b]
    assert len(blocks) == 1, "the README shows read_leaf once"
    return blocks[0]


HOW_TO = _readme_how_to()
_NAMESPACE: dict = {}
exec(HOW_TO, _NAMESPACE)  # our own snippet, as the README prints it
read_leaf = _NAMESPACE["read_leaf"]


def _values(name: str, rng: np.random.Generator) -> np.ndarray:
    """A (8, 6) leaf of dtype ``name`` spanning its range (NaN and infinities where it has them)."""
    dtype = np.dtype(name)
    if name == "bool":
        return rng.integers(0, 2, (8, 6)).astype(bool)
    if dtype.kind in "iu":  # every bit pattern
        return np.frombuffer(rng.bytes(48 * dtype.itemsize), dtype).reshape(8, 6)
    if name in ("int2", "int4", "uint2", "uint4"):
        info = ml_dtypes.iinfo(dtype)
        return rng.integers(int(info.min), int(info.max) + 1, (8, 6)).astype(dtype)
    if dtype.kind == "c":
        return (rng.standard_normal((8, 6)) + 1j * rng.standard_normal((8, 6))).astype(dtype)
    info = ml_dtypes.finfo(dtype)
    values = rng.uniform(-1, 1, (8, 6)) * float(info.max) * rng.choice([1, 1e-3, 1e-6], (8, 6))
    values.flat[:3] = [np.nan, np.inf, -np.inf]
    return values.astype(dtype)  # a dtype without NaN or infinity maps them to its own


def _numpy_only(name: str) -> bool:
    return name.startswith("float6") or name in ("int64", "uint64", "float64", "complex128")


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


@pytest.fixture(scope="module")
def every_dtype(tmp_path_factory):
    """One checkpoint with a zarr3 leaf of every dtype, in 4 chunks (numpy leaves in 1)."""
    rng = np.random.default_rng(0)
    saved = {name: _values(name, rng) for name in sorted(fmt.NUMERIC_DTYPES)}
    saved["float32"][:2] = 0  # an all-zero chunk: zarr3 stores no file for it
    mesh = make_mesh((4,), ("x",))
    # jax has no float6 arrays, and no 64-bit ones without jax_enable_x64: those stay numpy, one chunk
    tree = {"by_dtype": {k: v if _numpy_only(k) else put(v, mesh, P("x")) for k, v in saved.items()}}
    path = tmp_path_factory.mktemp("zarr_python") / "run-1"
    cc.save(path, tree, step=1, pack_bytes=0)
    ckpt = cc.open_checkpoint(path)
    item_dir = path / ckpt.commit.items["state"]
    return item_dir, saved, {r.path[-1]: r for r in ckpt.manifest("state").leaves}


def test_zarr_python_reads_every_dtype_it_has_bit_exact(every_dtype):
    item_dir, saved, records = every_dtype
    readable = [name for name, r in records.items() if r.zarr_dtype in ZARR_PYTHON]
    assert len(readable) >= 19 and {"bool", "float16", "complex128", "uint4", "float8_e4m3"} <= set(readable)
    for name in readable:
        r = records[name]
        assert len(r.crc32c) == (1 if _numpy_only(name) else 4)
        got = zarr.open_array(store=str(item_dir), path=r.array, mode="r")[...]
        if r.zarr_dtype != name:  # a dtype TensorStore lacks: its bits, as unsigned ints
            got = got.view(getattr(ml_dtypes, r.dtype))
        assert got.dtype == saved[name].dtype and np.array_equal(_bits(got), _bits(saved[name])), name


def test_what_zarr_python_cannot_open_is_exactly_the_listed_dtypes(every_dtype):
    item_dir, _, records = every_dtype
    unreadable = {name for name, r in records.items() if r.zarr_dtype not in ZARR_PYTHON}
    assert unreadable == NOT_ZARR_PYTHON & set(records)
    for name in unreadable:
        with pytest.raises(ValueError, match=f"No Zarr data type found that matches '{name}'"):
            zarr.open_array(store=str(item_dir), path=records[name].array, mode="r")


def test_numpy_and_ml_dtypes_read_every_leaf_from_its_chunk_files(every_dtype):
    item_dir, saved, records = every_dtype
    for name, r in records.items():
        got = read_leaf(item_dir / r.array)
        if r.zarr_dtype != name:
            got = got.view(getattr(ml_dtypes, r.dtype))
        assert got.dtype == saved[name].dtype and np.array_equal(_bits(got), _bits(saved[name])), name


@pytest.mark.parametrize("dtype", ["bfloat16", "int4", "float8_e4m3fn", "float32"])
def test_the_how_to_reads_edge_chunks_and_absent_chunks(tmp_path, dtype):
    """Shapes no save of ours gives (its chunks divide the shape) but zarr3 allows, written by TensorStore."""
    want = np.arange(35).reshape(5, 7).astype(getattr(ml_dtypes, dtype, dtype))
    want[:2, :3] = 0  # chunk (0, 0) equals the fill value: no file
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "a")}}
    spec["metadata"] = {"shape": [5, 7], "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [2, 3]}}}
    spec["metadata"] |= {"data_type": dtype, "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}]}
    ts.open(spec, create=True).result().write(want).result()
    assert not (tmp_path / "a" / "c" / "0" / "0").exists() and (tmp_path / "a" / "c" / "2" / "2").exists()
    got = read_leaf(tmp_path / "a")
    assert got.dtype == want.dtype and np.array_equal(_bits(got), _bits(want))


def test_tensorstore_reads_the_dtypes_zarr_python_cannot(every_dtype):
    item_dir, saved, records = every_dtype
    for name in NOT_ZARR_PYTHON & set(records):
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(item_dir / records[name].array)}}
        got = ts.open(spec, open=True).result().read().result()
        assert got.dtype == saved[name].dtype and np.array_equal(_bits(got), _bits(saved[name])), name


def test_the_item_directory_is_a_zarr_group(tmp_path):
    tree = {"params": {"dense": {"kernel": np.arange(40.0).reshape(5, 8)}}, "small": np.ones(2), "n": 3}
    cc.save(tmp_path / "run-1", tree, step=1, pack_bytes=64)
    item = tmp_path / "run-1" / "state"
    assert json.loads((item / "zarr.json").read_text()) == {"zarr_format": 3, "node_type": "group"}
    group = zarr.open_group(str(item), mode="r")
    np.testing.assert_array_equal(group["params/dense/kernel"][...], tree["params"]["dense"]["kernel"])
    assert not (item / "params" / "zarr.json").exists()  # one group file per item, not per dict
    assert sorted(str(p.relative_to(item)) for p in item.rglob("zarr.json")) == [
        "params/dense/kernel/zarr.json",
        "zarr.json",
    ]


def test_every_item_is_a_group_and_the_process_layout_writes_none(tmp_path):
    cc.save_items(tmp_path / "items", {"model": {"w": np.ones(3)}, "opt": {"mu": np.zeros(3)}}, step=1)
    for item in ("model", "opt"):
        assert zarr.open_group(str(tmp_path / "items" / item), mode="r").attrs.asdict() == {}
    cc.save(tmp_path / "process", {"w": np.ones((4, 4))}, step=1, layout="process")  # pack files are not zarr
    assert not (tmp_path / "process" / "state" / "zarr.json").exists()


@pytest.mark.parametrize("url", ["memory://zarr-python/run-2", None])
def test_group_files_change_no_reader(tmp_path, url):
    url = url or str(tmp_path / "run-2")
    tree = {"a": {"b": np.arange(6.0)}, "s": "x"}
    cc.save(url, tree, step=2, pack_bytes=0)
    assert cc.verify(url).ok and cc.restore(url)["a"]["b"].tolist() == tree["a"]["b"].tolist()
    assert [c.step for c in cc.list_checkpoints(url.rsplit("/", 1)[0])] == [2]
    if not url.startswith("memory://"):
        assert sorted(p.name for p in pathlib.Path(url, "state").iterdir()) == ["a", "manifest.json", "zarr.json"]
