"""docs/extending.md's worked example of a source, run as written; the seams' registries, and
what they refuse (careless plug-ins: a greedy source, a bad manifest, names that are not names)."""

from __future__ import annotations

import pathlib
import re

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import ckpt_callbacks as cc
from ckpt_callbacks import format as fmt
from ckpt_callbacks import layouts, restoring, storage
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
    assert [s.name for s in restoring.sources()] == ["orbax", "safetensors", "npy-dir"]
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
    with pytest.raises(
        cc.CheckpointNotFoundError,
        match=r"also tried as: orbax \(not one\), safetensors \(not one\), npy-dir \(not one\)",
    ):
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


class _Greedy:
    """A source that claims every directory (a careless plug-in)."""

    name = "greedy"

    def __init__(self, manifest=None, result=None):
        self.manifest, self.result = manifest, result

    def open(self, loc, item):
        if self.result is not None:
            return self.result
        tree, flat = fmt.flatten({"FOREIGN": np.zeros(2, np.float32)})
        records = self.manifest or tuple(
            fmt.LeafRecord(path=p, kind="array", source="numpy", shape=(2,), dtype="float32", stored_dtype="float32",
                           zarr_dtype="float32", chunks=(2,))
            for p, _ in flat
        )  # fmt: skip
        return restoring.Located(loc, fmt.Manifest(tree=tree, leaves=records), lambda r, t, w: [np.ones(2)] * len(r))


@pytest.fixture
def greedy():
    source = _Greedy()
    restoring.register_source(source)
    yield source
    restoring.unregister_source("greedy")


def test_a_checkpoint_of_ours_without_the_item_is_never_read_from_another_source(greedy, tmp_path):
    cc.save_items(tmp_path, {"model": {"w": np.zeros(2, np.float32)}})
    for item in ("state", "modle"):
        with pytest.raises(cc.CheckpointNotFoundError, match=rf"no item '{item}'") as caught:
            cc.restore(tmp_path, item=item)
        assert "also tried" not in str(caught.value)
    assert set(cc.restore(tmp_path, item="model")) == {"w"}
    assert set(cc.restore(tmp_path / "elsewhere")) == {"FOREIGN"}  # no marker there: the source's


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.lists(st.integers(-3, 4), max_size=3),
    chunks=st.lists(st.integers(-1, 4), max_size=3),
    dtype=st.sampled_from(["float32", "int8", "float128", "", "object"]),
)
def test_a_foreign_manifest_is_checked_before_the_engine_uses_it(tmp_path, shape, chunks, dtype):
    record = fmt.LeafRecord(path=("FOREIGN",), kind="array", source="numpy", shape=tuple(shape), dtype=dtype,
                            stored_dtype=dtype, zarr_dtype=dtype, chunks=tuple(chunks))  # fmt: skip
    source = _Greedy(manifest=(record,))
    source.open = lambda loc, item: restoring.Located(  # values of the right shape when the record is sound
        loc,
        fmt.Manifest(tree={"dict": [["FOREIGN", {"leaf": 0}]]}, leaves=(record,)),
        lambda r, t, w: [np.zeros(tuple(shape), dtype or None)],
    )
    restoring.register_source(source)
    try:
        sound = all(n >= 0 for n in shape) and len(chunks) == len(shape)
        sound = sound and all(c >= 1 or (c == 0 and n == 0) for n, c in zip(shape, chunks, strict=False))
        sound = sound and dtype in ("float32", "int8")
        if sound:
            assert cc.restore(tmp_path)["FOREIGN"].shape == tuple(shape)
        else:
            with pytest.raises(cc.CheckpointFormatError, match=r"read as 'greedy'"):
                cc.restore(tmp_path)
    finally:
        restoring.unregister_source("greedy")


@pytest.mark.parametrize(
    "result", ["not a Located", restoring.Located(None, "not a manifest", len)], ids=["str", "manifest"]
)
def test_a_source_returning_something_else_is_refused_by_name(tmp_path, result):
    restoring.register_source(_Greedy(result=result))
    try:
        with pytest.raises(cc.CheckpointFormatError, match=r"source 'greedy' returned"):
            cc.restore(tmp_path)
    finally:
        restoring.unregister_source("greedy")


def test_a_foreign_tree_naming_a_missing_leaf_is_refused(tmp_path):
    located = restoring.Located(None, fmt.Manifest(tree={"dict": [["x", {"leaf": 7}]]}, leaves=()), len)
    restoring.register_source(_Greedy(result=located))
    try:
        with pytest.raises(cc.CheckpointFormatError, match="read as 'greedy'"):
            cc.restore(tmp_path)
    finally:
        restoring.unregister_source("greedy")


class _Named:
    def __init__(self, **fields):
        self.__dict__.update(fields)

    def open(self, loc, item):
        return None


@pytest.mark.parametrize("kind", [None, "", "mine", 3, ("zarr3",)])
def test_a_layout_the_format_does_not_know_is_refused_at_registration(kind):
    before = layouts.kinds()
    with pytest.raises(ValueError, match="format v1 manifests record only the layouts"):
        layouts.register_layout(_Named(kind=kind))
    assert layouts.kinds() == before


@pytest.mark.parametrize("layout", [None, 3, "", "zarr2"])
def test_save_options_take_only_registered_layout_names(layout):
    with pytest.raises(ValueError, match=r"layout must be one of \('zarr3', 'process'\)"):
        cc.SaveOptions(layout=layout)


@pytest.mark.parametrize("name", [None, "", 3])
def test_a_source_without_a_name_is_refused(name):
    with pytest.raises(ValueError, match="non-empty str name"):
        restoring.register_source(_Named(name=name))
    assert [s.name for s in restoring.sources()] == ["orbax", "safetensors"]


@pytest.mark.parametrize("scheme", [None, "", "a:b", "3d", "s 3"])
def test_a_backend_whose_scheme_is_not_a_url_scheme_is_refused(scheme):
    before = storage.schemes()
    with pytest.raises(ValueError, match="must be a URL scheme"):
        storage.register_backend(_Named(scheme=scheme))
    assert storage.schemes() == before
