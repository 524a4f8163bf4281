"""FHIR REST conventions a generic FHIR client expects (HAPI, fhir.js, Medplum, Firely): versions
(meta.versionId / meta.lastUpdated, ETag, Last-Modified, If-Match, If-None-Match), the one format the
hub speaks (JSON; XML is answered 406), and a document's size and hash (attachment.size / hash).
docs/fhir-profiles.md (§1, §3 and §4 "Versions, conditional requests and searches") says the same
for clients."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from fastapi import Request, Response

from hie_platform.canonical_json import canonical_json
from hie_platform.errors import FhirError, PreconditionFailed, fhir_response
from hie_schemas.fhir import FHIR_JSON

_JSON_FORMATS = frozenset({"json", "application/json", "application/fhir+json"})
_JSON_RANGES = frozenset({"*/*", "application/*", "application/json", "application/fhir+json"})


class NotAcceptable(FhirError):
    status = 406
    code = "not-supported"


def negotiate(request: Request) -> None:
    """JSON only: ``_format`` (json, application/json, application/fhir+json) or an ``Accept`` that
    admits one of them; anything else (XML, Turtle) is 406 with an OperationOutcome in JSON."""
    for value in request.query_params.getlist("_format"):
        if value.split(";")[0].strip().lower() not in _JSON_FORMATS:
            raise NotAcceptable(
                f"_format {value[:40]!r} is not served: this server speaks FHIR JSON only "
                "(_format=json or application/fhir+json)",
                expression=("_format",),
            )
    accept = request.headers.get("accept", "").strip()
    if not accept:
        return
    ranges = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    if not any(r in _JSON_RANGES or r.endswith("+json") for r in ranges if r):
        raise NotAcceptable(
            f"Accept {accept[:60]!r} cannot be met: this server speaks FHIR JSON only ({FHIR_JSON})"
        )


async def negotiated(request: Request) -> None:
    """``negotiate`` as a router dependency: async, so FastAPI runs it inline, not in its threadpool."""
    negotiate(request)


def canonical(resource: Any) -> bytes:
    """The JSON the hub serves a document as, and what attachment.size / hash are computed over:
    keys sorted, no whitespace, UTF-8 (RFC 8785 JCS for FHIR's integers and strings)."""
    return canonical_json(resource)


def size_and_hash(body: bytes) -> dict[str, Any]:
    """attachment.size and attachment.hash (base64 of the SHA-1, FHIR R4) of ``body``."""
    return {"size": len(body), "hash": base64.b64encode(hashlib.sha1(body).digest()).decode()}


def etag(version: int) -> str:
    return f'W/"{version}"'


def instant(at: datetime) -> str:
    return at.astimezone(UTC).isoformat()


def with_meta(resource: dict[str, Any], version: int, at: datetime) -> dict[str, Any]:
    """A copy of ``resource`` with meta.versionId and meta.lastUpdated (other meta kept)."""
    meta = {**(resource.get("meta") or {}), "versionId": str(version), "lastUpdated": instant(at)}
    return {**resource, "meta": meta}


def version_headers(version: int, at: datetime) -> dict[str, str]:
    return {"ETag": etag(version), "Last-Modified": format_datetime(at.astimezone(UTC), usegmt=True)}


def _tags(header: str) -> set[str]:
    """The versions an If-Match / If-None-Match names (``W/"3"``, ``"3"``; ``*`` kept as is)."""
    return {t.strip().removeprefix("W/").strip('"') for t in header.split(",") if t.strip()}


def check_if_match(request: Request, version: int, what: str) -> None:
    """``If-Match`` on an update: 412 when it names another version (no header: no check)."""
    header = request.headers.get("if-match")
    if header is None:
        return
    tags = _tags(header)
    if "*" not in tags and str(version) not in tags:
        raise PreconditionFailed(
            f"{what} is at version {version} ({etag(version)}); If-Match named {header[:40]}"
        )


def versioned(
    request: Request, resource: dict[str, Any], version: int, at: datetime, *, body: bytes | None = None
) -> Response:
    """A read: 304 when ``If-None-Match`` names the current version, else the resource with its
    ETag and Last-Modified (``body``: the exact bytes to serve, when they were hashed)."""
    headers = version_headers(version, at)
    header = request.headers.get("if-none-match")
    if header is not None and ({"*", str(version)} & _tags(header)):
        return Response(status_code=304, headers=headers)
    if body is not None:
        return Response(body, status_code=200, media_type=FHIR_JSON, headers=headers)
    return fhir_response(200, resource, headers)
