"""The request JSON admission (hie_platform/json_limits.py): orjson for most bodies, the exact parser
of the standard library for the rest; both must give the same value and the same refusals."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hie_platform import json_limits
from hie_platform.json_limits import DEFAULT_LIMITS, JsonLimitExceeded

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=30)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=40,
)


def _same(a: Any, b: Any) -> bool:
    """Equal, and of the same type all the way down (an int must not come back as a float)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


@settings(max_examples=400, deadline=None)
@given(_values, st.sampled_from([None, 1, 2]))
def test_the_value_is_what_the_standard_parser_reads(value: Any, indent: int | None) -> None:
    raw = json.dumps(value, indent=indent, ensure_ascii=False).encode()
    assert _same(json_limits.loads(raw), json.loads(raw))


@pytest.mark.parametrize(
    "raw",
    [
        b'{"total": 999999999999999999999999999999}',  # orjson would give 1e+30
        b'{"a": [1, -12345678901234567890]}',
        b"123456789012345678901234567890",
        b'{"x": NaN, "y": -Infinity}',  # not JSON, but json.loads reads it, and so did we
        b'{"a":-12345678901234567890123}',
        b"[" + b" " * 40 + b"12345678901234567890123" + b" " * 40 + b"]",  # context beyond the window
    ],
)
def test_numbers_orjson_would_change_take_the_exact_parser(raw: bytes) -> None:
    assert json_limits._fast(raw, DEFAULT_LIMITS) is None
    assert _same(json_limits.loads(raw), json.loads(raw))


def test_an_oid_in_a_string_keeps_the_fast_path() -> None:
    raw = (
        b'{"system": "urn:oid:1.2.410.100110.10.41348.20261206123456", "n": [1, 2.5],'
        b' "s": "-1234567890123456789012 x"}'
    )
    assert json_limits._fast(raw, DEFAULT_LIMITS) == json.loads(raw)


@pytest.mark.parametrize(
    ("raw", "refusal"),
    [
        (b"[" * 65 + b"]" * 65, "nested deeper than 64 levels"),
        (b"[" * 5000 + b"]" * 5000, "nested deeper than 64 levels"),  # beyond orjson's own limit
        (b'{"x": 0.' + b"1" * 1000 + b"}", "longer than 64 characters"),
        (b'{"x": [1, ' + b"7" * 5000 + b"]}", "longer than 64 characters"),
        (b"{" + b",".join(b'"k%d": 1' % i for i in range(1001)) + b"}", "more than 1000 members (1001)"),
    ],
)
def test_refusals_read_the_same_on_both_paths(raw: bytes, refusal: str) -> None:
    with pytest.raises(JsonLimitExceeded) as refused:
        json_limits.loads(raw)
    assert refusal in refused.value.diagnostics


def test_a_key_repeated_past_the_member_limit_is_one_member() -> None:
    """Counted after parsing, an object's repeated keys are one member, whose value is the last, as
    json.loads keeps it: nothing multiplies (the limit is against one validation error per member)."""
    raw = b"[{" + b",".join(b'"k": %d' % i for i in range(5000)) + b"}]"
    assert json_limits.loads(raw) == json.loads(raw) == [{"k": 4999}]


def test_a_str_body_with_a_lone_surrogate_reads_as_json_loads_reads_it() -> None:
    raw = '{"a": "\ud800"}'
    assert json_limits.loads(raw) == json.loads(raw)


@pytest.mark.parametrize("raw", [b"{", b'{"a": 1,}', b"\xff\xfe", b""])
def test_what_is_not_json_raises_as_json_loads_does(raw: bytes) -> None:
    try:
        json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        expected = error
    with pytest.raises(type(expected)) as raised:
        json_limits.loads(raw)
    assert str(raised.value) == str(expected)
