"""``file://`` URLs are URLs: what ``pathlib.Path.as_uri()`` writes finds the directory it names.

A user keeps runs under a directory with a space and a non-ASCII letter, and passes the URL
``Path.as_uri()`` gives (``file:///.../uri%20test/%C3%BC``): the checkpoints are found, a save
goes to the real directory (never to one literally named ``uri%20test``), and the URLs we print
take the user back to the same place.
"""

from __future__ import annotations

import os
import pathlib
import re
import urllib.parse
import uuid

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckpt_callbacks as cc
from ckpt_callbacks import storage

STATE = {"w": jnp.arange(6.0).reshape(2, 3), "step": 3}


# Names a user may give a run directory: any text without '/' or NUL (and not '.', '..' or a
# name holding '\\', which TensorStore's file driver splits at: refused, tested apart),
# leaning on what URLs treat specially.
_NAME = st.text(
    alphabet=st.one_of(
        st.sampled_from(" %#?&=+:@;,[]{}~'\"\\é\u00fc\u4e2d\U0001f600"),
        st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"),
    ),
    min_size=1,
    max_size=12,
).filter(lambda s: s not in (".", "..") and "\\" not in s)


def test_a_path_as_uri_finds_and_saves_into_the_real_directory(tmp_path):
    runs = tmp_path / "uri test" / "ü"
    cc.save(os.fspath(runs / "run-3"), STATE, step=3)
    url = runs.as_uri()
    assert "%20" in url and "%C3%BC" in url  # what pathlib writes

    found = cc.list_checkpoints(url)
    assert [c.step for c in found] == [3]
    assert cc.find_latest_checkpoint(url) == url + "/run-3"
    np.testing.assert_array_equal(cc.restore(url + "/run-3")["w"], STATE["w"])

    ck = cc.Checkpointer(url)
    state, meta = ck.restore()
    assert meta["step"] == 3
    ck.on_step(state, step=4, force=True)
    ck.close()
    assert sorted(os.listdir(runs)) == ["run-3", "run-4"]
    assert not (tmp_path / "uri%20test").exists()


def test_a_plain_path_is_never_decoded(tmp_path):
    literal = tmp_path / "a%20b"
    cc.save(os.fspath(literal / "run-1"), STATE, step=1)
    assert os.listdir(tmp_path) == ["a%20b"]
    assert [c.step for c in cc.list_checkpoints(os.fspath(literal))] == [1]
    # Its URL encodes the '%', so the URL names the same directory again.
    url = storage.parse(os.fspath(literal)).url
    assert url.endswith("/a%2520b")
    assert [c.step for c in cc.list_checkpoints(url)] == [1]
    assert not (tmp_path / "a b").exists()


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("file:///tmp/run%", "invalid percent-escape '%"),
        ("file:///tmp/run%2", "invalid percent-escape '%2"),
        ("file:///tmp/run%zz/x", "invalid percent-escape '%zz'"),
        ("file:///tmp/%FF%FE", "not UTF-8"),
        ("file:///tmp/%C3", "not UTF-8"),
        ("file:///tmp/a%00b", "NUL"),
    ],
)
def test_a_url_that_cannot_be_decoded_is_refused_naming_it(url, match):
    with pytest.raises(cc.CheckpointPathError, match=match) as info:
        cc.list_checkpoints(url)
    assert repr(url) in str(info.value)
    with pytest.raises(cc.CheckpointPathError, match=match):
        cc.save(url + "/run-1", STATE, step=1)


def test_localhost_urls_decode_too():
    assert storage.parse("file://localhost/tmp/uri%20test").path == "/tmp/uri test"


def test_ordinary_paths_print_as_before():
    for path in ["/tmp/runs/run-10", "/tmp/lr=0.1,bs=32/exp+1@node:2/~x", "/tmp/(a)!$&';*"]:
        assert storage.parse(path).url == "file://" + path


@settings(max_examples=300, deadline=None)
@given(names=st.lists(_NAME, min_size=1, max_size=3))
def test_printed_urls_round_trip_and_match_pathlib(names):
    path = os.path.join("/tmp", *names)
    loc = storage.parse(path)
    assert loc.path == os.path.abspath(path)  # a plain path is taken as it is
    assert storage.parse(loc.url) == loc
    assert storage.parse(pathlib.PurePosixPath(loc.path).as_uri()) == loc
    assert storage.parse(loc.url.replace("file://", "file://localhost", 1)) == loc
    assert loc.url.isascii()
    joined = storage.parse("/tmp").join(*names)
    assert storage.parse(joined.url) == joined


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=_NAME)
def test_checkpoints_under_any_directory_name_are_found_by_their_printed_url(tmp_path, name):
    base = tmp_path / name / "runs"
    if base.exists():
        return
    handle = cc.save_async(os.fspath(base / "run-7"), STATE, step=7)
    handle.wait()
    assert storage.parse(handle.path).path == os.fspath(base / "run-7")
    for url in (storage.parse(os.fspath(base)).url, base.as_uri()):
        assert [c.step for c in cc.list_checkpoints(url)] == [7]
        np.testing.assert_array_equal(cc.restore(cc.find_latest_checkpoint(url))["w"], STATE["w"])


@pytest.mark.parametrize("scheme", ["FILE", "File", "fILe"])
def test_a_scheme_is_case_insensitive(tmp_path, scheme):
    """RFC 3986 3.1: schemes are case-insensitive (and so is the host name localhost)."""
    cc.save(os.fspath(tmp_path / "runs" / "run-1"), STATE, step=1)
    url = (tmp_path / "runs").as_uri().replace("file", scheme, 1)
    assert cc.find_latest_checkpoint(url) == (tmp_path / "runs").as_uri() + "/run-1"
    assert storage.parse(url.replace(":///", "://LocalHost/", 1)) == storage.parse(os.fspath(tmp_path / "runs"))
    assert storage.parse("MEMORY://a/b") == storage.parse("memory://a/b")


@pytest.mark.parametrize(
    ("tail", "match"),
    [
        ("q?x=1", r"a '\?' in a URL starts its query, not part of its path: percent-encode it \(%3F"),
        ("frag#f", r"a '#' in a URL starts its fragment, not part of its path: percent-encode it \(%23"),
        ("enc%2Fslash", r"%2F in a file URL is a '/' inside one name"),
        ("enc%2fslash", r"%2F in a file URL is a '/' inside one name"),
    ],
)
def test_a_query_a_fragment_or_an_encoded_slash_is_refused(tmp_path, tail, match):
    url = f"{tmp_path.as_uri()}/{tail}"
    for call in (lambda: cc.save(url + "/run-1", STATE, step=1), lambda: cc.list_checkpoints(url)):
        with pytest.raises(cc.CheckpointPathError, match=match):
            call()
    assert os.listdir(tmp_path) == []  # nothing written anywhere, under any name
    literal = tmp_path / urllib.parse.unquote(tail)  # as a plain path it is the name it spells
    if "/" not in urllib.parse.unquote(tail):
        cc.save(os.fspath(literal / "run-1"), STATE, step=1)
        found = cc.find_latest_checkpoint(literal.as_uri())
        assert found is not None and storage.parse(found) == storage.parse(os.fspath(literal / "run-1"))


@settings(max_examples=200, deadline=None)
@given(names=st.lists(_NAME, min_size=1, max_size=3), scheme=st.sampled_from(["file", "FILE", "File"]))
def test_what_as_uri_writes_parses_and_a_raw_query_or_fragment_never_does(names, scheme):
    path = pathlib.PurePosixPath("/tmp", *names)
    uri = path.as_uri()
    assert "?" not in uri and "#" not in uri and "%2F" not in uri.upper()  # pathlib encodes them
    assert storage.parse(uri.replace("file", scheme, 1)) == storage.parse(os.fspath(path))
    raw = f"{scheme}://{urllib.parse.quote(os.fspath(path), safe='/?#')}"  # '?' and '#' left raw
    if "?" in os.fspath(path) or "#" in os.fspath(path):
        with pytest.raises(cc.CheckpointPathError, match=r"percent-encode it \((%3F|%23)"):
            storage.parse(raw)
    else:
        assert storage.parse(raw) == storage.parse(os.fspath(path))


@pytest.mark.parametrize("name", ["\\", "x\\", "\\x", "a\\\\b", "a\\..", ".\\a"])
def test_a_name_tensorstore_cannot_open_is_refused_typed(tmp_path, name):
    """TensorStore reads '\\' as a separator too: refused naming the directory, never a bare ValueError."""
    path = os.fspath(tmp_path / name / "run-1")
    for call in (lambda: cc.save(path, STATE, step=1), lambda: cc.list_checkpoints(os.path.dirname(path))):
        with pytest.raises(cc.CheckpointPathError, match=re.escape(f"the directory name {name!r} cannot be used")):
            call()
    assert os.listdir(tmp_path) == []


_BACKSLASHED = st.text(alphabet=st.sampled_from("ab.\\ %"), min_size=1, max_size=6).filter(
    lambda s: "\\" in s and s not in (".", "..")
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=_BACKSLASHED, depth=st.integers(0, 2), as_url=st.booleans())
def test_a_backslash_in_any_directory_name_is_refused_before_anything_is_written(tmp_path, name, depth, as_url):
    """Found by a hostile review: ``save(root + "/bs2\\x/run-1")`` (a backslash in a *parent*)
    was accepted, and TensorStore wrote the arrays to ``bs2/x/run-1`` while the marker and the
    metadata went to ``bs2\\x/run-1``. Plain paths and file:// URLs (``%5C``) alike."""
    root = tmp_path / f"r{uuid.uuid4().hex[:8]}"
    path = root.joinpath(name, *["d"] * depth, "run-1")
    given_as = path.as_uri() if as_url else os.fspath(path)
    calls = (
        lambda: cc.save(given_as, STATE, step=1),
        lambda: cc.restore(given_as),
        lambda: cc.Checkpointer(os.path.dirname(given_as), handle_sigterm=False),
        lambda: cc.list_checkpoints(os.path.dirname(given_as)),
    )
    for call in calls:
        with pytest.raises(cc.CheckpointPathError, match=re.escape(f"the directory name {name!r} cannot be used")):
            call()
    assert not root.exists()
