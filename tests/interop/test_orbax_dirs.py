"""Orbax run directories: a ``Checkpointer`` pointed at one resumes from orbax's latest step.

The runs are written by orbax-checkpoint's own ``CheckpointManager`` in the layouts it writes
(OCDBT or not, one item or several, step prefixes), plus what an interrupted orbax save leaves
(a temporary step directory; on GCS, a step without ``commit_success.txt``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import object_stores
import orbax.checkpoint as ocp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from orbax.checkpoint._src.path.step import step_from_checkpoint_name

import ckpt_callbacks as cc
from ckpt_callbacks import directory, restoring
from ckpt_callbacks import interop as orbax_format
from ckpt_callbacks import storage as paths
from ckpt_callbacks.cli._main import main as cli
from ckpt_callbacks.errors import CheckpointFormatError, CheckpointNotFoundError
from conftest import assert_tree_equal, make_mesh

STEPS = (10, 20)
SPECS = {"w": P("x", "y"), "emb": P(None, "y"), "mu": P("x"), "count": P()}


def _state(step: int) -> dict:
    """A train state at ``step``, sharded over a 4x2 mesh: float32, bfloat16, int32, a scalar."""
    mesh = make_mesh((4, 2))
    values = {
        "w": jnp.arange(64.0, dtype=jnp.float32).reshape(8, 8) * step,
        "emb": (jnp.arange(32).reshape(4, 8) / (7 + step)).astype(jnp.bfloat16),
        "mu": jnp.arange(24, dtype=jnp.int32).reshape(8, 3) + step,
        "count": jnp.int32(step),
    }
    return {k: jax.device_put(v, NamedSharding(mesh, SPECS[k])) for k, v in values.items()}


@functools.cache
def _init_fn():
    """What a user's init looks like: jitted with out_shardings, the saved ones."""
    shardings = {k: NamedSharding(make_mesh((4, 2)), s) for k, s in SPECS.items()}
    return jax.jit(lambda: jax.tree.map(jnp.zeros_like, _state(0)), out_shardings=shardings)


def _init() -> dict:
    return _init_fn()()


def _manager_run(base: Path, kind: str) -> None:
    """An orbax ``CheckpointManager`` run of ``kind``, saving ``STEPS``."""
    options = ocp.CheckpointManagerOptions(step_prefix="ckpt", step_format_fixed_length=5) if kind == "prefix" else None
    names = {"items": ("params", "opt"), "state": ("state", "meta")}.get(kind)
    handlers = ocp.PyTreeCheckpointHandler(use_ocdbt=False) if kind == "plain" else None
    with ocp.CheckpointManager(base, options=options, item_names=names, item_handlers=handlers) as mngr:
        for step in STEPS:
            state = _state(step)
            if kind == "items":
                params, opt = {k: state[k] for k in ("w", "emb")}, {k: state[k] for k in ("mu", "count")}
                args = ocp.args.Composite(params=ocp.args.StandardSave(params), opt=ocp.args.StandardSave(opt))
            elif kind == "state":
                args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"step": step}))
            elif kind == "plain":
                args = ocp.args.PyTreeSave(state)
            else:
                args = ocp.args.StandardSave(state)
            mngr.save(step, args=args)


def _step_name(kind: str, step: int) -> str:
    return f"ckpt_{step:05d}" if kind == "prefix" else str(step)


def _add_debris(base: Path, kind: str) -> None:
    """What an interrupted orbax save leaves, and a step-named directory orbax did not write."""
    latest = base / _step_name(kind, STEPS[-1])
    shutil.copytree(latest, base / f"{_step_name(kind, 30)}.orbax-checkpoint-tmp-1796000000")
    (base / _step_name(kind, 40)).mkdir()
    (base / _step_name(kind, 40) / "notes.txt").write_text("not a checkpoint")


# default: OCDBT, one unnamed item ("default"); plain: a directory per array; state: items
# "state" and a JSON "meta"; prefix: ckpt_00010; legacy: an older orbax's steps, written before
# it recorded _CHECKPOINT_METADATA and commit_success.txt (this orbax always writes both:
# removed here); items: "params" and "opt", none named "default".
KINDS = ("default", "plain", "state", "prefix", "legacy", "items")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for kind in KINDS:
        base = tmp_path_factory.mktemp(kind) / "run"
        if kind == "legacy":
            shutil.copytree(out["default"], base)
            for step in STEPS:
                (base / str(step) / "_CHECKPOINT_METADATA").unlink()
                (base / str(step) / "commit_success.txt").unlink()
        else:
            _manager_run(base, kind)
            _add_debris(base, kind)
        out[kind] = base
    return out


def _copy(runs: dict[str, Path], kind: str, tmp_path: Path) -> str:
    dst = tmp_path / "run"
    shutil.copytree(runs[kind], dst)
    return str(dst)


@pytest.mark.parametrize("kind", ["default", "plain", "state", "prefix", "legacy"])
def test_checkpointer_resumes_an_orbax_run_then_saves_beside_it(runs, kind, tmp_path):
    base = _copy(runs, kind, tmp_path)
    ck = cc.Checkpointer(base, keep=cc.KeepPolicy(keep_last=1))
    assert ck.latest_step() == 20 and ck.all_steps() == [10, 20]  # the temporary 30 and the stray 40 skipped
    state, meta = ck.restore_or_init(_init_fn())
    assert meta is not None and meta["step"] == 20
    assert_tree_equal(state, _state(20))
    assert all(state[k].sharding == _init()[k].sharding for k in SPECS)

    assert ck.on_step(state, step=21, force=True)
    ck.wait_until_finished()
    listed = cc.list_checkpoints(base)
    assert [(c.step, c.source) for c in listed] == [(10, "orbax"), (20, "orbax"), (21, "ckpt_callbacks")]
    assert listed[-1].path == os.path.join(base, "run-21")
    assert ck.on_step(state, step=22, force=True)
    ck.close()
    # keep_last=1 counts ours only: run-21 goes, orbax's steps stay, every file of them
    names = sorted(os.listdir(base))
    assert "run-22" in names and "run-21" not in names
    assert {_step_name(kind, 10), _step_name(kind, 20)} <= set(names)
    assert_tree_equal(cc.restore(os.path.join(base, _step_name(kind, 10))), _state(10))

    again = cc.Checkpointer(base)
    state, meta = again.restore_or_init(_init_fn())
    assert meta is not None and meta["step"] == 22
    assert cc.find_latest_checkpoint(base) == os.path.join(base, "run-22")
    again.close()


def test_several_items_resume_the_one_named(runs, tmp_path):
    base = _copy(runs, "items", tmp_path)
    ck = cc.CheckpointReader(base)
    assert ck.latest_step() == 20
    params = {k: v for k, v in _init().items() if k in ("w", "emb")}
    with pytest.raises(CheckpointNotFoundError, match=r"holds orbax items \['opt', 'params'\], none.*pass item= to"):
        ck.restore_or_init(lambda: params, template=params, fallback=False)
    restored, meta = ck.restore_or_init(lambda: params, template=params, item="params")
    assert meta is not None and meta["step"] == 20
    assert_tree_equal(restored, {k: v for k, v in _state(20).items() if k in ("w", "emb")})
    assert cc.CheckpointReader(base, item="opt").restore(step=10)[0]["count"] == 10


def test_a_listed_orbax_step_restores_from_its_path(runs, tmp_path):
    base = _copy(runs, "prefix", tmp_path)
    info = cc.list_checkpoints(base)[0]
    assert (info.step, info.source, info.checkpoint) == (10, "orbax", None)
    assert info.path == os.path.join(base, "ckpt_00010") and info.timestamp > 1e9
    assert_tree_equal(cc.restore(info.path, template=_init()), _state(10))
    assert_tree_equal(cc.CheckpointReader(base).restore(path=info.path, template=_init())[0], _state(10))
    url = paths.parse(base).url  # a URL base lists URLs
    assert [c.path for c in cc.list_checkpoints(url)] == [f"{url}/ckpt_00010", f"{url}/ckpt_00020"]


def _upload(src: Path, dst: paths.Location, skip: str | None = None) -> None:
    for root, _, files in os.walk(src):
        rel = Path(root).relative_to(src).parts
        for name in files:
            if name != skip:
                paths.write_bytes(dst.join(*rel) if rel else dst, name, (Path(root) / name).read_bytes())


def test_on_gcs_a_step_without_commit_success_is_unfinished(runs, gcs_endpoint):
    """On GCS orbax commits by writing ``commit_success.txt``, not by a rename."""
    base = paths.parse(f"gs://{object_stores.BUCKET}/orbax-dirs-{uuid.uuid4().hex[:10]}")
    _upload(runs["default"] / "10", base.join("10"))
    _upload(runs["default"] / "20", base.join("20"), skip="commit_success.txt")
    assert [(c.step, c.source) for c in cc.list_checkpoints(base.url)] == [(10, "orbax")]
    restored, meta = cc.CheckpointReader(base.url).restore_or_init(_init_fn())
    assert meta is not None and meta["step"] == 10
    assert_tree_equal(restored, _state(10))


def test_cli_list_and_latest_mark_each_kind(runs, tmp_path, capsys):
    base = _copy(runs, "default", tmp_path)
    assert cli(["latest", base]) == 0
    out = capsys.readouterr()
    assert out.out == os.path.join(base, "20") + "\n" and "an orbax checkpoint" in out.err
    with cc.Checkpointer(base) as ck:
        ck.save_checkpoint(_state(25), "run-25", step=25)
    assert cli(["list", base, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    marked = [(r["step"], r["format"], r["status"]) for r in rows]
    assert marked == [
        (10, "orbax", "committed"),
        (20, "orbax", "committed"),
        (25, "ckpt_callbacks", "committed"),
        (30, "orbax", "uncommitted"),
        (40, "orbax", "damaged"),  # orbax lists it (a finalized step name), it holds only notes.txt
    ]
    assert rows[0]["items"] == ["default"] and rows[2]["items"] == ["state"]
    assert cli(["list", base]) == 0
    text = capsys.readouterr().out
    assert "format" in text and "2 written by orbax (read, never deleted)" in text
    assert "an orbax save that did not finish" in text
    assert cli(["latest", base]) == 0
    out = capsys.readouterr()
    assert out.out == os.path.join(base, "run-25") + "\n" and out.err == ""
    assert cli(["list", os.path.join(base, "10")]) == 2
    assert "is an orbax checkpoint, not a base directory" in capsys.readouterr().err


@given(
    prefix=st.one_of(st.none(), st.text(st.sampled_from("ab_-.x9"), min_size=1, max_size=6)),
    step=st.integers(0, 10**12),
    width=st.integers(0, 14),
)
def test_step_names_as_orbax_reads_them(prefix, step, width):
    name = ("" if prefix is None else f"{prefix}_") + f"{step:0{width}d}"
    assert orbax_format.step_of_name(name) == step_from_checkpoint_name(name) == step
    assert orbax_format.step_of_name(f"{name}.orbax-checkpoint-tmp-17") is None
    assert orbax_format.unfinished_step(f"{name}.orbax-checkpoint-tmp-17") == step
    assert orbax_format.step_of_name(f"run-{step}") is None  # ours


class _Listing:
    """A foreign source that lists what it is given."""

    name = "test-listing"

    def __init__(self, infos) -> None:
        self.infos = infos

    def open(self, loc, item):
        return None

    def steps(self, base):
        return self.infos


@pytest.mark.parametrize(
    "infos",
    [
        [directory.CheckpointInfo(path="memory://x/1", step=-1, timestamp=0.0)],
        [directory.CheckpointInfo(path="memory://x/1", step=None, timestamp=0.0)],
        ["memory://x/1"],
    ],
)
def test_a_source_listing_bad_steps_is_refused(infos, mem_url):
    restoring.register_source(_Listing(infos))
    try:
        with pytest.raises(CheckpointFormatError, match=r"source 'test-listing' listed .*expected a CheckpointInfo"):
            cc.list_checkpoints(mem_url)
    finally:
        restoring.unregister_source("test-listing")


def test_a_source_listing_a_step_of_ours_loses_the_tie(mem_url):
    cc.save(f"{mem_url}/run-3", {"w": np.zeros(2)}, step=3)
    theirs = [directory.CheckpointInfo(path=f"{mem_url}/{s}", step=s, timestamp=0.0) for s in (3, 4)]
    restoring.register_source(_Listing(theirs))
    try:
        listed = cc.list_checkpoints(mem_url)
    finally:
        restoring.unregister_source("test-listing")
    assert [(c.step, c.source, c.name) for c in listed] == [(3, "ckpt_callbacks", "run-3"), (4, "test-listing", "4")]


def _orbax_lists(base: str) -> list[int]:
    """The steps orbax's own ``CheckpointManager`` lists under ``base`` (the oracle)."""
    with ocp.CheckpointManager(base, options=ocp.CheckpointManagerOptions(create=False)) as mngr:
        return sorted(mngr.all_steps())


def _skip_warnings(caplog) -> dict[int, str]:
    found = {}
    for record in caplog.records:
        match = re.match(
            r"orbax lists step (\d+) \((\S+)\) but it holds no readable checkpoint: (.*)", record.getMessage()
        )
        if match and record.levelno == logging.WARNING:
            found[int(match.group(1))] = match.group(3)
    return found


def test_a_step_orbax_lists_but_we_cannot_read_is_warned_and_listed_as_a_problem(runs, tmp_path, caplog, capsys):
    base = _copy(runs, "default", tmp_path)
    (Path(base) / "20" / "_CHECKPOINT_METADATA").unlink()  # what is left: commit_success.txt, default/
    (Path(base) / "20" / "default" / "_METADATA").unlink()
    (Path(base) / "50").mkdir()
    assert _orbax_lists(base) == [10, 20, 40, 50]  # orbax counts each of them a finalized step
    with caplog.at_level(logging.WARNING, "ckpt_callbacks"):
        ck = cc.CheckpointReader(base)
        assert ck.all_steps() == [10]
        restored, meta = ck.restore_or_init(_init_fn())
    assert meta is not None and meta["step"] == 10
    assert_tree_equal(restored, _state(10))
    why = _skip_warnings(caplog)
    assert sorted(why) == [20, 40, 50], caplog.text
    assert why[20].startswith("no _CHECKPOINT_METADATA, and no item directory holding _METADATA (it holds ")
    assert "commit_success.txt, default" in why[20] and "notes.txt" in why[40] and why[50].startswith("it is empty")
    caplog.clear()
    assert cc.CheckpointReader(base).all_steps() == [10]
    assert not _skip_warnings(caplog)  # said once, not at every listing

    assert cli(["list", base, "--json"]) == 0
    rows = {r["step"]: r for r in json.loads(capsys.readouterr().out)}
    assert [(s, r["format"], r["status"]) for s, r in sorted(rows.items())] == [
        (10, "orbax", "committed"),
        (20, "orbax", "damaged"),
        (30, "orbax", "uncommitted"),
        (40, "orbax", "damaged"),
        (50, "orbax", "damaged"),
    ]
    assert rows[20]["problem"].startswith("orbax lists step 20 but it holds no readable checkpoint: no _CHECKPOINT")
    assert cli(["list", base]) == 0
    text = capsys.readouterr().out
    assert f"{os.path.join(base, '50')}: orbax lists step 50 but it holds no readable checkpoint: it is empty" in text
    assert text.splitlines()[-1].endswith("; 1 unfinished save; 3 damaged"), text


@pytest.mark.parametrize("marked", [False, True])
def test_numbered_directories_of_a_folder_orbax_never_wrote_are_not_reported(tmp_path, caplog, capsys, marked):
    """Only where orbax's claim is plausible: other orbax steps beside it, or its own marker."""
    base = tmp_path / "data"
    cc.save(base / "run-3", {"w": np.zeros(2)}, step=3)
    for name in ("2024", "7", "ckpt_12"):
        (base / name).mkdir(parents=True)
        (base / name / "rows.csv").write_text("a,b")
    if marked:
        (base / "7" / "commit_success.txt").write_text("Checkpoint commit was successful")
    with caplog.at_level(logging.WARNING, "ckpt_callbacks"):
        assert [(c.step, c.source) for c in cc.list_checkpoints(base)] == [(3, "ckpt_callbacks")]
    assert sorted(_skip_warnings(caplog)) == ([7] if marked else [])
    assert cli(["list", str(base), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["step"], r["status"]) for r in rows] == [(3, "committed")] + ([(7, "damaged")] if marked else [])


def test_several_items_none_named_says_which_to_pick(runs, tmp_path):
    base = _copy(runs, "items", tmp_path)
    step = os.path.join(base, "20")
    for call in (lambda: cc.restore(step), lambda: cc.CheckpointReader(base).restore(fallback=False)):
        with pytest.raises(
            CheckpointNotFoundError,
            match=r"20 holds orbax items \['opt', 'params'\], none of them "
            r"'state' \(the item restored by default\) or 'default' \(orbax's unnamed item\): "
            r"pass item= to pick one$",
        ):
            call()
    with pytest.raises(CheckpointNotFoundError, match=r"has no orbax item 'nope'; items: \['opt', 'params'\]"):
        cc.restore(step, item="nope")
    assert cc.restore(step, item="opt")["count"] == 20


def test_a_restore_of_a_base_lists_its_steps_of_each_writer(runs, tmp_path):
    base = _copy(runs, "default", tmp_path)
    with pytest.raises(CheckpointNotFoundError) as refused:
        cc.restore(base)
    text = str(refused.value)
    assert "it is a base directory of 2 checkpoints, not one" in text and "a save that did not finish" not in text
    assert "(steps, newest first: 20 (orbax: 20), 10 (orbax: 10))" in text
    assert f"restore({os.path.join(base, '20')!r})" in text and f"CheckpointReader({base!r}).restore()" in text
    cc.save(os.path.join(base, "run-25"), _state(25), step=25)
    url = paths.parse(base).url
    with pytest.raises(CheckpointNotFoundError) as refused:
        cc.restore(url)
    text = str(refused.value)
    assert "(steps, newest first: 25 (ckpt_callbacks: run-25), 20 (orbax: 20), 10 (orbax: 10))" in text
    assert f"restore({url + '/run-25'!r}) or restore({url + '/20'!r})" in text
    assert_tree_equal(cc.restore(f"{url}/20", template=_init()), _state(20))  # as it says


def test_verify_of_a_mixed_base_names_the_orbax_steps_it_did_not_verify(runs, tmp_path, capsys):
    base = _copy(runs, "default", tmp_path)
    assert cli(["verify", base]) == 2
    assert "holds no checkpoint of ours to verify, only steps 10 (orbax), 20 (orbax)" in capsys.readouterr().err
    cc.save(os.path.join(base, "run-25"), _state(25), step=25)
    assert cli(["verify", base]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == "OK (1 checkpoint); 2 orbax steps not verified (steps 10, 20): no checksums recorded", last
    assert cli(["verify", base, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(u["step"], u["format"]) for u in report["not_verified"]] == [(10, "orbax"), (20, "orbax")]
