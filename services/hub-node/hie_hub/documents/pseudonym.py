"""Keeping the RRN out of everything the hub stores or says: pseudonymisation and redaction.

The RRN is accepted only to derive the patient key (design.md §5); every RRN identifier is replaced by
the key before anything is stored, and no error message or log line may carry one.
"""

from __future__ import annotations

import json
import re
from typing import Any

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


def pseudonymise(root: Json, secret: bytes) -> None:
    """Replace every RRN identifier, wherever it sits, by the patient key identifier (design.md §5)."""
    keys: dict[str, str] = {}
    stack: list[tuple[dict[Any, Any] | list[Any], str]] = [(root, "Bundle")]
    while stack:
        node, path = stack.pop()
        items: list[tuple[Any, Any]] = list(node.items() if isinstance(node, dict) else enumerate(node))
        replaced = False
        for key, child in items:
            child_path = f"{path}.{key}" if isinstance(node, dict) else f"{path}[{key}]"
            if isinstance(child, dict) and child.get("system") == RRN_SYSTEM:
                node[key] = key_identifier(child, secret, child_path, keys)
                replaced = True
            elif isinstance(child, dict | list):
                stack.append((child, child_path))
        if replaced and isinstance(node, list):  # an RRN and a key for the same patient become one
            first = {json.dumps(v, sort_keys=True): v for v in reversed(node)}
            node[:] = [v for v in node if first.get(json.dumps(v, sort_keys=True)) is v]


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
