"""``StorageOptions``: every field checked at construction, and what its fields become (pure).

What the options do to requests (how many are sent, how long a wait lasts) is tested against the
test servers in ``test_faults.py`` and ``test_deletes.py``.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ckpt_callbacks as cc
from ckpt_callbacks import storage

FIELDS = ("max_retries", "initial_delay_s", "max_delay_s", "request_concurrency", "op_timeout_s")
# Values in and out of range: non-numbers, bools, NaN, infinities, each field's bounds and past them.
_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=3),
    st.just(math.nan),
    st.just(math.inf),
    st.just(-math.inf),
    st.lists(st.integers(), max_size=1),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.integers(min_value=-2, max_value=5000),
    st.floats(min_value=-1.0, max_value=1e5),
    st.sampled_from([0, 0.0, 0.0009, 0.001, 1000, 1001, 3600, 3600.5, 4096, 4097, 86400, 86400.5]),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e30, max_value=1e30),
)


def _valid(name: str, value: object) -> bool:
    """The documented range of each field (the reference the constructor is checked against)."""
    if isinstance(value, bool):
        return False
    if name in ("max_retries", "request_concurrency"):
        lo, hi = (0, storage.MAX_RETRIES) if name == "max_retries" else (1, storage.MAX_CONCURRENCY)
        return (value is None and name == "request_concurrency") or (isinstance(value, int) and lo <= value <= hi)
    hi = storage.MAX_OP_TIMEOUT_S if name == "op_timeout_s" else storage.MAX_DELAY_S
    return isinstance(value, int | float) and storage.MIN_SECONDS <= value <= hi


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(FIELDS), value=_JUNK)
def test_every_field_is_checked_at_construction_naming_it(name, value):
    # The other delays are set so that only the field under test can be wrong.
    base = {"initial_delay_s": 0.001, "max_delay_s": 3600.0} if name != "max_delay_s" else {"initial_delay_s": 0.001}
    kwargs = {**base, name: value}
    if _valid(name, value):
        assert getattr(cc.StorageOptions(**kwargs), name) == value
        return
    with pytest.raises(ValueError, match=rf"^StorageOptions\.{name}: expected .*, found ") as info:
        cc.StorageOptions(**kwargs)
    assert "\n" not in str(info.value)


@settings(max_examples=100, deadline=None)
@given(
    initial=st.floats(min_value=storage.MIN_SECONDS, max_value=storage.MAX_DELAY_S),
    largest=st.floats(min_value=storage.MIN_SECONDS, max_value=storage.MAX_DELAY_S),
)
def test_the_first_backoff_is_at_most_the_longest(initial, largest):
    if initial <= largest:
        opts = cc.StorageOptions(initial_delay_s=initial, max_delay_s=largest)
        # Every value accepted is one TensorStore takes: whole milliseconds, none of them zero.
        retries = storage.tensorstore_resources("s3", opts)["s3_request_retries"]
        assert retries["initial_delay"] != "0ms" and retries["max_delay"] != "0ms"
        return
    with pytest.raises(ValueError, match=r"^StorageOptions\.initial_delay_s: expected at most max_delay_s="):
        cc.StorageOptions(initial_delay_s=initial, max_delay_s=largest)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_delay_s": math.inf}, r"max_delay_s: expected a number of seconds in \[0.001, 3600\], found inf"),
        ({"op_timeout_s": math.nan}, r"op_timeout_s: expected a number of seconds in \[0.001, 86400\], found nan"),
        ({"op_timeout_s": 10**400}, r"op_timeout_s: expected"),
        ({"max_retries": True}, r"max_retries: expected an int in \[0, 1000\], found True"),
        ({"max_retries": 2.0}, r"max_retries: expected an int in \[0, 1000\], found 2.0"),
        ({"request_concurrency": 0}, r"request_concurrency: expected an int in \[1, 4096\] or None, found 0"),
        ({"initial_delay_s": 0.0001}, r"initial_delay_s: expected a number of seconds in \[0.001, 3600\]"),
    ],
)
def test_messages_say_the_field_the_range_and_what_was_given(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cc.StorageOptions(**kwargs)


def test_replace_is_checked_too():
    with pytest.raises(ValueError, match=r"StorageOptions\.max_delay_s"):
        dataclasses.replace(cc.StorageOptions(), max_delay_s=math.inf)


def test_fsspec_clients_send_each_request_once():
    """The library's retry loop is the only one over fsspec: botocore makes one attempt."""
    opts = cc.StorageOptions(max_retries=5, op_timeout_s=7.0)
    kwargs = storage.fsspec_options("s3", opts)["config_kwargs"]
    assert kwargs["retries"] == {"total_max_attempts": 1, "mode": "standard"}
    assert kwargs["connect_timeout"] == kwargs["read_timeout"] == 7.0
    assert storage.fsspec_options("gs", opts) == {"requests_timeout": 7.0}
