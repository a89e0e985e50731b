"""Restoring: resharding onto other meshes, templates, strictness, subsets, checksums."""

from __future__ import annotations

import collections
import json
import os
import pathlib

import flax.linen as nn
import http_proxy
import jax
import jax.numpy as jnp
import numpy as np
import object_stores
import optax
import pytest
from flax import nnx
from flax.training import train_state
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import ckpt_callbacks as cc
from ckpt_callbacks import storage as paths
from conftest import assert_tree_equal, make_mesh, put


def _state(mesh):
    return {
        "w": put(jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16), mesh, P("x", "y")),
        "b": put(jnp.arange(16, dtype=jnp.bfloat16), mesh, P("y")),
        "rep": put(jnp.arange(8 * 64 * 64, dtype=jnp.float32).reshape(8, 64, 64) * 0.5, mesh, P()),
        "part": put(jnp.arange(64, dtype=jnp.int32).reshape(8, 8), mesh, P(None, "x")),
        "key": put(jax.random.split(jax.random.key(0), 8), mesh, P("x")),
        "step": 11,
    }


TARGETS = {
    "(2,4)": ((2, 4), ("x", "y")),
    "(8,1)": ((8, 1), ("x", "y")),
    "(1,8)": ((1, 8), ("x", "y")),
    "(1,1)": ((1, 1), ("x", "y")),
    "2 devices": ((2,), ("x",)),
}


@pytest.mark.parametrize("target", TARGETS)
def test_reshard_with_mesh_and_saved_specs(url, mesh42, target):
    state = _state(mesh42)
    cc.save(url, state)
    shape, names = TARGETS[target]
    mesh = make_mesh(shape, names)
    if "y" not in names:
        with pytest.raises(
            cc.ShardingRuleError, match=r"leaf 'b': dim 0 uses mesh axis 'y', but the mesh has axes \('x',\)"
        ):
            cc.restore(url, mesh=mesh)
        rules = [("w|part", P("x")), ("b", P()), ("rep", P(None, "x")), ("key", P("x"))]
        restored = cc.restore(url, mesh=mesh, rules=rules)
        assert restored["w"].sharding == NamedSharding(mesh, P("x"))
    else:
        restored = cc.restore(url, mesh=mesh)
        assert restored["w"].sharding.spec == P("x", "y") and restored["w"].sharding.mesh == mesh
    assert_tree_equal(restored, state)


def test_reshard_with_rules_and_templates(url, mesh42):
    state = _state(mesh42)
    cc.save(url, state)
    mesh = make_mesh((2, 4))
    rules = [("rep", P("y", "x")), ("key", P("y")), (".*", P())]
    restored = cc.restore(url, mesh=mesh, rules=rules)
    assert restored["rep"].sharding.spec == P("y", "x")
    assert restored["w"].sharding.spec == P()
    assert_tree_equal(restored, state)
    shardings = cc.shardings_from_rules(mesh, rules, state)
    template = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) if hasattr(x, "shape") else x, state, shardings
    )
    from_template = cc.restore(url, template=template)
    assert from_template["rep"].sharding == NamedSharding(mesh, P("y", "x"))
    assert_tree_equal(from_template, state)


def test_replicated_to_sharded_and_back(url, mesh42):
    value = jnp.arange(8 * 32, dtype=jnp.float32).reshape(8, 32)
    cc.save(url, {"a": put(value, mesh42, P())})
    sharded = cc.restore(url, shardings=NamedSharding(mesh42, P("x", "y")))
    assert sharded["a"].sharding.spec == P("x", "y")
    np.testing.assert_array_equal(np.asarray(sharded["a"]), np.asarray(value))
    other = url + "-2" if url.startswith("memory") else url + "2"
    cc.save(other, sharded)
    replicated = cc.restore(other, mesh=make_mesh((8,), ("x",)), rules=[(".*", P())])
    assert replicated["a"].sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(replicated["a"]), np.asarray(value))


def test_default_target_is_one_device_and_numpy_stays_numpy(url, mesh42):
    cc.save(url, {"j": put(jnp.ones((8, 2)), mesh42, P("x")), "n": np.ones(3)})
    restored = cc.restore(url)
    assert isinstance(restored["j"].sharding, SingleDeviceSharding)
    assert type(restored["n"]) is np.ndarray


def test_linen_train_state_template(url, mesh42):
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(nn.relu(nn.Dense(8)(x)))

    model = MLP()
    params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adamw(1e-3))
    grads = jax.tree.map(jnp.ones_like, state.params)
    state = state.apply_gradients(grads=grads)
    cc.save(url, state, step=1)
    fresh = train_state.TrainState.create(
        apply_fn=model.apply, params=jax.tree.map(jnp.zeros_like, params), tx=optax.adamw(1e-3)
    )
    restored = cc.restore(url, template=fresh)
    assert type(restored) is train_state.TrainState and restored.apply_fn == fresh.apply_fn
    assert restored.step == 1
    assert_tree_equal(restored.params, state.params)
    assert_tree_equal(restored.opt_state, state.opt_state)
    plain = cc.restore(url)  # without a template: nested dicts
    assert set(plain) == {"step", "params", "opt_state"}
    np.testing.assert_array_equal(plain["params"]["Dense_0"]["kernel"], state.params["Dense_0"]["kernel"])


def test_nnx_state_template_with_rng_keys(url):
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(4, 8, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)

    model = Model(nnx.Rngs(0, dropout=1))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    tree = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
    cc.save(url, tree)
    other = Model(nnx.Rngs(5, dropout=9))
    other_opt = nnx.Optimizer(other, optax.adam(1e-3), wrt=nnx.Param)
    template = {"model": nnx.state(other), "optimizer": nnx.state(other_opt)}
    restored = cc.restore(url, template=template)
    nnx.update(other, restored["model"])
    nnx.update(other_opt, restored["optimizer"])
    assert_tree_equal(nnx.state(other), nnx.state(model))
    abstract = nnx.state(nnx.eval_shape(lambda: Model(nnx.Rngs(0, dropout=1))))
    assert_tree_equal(cc.restore(url, template={"model": abstract}, keys=["model"])["model"], nnx.state(model))


def test_optax_state_template(url):
    params = {"w": jnp.ones((3, 3)), "b": jnp.zeros(3)}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    opt_state = tx.init(params)
    _, opt_state = tx.update(params, opt_state, params)
    cc.save(url, opt_state)
    restored = cc.restore(url, template=tx.init(jax.tree.map(jnp.zeros_like, params)))
    assert type(restored[1][0]).__name__ == "ScaleByAdamState"
    assert_tree_equal(restored, opt_state)


def test_strict_lists_every_offending_path(url):
    cc.save(url, {"a": np.zeros((2, 3)), "b": np.zeros(4), "extra": np.zeros(1)})
    template = {"a": np.zeros((2, 4)), "b": np.zeros(4), "missing": np.zeros(2)}
    with pytest.raises(cc.RestoreMismatchError) as info:
        cc.restore(url, template=template)
    message = str(info.value)
    assert "shape mismatch at 'a': (2, 4) in template, (2, 3) on disk" in message
    assert "missing on disk: 'missing'" in message
    assert "unexpected on disk (not in template): 'extra'" in message
    loose = cc.restore(url, template={"b": np.ones(4), "missing": np.full(2, 7.0)}, strict=False)
    np.testing.assert_array_equal(loose["b"], np.zeros(4))
    np.testing.assert_array_equal(loose["missing"], np.full(2, 7.0))  # kept, as documented


def test_keys_restore_a_subset(url):
    cc.save(url, {"params": {"w": np.ones(2), "b": np.zeros(2)}, "opt": {"mu": np.ones(3)}, "step": 4})
    assert cc.restore(url, keys=["params/w", "step"]) == {"params": {"w": pytest.approx(np.ones(2))}, "step": 4}
    with pytest.raises(cc.RestoreMismatchError, match=r"no leaf under key 'nope'; top-level keys: \['opt'"):
        cc.restore(url, keys=["nope"])


def test_dtype_cast_on_restore(url):
    cc.save(url, {"f": np.ones(3, np.float32), "i": np.arange(3)})
    restored = cc.restore(url, dtype=jnp.bfloat16)
    assert restored["f"].dtype == jnp.bfloat16 and restored["i"].dtype == np.arange(3).dtype


def _chunk_files(root):
    for dirpath, _, files in os.walk(root):
        for name in files:
            if "/c" in dirpath.replace(root, "") and name != "zarr.json":
                yield os.path.join(dirpath, name)


def _corruption_tree(mesh):
    rng = np.random.default_rng(0)
    return {"w": put(jnp.asarray(rng.normal(size=(8, 16)), jnp.float32), mesh, P("x", "y")), "n": rng.normal(size=(5,))}


def test_flipped_byte_in_any_chunk_is_detected(tmp_path, mesh42):
    path = str(tmp_path / "ckpt")
    cc.save(path, _corruption_tree(mesh42), pack_bytes=0)  # every leaf its own zarr3 array
    files = sorted(_chunk_files(path))
    assert len(files) == 9
    for victim in files:
        raw = bytearray(pathlib.Path(victim).read_bytes())
        raw[len(raw) // 2] ^= 0x40
        pathlib.Path(victim).write_bytes(raw)
        leaf = "n" if "/state/n/" in victim else "w"
        with pytest.raises(cc.CorruptCheckpointError, match=rf"leaf '{leaf}' chunk [0-9.]+ .*crc32c"):
            cc.restore(path)
        report = cc.verify(path)
        assert not report.ok and len(report.problems) == 1 and f"leaf '{leaf}'" in report.problems[0].message
        raw[len(raw) // 2] ^= 0x40
        pathlib.Path(victim).write_bytes(raw)
    assert cc.verify(path).ok and cc.verify(path).chunks == 9


def test_flipped_byte_in_any_packed_chunk_is_detected(tmp_path, mesh42):
    path = tmp_path / "ckpt"
    cc.save(str(path), _corruption_tree(mesh42))  # small leaves: packed, chunk by chunk
    assert not list(_chunk_files(str(path)))
    manifest = json.loads((path / "state" / "manifest.json").read_text())
    packed = [(leaf["path"][0], chunk, where) for leaf in manifest["leaves"] for chunk, where in leaf["pack"].items()]
    assert len(packed) == 9 and {where[0] for _, _, where in packed} == {"pack.0-0"}
    pack = path / "state" / "pack.0-0"
    for leaf, chunk, (_, offset) in packed:
        raw = bytearray(pack.read_bytes())
        raw[offset + 1] ^= 0x40
        pack.write_bytes(raw)
        with pytest.raises(cc.CorruptCheckpointError, match=rf"leaf '{leaf}' chunk {chunk} .*crc32c"):
            cc.restore(str(path))
        report = cc.verify(str(path))
        (problem,) = report.problems
        assert not report.ok and f"leaf '{leaf}' chunk {chunk}" in problem.message
        raw[offset + 1] ^= 0x40
        pack.write_bytes(raw)
    assert cc.verify(str(path)).ok and cc.verify(str(path)).chunks == 9


def test_deleted_chunk_is_detected(tmp_path):
    path = str(tmp_path / "ckpt")
    cc.save(path, {"w": np.arange(1, 9, dtype=np.int64)}, pack_bytes=0)
    os.remove(next(_chunk_files(path)))
    with pytest.raises(cc.CorruptCheckpointError, match="leaf 'w' chunk 0"):
        cc.restore(path)


def test_deleted_or_truncated_pack_file_is_detected(tmp_path):
    path = tmp_path / "ckpt"
    cc.save(str(path), {"a": np.arange(1, 9, dtype=np.int64), "b": np.ones(3, np.float32)})
    pack = path / "state" / "pack.0-0"
    raw = pack.read_bytes()
    pack.write_bytes(raw[:70])  # "a" (64 bytes at 0) intact, "b" (at 64) cut short
    with pytest.raises(cc.CorruptCheckpointError, match="leaf 'b' chunk 0 could not be read"):
        cc.restore(str(path))
    np.testing.assert_array_equal(cc.restore(str(path), keys=["a"])["a"], np.arange(1, 9))
    pack.unlink()
    with pytest.raises(cc.CorruptCheckpointError, match=r"leaf 'a' chunk 0 .*pack file .*pack.0-0 is missing"):
        cc.restore(str(path))


def test_unknown_version_is_refused(url):
    cc.save(url, {"a": np.zeros(1)})
    loc = paths.parse(url)
    marker = paths.read_bytes(loc, "COMMITTED").replace(b'"version": 1', b'"version": 2')
    paths.write_bytes(loc, "COMMITTED", marker)
    with pytest.raises(cc.CheckpointFormatError, match="format version 2; this reader supports version 1"):
        cc.restore(url)


def test_sharding_rule_errors_name_leaf_dim_axis_and_sizes(mesh42):
    tree = {"w": np.zeros((6, 4)), "s": np.zeros(()), "v": np.zeros(3)}
    with pytest.raises(
        cc.ShardingRuleError,
        match=r"leaf 'w': dim 0 of size 6 is not divisible by mesh axes "
        r"\('x',\) of total size 4",
    ):
        cc.shardings_from_rules(mesh42, [("w", P("x")), (".*", P())], tree)
    with pytest.raises(
        cc.ShardingRuleError,
        match=r"leaf 'v': rule 'v' gives .* for 2 dims, but the leaf has "
        r"rank 1 \(shape \(3,\)\)",
    ):
        cc.shardings_from_rules(mesh42, [("v", P("x", "y")), (".*", P())], tree)
    with pytest.raises(cc.ShardingRuleError, match=r"leaf 'w': dim 1 uses mesh axis 'z', but the mesh has axes"):
        cc.shardings_from_rules(mesh42, [("w", P(None, "z")), (".*", P())], tree)
    with pytest.raises(cc.ShardingRuleError, match=r"leaf 'v' \(shape \(3,\)\): no partition rule matches"):
        cc.match_partition_rules([("w", P())], tree)
    specs = cc.match_partition_rules([("w", P(None, "y")), (".*", P("x"))], tree)
    assert specs == {"w": P(None, "y"), "s": P(), "v": P("x")}


def test_restore_rules_errors_happen_before_reading(url, mesh42):
    cc.save(url, {"w": put(jnp.ones((8, 6)), mesh42, P("x"))})
    with pytest.raises(cc.ShardingRuleError, match=r"leaf 'w': dim 1 of size 6 is not divisible"):
        cc.restore(url, mesh=mesh42, rules=[(".*", P(None, "x"))])


def test_missing_checkpoint_errors(url):
    with pytest.raises(cc.CheckpointNotFoundError, match="no committed checkpoint at"):
        cc.restore(url)


def test_list_and_latest_order_by_step_not_timestamp(url):
    base = url
    for step in (10, 5, 7):  # run-5 is written after run-10
        cc.save(f"{base}/run-{step}", {"a": np.full(1, step)}, step=step)
    paths.write_bytes(paths.parse(f"{base}/run-99/state"), "manifest.json", b"{}")  # never committed
    infos = cc.list_checkpoints(base)
    assert [i.step for i in infos] == [5, 7, 10]
    assert infos[0].timestamp > infos[1].timestamp or True  # timestamps are informational only
    assert cc.find_latest_checkpoint(base).endswith("/run-10")
    assert cc.find_latest_checkpoint(base + "/nothing-here") is None


def test_64_bit_leaves_are_not_silently_narrowed(url):
    cc.save(url, {"i": np.array([2**40], np.int64)})
    with pytest.raises(cc.RestoreMismatchError, match=r"leaf 'i' is int64 but jax_enable_x64 is off"):
        cc.restore(
            url, template={"i": jax.ShapeDtypeStruct((1,), np.int64, sharding=SingleDeviceSharding(jax.devices()[0]))}
        )
    assert cc.restore(url)["i"].tolist() == [2**40]  # as numpy, exact


def test_restore_of_the_latest_reads_each_json_file_once_on_s3(s3_endpoint, monkeypatch):
    base = f"s3://{object_stores.BUCKET}/gets-{os.getpid()}"
    ck = cc.Checkpointer(base, step_policies=[cc.CheckpointInterval(every=1)])
    for step in (1, 2, 3):
        ck.on_step({"w": jnp.full((4,), step, jnp.float32), "n": step}, step=step)
    ck.close()
    with http_proxy.recording_proxy(s3_endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", http_proxy.endpoint(proxy))
        reader = cc.Checkpointer(base)
        tree, meta = reader.restore()
        reader.close()
    assert meta["step"] == 3 and tree["w"].tolist() == [3.0] * 4
    gets = collections.Counter(path.split("?")[0] for method, path in proxy.requests if method == "GET")
    json_gets = {p: n for p, n in gets.items() if p.endswith((".json", "/COMMITTED"))}
    # Each checkpoint's marker and metadata once (the listing), the restored one's manifest once,
    # and the markers of the base and of its parents once each (a Checkpointer refuses a base that
    # is, or lies inside, a checkpoint).
    base_path = "/" + base.split("://", 1)[1]
    parts = base_path.strip("/").split("/")
    ancestors = {"/" + "/".join(parts[:n]) + "/COMMITTED" for n in range(1, len(parts) + 1)}
    assert f"{base_path}/COMMITTED" in json_gets, json_gets
    rest = {p: n for p, n in json_gets.items() if p not in ancestors}
    assert len(rest) == 7 and set(json_gets.values()) == {1}, json_gets


def test_restored_arrays_are_independent_even_where_they_share_read_buffers(tmp_path, mesh42):
    """On local disk a region is read once into an aligned buffer that JAX on CPU takes without a
    copy, so the shards of a replicated leaf share it: donating the restored arrays to a jitted
    step must change neither the other arrays, nor the numpy leaves, nor a second restore."""
    rng = np.random.default_rng(0)
    full = rng.standard_normal((64, 32)).astype(np.float32)
    state = {"rep": put(full, mesh42, P()), "sharded": put(full, mesh42, P("x", "y")), "host": full.copy()}
    cc.save(str(tmp_path / "c"), state)
    first = cc.restore(str(tmp_path / "c"), mesh=mesh42)
    keep = cc.restore(str(tmp_path / "c"), mesh=mesh42)
    shards = [np.asarray(s.data) for s in first["rep"].addressable_shards]
    step = jax.jit(lambda r, s: (r * 0 - 1, s * 0 - 1), donate_argnums=(0, 1))
    out = step(first["rep"], first["sharded"])
    jax.block_until_ready(out)
    assert all((np.asarray(x) == -1).all() for x in out)
    for shard in shards:
        np.testing.assert_array_equal(shard, full)
    assert_tree_equal(keep, state)
    assert_tree_equal(cc.restore(str(tmp_path / "c"), mesh=mesh42), state)
    host = keep["host"]
    host[0, 0] = 123.0  # numpy leaves come back as ordinary writable arrays of their own
    assert cc.restore(str(tmp_path / "c"), keys="host")["host"][0, 0] == full[0, 0]


def test_a_fifo_or_directory_where_a_chunk_file_was_is_corruption_not_a_hang(tmp_path, mesh42):
    path = tmp_path / "c"
    cc.save(str(path), {"w": put(np.ones((64, 8192), np.float32), mesh42, P("x", "y"))})
    chunk = path / "state" / "w" / "c" / "0" / "0"
    chunk.unlink()
    os.mkfifo(chunk)  # opening it for reading would block until a writer came
    with pytest.raises(cc.CorruptCheckpointError, match=r"c/0/0 is not a regular file"):
        cc.restore(str(path), mesh=mesh42)
    chunk.unlink()
    chunk.mkdir()
    with pytest.raises(cc.CorruptCheckpointError, match=r"c/0/0 is not a regular file"):
        cc.restore(str(path), mesh=mesh42)


def test_a_checksum_mismatch_names_the_chunk_file(tmp_path, mesh42):
    path = tmp_path / "c"
    cc.save(str(path), {"w": put(np.ones((64, 8192), np.float32), mesh42, P("x", "y"))})
    chunk = path / "state" / "w" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 1
    chunk.write_bytes(bytes(data))
    with pytest.raises(cc.CorruptCheckpointError, match=rf"file {chunk}\): crc32c"):
        cc.restore(str(path), mesh=mesh42)


def test_keys_that_only_differ_in_type_are_refused_before_anything_is_written(tmp_path):
    tree = {"m": collections.OrderedDict([(1, np.full((300, 1024), 1.0, np.float32)), ("1", np.zeros((300, 1024)))])}
    with pytest.raises(ValueError, match=r"\['m', 1\] and \['m', '1'\] map to one directory"):
        cc.save(str(tmp_path / "c"), tree, pack_bytes=0)
    assert not (tmp_path / "c").exists()
