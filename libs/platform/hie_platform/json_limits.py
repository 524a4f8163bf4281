"""Request JSON parsed with limits, before any route, model or handler sees it.

``json.loads`` on untrusted input has three ways to hurt a service: a number of more than 4,300
digits raises ``ValueError`` (CPython's int limit, ``sys.set_int_max_str_digits``), an array or object
nested about a thousand deep raises ``RecursionError`` (and the recursive walks after it fail sooner),
and an object with hundreds of thousands of members becomes hundreds of thousands of validation
errors, built one by one on the event loop. Each is refused here as a 400 OperationOutcome.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

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


def _check_depth(value: Any, max_depth: int) -> None:
    """Walked with a stack of its own: the value may be as deep as the parser allowed."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise _Refused(f"JSON nested deeper than {max_depth} levels")
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))


def loads(raw: bytes | str, limits: JsonLimits = DEFAULT_LIMITS) -> Any:
    """``json.loads`` within ``limits``: raise ``JsonLimitExceeded`` (400) beyond them, and
    ``json.JSONDecodeError``/``UnicodeDecodeError`` for what is not JSON at all, as ``json.loads``."""
    try:
        value = json.loads(raw, **_hooks(limits))
        if isinstance(value, dict | list):
            _check_depth(value, limits.max_depth)
    except _Refused as refused:
        raise JsonLimitExceeded(f"the body is refused: {refused.diagnostics}") from None
    except RecursionError:
        raise JsonLimitExceeded(
            f"the body is refused: JSON nested deeper than {limits.max_depth} levels"
        ) from None
    return value
