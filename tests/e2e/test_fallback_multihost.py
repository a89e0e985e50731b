"""Two real processes fall back past a damaged latest checkpoint together, and discard together."""

from __future__ import annotations

import pathlib

import multihost

# On a (2, 2) mesh over 2 processes x 2 devices, rows 0:4 of 'w' are read by process 0 only.
ONLY_PROCESS_0_READS = pathlib.Path("state") / "w" / "c" / "0" / "0"


def _saved(tmp_path, steps):
    base = tmp_path / "run"
    multihost.run("save_steps", 2, 2, base=str(base), mesh_shape=[2, 2], steps=steps)
    return base


def _results(**kwargs):
    return {o.pid: o.result for o in multihost.run("resume_latest", 2, 2, mesh_shape=[2, 2], **kwargs)}


def test_both_processes_fall_back_when_only_one_reads_the_damage(tmp_path):
    base = _saved(tmp_path, [1, 2])
    (base / "run-2" / ONLY_PROCESS_0_READS).unlink()
    results = _results(base=str(base))
    for pid in (0, 1):
        assert results[pid]["step"] == 1, results
        assert results[pid]["problems"] == []


def test_without_fallback_both_processes_raise(tmp_path):
    base = _saved(tmp_path, [1, 2])
    chunk = base / "run-2" / ONLY_PROCESS_0_READS
    raw = bytearray(chunk.read_bytes())
    raw[0] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    results = _results(base=str(base), fallback=False)
    assert results[0]["error"] == results[1]["error"] == "CorruptCheckpointError", results
    assert "crc32c" in results[0]["message"] and "process 0 could not restore it" in results[1]["message"]


def test_discard_newer_deletes_once_and_every_process_sees_it_done(tmp_path):
    base = _saved(tmp_path, [1, 2, 3])
    results = _results(base=str(base), step=1, discard_newer=True)
    for pid in (0, 1):
        assert results[pid]["step"] == 1 and results[pid]["steps"] == [1], results
    assert sorted(p.name for p in base.iterdir()) == ["run-1"]
