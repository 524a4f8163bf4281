"""Keeping the RRN out of everything the hub stores or says: pseudonymisation and redaction.

The RRN is accepted only to derive the patient key (design.md §5); every RRN identifier is replaced by
the key before anything is stored, and no error message or log line may carry one.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

from hie_platform.errors import BadRequest
from hie_schemas.documents.profiles import Json
from hie_schemas.identifiers import (
    PATIENT_KEY_SYSTEM,
    RRN_SYSTEM,
    InvalidIdentifierError,
    patient_key_from_identifier,
)

_RRN_SHAPE = re.compile(r"\d{6}-?\d{7}")
_PYDANTIC_INPUT = re.compile(r"input_value=.*?, input_type=")


def pseudonymised(bundle: Json, secret: bytes, secrets: list[str]) -> Json:
    """A copy of the transaction with every RRN identifier replaced by the patient key; BadRequest
    when a sent RRN is still found anywhere in it (narrative, free text)."""
    copied = with_patient_keys(bundle, secret)
    _refuse_rrn_left(copied, secrets)
    return copied


def _refuse_rrn_left(bundle: Json, secrets: list[str]) -> None:
    forms = rrn_forms(secrets)
    if not forms:
        return
    try:
        text_form = orjson.dumps(bundle).decode()
    except TypeError:  # integers beyond 64 bits: orjson refuses them, json does not
        text_form = json.dumps(bundle, ensure_ascii=False)
    if any(form in text_form for form in forms):
        raise BadRequest(
            "a resident registration number appears outside a Patient identifier (e.g. in narrative)"
        )


# Where a node sits, built into a FHIRPath-like string only when an error names it: formatting a
# path for every element was 9% of parse_submission's CPU (cProfile, 300 referrals).
_Trail = tuple["_Trail | None", "str | int"] | None


def _path(trail: _Trail) -> str:
    parts: list[str] = []
    while trail is not None:
        trail, key = trail
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key}")
    return "Bundle" + "".join(reversed(parts))


def with_patient_keys(root: Json, secret: bytes) -> Json:
    """A copy of a JSON tree (dicts, lists, immutable scalars) in which every RRN identifier, wherever
    it sits, is the patient key identifier (design.md §5); the input is left as it was.

    One pass that copies as it replaces: a full copy and then a walk over the copy were 3.7 % of the
    hub's CPU samples in a CRS publish (py-spy, 2026-12-07); ``tests/hub/test_pseudonym.py`` holds
    it to the rule below on generated trees."""
    copied: Json = _copied(root, None, secret, {})
    return copied


def _copied(node: Any, trail: _Trail, secret: bytes, keys: dict[str, str]) -> Any:
    # Recursive: the body's depth was bounded (64) by hie_platform.json_limits before it got here.
    is_list = type(node) is list
    copy: Any = [None] * len(node) if is_list else {}
    replaced = False
    for key, child in enumerate(node) if is_list else node.items():
        kind = type(child)
        if kind is dict and child.get("system") == RRN_SYSTEM:
            child = key_identifier(child, secret, _path((trail, key)), keys)
            replaced = True
        elif kind is dict or kind is list:
            child = _copied(child, (trail, key), secret, keys)
        copy[key] = child
    if replaced and is_list:  # an RRN and a key for the same patient become one
        first = {json.dumps(v, sort_keys=True): v for v in reversed(copy)}
        copy = [v for v in copy if first.get(json.dumps(v, sort_keys=True)) is v]
    return copy


def key_identifier(identifier: Json, secret: bytes, path: str, keys: dict[str, str]) -> Json:
    raw = identifier.get("value")
    if not isinstance(raw, str):
        raise BadRequest("the resident registration number has no value", expression=(path,))
    if raw not in keys:
        try:
            keys[raw] = patient_key_from_identifier(RRN_SYSTEM, raw, secret)
        except InvalidIdentifierError as exc:  # its message names the system and the rule, never the value
            raise BadRequest(
                f"invalid resident registration number: {exc.reason}", expression=(path,)
            ) from None
    use = {"use": identifier["use"]} if isinstance(identifier.get("use"), str) else {}
    return {**use, "system": PATIENT_KEY_SYSTEM, "value": keys[raw]}


def rrn_strings(body: Any) -> list[str]:
    """Every value sent under the RRN system (walked iteratively: the body is untrusted)."""
    found: list[str] = []
    stack = [body]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            value = node.get("value")
            if node.get("system") == RRN_SYSTEM and isinstance(value, str) and value.strip():
                found.append(value.strip())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def rrn_forms(secrets: list[str]) -> set[str]:
    digits = {re.sub(r"\D", "", s) for s in secrets}
    return {f for d in digits if len(d) == 13 for f in (d, f"{d[:6]}-{d[6:]}")}


def redact(message: str, secrets: list[str]) -> str:
    """A validation message without the offending input values, RRN-shaped numbers or sent RRNs."""
    lines = [line for line in message.splitlines() if "errors.pydantic.dev" not in line]
    redacted = _PYDANTIC_INPUT.sub("input_type=", "\n".join(lines))
    # Shorter strings cannot be an RRN and replacing them would only garble the message.
    for secret in sorted({*(s for s in secrets if len(s) >= 6), *rrn_forms(secrets)}, key=len, reverse=True):
        redacted = redacted.replace(secret, "<redacted>")
    return _RRN_SHAPE.sub("<redacted>", redacted)
