"""Messages that point the right way, each from a user's script (issue 21, item 7).

A base passed where a checkpoint is expected, a deleted chunk file, a donated array: each is
refused with the error a user can act on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import ckpt_callbacks as cc
from ckpt_callbacks import cli, storage
from ckpt_callbacks.errors import DeletedArrayError, MissingFileError
from ckpt_callbacks.restoring import VerifyProblem
from conftest import make_mesh, put

HEX = r"0x[0-9a-f]{8}"


def _remove(url: str, name: str) -> None:
    """Deletes file ``name`` under ``url`` (memory:// too, which has no files to unlink)."""
    loc = storage.parse(url)
    *dirs, base = name.split("/")
    storage.delete_entry(loc.join(*dirs) if dirs else loc, base)


# ------------------------------------------------------------------- a base is not a checkpoint
def test_restore_of_a_base_names_its_steps_and_how_to_read_one(tmp_path):
    base = str(tmp_path / "run")
    for step in (1, 2):
        cc.save(f"{base}/run-{step}", {"w": np.full(2, float(step))}, step=step)
    with pytest.raises(cc.CheckpointNotFoundError) as caught:
        cc.restore(base)
    message = str(caught.value)
    assert "a save that did not finish" not in message
    assert "checkpoint base" in message and "committed steps 2, 1" in message
    suggested = re.search(r"pass one checkpoint \('([^']+)'\)", message).group(1)
    assert suggested == os.path.join(base, "run-2")  # the form the base was given in
    assert cc.restore(suggested)["w"].tolist() == [2.0, 2.0]
    assert f"CheckpointReader({base!r}).restore(step=2)" in message
    tree, _ = cc.CheckpointReader(base).restore(step=2)
    assert tree["w"].tolist() == [2.0, 2.0]
    with pytest.raises(cc.CheckpointNotFoundError, match="checkpoint base"):
        cc.verify(base)  # every reader of one checkpoint says the same


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    committed=st.sets(st.integers(0, 60), min_size=1, max_size=8),
    unfinished=st.sets(st.integers(61, 99), max_size=2),
)
def test_a_base_lists_its_newest_committed_steps_only(committed, unfinished):
    base = f"memory://tests/messages/{uuid.uuid4().hex}"
    for step in committed:
        cc.save(f"{base}/run-{step}", {"w": np.zeros(1)}, step=step)
    for step in unfinished:  # a save that died, newer than every committed one: files, no marker
        cc.save(f"{base}/run-{step}", {"w": np.zeros(1)}, step=step)
        _remove(f"{base}/run-{step}", "COMMITTED")
    newest = sorted(committed, reverse=True)[:5]
    with pytest.raises(cc.CheckpointNotFoundError) as caught:
        cc.restore(base)
    message = str(caught.value)
    shown = ", ".join(map(str, newest)) + (", ..." if len(committed) > len(newest) else "")
    assert f"committed steps {shown}, newest first" in message, message
    assert f"'{base}/run-{newest[0]}'" in message and f".restore(step={newest[0]})" in message


def test_a_half_written_save_and_a_base_of_them_keep_their_own_hints(tmp_path):
    half = tmp_path / "half"
    cc.save(str(half), {"w": np.zeros(2)})
    (half / "COMMITTED").unlink()
    with pytest.raises(cc.CheckpointNotFoundError, match="no commit marker: a save that did not finish"):
        cc.restore(str(half))
    base = tmp_path / "base"
    for step in (3, 4):
        cc.save(str(base / f"run-{step}"), {"w": np.zeros(2)}, step=step)
        (base / f"run-{step}" / "COMMITTED").unlink()
    with pytest.raises(cc.CheckpointNotFoundError, match="checkpoint base, but none of its 2 run-<step> directories"):
        cc.restore(str(base))


# -------------------------------------------------------------------- missing is missing everywhere
def _cli_verify(path: str, capsys) -> list[dict]:
    capsys.readouterr()
    cli.main(["verify", path, "--json"])
    return json.loads(capsys.readouterr().out)["checkpoints"][0]["problems"]


@pytest.mark.parametrize("where", ["file", "memory"])
def test_a_deleted_chunk_file_is_missing_in_restore_verify_and_the_cli(where, tmp_path, mem_url, capsys):
    path = str(tmp_path / "ckpt") if where == "file" else mem_url  # local: read directly; memory: TensorStore
    w = put(np.arange(1, 9, dtype=np.int64).reshape(2, 4), make_mesh((2,), ("x",)), P("x"))  # chunks 0.0, 1.0
    cc.save(path, {"p": {"w": w}}, pack_bytes=0)
    _remove(path, "state/p/w/c/1/0")
    with pytest.raises(MissingFileError, match=r"leaf 'p/w' chunk 1\.0 .*its chunk file \S+p/w/c/1/0 is missing") as e:
        cc.restore(path)
    assert isinstance(e.value, cc.CorruptCheckpointError) and (e.value.leaf, e.value.chunk) == ("p/w", "1.0")
    assert "on disk" not in str(e.value) and re.search(rf"crc32c {HEX}\)$", str(e.value))
    (problem,) = cc.verify(path).problems
    assert problem == VerifyProblem(kind="missing", leaf="p/w", chunk="1.0", message=str(e.value))
    assert str(problem) == problem.message
    (shown,) = _cli_verify(path, capsys)
    assert set(shown) == {f.name for f in dataclasses.fields(VerifyProblem)}  # the --json entry's fields
    assert (shown["kind"], shown["leaf"], shown["chunk"]) == ("missing", "p/w", "1.0")


def test_a_flipped_byte_prints_crc32c_in_hex_everywhere(tmp_path):
    path = tmp_path / "ckpt"
    cc.save(str(path), {"w": np.arange(1, 9, dtype=np.int64)}, pack_bytes=0)
    chunk = path / "state" / "w" / "c" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[0] ^= 1
    chunk.write_bytes(raw)
    with pytest.raises(cc.CorruptCheckpointError, match=rf"crc32c {HEX} read, {HEX} in the manifest") as e:
        cc.restore(str(path))
    assert not isinstance(e.value, MissingFileError)
    assert [(p.kind, p.leaf, p.chunk) for p in cc.verify(str(path)).problems] == [("corrupt", "w", "0")]
    meta = path / "metadata.json"
    meta.write_text(meta.read_text().replace('"step"', ' "step"', 1))
    with pytest.raises(cc.CorruptCheckpointError, match=rf"crc32c {HEX} read, {HEX} in the commit marker"):
        cc.restore(str(path))


def test_deleted_and_truncated_pack_files_and_manifests(tmp_path):
    path = tmp_path / "ckpt"
    cc.save(str(path), {"a": np.arange(1, 9, dtype=np.int64)})  # small: packed
    pack = path / "state" / "pack.0-0"
    pack.write_bytes(pack.read_bytes()[:10])
    assert [(p.kind, p.leaf, p.chunk) for p in cc.verify(str(path)).problems] == [("corrupt", "a", "0")]
    pack.unlink()
    with pytest.raises(MissingFileError, match=r"leaf 'a' chunk 0 .*pack\.0-0 is missing"):
        cc.restore(str(path))
    assert [(p.kind, p.leaf, p.chunk) for p in cc.verify(str(path)).problems] == [("missing", "a", "0")]
    (path / "state" / "manifest.json").unlink()
    (problem,) = cc.verify(str(path)).problems
    assert (problem.kind, problem.leaf) == ("missing", None) and "manifest.json" in problem.message


def test_the_process_layout_tells_missing_from_truncated(tmp_path, capsys):
    path = tmp_path / "ckpt"
    cc.save(str(path), {"a": np.arange(1, 9, dtype=np.int64)}, layout="process")
    data = path / "state" / "pack.0-0"
    data.write_bytes(data.read_bytes()[:10])
    assert [(p.kind, p.leaf, p.chunk) for p in cc.verify(str(path)).problems] == [("corrupt", "a", "0")]
    data.unlink()
    with pytest.raises(MissingFileError, match=r"leaf 'a' chunk 0 .*pack\.0-0 is missing"):
        cc.restore(str(path))
    problems = cc.verify(str(path)).problems
    assert [(p.kind, p.leaf, p.chunk) for p in problems] == [("missing", "a", "0")]
    assert [dataclasses.asdict(p) for p in problems] == _cli_verify(str(path), capsys)  # one report, two views
    (path / "state" / "index.0").unlink()
    (problem,) = cc.verify(str(path)).problems
    assert (problem.kind, problem.leaf) == ("missing", None) and "index.0" in problem.message


def test_a_problem_is_a_frozen_typed_record():
    problem = VerifyProblem(kind="corrupt", leaf="w", chunk="0", message="bad")
    with pytest.raises(dataclasses.FrozenInstanceError):
        problem.kind = "missing"  # type: ignore[misc]
    with pytest.raises(ValueError, match="kind 'gone'"):
        VerifyProblem(kind="gone", message="x")  # type: ignore[arg-type]


# ---------------------------------------------------------------- a donated array names its leaf
def _state():
    return {"params": {"w": jnp.arange(4.0), "b": jnp.zeros(2)}, "step": 3}


def test_a_donated_state_is_refused_naming_the_leaf_and_nothing_is_written(tmp_path):
    state = _state()
    train_step = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
    new_state = train_step(state)
    for save in (cc.save, lambda p, s: cc.save_async(p, s).wait()):
        with pytest.raises(DeletedArrayError, match=r"leaves 'params/b', 'params/w': .*donated") as e:
            save(str(tmp_path / "ckpt"), state)
        assert isinstance(e.value, ValueError) and "pass the new state" in str(e.value)
        assert not (tmp_path / "ckpt").exists()  # not even a claim
    cc.save(str(tmp_path / "ckpt"), new_state)  # the state the step returned saves
    assert cc.restore(str(tmp_path / "ckpt"))["params"]["w"].tolist() == [1.0, 2.0, 3.0, 4.0]


def test_a_deleted_leaf_never_touches_what_is_there(tmp_path):
    path = tmp_path / "ckpt"
    cc.save(str(path), _state())
    before = sorted(p.name for p in path.iterdir())
    state = _state()
    state["params"]["w"].delete()
    with pytest.raises(DeletedArrayError, match=r"^leaf 'params/w': the jax\.Array was deleted"):
        cc.save(str(path), state, overwrite=True)
    assert sorted(p.name for p in path.iterdir()) == before
    assert cc.restore(str(path))["params"]["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_a_checkpointer_refuses_a_donated_state_and_keeps_its_checkpoints(tmp_path):
    base = tmp_path / "run"
    with cc.Checkpointer(str(base)) as ck:
        ck.on_step(_state(), step=1, force=True)
        ck.wait_until_finished()
        state = _state()
        jax.jit(lambda b: b + 1, donate_argnums=0)(state["params"]["b"])
        with pytest.raises(DeletedArrayError, match=r"leaf 'params/b'.*donated"):
            ck.on_step(state, step=2, force=True)
        assert ck.on_step(_state(), step=2, force=True)  # the step is still due: nothing counted it saved
    assert [c.step for c in cc.list_checkpoints(str(base))] == [1, 2]
