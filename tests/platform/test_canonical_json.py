"""canonical_json writes exactly the standard library's canonical bytes: stored documents' hashes and
the audit chain were computed over them (hie_platform/canonical_json.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hie_platform.canonical_json import canonical_json


def standard(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)  # past 64 bits both ways
    | st.floats()  # every magnitude, NaN and the infinities included
    | st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=20)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=40,
)


@settings(max_examples=1000, deadline=None)
@given(_values)
def test_the_bytes_are_the_standard_encoders(value: Any) -> None:
    assert canonical_json(value) == standard(value)


@pytest.mark.parametrize(
    "value",
    [
        {"v": 1e16},
        {"v": 3e-05},
        {"v": 9_999_999_999_999_998.0},  # the largest float below 1e16
        {"v": 0.0001},
        {"v": -0.0},
        {"v": float("nan"), "w": float("inf")},
        {"v": 2**64},
        {"v": -(2**63) - 1},
        {"v": (1, 2)},
        {1: "an integer key"},
        {"ключ": "값", "a": "\u2028\x7f\x00"},
    ],
)
def test_the_edges_of_both_encoders(value: Any) -> None:
    assert canonical_json(value) == standard(value)


def test_a_lone_surrogate_fails_as_before() -> None:
    with pytest.raises(UnicodeEncodeError):
        standard({"a": "\ud800"})
    with pytest.raises(UnicodeEncodeError):
        canonical_json({"a": "\ud800"})
