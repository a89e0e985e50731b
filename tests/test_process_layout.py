"""The "process" layout: objects per process, not per chunk; restores anywhere; plan-layout."""

from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import mh_tasks
import multihost
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt_callbacks as cc
from ckpt_callbacks import cli, layout_plan, process_index
from ckpt_callbacks.layout_plan import LeafShape, plan_layout
from conftest import assert_tree_equal, make_mesh, put


def _tree():
    mesh = make_mesh((4, 2))
    rng = np.random.default_rng(1)
    return {
        "w": put(jnp.asarray(rng.normal(size=(64, 512)), jnp.float32), mesh, P("x", "y")),  # 128 KiB, 8 chunks
        "big": put(jnp.asarray(rng.normal(size=(512, 1024)), jnp.float32), mesh, P("x")),  # 2 MiB: zarr3 array
        "rep": put(jnp.asarray(rng.normal(size=(1024, 512)), jnp.float32), mesh, P()),  # 2 MiB replicated: split
        "b": put(jnp.arange(1.0, 17.0), mesh, P()),
        "n": np.arange(1, 7, dtype=np.int16).reshape(2, 3),
        "key": jax.random.key(0),
        "step": 3,
        "empty": np.zeros((0, 4), np.float32),
    }


def _files(path: str) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in pathlib.Path(path).rglob("*") if p.is_file())


def test_round_trip_on_every_backend_with_one_data_file_and_one_index(url):
    tree = _tree()
    cc.save(url, tree, step=3, layout="process")
    assert_tree_equal(cc.restore(url, mesh=make_mesh((4, 2))), tree)
    report = cc.verify(url)
    assert report.ok and report.chunks > 20
    if url.startswith("/"):
        names = _files(url)
        state = ["state/empty/zarr.json", "state/index.0", "state/manifest.json", "state/pack.0-0"]
        assert names == ["COMMITTED", "metadata.json", *state]
        manifest = json.loads((pathlib.Path(url) / "state/manifest.json").read_text())
        assert all(leaf.get("crc32c", {}) == {} for leaf in manifest["leaves"])  # no per-chunk records
        assert manifest["layout"]["processes"] == 1


def test_restores_onto_other_meshes_templates_and_subsets(tmp_path):
    path, tree = str(tmp_path / "run-3"), _tree()
    cc.save(path, tree, step=3, layout="process")
    for shape in ((2, 4), (8, 1), (1, 2)):
        mesh = make_mesh(shape)
        got = cc.restore(path, mesh=mesh, rules=[("w|big", P("y", "x")), (".*", P())])
        assert got["w"].sharding == NamedSharding(mesh, P("y", "x"))
        assert_tree_equal(got, tree)
    assert_tree_equal(cc.restore(path, keys=["big"])["big"], tree["big"])
    template = jax.tree.map(lambda x: x, tree)
    assert_tree_equal(cc.restore(path, template=template), tree)


def test_data_files_are_capped_and_a_small_budget_makes_more(tmp_path):
    path, tree = str(tmp_path / "c"), _tree()
    cc.save(path, tree, layout="process", max_host_bytes=4 << 20)  # files of at most 1 MiB
    packs = [n for n in _files(path) if "/pack." in n]
    assert len(packs) >= 4
    assert all(os.path.getsize(os.path.join(path, n)) <= 1 << 20 for n in packs)
    assert_tree_equal(cc.restore(path), tree)


@pytest.mark.parametrize("layout", ["zarr3", "process"])
def test_plan_layout_counts_what_a_real_save_writes(tmp_path, layout):
    tree = {k: v for k, v in _tree().items() if isinstance(v, jax.Array) and k != "key"}
    path = str(tmp_path / layout)
    cc.save(path, tree, layout=layout)
    leaves = [
        LeafShape(path=k, shape=v.shape, dtype=str(v.dtype), spec=tuple(v.sharding.spec))
        for k, v in sorted(tree.items())
    ]
    planned = plan_layout(leaves, {"x": 4, "y": 2}, processes=1, layout=layout)
    assert planned.total_objects == len(_files(path))
    manifest = os.path.getsize(os.path.join(path, "state/manifest.json"))
    others = sum(os.path.getsize(os.path.join(path, n)) for n in ("COMMITTED", "metadata.json"))
    assert 0.9 * (manifest + others) <= planned.manifest_bytes <= 1.1 * (manifest + others) + 64


def test_plan_layout_by_hand():
    # (16, 8) float32 over 8 devices on 2 processes, sharded on dim 0: 8 chunks of 64 bytes,
    # 4 per process. zarr3 with no packing: 4 chunk objects each, zarr.json + 3 JSON on process 0.
    leaves = [LeafShape(path="a/w", shape=(16, 8), dtype="float32", spec=("d",))]
    zarr = plan_layout(leaves, {"d": 8}, 2, layout="zarr3", pack_bytes=0)
    assert zarr.objects == (4 + 1 + 3, 4) and zarr.chunks == 8 and zarr.bytes[1] == 4 * 64
    packed = plan_layout(leaves, {"d": 8}, 2, layout="zarr3")  # 512 bytes: packed, one file each
    assert packed.objects == (1 + 3, 1)
    # process layout, files of 128 bytes: 2 data files + 1 index each; index = 16 + 4 x 32 bytes
    proc = plan_layout(leaves, {"d": 8}, 2, layout="process", file_bytes=128)
    assert proc.objects == (3 + 3, 3) and proc.index_bytes == (144, 144)
    # 1,024 processes x 8 devices, 100 leaves: objects grow with processes only
    many = [LeafShape(path=f"l{i}", shape=(8192, 1024), dtype="bfloat16", spec=("d",)) for i in range(100)]
    big = plan_layout(many, {"d": 8192}, 1024, layout="process")
    assert big.total_objects == 2 * 1024 + 3 and big.chunks == 100 * 8192
    assert plan_layout(many, {"d": 8192}, 1024, layout="zarr3").total_objects == 100 * (8192 + 1) + 3
    with pytest.raises(ValueError, match="not divisible"):
        plan_layout([LeafShape(path="x", shape=(10,), dtype="float32", spec=("d",))], {"d": 4}, 1)


def test_llama_example_on_2048_devices():
    leaves = layout_plan.llama70b(2048)
    assert len(leaves) == 723
    assert 70.5e9 < sum(int(np.prod(leaf.shape)) for leaf in leaves) < 70.6e9
    process = plan_layout(leaves, {"fsdp": 2048}, 256, layout="process")
    assert process.total_objects == 2 * 256 + 3 and max(process.objects) <= 5


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=40))
def test_writers_blocks_round_trip_and_rank(owners):
    blocks = process_index.encode_writers(owners)
    assert process_index.decode_writers(blocks) == owners
    process_index.check_writers(blocks, len(owners))
    for chunk, owner in enumerate(owners):
        assert process_index.owner_and_rank(blocks, chunk) == (owner, owners[:chunk].count(owner))
    for p in range(6):
        assert process_index.count_of(blocks, p) == owners.count(p)


def test_plan_layout_command(capsys):
    assert cli.main(["plan-layout", "--example", "llama70b", "--hosts", "4", "--devices-per-host", "2"]) == 0
    out = capsys.readouterr().out
    assert "zarr3" in out and "process" in out and "723 array leaves" in out
    assert cli.main(["plan-layout", "--example", "llama70b", "--hosts", "4", "--devices-per-host", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [x["layout"] for x in data["layouts"]] == ["zarr3", "process"]
    zarr, process = data["layouts"]
    # 131 GiB over 4 processes: 33 GiB each, in data files of at most 1 GiB (a few more than 33:
    # chunks of up to 224 MiB do not fill every file), an index each, and 3 JSON files
    assert 4 * (33 + 1) + 3 <= process["objects"] <= 4 * (40 + 1) + 3 and zarr["objects"] > 562 * 8


def test_cli_inspect_and_verify_read_the_process_layout(tmp_path, capsys):
    path = str(tmp_path / "run-3")
    cc.save(path, _tree(), step=3, layout="process")
    assert cli.main(["verify", path]) == 0
    capsys.readouterr()
    assert cli.main(["inspect", path, "--json"]) == 0
    leaves = json.loads(capsys.readouterr().out)["items"]["state"]["leaves"]
    assert all(leaf["packed"] for leaf in leaves if leaf["kind"] != "scalar" and leaf["bytes"])
    (tmp_path / "run-3" / "state" / "index.0").write_bytes(b"junk")
    assert cli.main(["verify", path]) == 1


def test_two_processes_save_then_restore_on_one_and_on_another_mesh(tmp_path):
    path = str(tmp_path / "run-1")
    multihost.run("save", 2, 2, path=path, mesh_shape=[2, 2], layout="process")
    names = _files(path)
    assert {"state/index.0", "state/index.1", "state/pack.0-0", "state/pack.1-0"} <= set(names)
    assert not any("/c/" in n for n in names)  # no per-chunk objects
    assert cc.verify(path).ok
    for n, local, mesh in ((1, 4, [2, 2]), (2, 2, [1, 4])):
        for outcome in multihost.run("restore", n, local, path=path, mesh_shape=mesh):
            assert outcome.result["problems"] == [], outcome.result
    data = mh_tasks.expected()
    restored = cc.restore(path)
    assert np.array_equal(np.asarray(restored["rep"]), data["rep"])


def test_an_index_rewritten_with_consistent_records_is_caught_by_verify(tmp_path):
    """Each index record carries its own crc32c, so the manifest's checksum of an index must not
    be a plain crc32c of the file (that is one constant for any records): swapping two records'
    targets, each with a recomputed own crc32c, or an index from another save, is found."""
    path, other = str(tmp_path / "a"), str(tmp_path / "b")
    tree = {"y": put(np.arange(64 * 512, dtype=np.float32).reshape(64, 512), make_mesh((4, 2)), P("x", "y"))}
    cc.save(path, tree, layout="process")
    cc.save(other, {"y": tree["y"] + 1}, layout="process")
    index = pathlib.Path(path, "state", "index.0")
    data = index.read_bytes()
    head, size = process_index.HEADER.size, process_index.RECORD.size
    r0 = process_index.RECORD.unpack_from(data, head)[:-1]
    r1 = process_index.RECORD.unpack_from(data, head + size)[:-1]
    forged = (r0[0], r1[1], r0[2], r1[3], r1[4])  # chunk 0 now points at chunk 1's bytes and crc32c
    record = process_index.RECORD.pack(*forged, process_index._record_crc(0, forged))
    index.write_bytes(data[:head] + record + data[head + size :])
    assert any("index.0" in p for p in cc.verify(path).problems)
    index.write_bytes(pathlib.Path(other, "state", "index.0").read_bytes())  # another save's index
    assert any("index.0" in p for p in cc.verify(path).problems)
    with pytest.raises(cc.CheckpointError):
        cc.restore(path, mesh=make_mesh((4, 2)))  # b's records carry b's chunk checksums: a's data fails them
