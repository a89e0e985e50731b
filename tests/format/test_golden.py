"""Golden format-v1 checkpoints (``tests/golden/v1``, written before the package was layered):
every one restores bit-exact and verifies. They guard every refactor and every later version.
"""

from __future__ import annotations

import hashlib
import pathlib
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from golden import state
from jax.sharding import PartitionSpec as P

import ckpt_callbacks as cc

GOLDEN = pathlib.Path(__file__).resolve().parent.parent / "golden" / "v1"
ONE_PROCESS = ("zarr3-packed", "zarr3-arrays", "process-1p")
TWO_PROCESSES = ("zarr3-2p", "process-2p")


def test_every_golden_byte_is_as_committed():
    """Nothing (a test, a reader, a regeneration) has changed a golden file."""
    listed = {}
    for line in (GOLDEN / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        listed[name] = digest
    present = {p.relative_to(GOLDEN).as_posix() for p in GOLDEN.rglob("*") if p.is_file()} - {"SHA256SUMS"}
    assert present == set(listed)
    for name, digest in listed.items():
        assert hashlib.sha256((GOLDEN / name).read_bytes()).hexdigest() == digest, name
    assert len(listed) > 60


@pytest.fixture
def golden(tmp_path):
    """A copy of one golden checkpoint: a reader that wrote into it could not hide it."""

    def copy(name: str) -> str:
        target = tmp_path / name
        shutil.copytree(GOLDEN / name, target)
        return str(target)

    return copy


def _same(restored, expected, where: str) -> None:
    if isinstance(expected, dict):
        assert isinstance(restored, dict) and set(restored) == set(expected), where
        for key in expected:
            _same(restored[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, list):
        assert list(restored) == expected, where
    elif isinstance(expected, np.ndarray | np.generic):
        got = np.asarray(restored)
        assert got.dtype == expected.dtype and got.shape == np.shape(expected), where
        assert got.tobytes() == np.asarray(expected).tobytes(), where
    else:
        assert type(restored) is type(expected) and restored == expected, where


@pytest.mark.parametrize("name", ONE_PROCESS)
def test_items_restore_bit_exact(golden, name):
    path = golden(name)
    expected = state.items()
    for item in ("optimizer", "loader"):
        _same(cc.restore(path, item=item), expected[item], item)
    restored = cc.restore(path)
    rng = restored.pop("rng")
    assert jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    assert str(jax.random.key_impl(rng)) == str(jax.random.key_impl(expected["state"]["rng"]))
    _same(np.asarray(jax.random.key_data(rng)), state.key_data(), "state/rng")
    del expected["state"]["rng"]
    _same(restored, expected["state"], "state")
    assert np.asarray(restored["params"]["embed"]).dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize("name", ONE_PROCESS + TWO_PROCESSES)
def test_golden_verifies_and_lists(golden, name):
    path = golden(name)
    report = cc.verify(path)
    assert report.ok, report
    checkpoint = cc.open_checkpoint(path)
    assert checkpoint.metadata.step == (12 if name in TWO_PROCESSES else 900)
    if name not in TWO_PROCESSES:
        assert checkpoint.metadata.extras == {"loss": 0.25, "tag": name}
    expected_items = {"state"} if name in TWO_PROCESSES else {"state", "optimizer", "loader"}
    assert set(checkpoint.items) == expected_items
    if name not in TWO_PROCESSES:
        assert cc.list_checkpoints(str(pathlib.Path(path).parent))[0].step == 900


@pytest.mark.parametrize("name", TWO_PROCESSES)
@pytest.mark.parametrize("mesh_shape", [(8,), (2, 2)])
def test_two_process_save_restores_onto_one_process_meshes(golden, name, mesh_shape, request):
    from conftest import make_mesh

    mesh = make_mesh(mesh_shape, ("x", "y")[: len(mesh_shape)])
    rules = [("w", P("x")), ("part", P("y") if len(mesh_shape) == 2 else P()), (".*", P())]
    restored = cc.restore(golden(name), mesh=mesh, rules=rules)
    expected = state.sharded_values()
    for key in ("w", "part", "rep"):
        _same(np.asarray(restored[key]), expected[key], key)
        assert restored[key].sharding.mesh.shape == mesh.shape
    assert restored["step"] == 12 and restored["name"] == "two processes"
    assert restored["w"].sharding.spec == P("x")


def test_golden_checkpoints_are_found_by_step(golden):
    for name in ONE_PROCESS:
        golden(name)
    root = pathlib.Path(golden("zarr3-2p")).parent
    assert {info.step for info in cc.list_checkpoints(str(root))} == {900, 12}


@pytest.mark.parametrize("name", ("zarr3-packed", "process-2p"))
def test_inverted_bytes_in_any_golden_data_file_are_caught(golden, name):
    """The golden checks can fail: any chunk or pack file with its bytes inverted fails ``verify``."""
    path = pathlib.Path(golden(name))
    data_files = [p for p in path.rglob("*") if p.is_file() and not p.name.endswith(".json") and p.name != "COMMITTED"]
    assert data_files
    for file in data_files:
        original = file.read_bytes()
        file.write_bytes(bytes(b ^ 0xFF for b in original))
        try:
            report = cc.verify(str(path))
            assert not report.ok, file
        except cc.CheckpointError:
            pass
        finally:
            file.write_bytes(original)
    assert cc.verify(str(path)).ok
