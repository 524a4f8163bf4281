"""Request JSON parsed with limits, before any route, model or handler sees it.

``json.loads`` on untrusted input has three ways to hurt a service: a number of more than 4,300
digits raises ``ValueError`` (CPython's int limit, ``sys.set_int_max_str_digits``), an array or object
nested about a thousand deep raises ``RecursionError`` (and the recursive walks after it fail sooner),
and an object with hundreds of thousands of members becomes hundreds of thousands of validation
errors, built one by one on the event loop. Each is refused here as a 400 OperationOutcome.

Most bodies are parsed by orjson and then walked once for depth and members: with the parser of the
standard library and the hooks below, admitting a 10 KB ITI-65 transaction took 0.25 ms of CPU
(with the hub's second parse of it), now 0.12 ms (docs/operations.md, "Sizing: hub publish path"). A body
with a run of number characters longer than the limit, or one orjson refuses (not JSON, NaN, deeper
than orjson's own 1,024 levels, an integer beyond 64 bits), goes to the exact parser with the hooks,
so every refusal and every "not JSON" error reads as before.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import orjson

from hie_platform.errors import BadRequest


@dataclass(frozen=True)
class JsonLimits:
    """Generous for any FHIR resource or API body of the federation, small for an attack."""

    max_depth: int = 64  # a FHIR document Bundle nests about 15 deep
    max_members: int = 1000  # members of one object (FHIR repeats in arrays, not in keys)
    max_number_chars: int = 64  # an int64 has 19 digits; FHIR decimals keep 18 significant digits


DEFAULT_LIMITS = JsonLimits()


class JsonLimitExceeded(BadRequest):
    """The body is JSON, but beyond what any route of the federation accepts."""


class _Refused(Exception):
    def __init__(self, diagnostics: str) -> None:
        super().__init__(diagnostics)
        self.diagnostics = diagnostics


def _hooks(limits: JsonLimits) -> dict[str, Any]:
    def members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        if len(pairs) > limits.max_members:
            raise _Refused(f"a JSON object has more than {limits.max_members} members ({len(pairs)})")
        return dict(pairs)

    def number(kind: type[int] | type[float]) -> Any:
        def parse(text: str) -> int | float:
            if len(text) > limits.max_number_chars:
                raise _Refused(f"a JSON number is longer than {limits.max_number_chars} characters")
            return kind(text)

        return parse

    return {"object_pairs_hook": members, "parse_int": number(int), "parse_float": number(float)}


def _check_shape(node: dict[str, Any] | list[Any], limits: JsonLimits, depth: int = 1) -> bool:
    """Depth, and members per object (the exact parser counts them as they come; after orjson an
    object's repeated keys are already one). Recursive: it stops at ``max_depth``, long before
    Python's recursion limit, whatever depth the parser allowed.

    True when a number in it may have been written with 19 or more characters (``_wide``)."""
    if depth > limits.max_depth:
        raise _Refused(f"JSON nested deeper than {limits.max_depth} levels")
    if type(node) is dict:
        if len(node) > limits.max_members:
            raise _Refused(f"a JSON object has more than {limits.max_members} members ({len(node)})")
        children: Any = node.values()
    else:
        children = node
    wide = False
    for child in children:
        kind = type(child)
        if kind is dict or kind is list:
            wide = _check_shape(child, limits, depth + 1) or wide
        elif kind is not str and _wide(child):  # strings, most leaves, skip the call
            wide = True
    return wide


def _wide(value: Any) -> bool:
    """A float, or an integer of 18 digits or more: only these can come from a number literal of 19
    or more characters (a narrower integer has at most 17 digits and a minus sign). A body
    without them needs no look at its number literals."""
    kind = type(value)
    return kind is float or (kind is int and not -_NARROW < value < _NARROW)


_NARROW = 10**17


# Bodies with a number of 19 characters or more take the exact parser: orjson turns an integer beyond
# 64 bits into a float (1e+30 for thirty nines) where json.loads keeps it exact, and it knows nothing
# of the length limit. A run of number characters counts only where a value stands: after ":", ","
# or "[" (and an optional minus), before ",", "}" or "]", with any whitespace between; in a string
# ("urn:oid:1.2.410...") it does not. A top-level number is looked at by _fast itself.
_LONG_NUMBER = re.compile(rb"[:,\[][ \t\r\n]*+-?[0-9][-+.eE0-9]{18,}+[ \t\r\n]*+[,}\]]")


def _long_number(data: bytes) -> bool:
    return _LONG_NUMBER.search(data) is not None


def _fast(raw: bytes | str, limits: JsonLimits) -> Any:
    """orjson's value, checked for depth and members, or None when the exact parser must decide
    (None is also JSON's null: that body is then parsed again, which costs nothing).

    The bytes are searched for long number literals only when the value holds a float or a wide
    integer (the walk that tells is the one that checks the shape anyway): the search costs about
    50 µs of CPU on a 10 KB ITI-65 transaction, whose OIDs are long runs of digits and dots."""
    if limits.max_number_chars < 18:
        return None
    try:
        data = raw.encode() if isinstance(raw, str) else raw
        value = orjson.loads(data)
    except (orjson.JSONDecodeError, UnicodeEncodeError):
        return None
    if not isinstance(value, dict | list):
        return None if _wide(value) else value  # a number alone: the exact parser reads it
    if _check_shape(value, limits) and _long_number(data):
        return None
    return value


def loads(raw: bytes | str, limits: JsonLimits = DEFAULT_LIMITS) -> Any:
    """``json.loads`` within ``limits``: raise ``JsonLimitExceeded`` (400) beyond them, and
    ``json.JSONDecodeError``/``UnicodeDecodeError`` for what is not JSON at all, as ``json.loads``."""
    try:
        value = _fast(raw, limits)
        if value is None:
            value = json.loads(raw, **_hooks(limits))
            if isinstance(value, dict | list):
                _check_shape(value, limits)
    except _Refused as refused:
        raise JsonLimitExceeded(f"the body is refused: {refused.diagnostics}") from None
    except RecursionError:
        raise JsonLimitExceeded(
            f"the body is refused: JSON nested deeper than {limits.max_depth} levels"
        ) from None
    return value
