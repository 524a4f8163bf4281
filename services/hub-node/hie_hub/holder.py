"""This hub as the data holder in a federated search (IHE XCA-like, over NATS request/reply).

Another hub asks on behalf of one of its institutions (``hie.hub.<hub>.rpc.search`` and ``.retrieve``);
this hub applies the patient's consent for that institution and purpose, exactly as for its own
institutions, and audits every disclosure with the asking institution as the actor. The same
functions answer the asking hub's own holdings in-process.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from hie_hub import repository
from hie_hub.disclosure import Access, decisions, first_refusal, newest_version
from hie_hub.models import Document
from hie_hub.node import HubNode
from hie_platform.logging import get_logger
from hie_schemas import subjects
from hie_schemas.auth import AUDIENCE, TokenClaims
from hie_schemas.consent import Purpose
from hie_schemas.directory import InstitutionKind
from hie_schemas.events import HubRetrieveReply, HubRetrieveRequest, HubSearchReply, HubSearchRequest
from hie_schemas.identifiers import InvalidIdentifierError, validate_institution_code, validate_patient_key

log = get_logger(__name__)
QUEUE = "hub-node"
# A holder answers with at most this many documents; the asking hub pages through the merged list.
MAX_DOCUMENTS = 1000


def hub_source(hub: str) -> str:
    """Where a federated result came from (DocumentReference.meta.source)."""
    return f"urn:hie-federation:hub:{hub}"


async def remote_actor(node: HubNode, requester: str, requester_hub: str) -> TokenClaims:
    """The asking institution as the audit trail names it (its hub vouched for it; no token here)."""
    view = await node.runtime.registry.institution(requester)
    return TokenClaims(
        iss=f"hub:{requester_hub}",
        sub=f"hub:{requester_hub}",
        aud=AUDIENCE,
        exp=0,
        iat=0,
        jti=str(uuid.uuid4()),
        inst=requester,
        kind=view.kind if view is not None else InstitutionKind.CLINIC,
        hub=requester_hub,
    )


def _access(request: HubSearchRequest | HubRetrieveRequest) -> Access:
    return Access(request.requester, request.purpose, request.justification)


def _refusal(request: HubSearchRequest | HubRetrieveRequest) -> str | None:
    """Why a request cannot be answered at all (checked before anything is read)."""
    try:
        validate_institution_code(request.requester)
        if isinstance(request, HubSearchRequest):
            validate_patient_key(request.patient_key)
    except InvalidIdentifierError as exc:
        return exc.reason
    if request.purpose is Purpose.EMERGENCY and not (request.justification or "").strip():
        return "emergency access needs a justification"
    if request.purpose not in (Purpose.TREATMENT, Purpose.EMERGENCY):
        return f"a federated search is for treatment or emergency, not {request.purpose.value}"
    return None


def _detail(request: HubSearchRequest | HubRetrieveRequest, **more: Any) -> dict[str, Any]:
    detail: dict[str, Any] = {"federated": True, "requester_hub": request.requester_hub, **more}
    if request.purpose is Purpose.EMERGENCY:
        # Break-the-glass is recorded with its justification (의료법 §21-2 exception).
        detail |= {"flagged": True, "justification": request.justification}
    return detail


def disclosed(row: Document, hub: str) -> dict[str, Any]:
    return {**row.docref, "meta": {**(row.docref.get("meta") or {}), "source": hub_source(hub)}}


async def answer_search(node: HubNode, request: HubSearchRequest) -> HubSearchReply:
    """The patient's documents held here that consent lets flow to the asking institution now."""
    refused = _refusal(request)
    if refused is not None:
        return HubSearchReply(hub=node.hub, outcome="refused", message=refused)
    wanted = request.filter
    async with node.runtime.db.read_sessions() as read:
        rows = await repository.documents_of_patient(
            read,
            request.patient_key,
            types=wanted.types,
            statuses=wanted.statuses,
            authors=wanted.authors,
            created_from=wanted.created_from,
            created_before=wanted.created_before,
        )
    rows = rows[:MAX_DOCUMENTS]
    decided = await decisions(node, _access(request), rows)
    permitted = [row for row, d in zip(rows, decided, strict=True) if d is None or d.permit]
    refusal = first_refusal(decided)
    async with node.runtime.db.transaction() as session:
        await node.runtime.audit.record(
            session,
            action="federated.search",
            actor=await remote_actor(node, request.requester, request.requester_hub),
            outcome="success" if permitted or not rows else "denied",
            patient_key=request.patient_key,
            document_ids=[row.document_id for row in permitted],
            purpose=request.purpose.value,
            rule=refusal.rule.value if refusal and not permitted else None,
            consent_version=newest_version(decided),
            detail=_detail(request, matched=len(rows), withheld=len(rows) - len(permitted)),
        )
    node.runtime.relay.kick()
    if rows and not permitted and refusal is not None:
        return HubSearchReply(
            hub=node.hub,
            outcome="denied",
            rule=refusal.rule.value,
            message=f"consent does not disclose this hub's records to {request.requester}",
        )
    return HubSearchReply(
        hub=node.hub,
        outcome="ok",
        document_references=[disclosed(row, node.hub) for row in permitted],
        withheld=len(permitted) < len(rows),
    )


async def answer_retrieve(node: HubNode, request: HubRetrieveRequest) -> HubRetrieveReply:
    """One document for the asking institution, if consent lets it flow now (asked again: it may
    have been withdrawn since the search)."""
    refused = _refusal(request)
    if refused is not None:
        return HubRetrieveReply(hub=node.hub, outcome="refused", message=refused)
    async with node.runtime.db.read_sessions() as read:
        row = await repository.document(read, request.document_id)
    if row is None:
        return HubRetrieveReply(hub=node.hub, outcome="not-found", message="no such document")
    decision = (await decisions(node, _access(request), [row]))[0]
    permitted = decision is None or decision.permit
    async with node.runtime.db.transaction() as session:
        await _audit_retrieve(
            node, session, request, row, permitted, decision.rule.value if decision else None
        )
    node.runtime.relay.kick()
    if not permitted and decision is not None:
        return HubRetrieveReply(
            hub=node.hub, outcome="denied", rule=decision.rule.value, message="consent refuses the document"
        )
    return HubRetrieveReply(
        hub=node.hub, outcome="ok", document_reference=disclosed(row, node.hub), document=row.bundle
    )


async def _audit_retrieve(
    node: HubNode,
    session: AsyncSession,
    request: HubRetrieveRequest,
    row: Document,
    permitted: bool,
    rule: str | None,
) -> None:
    await node.runtime.audit.record(
        session,
        action="federated.retrieve",
        actor=await remote_actor(node, request.requester, request.requester_hub),
        outcome="success" if permitted else "denied",
        patient_key=row.patient_key,
        document_ids=[row.document_id],
        purpose=request.purpose.value,
        rule=rule,
        detail=_detail(request),
    )


async def serve(node: HubNode) -> None:
    """Answer other hubs' federated searches and retrievals (queue group: every replica of the hub)."""
    bus = node.runtime.bus

    async def search(request: HubSearchRequest) -> HubSearchReply:
        return await answer_search(node, request)

    async def retrieve(request: HubRetrieveRequest) -> HubRetrieveReply:
        return await answer_retrieve(node, request)

    await bus.serve(subjects.hub_rpc(node.hub, "search"), QUEUE, HubSearchRequest, search)
    await bus.serve(subjects.hub_rpc(node.hub, "retrieve"), QUEUE, HubRetrieveRequest, retrieve)
