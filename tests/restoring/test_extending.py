"""docs/extending.md's worked example of a source, run as written; and the seams' registries."""

from __future__ import annotations

import pathlib
import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import ckpt_callbacks as cc
from ckpt_callbacks import layouts, restoring
from conftest import make_mesh

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "extending.md"


def _source_example() -> str:
    section = DOC.read_text().split("## A source", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    return blocks[0]


@pytest.fixture
def npy_source():
    namespace: dict = {}
    exec(compile(_source_example(), str(DOC), "exec"), namespace)  # our own doc, not a checkpoint
    yield namespace["NpyDirSource"]
    restoring.unregister_source("npy-dir")


def test_the_documented_source_restores_a_foreign_directory(npy_source, tmp_path):
    w, b = np.arange(32, dtype=np.float32).reshape(8, 4), np.ones(3, np.int32)
    np.save(tmp_path / "w.npy", w)
    np.save(tmp_path / "b.npy", b)
    assert [s.name for s in restoring.sources()] == ["orbax", "npy-dir"]
    plain = cc.restore(tmp_path)
    np.testing.assert_array_equal(plain["w"], w)
    np.testing.assert_array_equal(plain["b"], b)
    mesh = make_mesh((4,), ("x",))
    tree = cc.restore(tmp_path, mesh=mesh, rules=[("w", P("x", None)), (".*", P())], keys=["w"])
    assert set(tree) == {"w"} and tree["w"].sharding.spec == P("x", None)
    np.testing.assert_array_equal(np.asarray(tree["w"]), w)
    template = {"w": jax.ShapeDtypeStruct((8, 4), np.float32), "b": np.zeros(3, np.int32)}
    with pytest.raises(cc.RestoreMismatchError, match="shape mismatch at 'w'"):
        cc.restore(tmp_path, template={**template, "w": jax.ShapeDtypeStruct((4, 8), np.float32)})


def test_a_refusal_names_every_source_tried(npy_source, tmp_path):
    with pytest.raises(cc.CheckpointNotFoundError, match=r"also tried as: orbax \(not one\), npy-dir \(not one\)"):
        cc.restore(tmp_path)


def test_our_own_format_is_tried_first(npy_source, tmp_path):
    cc.save(tmp_path, {"w": np.zeros(2, np.float32)})
    np.save(tmp_path / "w.npy", np.ones(5, np.float32))  # a stray .npy beside our checkpoint is not read
    assert cc.restore(tmp_path)["w"].shape == (2,)


def test_a_source_that_raises_fails_the_restore(tmp_path):
    class Broken:
        name = "broken"

        def open(self, loc, item):
            raise cc.CheckpointFormatError(f"{loc.url}: mine, but broken")

    restoring.register_source(Broken())
    try:
        with pytest.raises(cc.CheckpointFormatError, match="mine, but broken"):
            cc.restore(tmp_path)
        with pytest.raises(ValueError, match="registered already"):
            restoring.register_source(Broken())
    finally:
        restoring.unregister_source("broken")
    with pytest.raises(KeyError, match="no source named 'broken'"):
        restoring.unregister_source("broken")


def test_layouts_are_found_by_kind_and_unknown_kinds_are_refused(tmp_path):
    assert layouts.kinds() == ("zarr3", "process")
    with pytest.raises(ValueError, match=r"layout must be one of \('zarr3', 'process'\), got 'zarr2'"):
        cc.SaveOptions(layout="zarr2")
    with pytest.raises(ValueError, match="registered already"):
        layouts.register_layout(layouts.layout_for("zarr3"))
    for kind in layouts.kinds():
        cc.save(tmp_path / kind, {"w": np.arange(6.0)}, layout=kind)
        manifest = cc.open_checkpoint(tmp_path / kind).manifest("state")
        assert layouts.of_manifest(manifest).kind == kind
        assert cc.verify(tmp_path / kind).ok
