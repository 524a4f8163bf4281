"""FHIR REST endpoints of DocumentReference and the document (IHE MHD ITI-67, ITI-68), local and
federated, and the author's status change (entered-in-error)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any
from urllib.parse import unquote

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from hie_hub.core.bundles import count_only, searchset
from hie_hub.core.disclosure import Access
from hie_hub.core.params import DEFAULT_COUNT, SearchParams, json_body
from hie_hub.core.rest import (
    canonical,
    check_if_match,
    negotiated,
    size_and_hash,
    version_headers,
    versioned,
    with_meta,
)
from hie_hub.core.unit import UnitOfWork
from hie_hub.documents import federation, lifecycle, repository
from hie_hub.documents import service as retrieval
from hie_hub.documents.cda_rendition import with_rendition
from hie_hub.documents.schemas import DOCUMENT_SEARCH, document_filter_fields
from hie_hub.documents.service import DocumentQuery
from hie_hub.models import Document
from hie_hub.node import HubActor, HubNode, NodeDep, ReaderActor, Reading, ReadingDep, UnitDep
from hie_platform.db import raise_after_commit
from hie_platform.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    RpcError,
    ServiceUnavailable,
    fhir_response,
)
from hie_platform.http import SessionDep
from hie_platform.logging import get_logger
from hie_schemas.auth import TokenClaims
from hie_schemas.consent import Purpose
from hie_schemas.events import DocumentFilter, HubRetrieveReply
from hie_schemas.fhir import FHIR_JSON
from hie_schemas.identifiers import PATIENT_KEY_SYSTEM

log = get_logger(__name__)

router = APIRouter(prefix="/fhir", tags=["documents"], dependencies=[Depends(negotiated)])

JUSTIFICATION_HEADER = "x-hie-justification"
MAX_JUSTIFICATION = 500


def _query(params: SearchParams, node: HubNode) -> DocumentQuery:
    wanted = DocumentFilter(**document_filter_fields(params))
    count = params.count()
    return DocumentQuery(
        patient_key=params.patient_key("patient.identifier", node.settings.patient_key_bytes),
        filter=wanted,
        dates=params.dates("date"),
        count=count if count is not None else DEFAULT_COUNT,
        cursor=params.cursor(),
    )


def _access(request: Request, params: SearchParams, actor: TokenClaims) -> Access:
    """purpose (treatment | emergency) and the justification emergency access needs: the
    ``justification`` parameter, or the X-HIE-Justification header (percent-encoded UTF-8)."""
    raw = params.one("purpose") or Purpose.TREATMENT.value
    if raw not in (Purpose.TREATMENT.value, Purpose.EMERGENCY.value):
        raise BadRequest("purpose must be treatment or emergency", expression=("purpose",))
    header = request.headers.get(JUSTIFICATION_HEADER)
    justification = (params.one("justification") or (unquote(header) if header else "")).strip()
    if len(justification) > MAX_JUSTIFICATION:
        raise BadRequest(f"the justification is limited to {MAX_JUSTIFICATION} characters")
    purpose = Purpose(raw)
    if purpose is Purpose.EMERGENCY and not justification:
        raise BadRequest(
            "emergency access needs a justification (parameter justification or header X-HIE-Justification)",
            expression=("justification",),
        )
    return Access(actor.inst, purpose, justification or None)


def _links(params: SearchParams, node: HubNode, query: DocumentQuery, next_at: Any) -> list[tuple[str, str]]:
    base = f"{node.settings.fhir_base}/DocumentReference"
    patient = {"patient.identifier": f"{PATIENT_KEY_SYSTEM}|{query.patient_key}"}
    links = [("self", params.link(base, patient))]
    if next_at is not None:
        links.append(("next", params.link(base, patient | {"_cursor": next_at.encode()})))
    return links


@router.get(
    "/DocumentReference", summary="ITI-67 Find Document References (add _federated=true for all hubs)"
)
async def find_document_references(
    request: Request, node: NodeDep, actor: ReaderActor, unit: UnitDep
) -> JSONResponse:
    params = SearchParams(request, DOCUMENT_SEARCH)
    params.check_total()
    query = _query(params, node)
    if params.count_only():  # only the total: no document is disclosed (nor audited as such)
        query = replace(query, count=0)
    access = _access(request, params, actor)
    if not params.flag("_federated"):
        if access.purpose is not Purpose.TREATMENT:
            raise BadRequest(
                "purpose applies to the federated search (_federated=true)", expression=("purpose",)
            )
        found = await retrieval.search(node, unit, actor, query)
        links = _links(params, node, query, found.next_cursor)
        bundle = searchset(
            node.settings.fhir_base, [presented(d) for d in found.rows], found.total, links=links
        )
        return fhir_response(200, count_only(bundle) if params.count_only() else bundle)
    if actor.hub != node.hub:
        raise Forbidden("a federated search is made by an institution of this hub")
    result = await federation.search(node, unit, actor, query, access)
    returned, next_cursor = federation.page(result.document_references, query)
    links = _links(params, node, query, next_cursor)
    bundle = searchset(
        node.settings.fhir_base,
        returned,
        len(result.document_references),
        links=links,
        outcomes=result.outcomes,
    )
    return fhir_response(200, count_only(bundle) if params.count_only() else bundle)


async def _federated(
    node: HubNode, unit: UnitOfWork, actor: TokenClaims, document_id: str
) -> HubRetrieveReply:
    """A document found by a federated search, retrieved from its holder through this hub (the write
    session is first taken after the holder answered: no write lock is held across the call)."""
    async with unit.reading() as read:
        found = await federation.grant(read, actor, document_id)
    if found is None:
        raise NotFound(f"no document {document_id} visible to institution {actor.inst}")
    try:
        reply: HubRetrieveReply | None = await federation.retrieve(node, actor, found)
    except RpcError as exc:
        log.warning("federated retrieve failed", hub=found.holder_hub, error=str(exc))
        reply = None
    outcome = "error" if reply is None else reply.outcome
    session = unit.writing()
    await node.audit.record(
        session,
        action="federated.retrieve",
        actor=actor,
        outcome="success" if outcome == "ok" else outcome,
        patient_key=found.patient_key,
        document_ids=[document_id],
        purpose=found.purpose,
        detail={"federated": True, "holder_hub": found.holder_hub}
        | ({"flagged": True, "justification": found.justification} if found.justification else {}),
    )
    # A refusal keeps its audit record: the session commits it, then the error goes on.
    if reply is None:
        message = f"hub {found.holder_hub}, which holds document {document_id}, did not answer"
        raise raise_after_commit(session, ServiceUnavailable(message))
    if reply.outcome == "denied":
        message = f"consent refuses document {document_id} to {actor.inst}: rule {reply.rule}"
        raise raise_after_commit(session, Forbidden(message))
    if reply.outcome != "ok" or reply.document is None or reply.document_reference is None:
        message = f"hub {found.holder_hub} no longer holds document {document_id}"
        raise raise_after_commit(session, NotFound(message))
    return reply


def served_document(row: Document) -> bytes:
    """The document as ITI-68 serves it (canonical JSON; its first version's meta if it was stored
    without one): what attachment.size and hash describe."""
    bundle = (
        row.bundle
        if (row.bundle.get("meta") or {}).get("versionId")
        else with_meta(row.bundle, 1, row.published_at)
    )
    return canonical(bundle)


def _described(docref: dict[str, Any], document: bytes) -> dict[str, Any]:
    """``docref`` with attachment.size and hash of ``document`` (MHD: both on every DocumentReference),
    and the K-CDA rendition as its second content when it has none (cda_rendition)."""
    contents = [dict(c) for c in docref.get("content") or [{}]]
    contents[0]["attachment"] = {**(contents[0].get("attachment") or {}), **size_and_hash(document)}
    return with_rendition({**docref, "content": contents}, document)


def last_change(row: Document) -> datetime:
    return row.updated_at or row.published_at


def presented(row: Document) -> dict[str, Any]:
    """The DocumentReference as every read and search returns it: version, last change, size, hash."""
    return with_meta(_described(row.docref, served_document(row)), row.version or 1, last_change(row))


async def _held_or_federated(reading: Reading, document_id: str, action: str) -> Document | HubRetrieveReply:
    """The document held here, else the one a federated search found elsewhere."""
    node, actor, unit = reading.node, reading.actor, reading.unit
    try:
        return await retrieval.read_document(node, unit, actor, document_id, action)
    except NotFound:
        return await _federated(node, unit, actor, document_id)


@router.get("/DocumentReference/{document_id}", summary="Read one DocumentReference")
@router.head("/DocumentReference/{document_id}", include_in_schema=False)
async def read_document_reference(document_id: str, request: Request, reading: ReadingDep) -> Response:
    found = await _held_or_federated(reading, document_id, "document.read")
    if isinstance(found, HubRetrieveReply):
        return fhir_response(200, _described(found.document_reference or {}, canonical(found.document or {})))
    return versioned(request, presented(found), found.version or 1, last_change(found))


@router.get("/Bundle/{document_id}", summary="ITI-68 Retrieve Document")
@router.head("/Bundle/{document_id}", include_in_schema=False)
async def retrieve_document(document_id: str, request: Request, reading: ReadingDep) -> Response:
    found = await _held_or_federated(reading, document_id, "document.retrieve")
    if isinstance(found, HubRetrieveReply):
        return Response(canonical(found.document or {}), media_type=FHIR_JSON)
    # The document never changes: version 1 (a status change is the DocumentReference's).
    return versioned(request, {}, 1, found.published_at, body=served_document(found))


@router.put("/DocumentReference/{document_id}", summary="The author marks its document entered-in-error")
async def update_document_reference(
    document_id: str, request: Request, node: NodeDep, actor: HubActor, session: SessionDep
) -> JSONResponse:
    body = await json_body(request)
    row = await repository.document(session, document_id)
    if row is not None and row.author_institution == actor.inst:
        check_if_match(request, row.version or 1, f"DocumentReference/{document_id}")
        body = _as_stored(body, row)
    await lifecycle.mark_entered_in_error(node, session, actor, document_id, body)
    row = await repository.document(session, document_id)
    if row is None:  # mark_entered_in_error answered NotFound already
        raise NotFound(f"no document {document_id}")
    await session.flush()  # the version moves when the change is written
    headers = version_headers(row.version or 1, last_change(row))
    return fhir_response(200, presented(row), headers)


def _as_stored(body: Any, row: Document) -> Any:
    """A DocumentReference PUT back as it was read carries the size and hash and the K-CDA rendition
    the hub adds on read: compare the rest with what is stored."""
    if not isinstance(body, dict) or not isinstance(body.get("content"), list) or not body["content"]:
        return body
    first = body["content"][0]
    attachment = first.get("attachment") if isinstance(first, dict) else None
    if not isinstance(attachment, dict):
        return body
    stored = ((row.docref.get("content") or [{}])[0].get("attachment")) or {}
    served = size_and_hash(served_document(row))
    kept = {k: v for k, v in attachment.items() if k not in served or v != served[k]}
    kept |= {k: stored[k] for k in served if k in stored and attachment.get(k) == served[k]}
    rest = body["content"][1:]
    offered = (_described(row.docref, served_document(row)).get("content") or [])[1:]
    if len(row.docref.get("content") or []) == 1 and rest == offered:
        rest = []  # the K-CDA rendition the hub adds on read, not stored
    return {**body, "content": [{**first, "attachment": kept}, *rest]}
