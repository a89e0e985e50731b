"""Orbax checkpoints in: what orbax-checkpoint writes, restored and inspected without orbax.

orbax is imported here only to write checkpoints; ``test_restore_never_imports_orbax`` checks
that restoring does not import it.
"""

from __future__ import annotations

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt_callbacks as cc
from ckpt_callbacks import format as fmt
from ckpt_callbacks import interop as orbax_format
from ckpt_callbacks import storage as paths
from ckpt_callbacks.errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    RestoreMismatchError,
)
from ckpt_callbacks.layouts import LeafRead
from conftest import assert_tree_equal, make_mesh, put, run_python

# Layouts orbax writes: how to write one, and the directory to restore from.
VARIANTS = ("standard", "plain_zarr", "ocdbt_zarr3", "plain_zarr3", "manager")


def _tree() -> dict:
    """Sharded, replicated and numpy arrays, bfloat16, nested dicts and lists, Python scalars."""
    mesh = make_mesh((4, 2))
    return {
        "params": {
            "w": put(jnp.arange(64.0, dtype=jnp.float32).reshape(8, 8), mesh, P("x", "y")),
            "emb": put(jnp.arange(32).astype(jnp.bfloat16).reshape(4, 8) / 7, mesh, P(None, "y")),
            "b": put(jnp.linspace(-1, 1, 8, dtype=jnp.float32), mesh, P()),  # replicated
        },
        "opt": [{"mu": put(jnp.arange(24, dtype=jnp.int32).reshape(8, 3), mesh, P("x"))}, np.arange(6.0).reshape(2, 3)],
        "scale": jnp.float32(0.25),
        "step": 7,
        "lr": 0.5,
    }


def _save(kind: str, base) -> str:
    tree = _tree()
    if kind == "standard":
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(base / "std", tree)
        return str(base / "std")
    if kind == "manager":
        with ocp.CheckpointManager(base / "mgr") as mngr:
            mngr.save(3, args=ocp.args.StandardSave(tree))
        return str(base / "mgr" / "3")
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=not kind.startswith("plain"), use_zarr3=kind.endswith("zarr3"))
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(base / kind, tree)
    return str(base / kind)


@pytest.fixture(scope="module", params=VARIANTS)
def saved(request, tmp_path_factory) -> str:
    return _save(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def standard(tmp_path_factory) -> str:
    return _save("standard", tmp_path_factory.mktemp("standard"))


def _copy(src: str, tmp_path) -> str:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return str(dst)


def _forge_metadata(path: str, edit) -> None:
    meta_path = f"{path}/_METADATA"
    with open(meta_path) as f:
        data = json.load(f)
    edit(data)
    with open(meta_path, "w") as f:
        json.dump(data, f)


@pytest.mark.parametrize("shape", [(4, 2), (2, 4)])
def test_restore_onto_a_mesh_with_saved_specs(saved, shape):
    mesh = make_mesh(shape)
    restored = cc.restore(saved, mesh=mesh)
    assert_tree_equal(restored, _tree())
    w = restored["params"]["w"]
    assert w.sharding == NamedSharding(mesh, P("x", "y"))
    assert restored["params"]["emb"].sharding.spec == P(None, "y")
    assert restored["params"]["b"].sharding.is_fully_replicated  # saved replicated
    assert isinstance(restored["opt"][1], np.ndarray)  # numpy stays numpy, as orbax restores it
    shard_shapes = {s.data.shape for s in w.addressable_shards}
    assert shard_shapes == {(8 // shape[0], 8 // shape[1])}


@pytest.mark.parametrize("shape", [(4, 2), (2, 4)])
def test_restore_with_rules(saved, shape):
    mesh = make_mesh(shape)
    rules = [(r"params/w", P("y", "x")), (r"opt/0/mu", P(None, None)), (r".*", P())]
    restored = cc.restore(saved, mesh=mesh, rules=rules)
    assert_tree_equal(restored, _tree())
    assert restored["params"]["w"].sharding == NamedSharding(mesh, P("y", "x"))
    assert restored["params"]["emb"].sharding.is_fully_replicated


def test_restore_keys_subset(standard):
    restored = cc.restore(standard, mesh=make_mesh((2, 4)), keys=["params/w", "step"])
    expected = _tree()
    assert_tree_equal(restored, {"params": {"w": expected["params"]["w"]}, "step": 7})


def test_restore_with_template_and_dtype(standard):
    mesh = make_mesh((2, 4))
    expected = _tree()
    shardings = {"w": NamedSharding(mesh, P(None, "x")), "emb": NamedSharding(mesh, P()), "b": NamedSharding(mesh, P())}
    template = {
        **expected,
        "params": {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in expected["params"].items()
        },
        "opt": (
            {"mu": jax.ShapeDtypeStruct((8, 3), jnp.int32, sharding=NamedSharding(mesh, P("y")))},
            np.zeros((2, 3)),
        ),
    }
    restored = cc.restore(standard, template=template)
    assert isinstance(restored["opt"], tuple)  # the template's structure, not the saved lists
    assert restored["params"]["w"].sharding == shardings["w"]
    assert_tree_equal(restored, {**expected, "opt": tuple(expected["opt"])})
    cast = cc.restore(standard, mesh=mesh, dtype=jnp.float32)
    assert cast["params"]["emb"].dtype == jnp.float32 and cast["opt"][0]["mu"].dtype == jnp.int32


def test_template_mismatch_is_strict(standard):
    expected = _tree()
    wrong = {**expected, "params": {**expected["params"], "w": np.zeros((8, 4), np.float32)}}
    with pytest.raises(RestoreMismatchError, match=r"shape mismatch at 'params/w': \(8, 4\) in template"):
        cc.restore(standard, template=wrong)
    missing = {**expected, "extra": 1.0}
    with pytest.raises(RestoreMismatchError, match="extra"):
        cc.restore(standard, template=missing)
    loose = cc.restore(standard, template=missing, strict=False)
    assert loose["extra"] == 1.0 and loose["step"] == 7


def test_manager_items_and_strings(tmp_path):
    tree = {"w": np.arange(4.0), "name": "run-a", "none": None, "empty": {}, "seq": []}
    with ocp.CheckpointManager(tmp_path / "mgr", item_names=("state", "meta")) as mngr:
        mngr.save(5, args=ocp.args.Composite(state=ocp.args.PyTreeSave(tree), meta=ocp.args.JsonSave({"a": 1})))
    step = str(tmp_path / "mgr" / "5")
    assert_tree_equal(cc.restore(step), tree)  # item "state", the default
    with pytest.raises(CheckpointFormatError, match="'meta' is not a PyTree"):
        cc.restore(step, item="meta")
    with pytest.raises(CheckpointNotFoundError, match=r"no orbax item 'nope'; items: \['meta', 'state'\]"):
        cc.restore(step, item="nope")
    out = run_python("-m", "ckpt_callbacks.cli", "inspect", step)
    assert out.returncode == 0, out.stderr
    assert "item 'meta': not a PyTree item" in out.stdout and "name: str = 'run-a'" in out.stdout


def test_inspect_cli(saved):
    out = run_python("-m", "ckpt_callbacks.cli", "inspect", saved)
    assert out.returncode == 0, out.stderr
    assert "an orbax checkpoint" in out.stdout
    assert "params/w: array [8, 8] float32 spec=['x', 'y']" in out.stdout
    assert "params/emb: array [4, 8] bfloat16" in out.stdout and "step: int = 7" in out.stdout


def test_restore_never_imports_orbax(standard):
    code = (
        "import sys, ckpt_callbacks as cc\n"
        f"tree = cc.restore({standard!r})\n"
        "assert tree['step'] == 7, tree\n"
        "print(sorted(m for m in sys.modules if m == 'orbax' or m.startswith('orbax.')))\n"
    )
    out = run_python("-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.update(tree_metadata=[]), "tree_metadata: expected an object"),
        (lambda d: d.update(use_zarr3="yes"), "use_zarr3: expected true or false"),
        (
            lambda d: d["tree_metadata"].update(x={"key_metadata": [{"key": "x", "key_type": 7}]}),
            r"key_metadata\[0\]: expected",
        ),
        (
            lambda d: d["tree_metadata"].update(
                x={"key_metadata": [{"key": "ghost", "key_type": 2}], "value_metadata": {"value_type": "jax.Array"}}
            ),
            "ghost/.zarray.*missing: _METADATA names array 'ghost'",
        ),
        (
            lambda d: d["tree_metadata"].update(
                x={"key_metadata": [{"key": "step", "key_type": 2}], "value_metadata": {"value_type": "scalar"}}
            ),
            "'step' is named twice",
        ),
        (
            lambda d: d["tree_metadata"].update(
                x={"key_metadata": [{"key": "step", "key_type": 2}], "value_metadata": {"value_type": "pickle"}}
            ),
            "value_type 'pickle'; this reader supports",
        ),
        (
            lambda d: d["tree_metadata"].update(
                x={"key_metadata": [{"key": "..", "key_type": 2}], "value_metadata": {"value_type": "np.ndarray"}}
            ),
            "is not a relative path",
        ),
        (
            lambda d: d["tree_metadata"].update(
                x={"key_metadata": [{"key": "\ud800", "key_type": 2}], "value_metadata": {"value_type": "scalar"}}
            ),
            r"expected a string key \(key_type 2\)",
        ),
    ],
)
def test_forged_metadata_is_refused(standard, tmp_path, edit, match):
    path = _copy(standard, tmp_path)
    _forge_metadata(path, edit)
    with pytest.raises(CheckpointFormatError, match=match):
        cc.restore(path)


def test_damaged_files_are_refused(tmp_path_factory, tmp_path):
    path = _copy(_save("plain_zarr", tmp_path_factory.mktemp("plain")), tmp_path)
    with open(f"{path}/_sharding", "w") as f:
        f.write("{}")  # no saved shardings: still restores, replicated
    assert cc.restore(path, mesh=make_mesh((2, 4)))["params"]["w"].sharding.is_fully_replicated
    with open(f"{path}/params.w/.zarray") as f:
        zarray = json.load(f)
    for forged, match in [
        ({**zarray, "shape": [2**40, 2**20]}, "more bytes than"),
        ({**zarray, "dtype": "|O"}, "not a numeric dtype"),
        ({**zarray, "chunks": [0, 4]}, "chunk shape"),
        ({**zarray, "fill_value": 10**500}, "field 'metadata': <an integer of 501 digits"),
        ({**zarray, "compressor": {"id": "pickle"}}, "params.w: leaf 'params/w'"),
    ]:
        with open(f"{path}/params.w/.zarray", "w") as f:
            json.dump(forged, f)
        with pytest.raises(CheckpointFormatError, match=match):
            cc.restore(path)
    with open(f"{path}/params.w/.zarray", "w") as f:
        json.dump(zarray, f)
    (tmp_path / "copy" / "params.w" / "1.0").unlink()  # a chunk gone: an error, never zeros
    with pytest.raises(CorruptCheckpointError, match="leaf 'params/w'"):
        cc.restore(path, mesh=make_mesh((4, 2)))
    with open(f"{path}/_METADATA", "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointFormatError, match="_METADATA: not valid JSON"):
        cc.restore(path)


def test_unfinished_or_foreign_directories(standard, tmp_path):
    tmp = tmp_path / "7.orbax-checkpoint-tmp-1234"
    shutil.copytree(standard, tmp)
    with pytest.raises(CheckpointNotFoundError, match="save did not finish"):
        cc.restore(str(tmp))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint"):
        cc.restore(str(other))
    assert orbax_format.find_items(paths.parse(str(other))) == {}


def test_our_format_still_requires_every_checksum(mem_url):
    """An orbax read skips crc32c checks; a record of ours without a chunk's crc32c still fails."""
    record = fmt.LeafRecord(
        path=("w",), kind="array", source="numpy", shape=(4,), dtype="float32", stored_dtype="float32",
        zarr_dtype="float32", array="w", chunks=(2,), crc32c={"0": 0},
    )  # fmt: skip
    spec = fmt.zarr_spec(paths.kvstore_spec(paths.parse(mem_url)), record)
    array = ts.open(spec, create=True, context=paths.context()).result()
    array.write(np.arange(4, dtype=np.float32)).result()
    with pytest.raises(CorruptCheckpointError, match=r"chunk 0 .*in the manifest"):
        LeafRead(array, record, [((0, 4),)], mem_url).result()
    unchecked = LeafRead(array, record, [((0, 4),)], mem_url, checksums=False).result()
    assert unchecked[((0, 4),)].tolist() == [0.0, 1.0, 2.0, 3.0]


_DECLARED = [1 << 28]  # 2 GiB of int64 in one chunk: more than the address space the reader below is given
_UNDER_A_CAP = """
import resource, sys
import ckpt_callbacks as cc
vm = next(int(line.split()[1]) << 10 for line in open("/proc/self/status") if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (768 << 20), resource.getrlimit(resource.RLIMIT_AS)[1]))
try:
    cc.restore(sys.argv[1])
except cc.CheckpointFormatError as e:
    print("refused:", e)
"""


@pytest.mark.parametrize("kind", ["plain_zarr", "plain_zarr3"])
def test_a_scalar_declaring_a_huge_shape_is_refused_before_it_is_read(tmp_path_factory, tmp_path, kind):
    """The forged size is checked before TensorStore allocates it: under an address-space cap
    smaller than the declared array, the restore raises instead of the process aborting."""
    path = _copy(_save(kind, tmp_path_factory.mktemp(kind)), tmp_path)
    meta_file = f"{path}/step/{'zarr.json' if kind.endswith('zarr3') else '.zarray'}"
    with open(meta_file) as f:
        meta = json.load(f)
    meta["shape"] = _DECLARED
    if kind.endswith("zarr3"):
        meta["chunk_grid"]["configuration"]["chunk_shape"] = _DECLARED
        meta["codecs"][0]["configuration"]["chunk_shape"] = _DECLARED  # sharding_indexed: one inner chunk
    else:
        meta["chunks"] = _DECLARED
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    out = run_python("-c", _UNDER_A_CAP, path)
    assert out.returncode == 0, out.stderr[-3000:]
    # (a host with less memory than the declared array refuses it earlier, as too large to read)
    assert re.search(
        r"refused: .*/step: leaf 'step': orbax names it a scalar, its zarr metadata declares int64 \[268435456\]; "
        r"expected one number|refused: .*more bytes than this host can read",
        out.stdout,
    ), out.stdout
