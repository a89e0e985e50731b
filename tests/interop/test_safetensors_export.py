"""cc.export_safetensors: our checkpoints (both layouts, sharded over 8 devices) to safetensors,
checked against the safetensors package, restored back bit-exact through our own source."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
from hypothesis import given, settings
from hypothesis import strategies as hst
from jax.sharding import PartitionSpec as P

import ckpt_callbacks as cc
from ckpt_callbacks.interop import _safetensors_export as ex
from conftest import assert_tree_equal, make_mesh, put


def _tree(mesh):
    return {
        "params": {
            "Dense_0": {"kernel": put(np.arange(64 * 16, dtype=np.float32).reshape(64, 16), mesh, P("x", "y"))},
            "a.b/c": put(np.arange(32, dtype=np.float32).reshape(8, 4), mesh, P(None, "x")),
            "layers": [put(np.ones((16,), np.int32) * i, mesh, P("x")) for i in range(3)],
        },
        "bf": put(jnp.arange(48, dtype=jnp.bfloat16).reshape(8, 6), mesh, P("x")),
        "zero_d": jnp.float32(3.5),
        "empty": np.zeros((0, 4), np.float32),
        "step": 7,
        "name": "run-a",
    }


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


def _package_read(path):
    """Every tensor of a safetensors file as the package reads it (bytes, dtype name, shape)."""
    with open(path, "rb") as f:
        return {k: v for k, v in safetensors.deserialize(f.read())}


@pytest.mark.parametrize("layout", ["zarr3", "process"])
def test_round_trip_through_package_and_back(tmp_path, layout):
    mesh = make_mesh((4, 2))
    tree = _tree(mesh)
    ckpt = str(tmp_path / "ckpt")
    cc.save(ckpt, tree, options=cc.SaveOptions(layout=layout))
    out = str(tmp_path / "out")
    files = cc.export_safetensors(ckpt, out)
    assert files == [os.path.join(out, "model.safetensors")]
    got = _package_read(files[0])
    kernel = got["params.Dense_0.kernel"]
    assert kernel["dtype"] == "F32" and kernel["shape"] == [64, 16]
    assert bytes(kernel["data"]) == np.asarray(tree["params"]["Dense_0"]["kernel"]).tobytes()
    assert bytes(got["bf"]["data"]) == np.asarray(tree["bf"]).tobytes() and got["bf"]["dtype"] == "BF16"
    assert "params.a.b/c.c" not in got and "params.a.b/c" in got  # named by '.'-joined key paths
    assert got["empty"]["shape"] == [0, 4] and got["zero_d"]["shape"] == []
    back = cc.restore(out, mesh=mesh, rules=[(".*", P())])
    assert back["step"] == 7 and back["name"] == "run-a"
    for key in ("bf", "zero_d", "empty"):
        assert np.asarray(back[key]).tobytes() == np.asarray(tree[key]).tobytes()
    assert np.asarray(back["params"]["a.b/c"]).tobytes() == np.asarray(tree["params"]["a.b/c"]).tobytes()
    template = jax.tree.map(lambda x: x, tree)
    again = cc.restore(out, template=template)
    assert_tree_equal(jax.tree.map(np.asarray, again), jax.tree.map(np.asarray, tree))


def test_sharded_files_index_exact(tmp_path):
    mesh = make_mesh((4, 2))
    tree = {
        f"w{i}": put(np.random.default_rng(i).normal(size=(32, 64)).astype(np.float32), mesh, P("x", "y"))
        for i in range(5)
    }
    ckpt = str(tmp_path / "ckpt")
    cc.save(ckpt, tree)
    out = str(tmp_path / "out")
    files = cc.export_safetensors(ckpt, out, max_file_bytes=20000, max_host_bytes=4096)
    assert len(files) == 4 and files[-1].endswith(ex.INDEX)
    with open(files[-1]) as f:
        index = json.load(f)
    assert index["metadata"]["total_size"] == 5 * 32 * 64 * 4
    for name, file in index["weight_map"].items():
        got = _package_read(os.path.join(out, file))
        assert bytes(got[name]["data"]) == np.asarray(tree[name]).tobytes()
    assert sorted(index["weight_map"]) == sorted(tree)
    assert not [n for n in os.listdir(out) if ".tmp" in n]
    back = cc.restore(out, mesh=mesh, rules=[(".*", P("x", "y"))])
    for k, value in tree.items():
        assert np.asarray(back[k]).tobytes() == np.asarray(value).tobytes()


def test_dtype_rename_keys(tmp_path):
    mesh = make_mesh((4, 2))
    ckpt = str(tmp_path / "ckpt")
    cc.save(
        ckpt,
        {
            "params": {"w": put(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8), mesh, P("x"))},
            "opt": {"mu": np.ones(4, np.float32)},
            "count": np.arange(3, dtype=np.int32),
        },
    )
    out = str(tmp_path / "out")
    cc.export_safetensors(ckpt, out, keys=["params", "count"], dtype=jnp.bfloat16, rename=[(r"^params\.", "model.")])
    got = _package_read(os.path.join(out, "model.safetensors"))
    assert sorted(got) == ["count", "model.w"]
    assert got["model.w"]["dtype"] == "BF16" and got["count"]["dtype"] == "I32"
    want = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8).astype(ml_dtypes.bfloat16)
    assert bytes(got["model.w"]["data"]) == want.tobytes()


def test_refusals_leave_nothing(tmp_path):
    mesh = make_mesh((4, 2))
    ckpt = str(tmp_path / "ckpt")
    cc.save(ckpt, {"w": put(np.ones((8, 8), np.float32), mesh, P("x")), "k": jax.random.key(0)})
    out = str(tmp_path / "out")
    cc.export_safetensors(ckpt, out)
    before = _bytes(os.path.join(out, "model.safetensors"))
    with pytest.raises(cc.CheckpointExistsError, match="overwrite"):
        cc.export_safetensors(ckpt, out)
    with pytest.raises(cc.CheckpointPathError, match="overlaps"):
        cc.export_safetensors(ckpt, os.path.join(ckpt, "x"))
    with pytest.raises(cc.CheckpointPathError, match="local"):
        cc.export_safetensors(ckpt, "memory://x/y")
    with pytest.raises(ValueError, match="dtype"):
        cc.export_safetensors(ckpt, out, dtype=np.int8, overwrite=True)
    with pytest.raises(cc.CheckpointNotFoundError):
        cc.export_safetensors(str(tmp_path / "nothing"), str(tmp_path / "o2"))
    assert _bytes(os.path.join(out, "model.safetensors")) == before
    cc.export_safetensors(ckpt, out, overwrite=True, keys=["w"])
    assert sorted(_package_read(os.path.join(out, "model.safetensors"))) == ["w"]


def test_bit_flip_in_chunk_fails_export_and_writes_nothing(tmp_path):
    mesh = make_mesh((4, 2))
    ckpt = str(tmp_path / "ckpt")
    cc.save(ckpt, {"w": put(np.arange(4096, dtype=np.float32).reshape(64, 64), mesh, P("x", "y"))})
    files = [
        os.path.join(d, f) for d, _, fs in os.walk(ckpt) for f in fs if not f.endswith(".json") and f != "COMMITTED"
    ]
    chunk = max(files, key=os.path.getsize)  # a chunk file or a pack file: either is checked
    data = bytearray(_bytes(chunk))
    data[len(data) // 2] ^= 1
    with open(chunk, "wb") as f:
        f.write(bytes(data))
    out = str(tmp_path / "out")
    with pytest.raises(cc.CorruptCheckpointError):
        cc.export_safetensors(ckpt, out)
    assert not [n for n in os.listdir(out) if n.endswith(".safetensors") or ".tmp" in n]


@settings(max_examples=25, deadline=None)
@given(
    shape=hst.lists(hst.integers(1, 9), min_size=1, max_size=3).map(tuple),
    budget=hst.integers(4, 400),
    data=hst.data(),
)
def test_pieces_cover_each_element_once(shape, budget, data):
    chunks = tuple(data.draw(hst.integers(1, n)) for n in shape)
    from ckpt_callbacks import format as fmt

    record = fmt.LeafRecord(
        path=("w",),
        kind="array",
        source="jax",
        shape=shape,
        dtype="float32",
        stored_dtype="float32",
        zarr_dtype="float32",
        chunks=chunks,
    )
    t = ex._Tensor(record, "w", np.dtype(np.float32))
    seen = np.zeros(shape, np.int32)
    for region in ex._pieces(t, budget):
        seen[tuple(slice(a, b) for a, b in region)] += 1
    assert (seen == 1).all()


def test_export_hook_exports_the_final_step(tmp_path):
    hook = cc.interop.ExportHook(str(tmp_path / "serve"), at_step=4, dtype=jnp.bfloat16)
    cb = cc.CheckpointCallback(str(tmp_path / "run"), step_policies=[cc.CheckpointInterval(every=2)], on_commit=[hook])
    for step in range(1, 5):
        cb(step, state={"w": np.full((4, 4), step, np.float32)})
    cb.on_train_end(4, {"w": np.full((4, 4), 4, np.float32)})
    cb.close()
    assert [s for s, _ in hook.exported] == [4]
    got = _package_read(str(tmp_path / "serve" / "model.safetensors"))
    assert got["w"]["dtype"] == "BF16" and bytes(got["w"]["data"]) == np.full((4, 4), 4, ml_dtypes.bfloat16).tobytes()
    with pytest.raises(ValueError, match="at_step"):
        cc.interop.ExportHook("x", at_step=-1)


def test_cli_export(tmp_path):
    import subprocess
    import sys

    ckpt = str(tmp_path / "ckpt")
    cc.save(ckpt, {"params": {"w": np.arange(8, dtype=np.float32)}})
    out = str(tmp_path / "out")
    run = subprocess.run(
        [sys.executable, "-m", "ckpt_callbacks.cli", "export", ckpt, out, "--dtype", "bfloat16", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["files"] == [os.path.join(out, "model.safetensors")]
    assert _package_read(os.path.join(out, "model.safetensors"))["params.w"]["dtype"] == "BF16"
    again = subprocess.run(
        [sys.executable, "-m", "ckpt_callbacks.cli", "export", ckpt, out], capture_output=True, text=True, check=False
    )
    assert again.returncode != 0 and "overwrite" in again.stderr
