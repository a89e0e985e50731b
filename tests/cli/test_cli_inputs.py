"""Every command on hostile input: an answer or one line of error with exit status 2, never a
traceback or a hang; and the dtypes a save refuses by name before it writes anything.

The command runs in-process (``cli.main``), so hypothesis can try many inputs per second.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import ckpt_callbacks as cc
from ckpt_callbacks import cli
from ckpt_callbacks import layouts as layout_plan
from ckpt_callbacks import storage as paths
from ckpt_callbacks.layouts import LeafShape

_COUNTER = itertools.count()
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _main(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as e:  # argparse: --help, usage errors
            code = e.code if isinstance(e.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def _answered(*argv: str, codes: tuple[int, ...] = (0, 2)) -> tuple[int, str, str]:
    """Runs a command: an expected exit status; on status 2, one line of error and no bug."""
    code, out, err = _main(*argv)
    assert code in codes, (argv, code, err[-2000:])
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err, (argv, err)
    if code == 2:
        assert len(errors) == 1 and err.endswith("\n") and "internal error" not in err, (argv, err)
    return code, out, err


def _within(seconds: float, fn, *args):
    """``fn(*args)`` in a thread: a guard that fails a hang instead of blocking the suite."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn(*args)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"{fn.__name__}{args} did not return within {seconds} s"
    return result[0]


# Flag values: numbers of every size and sign, floats that overflow, words that are no number.
_INTS = st.one_of(st.integers(-3, 3000), st.integers(-(10**40), 10**40)).map(str)
_FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["1e308", "-1e308", "1e-320", "inf", "-inf", "nan", "0", "-0.0", "1e400"]),
)
_WORDS = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Nd")), max_size=6)
_VALUES = st.one_of(_INTS, _FLOATS, _WORDS)


@st.composite
def _plan_args(draw) -> list[str]:
    args = ["plan", "--steps", draw(st.one_of(st.integers(-3, 3000).map(str), st.integers(10**7, 10**40).map(str)))]
    for _ in range(draw(st.integers(0, 20))):
        args += ["--every", draw(st.one_of(st.integers(-3, 500).map(str), _VALUES))]
    for _ in range(draw(st.integers(0, 3))):
        args += ["--until", draw(_VALUES)]
    for flag in ("--save-interval", "--step-time", "--keep-last", "--keep-every"):
        if draw(st.booleans()):
            args += [flag, draw(_VALUES)]
    return args + draw(st.sampled_from([[], ["--json"], ["--no-final"], ["--json", "--no-final"]]))


@FAST
@given(_plan_args())
def test_plan_answers_every_flag_value(args):
    code, out, _ = _answered(*args)
    if code == 0 and "--json" in args:
        assert isinstance(json.loads(out)["saves"], list)


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--save-interval", "1e308"], r"--save-interval 1e\+308: expected seconds in \[1e-06, 1e\+13\]"),
        (["--save-interval", "nan"], "--save-interval nan: expected seconds"),
        (["--save-interval", "1e-9"], "expected seconds in"),
        (["--every", "1", "--step-time", "1e308"], "the run at most 1e\\+13 s"),
        (["--every", "1", "--step-time", "-1"], "expected positive steps and a positive time"),
        (["--every", "1"] * 17, "17 --every: plan simulates at most 16 intervals"),
        (["--every", "1"], "the policy saves more than 100,000 times by step 100001"),
        (["--every", "x"], r"error: ckpt-callbacks plan: argument --every: invalid int value: 'x' \(see"),
    ],
)
def test_plan_refuses_extreme_values_in_one_line(flags, match):
    _, _, err = _answered("plan", "--steps", "200000", *flags, codes=(2,))
    assert re.search(match, err), err


# --- plan-layout: --leaves files ---------------------------------------------------------------

_DIMS = st.one_of(st.integers(0, 40), st.integers(-(2**70), -1), st.integers(2**40, 2**70))


def _json(floats: st.SearchStrategy) -> st.SearchStrategy:
    return st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(-(10**30), 10**30), floats, st.text(max_size=4)),
        lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
        max_leaves=8,
    )


_JSON = _json(st.floats())
_FINITE_JSON = _json(st.floats(allow_nan=False, allow_infinity=False))  # what extras can hold
_AXES = st.sampled_from(["fsdp", "x", "y"])


@st.composite
def _leaf_entry(draw) -> dict:
    entry = {
        "path": draw(st.one_of(st.sampled_from(["w", "a/b", "a", "", "a//b", "c/d/e"]), _JSON)),
        "shape": draw(st.one_of(st.lists(_DIMS, max_size=4), _JSON)),
        "dtype": draw(st.one_of(st.sampled_from(["float32", "bfloat16", "int4", "uint128", "float128", "O"]), _JSON)),
    }
    if draw(st.booleans()):
        entry["spec"] = draw(st.one_of(st.lists(st.one_of(st.none(), _AXES, st.lists(_AXES, max_size=2))), _JSON))
    if draw(st.integers(0, 5)) == 0:
        entry.pop(draw(st.sampled_from(sorted(entry))))
    if draw(st.integers(0, 5)) == 0:
        entry[draw(st.text(max_size=3))] = draw(_JSON)
    return entry


@st.composite
def _leaves_file(draw) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=40))
    if kind == 1:
        return json.dumps(draw(_JSON)).encode()
    if kind == 2:  # integers past Python's 4300 digits, nesting past its recursion limit
        return draw(st.sampled_from([b'{"leaves": [{"shape": [' + b"9" * 5000 + b"]}]}", b"[" * 50_000]))
    data: dict = {"leaves": draw(st.lists(_leaf_entry(), max_size=4))}
    if draw(st.booleans()):
        data["mesh"] = draw(st.one_of(st.dictionaries(_AXES, st.integers(-2, 8), max_size=3), _JSON))
    return json.dumps(data).encode()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli-inputs")


@FAST
@given(
    raw=_leaves_file(),
    hosts=st.one_of(st.integers(-2, 4), st.integers(2**17, 2**70)),
    per_host=st.one_of(st.integers(-1, 4), st.just(2**40)),
    extra=st.sampled_from([[], ["--json"], ["--file-bytes", "0"], ["--file-bytes", "-5"], ["--file-bytes", "100"]]),
)
def test_plan_layout_answers_every_leaves_file(workdir, raw, hosts, per_host, extra):
    path = workdir / f"leaves-{next(_COUNTER)}.json"
    path.write_bytes(raw)
    argv = ["plan-layout", "--leaves", str(path), "--hosts", str(hosts), "--devices-per-host", str(per_host)]
    code, out, _ = _answered(*argv, *extra)
    if code == 0 and "--json" in extra:
        assert [s["layout"] for s in json.loads(out)["layouts"]] == ["zarr3", "process"]


def _leaves(workdir: Path, leaves: list[dict], mesh: dict | None = None) -> str:
    path = workdir / f"leaves-{next(_COUNTER)}.json"
    path.write_text(json.dumps({"leaves": leaves, **({"mesh": mesh} if mesh is not None else {})}))
    return str(path)


@pytest.mark.parametrize(
    ("leaf", "match"),
    [
        ({"shape": [2**62]}, r"leaf 'w': shape \[4611686018427387904\] float32 is more than 2\*\*50 bytes"),
        ({"shape": [-4]}, r"leaf 'w': shape \(-4,\); expected a tuple of at most 100 ints, each in \[0, 2\*\*62\]"),
        ({"shape": [2**63]}, r"shape \(9223372036854775808,\); expected"),
        ({"shape": [2**50 - 27], "dtype": "uint8"}, r"leaf 'w' \(1,125,899,906,842,597 chunks, 1 of 1 leaves\)"),
        ({"shape": [2**25, 2**25], "dtype": "uint8"}, "takes the plan past 20,000,000 steps"),
        ({"dtype": "float128"}, r"leaf 'w': dtype 'float128'; expected one of \["),
        ({"spec": ["fsdp", "fsdp"], "shape": [4, 4]}, "no axis named twice"),
        ({"spec": [3]}, r"spec \(3,\); expected a tuple of at most 1 entries"),
        ({"path": 3}, "expected a string path, a list shape and a list spec or none; found path 3"),
        ({"size": 3}, r"leaves\[0\]: unknown keys \['size'\]"),
    ],
)
def test_plan_layout_refuses_a_leaf_at_once(workdir, leaf, match):
    path = _leaves(workdir, [{"path": "w", "shape": [8], "dtype": "float32", "spec": [], **leaf}])
    code, _, err = _within(60, _main, "plan-layout", "--leaves", path, "--hosts", "1", "--devices-per-host", "1")
    assert code == 2 and len(err.splitlines()) == 1 and re.search(match, err), err


def test_plan_layout_refuses_trees_meshes_and_files_it_cannot_plan(workdir):
    one = {"shape": [8], "dtype": "float32"}
    cases = [
        ([{"path": "a", **one}, {"path": "a/b", **one}], None, "leaf 'a' is also the parent of leaf 'a/b'"),
        ([{"path": "a", **one}, {"path": "a", **one}], None, "1 leaf paths appear twice"),
        ([{"path": "w", **one}], {}, r"mesh \{\}; expected an object of axis name -> positive int"),
        ([{"path": "w", "shape": [0, 2**62 - 57], "dtype": "int8", "spec": []}], None, None),  # 0 bytes: planned
    ]
    for leaves, mesh, match in cases:
        args = ("plan-layout", "--leaves", _leaves(workdir, leaves, mesh), "--hosts", "1", "--devices-per-host", "1")
        code, _, err = _within(60, _main, *args)
        assert (code, bool(match and re.search(match, err))) == ((2, True) if match else (0, False)), err
    fifo = workdir / "fifo"
    os.mkfifo(fifo)
    code, _, err = _within(60, _main, "plan-layout", "--leaves", str(fifo), "--hosts", "1")
    assert code == 2 and "not a regular file" in err
    code, _, err = _main("plan-layout", "--example", "llama70b", "--hosts", str(2**40))
    assert code == 2 and "at most 131,072 devices in all" in err


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    sizes=st.lists(st.sampled_from([1, 2, 3, 4]), min_size=1, max_size=3),
    dims=st.lists(st.sampled_from([0, 1, 2, 3, 5, 8, 64, 1000]), max_size=3),  # times the mesh axes they use
    spec_seed=st.integers(0, 2**16),
    dtype=st.sampled_from(["float32", "uint8", "bfloat16"]),
    max_chunk=st.sampled_from([16, 64, 1 << 20]),
    i=st.integers(0, 5),
)
def test_the_work_bound_counts_the_chunks_the_planner_makes(sizes, dims, spec_seed, dtype, max_chunk, i):
    """``plan_layout`` refuses by a count it takes before planning: it must be the planner's."""
    axes = {f"a{k}": n for k, n in enumerate(sizes)}
    rng = np.random.default_rng(spec_seed)
    names = [str(n) for n in rng.permutation(list(axes))]
    spec: list = []
    for _ in range(int(rng.integers(0, len(dims) + 1))):
        k = int(rng.integers(0, 3))
        take, names = names[:k], names[k:]
        spec.append(None if not take else take[0] if len(take) == 1 else tuple(take))
    counts = [math.prod(axes[a] for a in ((e,) if isinstance(e, str) else e or ())) for e in spec]
    shape = tuple(n * (counts[d] if d < len(counts) else 1) for d, n in enumerate(dims))
    leaf = LeafShape(path="w", shape=shape, dtype=dtype, spec=tuple(spec))
    units, _ = layout_plan._units(leaf, axes, max_chunk)
    assume(units <= 10_000)  # the planner lists them all
    planned = layout_plan._owners(leaf, i, tuple(axes.items()), math.prod(sizes), max_chunk)
    assert units == len(planned.units)


# --- list, inspect, prune: hostile metrics -----------------------------------------------------

_METRIC = st.one_of(
    _JSON,
    st.sampled_from([10**399, -(10**399), 10**4000, 1e308, float("nan"), float("inf"), "x" * 100, "a\nb"]),
)


@pytest.fixture(scope="module")
def base() -> str:
    url = f"memory://cli-inputs/{next(_COUNTER)}"
    for step in (1, 2):
        cc.save(f"{url}/run-{step}", {"w": np.zeros(2)}, step=step)
    return url


@FAST
@given(metrics=st.one_of(st.dictionaries(st.sampled_from(["loss", "acc", ""]), _METRIC, max_size=3), _METRIC))
def test_list_and_prune_show_any_metrics_file(base, metrics):
    raw = json.dumps(metrics).encode()  # NaN and Infinity as Python writes them
    paths.write_bytes(paths.parse(base).join("metrics"), "run-1.json", raw)
    for argv in (
        ["list", base],
        ["list", base, "--json"],
        ["list", base, "--metric", "loss", "--mode", "max"],
        ["prune", base, "--keep-best", "1", "--metric", "loss"],
        ["prune", base, "--keep-last", "1", "--json"],
        ["inspect", base],
    ):
        _, out, _ = _answered(*argv, codes=(0,))
        assert "run-1" in out and "run-2" in out


@FAST
@given(metrics=st.one_of(st.dictionaries(st.sampled_from(["loss", "acc"]), _FINITE_JSON, max_size=3), _FINITE_JSON))
def test_list_shows_any_metrics_saved_in_extras(metrics):
    url = f"memory://cli-inputs/extras-{next(_COUNTER)}"
    cc.save(f"{url}/run-3", {"w": np.zeros(1)}, step=3, extras={"metrics": metrics})
    for argv in (
        ["list", url],
        ["list", url, "--json"],
        ["list", url, "--metric", "loss"],
        ["inspect", f"{url}/run-3"],
    ):
        _, out, _ = _answered(*argv, codes=(0,))
        assert "run-3" in out or "step 3" in out


def test_metrics_that_no_number_spells_are_shown_as_is_or_as_a_question_mark(base):
    paths.write_bytes(
        paths.parse(base).join("metrics"), "run-1.json", json.dumps({"big": 10**399, "huge": 10**4000}).encode()
    )
    _, out, _ = _answered("list", base, "--metric", "big", codes=(0,))
    assert re.search(r"^\s*1\s.*\sbig=\? huge=\?\s.*run-1$", out, re.M), out  # retention keeps numbers only
    url = f"memory://cli-inputs/extras-{next(_COUNTER)}"
    extras = {"big": 10**399, "name": "best", "list": [1, 2], "d": {"a": 1}, "n": None, "flag": True, "x": 0.25}
    cc.save(f"{url}/run-3", {"w": np.zeros(1)}, step=3, extras={"metrics": extras})
    _, out, _ = _answered("list", url, codes=(0,))
    assert 'big=? d=? flag=true list=? n=null name="best" x=0.25' in out, out


# --- every other command: arbitrary paths and flag values --------------------------------------

_PATH_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="."), max_size=12)


# Tokens a command line may hold besides the right ones: usage errors are one line too.
_TOKENS = st.lists(
    st.sampled_from(["--json", "--bogus", "-", "--metric", "--mode", "sideways", "-x", "--"]), max_size=2
)


@FAST
@given(
    command=st.sampled_from(["latest", "inspect", "verify", "list"]),
    tail=_PATH_TEXT,
    scheme=st.sampled_from(["memory://cli-inputs/", "file://", "", "ftp://x/", "gs:/", "memory://"]),
    extra=_TOKENS,
)
def test_reading_commands_answer_any_path_and_flags(workdir, command, tail, scheme, extra):
    path = scheme + (str(workdir) + "/" if scheme in ("file://", "") else "") + tail
    _answered(command, path, *extra, codes=(0, 1, 2))


@FAST
@given(
    a=st.sampled_from(["run-1", "run-2", "run-9", ""]),
    b=_PATH_TEXT,
    item=st.one_of(st.sampled_from(["state", "../state", "COMMITTED", "-x", "--json"]), _PATH_TEXT),
    extra=_TOKENS,
)
def test_diff_answers_any_pair_item_and_flags(base, a, b, item, extra):
    _answered("diff", f"{base}/{a}", f"{base}/{b}", "--item", item, *extra, codes=(0, 2))


@FAST
@given(
    flags=st.lists(
        st.tuples(st.sampled_from(["--keep-last", "--keep-every", "--keep-best", "--metric", "--mode"]), _VALUES),
        max_size=4,
    ),
    json_flag=st.booleans(),
)
def test_prune_answers_any_flag_value_without_yes(base, flags, json_flag):
    argv = ["prune", base, *[x for pair in flags for x in pair], *(["--json"] if json_flag else [])]
    _answered(*argv, codes=(0, 2))
    assert [c.step for c in cc.list_checkpoints(base)] == [1, 2]  # a dry run deletes nothing


# --- a save refuses the dtypes the format has no name for, before it writes --------------------


def _save(target: Path, tree: dict, entry: str, **kwargs) -> None:
    if entry == "save":
        cc.save(target, tree, step=1, **kwargs)
    elif entry == "save_async":  # refused in the caller's thread: no handle comes back
        cc.save_async(target, tree, step=1, **kwargs)
    else:
        cc.save_items(target, {"state": tree, "extra": {"n": np.ones(2)}}, step=1, **kwargs)


@pytest.mark.parametrize("layout", ["zarr3", "process"])
@pytest.mark.parametrize("entry", ["save", "save_async", "save_items"])
@pytest.mark.parametrize(
    ("leaf", "kwargs", "match"),
    [
        (np.zeros(3, np.longdouble), {}, r"leaf 'a/w': dtype float128 cannot be saved; expected one of \["),
        (np.zeros(3, np.clongdouble), {}, "leaf 'a/w': dtype complex256 cannot be saved"),
        (np.zeros(3, np.float32), {"dtype": np.longdouble}, r"leaf 'a/ok': stored dtype \(the dtype= cast\) float128"),
    ],
)
def test_unsupported_dtypes_are_refused_by_name_before_anything_is_written(
    tmp_path, layout, entry, leaf, kwargs, match
):
    target = tmp_path / "run-1"
    tree = {"a": {"w": leaf, "ok": np.ones(4, np.float32)}}
    with pytest.raises(TypeError, match=match):
        _save(target, tree, entry, layout=layout, **kwargs)
    assert list(tmp_path.iterdir()) == []
