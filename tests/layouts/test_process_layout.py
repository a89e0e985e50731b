"""The "process" layout: objects per process, not per chunk; restores anywhere; plan-layout."""

from __future__ import annotations

import json
import os
import pathlib
import re
import struct
import threading

import crc32c
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
from ckpt_callbacks import cli
from ckpt_callbacks import format as process_index
from ckpt_callbacks import layouts as layout_plan
from ckpt_callbacks.layouts import LeafShape, plan_layout
from conftest import assert_tree_equal, forge_committed_json, make_mesh, put


def _tree():
    mesh = make_mesh((4, 2))
    rng = np.random.default_rng(1)
    return {
        "w": put(jnp.asarray(rng.normal(size=(64, 512)), jnp.float32), mesh, P("x", "y")),  # 128 KiB, 8 chunks
        "big": put(jnp.asarray(rng.normal(size=(512, 1024)), jnp.float32), mesh, P("x")),  # 2 MiB: zarr3 array
        "rep": put(jnp.asarray(rng.normal(size=(1024, 512)), jnp.float32), mesh, P()),  # 2 MiB replicated: split
        "b": put(jnp.arange(1.0, 17.0), mesh, P()),
        "zero_d": put(jnp.float32(2.5), mesh, P()),
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
    # 4 per process. zarr3 with no packing: 4 chunk objects each, 2 zarr.json + 3 JSON on process 0.
    leaves = [LeafShape(path="a/w", shape=(16, 8), dtype="float32", spec=("d",))]
    zarr = plan_layout(leaves, {"d": 8}, 2, layout="zarr3", pack_bytes=0)
    assert zarr.objects == (4 + 2 + 3, 4) and zarr.chunks == 8 and zarr.bytes[1] == 4 * 64
    packed = plan_layout(leaves, {"d": 8}, 2, layout="zarr3")  # 512 bytes: packed, one file each
    assert packed.objects == (1 + 1 + 3, 1)
    # process layout, files of 128 bytes: 2 data files + 1 index each; index = 16 + 4 x 48 bytes
    proc = plan_layout(leaves, {"d": 8}, 2, layout="process", file_bytes=128)
    assert proc.objects == (3 + 3, 3) and proc.index_bytes == (208, 208)
    # 1,024 processes x 8 devices, 100 leaves: objects grow with processes only
    many = [LeafShape(path=f"l{i}", shape=(8192, 1024), dtype="bfloat16", spec=("d",)) for i in range(100)]
    big = plan_layout(many, {"d": 8192}, 1024, layout="process")
    assert big.total_objects == 2 * 1024 + 3 and big.chunks == 100 * 8192
    assert plan_layout(many, {"d": 8192}, 1024, layout="zarr3").total_objects == 100 * (8192 + 1) + 4
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
    forged = (r0[0], r1[1], r0[2], r1[3], r0[4], r0[5], r1[6])  # chunk 0 now points at chunk 1's bytes and crc32c
    record = process_index.pack_record(0, forged)
    index.write_bytes(data[:head] + record + data[head + size :])
    assert any("index.0" in p.message for p in cc.verify(path).problems)
    index.write_bytes(pathlib.Path(other, "state", "index.0").read_bytes())  # another save's index
    assert any("index.0" in p.message for p in cc.verify(path).problems)
    with pytest.raises(cc.CheckpointError):
        cc.restore(path, mesh=make_mesh((4, 2)))  # b's records carry b's chunk checksums: a's data fails them


# ------------------------------------------------------------- forgeries a re-signed file can make
# A forger who knows the format recomputes every crc32c: an index record's own, the index's in
# the manifest, the manifest's in the marker. Only structure can then tell a forgery: each record
# bound to its leaf and chunk, no two records claiming the same bytes.
HEADER = struct.Struct("<8sII")
RECORDS = {b"CKPTIDX1": struct.Struct("<IIQQII"), b"CKPTIDX2": struct.Struct("<IIQQQQII")}


def _read_index(path: str, process: int = 0) -> tuple[bytes, list[list[int]]]:
    """(magic, each record's fields without its own crc32c) of an index file, by hand."""
    data = pathlib.Path(path, "state", f"index.{process}").read_bytes()
    magic, _, count = HEADER.unpack_from(data)
    record = RECORDS[magic]
    return magic, [list(record.unpack_from(data, HEADER.size + i * record.size)[:-1]) for i in range(count)]


def _forge_index(path: str, magic: bytes, records: list[list[int]], process: int = 0) -> None:
    """Writes an index of ``records`` and re-signs it: own crc32c, manifest entry, marker."""
    record = RECORDS[magic]
    head, body = HEADER.pack(magic, process, len(records)), []
    signed = crc32c.crc32c(head)
    for fields in records:
        raw = record.pack(*fields, 0)[:-4]
        signed = crc32c.crc32c(raw, signed)
        body.append(raw + struct.pack("<I", crc32c.crc32c(raw, crc32c.crc32c(struct.pack("<I", process)))))
    data = head + b"".join(body)
    pathlib.Path(path, "state", f"index.{process}").write_bytes(data)
    manifest = _manifest(path)
    manifest["layout"]["indexes"][process][:2] = [len(data), signed]
    _forge_manifest(path, manifest)


def _manifest(path: str) -> dict:
    return json.loads(pathlib.Path(path, "state", "manifest.json").read_text())


def _forge_manifest(path: str, manifest: dict) -> None:
    forge_committed_json(path, "state/manifest.json", json.dumps(manifest).encode())


def _refused(path: str, match: str) -> None:
    """Restore raises a CheckpointError saying ``match``, and verify finds it too."""
    with pytest.raises(cc.CheckpointError, match=match):
        cc.restore(path, mesh=make_mesh((4, 2)))
    problems = cc.verify(path).problems
    assert any(re.search(match, p.message) for p in problems), problems


def _pair(tmp_path, offset: float = 100.0) -> tuple[str, dict]:
    """Two leaves alike but for their values, each 8 chunks of (2, 4) float32 (32 bytes)."""
    mesh, a = make_mesh((4, 2)), np.arange(64, dtype=np.float32).reshape(8, 8)
    tree = {"a": put(a, mesh, P("x", "y")), "b": put(a + offset, mesh, P("x", "y"))}
    path = str(tmp_path / "run-1")
    cc.save(path, tree, step=1, layout="process")
    assert_tree_equal(cc.restore(path, mesh=mesh), tree)
    return path, tree


def test_a_re_signed_manifest_with_a_reshaped_chunk_grid_is_refused(tmp_path):
    """Chunks (2, 4) said to be (4, 2): as many chunks of as many bytes, their crc32c unchanged;
    read as the manifest says, every element would land somewhere else."""
    path, _ = _pair(tmp_path)
    manifest = _manifest(path)
    assert manifest["leaves"][0]["chunks"] == [2, 4]
    manifest["leaves"][0]["chunks"] = [4, 2]
    _forge_manifest(path, manifest)
    _refused(path, "leaf 'a' chunk 0: tag .* manifest .*does not describe the leaf the save wrote")


def test_a_re_signed_manifest_with_two_leaves_records_swapped_is_refused(tmp_path):
    """Leaves 0 ('a') and 1 ('b') trade records (and tree nodes): the index's records of leaf 0
    are a's chunks, which the manifest now calls b's."""
    path, _ = _pair(tmp_path)
    manifest = _manifest(path)
    leaves = manifest["leaves"]
    leaves[0], leaves[1] = leaves[1], leaves[0]
    assert [leaf["path"] for leaf in leaves] == [["b"], ["a"]]
    for _, node in manifest["tree"]["dict"]:
        node["leaf"] = 1 - node["leaf"]
    _forge_manifest(path, manifest)
    _refused(path, "leaf 'b' chunk 0: tag")


def test_re_signed_index_records_that_overlap_are_refused(tmp_path):
    """Chunk 1 of leaf 'a' pointed at chunk 0's bytes (and crc32c): both would restore chunk 0."""
    path, _ = _pair(tmp_path)
    magic, records = _read_index(path)
    assert records[0][:3] == [0, 0, 0] and records[1][:3] == [0, 0, 1]  # leaf, file, chunk
    records[1][1], records[1][3], records[1][-1] = records[0][1], records[0][3], records[0][-1]  # file, offset, crc
    _forge_index(path, magic, records)
    _refused(path, "leaf 'a' chunk 0 .* and leaf 'a' chunk 1 .* overlap in data file 0")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [(4, 64, "size in bytes 64 in its record, 32"), (5, 12345, "tag 12345")],
)
def test_a_re_signed_record_of_another_size_or_leaf_tag_is_refused(tmp_path, field, value, match):
    """Fields (leaf, file, chunk, offset, size, tag, crc32c) of a version 2 record."""
    path, _ = _pair(tmp_path)
    magic, records = _read_index(path)
    records[7][field] = value  # leaf 'a' chunk 7, the last before leaf 'b'
    _forge_index(path, magic, records)
    _refused(path, match)


def test_version_1_indexes_restore_and_are_checked_as_well(tmp_path):
    """An index of 32-byte records (no size, no leaf tag), as saves wrote before, still restores
    and verifies; overlapping records in one are refused all the same."""
    path, tree = _pair(tmp_path)
    magic, records = _read_index(path)
    if magic == b"CKPTIDX2":  # to version 1: leaf, file, chunk, offset, crc32c
        records = [[r[0], r[1], r[2], r[3], r[6]] for r in records]
        _forge_index(path, b"CKPTIDX1", records)
    assert_tree_equal(cc.restore(path, mesh=make_mesh((4, 2))), tree)
    assert cc.verify(path).ok
    records[9][1], records[9][3], records[9][4] = records[8][1], records[8][3], records[8][4]
    _forge_index(path, b"CKPTIDX1", records)
    _refused(path, "leaf 'b' chunk 0 .* and leaf 'b' chunk 1 .* overlap")


# ------------------------------------------------------------------- special files, both layouts
SPECIAL = [
    ("zarr3", "state/pack.0-0", {"w": np.arange(8.0)}),  # packed small leaves
    ("zarr3", "state/s/c", {"s": np.float32(3.0)}),  # a 0-d zarr3 array's one chunk file
    ("process", "state/pack.0-0", {"w": np.arange(8.0)}),  # a data file
    ("process", "state/index.0", {"w": np.arange(8.0)}),
]


def _promptly(fn, fifo: str):
    """``fn()``'s result or exception, failing the test if it is still blocked after 20 s (then
    the FIFO gets a writer, so that whatever blocked on it ends)."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except Exception as e:
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
        pytest.fail(f"blocked on the FIFO {fifo}")
    return out


@pytest.mark.parametrize(("layout", "name", "tree"), SPECIAL, ids=[f"{x[0]}-{x[1]}" for x in SPECIAL])
def test_a_fifo_in_place_of_a_file_is_refused_at_once(tmp_path, layout, name, tree):
    path = str(tmp_path / "run-1")
    cc.save(path, tree, step=1, layout=layout, pack_bytes=0 if name.endswith("/c") else 1 << 20)
    fifo = os.path.join(path, name)
    os.remove(fifo)
    os.mkfifo(fifo)
    restored = _promptly(lambda: cc.restore(path), fifo)
    assert isinstance(restored.get("error"), cc.CorruptCheckpointError), restored
    assert f"{fifo} is not a regular file" in str(restored["error"])
    report = _promptly(lambda: cc.verify(path), fifo)["value"]
    assert any(f"{fifo} is not a regular file" in p.message for p in report.problems), report.problems
