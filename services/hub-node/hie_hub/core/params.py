"""FHIR REST request plumbing: JSON bodies and search parameters (lenient unless ``handling=strict``)."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Generic, TypeVar
from urllib.parse import urlencode

from fastapi import Request

from hie_hub.core.rest import negotiate
from hie_platform.errors import BadRequest, UnsupportedMediaType
from hie_platform.http import request_json
from hie_schemas import codes
from hie_schemas.codes import DocumentType
from hie_schemas.fhir import FHIR_JSON, FhirParseError, parse_resource
from hie_schemas.identifiers import (
    KRNPI_SYSTEM,
    InvalidIdentifierError,
    parse_token_param,
    patient_key_from_identifier,
)

T = TypeVar("T")

MAX_COUNT = 1000
DEFAULT_COUNT = 100
# FHIR's general parameters (http.html#parameters) the hub honours on every search; never "unknown".
GENERAL = frozenset({"_format", "_pretty"})
# Searches that give Bundle.total also take _summary=count and _total (see the CapabilityStatement).
_NOT_HERE = " (_summary=count and _total are supported on DocumentReference, Task and AuditEvent searches)"
# A date or dateTime without a timezone is read in Korean time (the federation's local time).
LOCAL_TIME = timezone(timedelta(hours=9), "KST")
_DATE_PREFIXES = ("eq", "gt", "lt", "ge", "le")
_CLOCK = re.compile(r"\d{2}:\d{2}(?::(?P<seconds>\d{2})(?P<fraction>\.\d+)?)?")
_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")
# An RRN typed into a parameter name must not come back in an error either.
_RRN_SHAPE = re.compile(r"\d{6}-?\d{7}")


async def json_body(request: Request) -> Any:
    """The request body as JSON; FHIR JSON or plain JSON only."""
    content_type = request.headers.get("content-type", "")
    if content_type and "json" not in content_type.lower():
        raise UnsupportedMediaType(f"send {FHIR_JSON} (got {content_type.split(';')[0][:80]})")
    try:
        return await request_json(request)  # parsed once, by the platform's admission (json_limits.py)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise BadRequest(f"the body is not valid JSON{where}") from None


def fhir_body(body: Any, resource_type: str) -> dict[str, Any]:
    """A request body that must be one FHIR R4 resource of ``resource_type``, or the 400 saying why."""
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a FHIR {resource_type}")
    try:
        parse_resource(body, resource_type)
    except FhirParseError as exc:
        raise BadRequest(f"invalid {resource_type}: {exc}") from None
    return body


class SearchParams:
    """The query string of a FHIR search, checked against the parameters a resource supports.

    FHIR's general parameters ``_format`` and ``_pretty`` are accepted everywhere (JSON only: anything
    else is 406); ``_summary`` (count only) and ``_total`` where the resource lists them."""

    def __init__(self, request: Request, supported: Collection[str]) -> None:
        negotiate(request)
        self.query = request.query_params
        self.supported = supported
        prefer = request.headers.get("prefer", "")
        self.strict = any(p.strip().lower() == "handling=strict" for p in prefer.split(";"))
        unknown = sorted(
            {
                _RRN_SHAPE.sub("<redacted>", n)[:60]
                for n in self.query
                if n not in supported and n not in GENERAL
            }
        )
        if unknown and self.strict:
            raise BadRequest(
                f"unsupported search parameter(s): {', '.join(unknown)}"
                + (_NOT_HERE if {"_summary", "_total"} & set(unknown) else ""),
                expression=tuple(unknown[:5]),
            )

    def link(self, base: str, replace: dict[str, str], drop: frozenset[str] = frozenset()) -> str:
        """This search as a URL under ``base`` with parameters replaced (e.g. the RRN by the patient key)
        or dropped; used for self and next links, so it must never carry an RRN."""
        clamped = self.count()
        if clamped is not None and "_count" not in replace:
            replace = {**replace, "_count": str(clamped)}  # the page size served, not the one asked
        pairs = [
            (k, v)
            for k, v in self.query.multi_items()
            if k in self.supported and k not in replace and k not in drop
        ]
        pairs += list(replace.items())
        return f"{base}?{urlencode(pairs)}"

    def one(self, name: str) -> str | None:
        values = self.query.getlist(name)
        if len(values) > 1:
            raise BadRequest(f"search parameter {name} may be given once", expression=(name,))
        return values[0] if values else None

    def any_of(self, name: str) -> list[str] | None:
        """A token parameter's comma-separated alternatives (OR), or None when absent."""
        value = self.one(name)
        if value is None:
            return None
        return [v for v in value.split(",") if v]

    def count(self) -> int | None:
        value = self.one("_count")
        if value is None:
            return None
        if not value.isdigit():
            raise BadRequest("_count must be a non-negative integer", expression=("_count",))
        return min(int(value), MAX_COUNT)

    def count_only(self) -> bool:
        """``_summary=count``: only Bundle.total. Other _summary values are ignored (400 under
        strict handling, which names what is supported)."""
        if "_summary" not in self.supported:
            return False
        value = self.one("_summary")
        if value is None or value == "count":
            return value == "count"
        if self.strict:
            raise BadRequest("_summary: only _summary=count is supported", expression=("_summary",))
        return False

    def check_total(self) -> None:
        """``_total``: none | estimate | accurate; Bundle.total is always the accurate count."""
        value = self.one("_total") if "_total" in self.supported else None
        if value is not None and value not in ("none", "estimate", "accurate"):
            raise BadRequest("_total must be none, estimate or accurate", expression=("_total",))

    def dates(self, name: str) -> list[DateBound]:
        """Every ``name`` parameter (repeats are ANDed) as bounds on an instant (FHIR date search)."""
        return [parse_date(name, value) for value in self.query.getlist(name)]

    def instant(self, name: str) -> datetime | None:
        value = self.one(name)
        if value is None:
            return None
        bound = parse_date(name, value)
        return bound.start

    def flag(self, name: str) -> bool:
        value = self.one(name)
        if value is None or value.lower() == "false":
            return False
        if value.lower() == "true":
            return True
        raise BadRequest(f"{name} must be true or false", expression=(name,))

    def cursor(self) -> Cursor | None:
        value = self.one("_cursor")
        return None if value is None else Cursor.decode(value)

    def patient_key(self, name: str, secret: bytes) -> str:
        """The patient key of ``system|value`` (RRN or patient key system); the value is never echoed."""
        value = self.one(name)
        if value is None:
            raise BadRequest(f"{name} is required (system|value)", expression=(name,))
        try:
            system, raw = parse_token_param(value)
            return patient_key_from_identifier(system, raw, secret)
        except InvalidIdentifierError as exc:
            raise BadRequest(
                f"{name}: {_RRN_SHAPE.sub('<redacted>', str(exc))[:200]}", expression=(name,)
            ) from None

    def institution(self, name: str) -> str | None:
        """An Organization by its 요양기관기호: ``<KRNPI system>|<code>`` or just the code, as
        ``name`` (this API's shorthand) or ``name:identifier`` (the FHIR modifier)."""
        plain, modified = self.one(name), self.one(f"{name}:identifier")
        if plain is not None and modified is not None and plain != modified:
            raise BadRequest(f"{name} and {name}:identifier disagree", expression=(name,))
        value = plain or modified
        return None if value is None else self.institution_code(name, value)

    @staticmethod
    def institution_code(name: str, value: str) -> str:
        system, sep, code = value.rpartition("|")
        if sep and system and system != KRNPI_SYSTEM:
            raise BadRequest(f"{name} must use the system {KRNPI_SYSTEM}", expression=(name,))
        if not re.fullmatch(r"\d{8}", code):
            raise BadRequest(f"{name} must be an 8-digit 요양기관기호", expression=(name,))
        return code


def document_types(tokens: list[str]) -> list[str]:
    """DocumentReference.type tokens (K-CDA template or LOINC, with or without system) → stored types."""
    found: list[DocumentType] = []
    for token in tokens:
        system, sep, code = token.rpartition("|")
        systems = [system] if sep and system else [codes.TEMPLATE_SYSTEM, codes.LOINC]
        for candidate in systems:
            kind = codes.document_kind_by_coding(candidate, code)
            if kind is not None:
                found.append(kind.type)
    return [t.value for t in dict.fromkeys(found)]


@dataclass(frozen=True)
class DateBound:
    """One FHIR date parameter: the instant must lie in [start, end) shifted by the prefix."""

    prefix: str
    start: datetime
    end: datetime

    def admits(self, at: datetime) -> bool:
        if self.prefix == "eq":
            return self.start <= at < self.end
        if self.prefix == "gt":
            return at >= self.end
        if self.prefix == "ge":
            return at >= self.start
        if self.prefix == "lt":
            return at < self.start
        return at < self.end  # le

    @property
    def lower(self) -> datetime | None:
        """The inclusive lower limit it puts on the instant, if any."""
        return {"eq": self.start, "ge": self.start, "gt": self.end}.get(self.prefix)

    @property
    def upper(self) -> datetime | None:
        """The exclusive upper limit it puts on the instant, if any."""
        return {"eq": self.end, "le": self.end, "lt": self.start}.get(self.prefix)


def parse_date(name: str, raw: str) -> DateBound:
    """``[prefix]YYYY[-MM[-DD[Thh:mm[:ss[.fff]][zone]]]]``; the precision given is the range matched."""
    prefix = raw[:2] if raw[:2] in _DATE_PREFIXES else "eq"
    if raw[:2].isalpha() and raw[:2] not in _DATE_PREFIXES:
        raise BadRequest(
            f"{name}: prefix {raw[:2]!r} is not supported (use eq, gt, lt, ge or le)", expression=(name,)
        )
    value = raw[2:] if raw[:2] == prefix else raw
    match = _DATE.fullmatch(value)
    try:
        if match is not None:
            year = int(match.group(1))
            month, day = (int(g) if g else None for g in match.groups()[1:])
            start = datetime(year, month or 1, day or 1, tzinfo=LOCAL_TIME)
            if day is not None:
                end = start + timedelta(days=1)
            elif month is not None:
                end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=LOCAL_TIME)
            else:
                end = datetime(year + 1, 1, 1, tzinfo=LOCAL_TIME)
        else:
            if "T" not in value:
                raise ValueError(value)
            start = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if start.tzinfo is None:
                start = start.replace(tzinfo=LOCAL_TIME)
            # The precision of a dateTime is its last given unit: minutes, seconds or a fraction.
            clock = _CLOCK.match(value.split("T", 1)[1])
            if clock is None:
                raise ValueError(value)
            if clock["seconds"] is None:
                end = start + timedelta(minutes=1)
            elif clock["fraction"] is None:
                end = start + timedelta(seconds=1)
            else:
                end = start + timedelta(microseconds=1)
    except (ValueError, OverflowError):
        raise BadRequest(
            f"{name} must be a FHIR date or dateTime, optionally prefixed (e.g. ge2025-03-01)",
            expression=(name,),
        ) from None
    return DateBound(prefix, start.astimezone(UTC), end.astimezone(UTC))


@dataclass(frozen=True)
class Cursor:
    """Where the next page starts: after this (time, id) in the result order. Opaque to clients."""

    at: datetime
    key: str

    def encode(self) -> str:
        raw = json.dumps([self.at.isoformat(), self.key], separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            at, key = json.loads(raw)
            parsed = datetime.fromisoformat(at)
            if parsed.tzinfo is None or not isinstance(key, str):
                raise ValueError(token)
        except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
            raise BadRequest("_cursor is not a cursor this server issued", expression=("_cursor",)) from None
        return cls(parsed, key)


@dataclass(frozen=True)
class Found(Generic[T]):
    """One page of a search: its rows, the number of matches in all pages, where the next starts."""

    rows: list[T]
    total: int
    next_cursor: Cursor | None = None
