"""Key paths as text: ``key_string`` spells a leaf's path for every display and ``keys=``, and
``parse_key_string`` reads it back, for any key (a '/', a '%', a backslash, unicode, empty)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ckpt_callbacks as cc
from ckpt_callbacks import format as fmt
from ckpt_callbacks.restoring import _restructure as restructure

_COMPONENT = st.one_of(
    st.text(alphabet=st.sampled_from("ab/%\\ü_ .-2F5"), max_size=6),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=8),
    st.integers(min_value=0, max_value=10**6),  # a sequence index
)
_PATH = st.lists(_COMPONENT, max_size=5).map(tuple)


@given(_PATH)
def test_parse_reads_back_what_key_string_spells(path):
    text = fmt.key_string(path)
    assert fmt.parse_key_string(text) == tuple(str(k) for k in path)
    assert fmt.key_string(fmt.parse_key_string(text)) == text


@given(_PATH, _PATH)
def test_two_paths_never_spell_alike(a, b):
    if tuple(map(str, a)) != tuple(map(str, b)):
        assert fmt.key_string(a) != fmt.key_string(b)


@given(st.lists(st.from_regex(r"[A-Za-z0-9_.\-:\[\] ]{1,12}", fullmatch=True), max_size=5), st.integers(0, 99))
def test_ordinary_keys_print_as_they_always_have(path, index):
    assert fmt.key_string((*path, index)) == "/".join([*path, str(index)])


@given(_PATH)
def test_the_renamer_matches_by_the_same_spelling(path):
    assert restructure.match_key(path) == fmt.key_string(path)


def test_a_leaf_record_key_is_its_spelled_path(tmp_path):
    cc.save(tmp_path / "c", {"a/b": np.zeros(1), "a": {"b": np.ones(1)}, "l": [np.ones(1)]}, step=1)
    keys = [r.key for r in cc.open_checkpoint(tmp_path / "c").manifest("state").leaves]
    assert sorted(keys) == ["a%2Fb", "a/b", "l/0"]


@pytest.mark.parametrize(
    ("text", "parts"), [("params/", ("params",)), ("/params//w", ("params", "w")), ("", ()), ("%", ("",))]
)
def test_empty_parts_name_nothing_and_a_lone_percent_is_an_empty_key(text, parts):
    assert fmt.parse_key_string(text) == parts


@pytest.mark.parametrize("text", ["100%", "a%2", "%%", "a%2Gb", "%20"])
def test_a_stray_percent_is_refused(text):
    with pytest.raises(ValueError, match=re.escape(f"key {text!r}: part")):
        fmt.parse_key_string(text)
