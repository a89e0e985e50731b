"""Real multi-process saves and restores (jax.distributed on 127.0.0.1, gloo, CPU devices)."""

from __future__ import annotations

import json
import pathlib
import uuid

import mh_tasks
import multihost
import numpy as np
import object_stores
import pytest

import ckpt_callbacks as cc


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One checkpoint saved by 2 processes x 2 devices on a (2, 2) mesh."""
    path = str(tmp_path_factory.mktemp("mh") / "run-1")
    outcomes = multihost.run("save", 2, 2, path=path, mesh_shape=[2, 2])
    return path, [o.result for o in outcomes]


def test_every_slice_written_once_and_spread_over_processes(saved):
    _, results = saved
    data = mh_tasks.expected()
    unique = sum(v.nbytes for k, v in data.items() if k != "host")
    per_process = [r["bytes"] for r in sorted(results, key=lambda r: r["pid"])]
    # every byte of every array written exactly once, in total
    assert sum(per_process) == unique + data["host"].nbytes
    # the 2 MiB replicated array is split: each process wrote about half of the total
    assert all(b > 0.4 * unique for b in per_process), per_process


def test_commit_once_after_all_writes_with_every_process_checksums(saved):
    path, _ = saved
    root = pathlib.Path(path)
    marker = root / "COMMITTED"
    chunk_files = [p for p in root.rglob("*") if (p.is_file() and "/c/" in str(p)) or p.parent.name == "c"]
    assert marker.exists() and chunk_files
    assert marker.stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in chunk_files)
    assert sorted(p.name for p in root.iterdir()) == ["COMMITTED", "metadata.json", "state"]
    # small leaves are packed, each process its own chunks; the 2 MiB "rep" is a zarr3 array
    assert sorted(p.name for p in (root / "state").glob("pack.*")) == ["pack.0-0", "pack.1-0"]
    assert (root / "state" / "rep" / "zarr.json").exists()
    manifest = json.loads((root / "state" / "manifest.json").read_text())
    leaves = {tuple(leaf["path"]): leaf for leaf in manifest["leaves"]}
    for key in (("w",), ("rep",), ("part",), ("keys",), ("host",)):
        leaf = leaves[key]
        grid = [-(-s // c) for s, c in zip(leaf["shape"] + list(leaf.get("key_tail", [])), leaf["chunks"], strict=True)]
        assert len(leaf["crc32c"]) == int(np.prod(grid)), key  # chunks from both processes recorded
    assert cc.verify(path).ok


@pytest.mark.parametrize(
    ("n", "local", "mesh", "rules"),
    [
        (2, 2, [1, 4], None),  # 2 processes, another mesh (saved specs)
        (2, 2, [4, 1], [["rep", ["x", "y"]], ["keys", ["y"]], [".*", []]]),  # 2 processes, rules
        (1, 4, [2, 2], None),  # 1 process, 4 devices
        (4, 1, [2, 2], None),  # 4 processes, 1 device each
    ],
)
def test_restore_on_other_topologies_bit_exact(saved, n, local, mesh, rules):
    path, _ = saved
    for outcome in multihost.run("restore", n, local, path=path, mesh_shape=mesh, rules=rules):
        assert outcome.result["problems"] == [], outcome.result
        if n > 1:
            assert not outcome.result["addressable"]


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_two_processes_save_to_an_object_store_and_restore_on_another_mesh(request, scheme):
    """The same protocol against real S3 and GCS servers (moto, fake-gcs-server) on 127.0.0.1."""
    request.getfixturevalue("s3_endpoint" if scheme == "s3" else "gcs_endpoint")
    path = f"{scheme}://{object_stores.BUCKET}/mh-{request.node.name[-3:-1]}-{uuid.uuid4().hex[:8]}/run-1"
    results = [o.result for o in multihost.run("save", 2, 2, path=path, mesh_shape=[2, 2])]
    assert all(r["bytes"] > 0 for r in results), results  # both processes wrote to the bucket
    assert cc.verify(path).ok
    for outcome in multihost.run("restore", 2, 2, path=path, mesh_shape=[1, 4]):
        assert outcome.result["problems"] == [], outcome.result


def test_each_process_reads_only_the_chunks_it_needs(tmp_path):
    path = str(tmp_path / "ckpt")
    multihost.run("save", 2, 2, path=path, mesh_shape=[2, 2], pack_bytes=0)  # every chunk its own file
    # w's rows 0:4 are only needed by process 0 on a (2, 2) mesh: corrupt that chunk
    chunk = pathlib.Path(path) / "state" / "w" / "c" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[0] ^= 0xFF
    chunk.write_bytes(raw)
    results = {o.pid: o.result for o in multihost.run("restore", 2, 2, path=path, mesh_shape=[2, 2])}
    assert "leaf 'w' chunk 0.0" in results[0]["corrupt"]
    assert results[1]["problems"] == []  # process 1 never read it


def test_time_and_preemption_decisions_agree_despite_skewed_clocks(tmp_path):
    path = str(tmp_path / "agree")
    results = [o.result for o in multihost.run("agreement", 2, 1, path=path, skew=13.7, steps=64, request_at=23)]
    assert results[0]["saved"] == results[1]["saved"], results
    saved = results[0]["saved"]
    assert 30 in saved  # the request on process 1 at step 23 is acted on at the next sync step, by both
    assert all(s % 10 == 0 for s in saved)  # decisions are only taken at sync steps
    assert results[0]["kinds"] == results[1]["kinds"]


def test_killed_process_mid_save_fails_others_within_timeout(tmp_path):
    base = tmp_path / "dead"
    outcomes = multihost.run("die_mid_save", 2, 2, expect_ok=False, timeout=90, path=str(base), timeout_s=6.0)
    survivor = outcomes[0].result
    assert survivor is not None, outcomes[0].output[-3000:]
    assert survivor["error"] and "TimeoutError" in survivor["error"] and "process 1" in survivor["error"]
    assert survivor["after_s"] < 30
    assert outcomes[1].returncode == 17
    assert not (base / "run-2" / "COMMITTED").exists()
    assert cc.find_latest_checkpoint(str(base)).endswith("run-1")
    assert cc.restore(str(base / "run-1"))["step"] == 7


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_training_loop_in_two_processes_resumes_on_one(request, tmp_path, backend):
    if backend == "s3":
        request.getfixturevalue("s3_endpoint")
        path = f"s3://{object_stores.BUCKET}/train-{uuid.uuid4().hex[:8]}"
    else:
        path = str(tmp_path / "train")
    first = multihost.run("train", 2, 2, path=path, steps=12, kill_after=12)
    assert first[0].result["steps"] == [5, 10]
    reference = multihost.run("train", 1, 4, path=str(tmp_path / "ref"), steps=16)[0].result["losses"]
    resumed = multihost.run("train", 1, 4, path=path, steps=16)[0].result
    assert resumed["start"] == 10 and resumed["steps"] == [5, 10, 15, 16]
    for step, loss in resumed["losses"].items():
        assert loss == pytest.approx(reference[step], rel=1e-5), step
    for step, loss in first[0].result["losses"].items():
        assert loss == pytest.approx(reference[step], rel=1e-5), step


def test_harness_tears_down_on_timeout(tmp_path):
    outcomes = multihost.run(
        "agreement", 2, 1, expect_ok=False, timeout=0.5, path=str(tmp_path / "x"), skew=0.0, steps=10**6
    )
    assert all(o.returncode == -9 for o in outcomes)  # killed, and reaped


def test_processes_that_do_not_share_storage_fail_the_first_save_at_once():
    outcomes = multihost.run("save_unshared", 2, 2, timeout=90, path="memory://not-shared/run-1")
    for o in outcomes:
        assert o.result["error"].startswith("StorageNotSharedError"), o.result
        assert "processes [1] cannot see what process 0 writes" in o.result["error"]
        assert o.result["after_s"] < 20  # at once, not after the 60 s commit barrier timeout
