"""This hub as the data holder in a federated search (IHE XCA-like, over NATS request/reply).

Another hub asks on behalf of one of its institutions (``hie.hub.<hub>.rpc.search`` and ``.retrieve``);
this hub applies the patient's consent for that institution and purpose, exactly as for its own
institutions, and audits every disclosure with the asking institution as the actor. A document that an
exchange sent to the asking institution may also flow for that exchange's purpose (as its own hub
reads it), and is then audited with that purpose. The same
functions answer the asking hub's own holdings in-process.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from hie_hub.core.disclosure import (
    Access,
    Disclosure,
    disclosures,
    exchange_accesses,
    first_refusal,
    newest_version,
)
from hie_hub.core.rest import canonical
from hie_hub.documents import repository
from hie_hub.documents.cda_rendition import with_rendition
from hie_hub.models import Document
from hie_hub.node import HubNode
from hie_platform.logging import get_logger
from hie_schemas.auth import AUDIENCE, TokenClaims
from hie_schemas.consent import Purpose
from hie_schemas.contract import RPCS, Operation
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
    view = await node.registry.institution(requester)
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


async def _candidates(
    read: AsyncSession, request: HubSearchRequest | HubRetrieveRequest, rows: list[Document]
) -> list[list[Access]]:
    """The asked purpose first, then those of the exchanges that sent each row to the requester."""
    asked = _access(request)
    by_exchange = await exchange_accesses(read, request.requester, rows)
    return [[asked, *(a for a in found if a != asked)] for found in by_exchange]


def _access_detail(request: HubSearchRequest | HubRetrieveRequest, shown: list[Disclosure]) -> dict[str, Any]:
    """The audit detail of documents disclosed for one access: the request's own, or an exchange's."""
    if not shown or shown[0].access == _access(request):
        return _detail(request)
    exchanges = sorted({d.access.exchange_id for d in shown if d.access.exchange_id})
    detail = {"federated": True, "requester_hub": request.requester_hub, "exchange_ids": exchanges}
    return detail | shown[0].access.audit_detail()


def disclosed(row: Document, hub: str) -> dict[str, Any]:
    """The DocumentReference another hub shows its reader: with the K-CDA rendition of the document as
    that hub's ITI-68 serves it (row.bundle, canonical) when it has no K-CDA content of its own."""
    docref = with_rendition(row.docref, canonical(row.bundle))
    return {**docref, "meta": {**(row.docref.get("meta") or {}), "source": hub_source(hub)}}


async def answer_search(node: HubNode, request: HubSearchRequest) -> HubSearchReply:
    """The patient's documents held here that consent lets flow to the asking institution now."""
    refused = _refusal(request)
    if refused is not None:
        return HubSearchReply(hub=node.hub, outcome="refused", message=refused)
    wanted = request.filter
    async with node.db.read_sessions() as read:
        rows = await repository.documents_of_patient(read, request.patient_key, **wanted.model_dump())
        rows = rows[:MAX_DOCUMENTS]
        candidates = await _candidates(read, request, rows)
    decided = await disclosures(node, rows, candidates)
    permitted = [row for row, d in zip(rows, decided, strict=True) if d.permit]
    refusal = first_refusal([d.decision for d in decided])
    await _audit_search(node, request, rows, decided)
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


async def _audit_search(
    node: HubNode, request: HubSearchRequest, rows: list[Document], decided: list[Disclosure]
) -> None:
    """One record per purpose the documents were disclosed for, the asked one first (always written)."""
    permitted = [d for d in decided if d.permit]
    refusal = first_refusal([d.decision for d in decided])
    groups: dict[Access, list[tuple[Document, Disclosure]]] = {_access(request): []}
    for row, d in zip(rows, decided, strict=True):
        if d.permit:
            groups.setdefault(d.access, []).append((row, d))
    async with node.db.transaction() as session:
        actor = await remote_actor(node, request.requester, request.requester_hub)
        for n, (access, group) in enumerate(groups.items()):
            counts = {"matched": len(rows), "withheld": len(rows) - len(permitted)} if n == 0 else {}
            await node.audit.record(
                session,
                action="federated.search",
                actor=actor,
                outcome="success" if permitted or not rows else "denied",
                patient_key=request.patient_key,
                document_ids=[row.document_id for row, _ in group],
                purpose=access.purpose.value,
                rule=refusal.rule.value if refusal and not permitted else None,
                consent_version=newest_version(
                    [d.decision for _, d in group] if n else [d.decision for d in decided]
                ),
                detail=_access_detail(request, [d for _, d in group]) | counts,
            )


async def answer_retrieve(node: HubNode, request: HubRetrieveRequest) -> HubRetrieveReply:
    """One document for the asking institution, if consent lets it flow now (asked again: it may
    have been withdrawn since the search)."""
    refused = _refusal(request)
    if refused is not None:
        return HubRetrieveReply(hub=node.hub, outcome="refused", message=refused)
    async with node.db.read_sessions() as read:
        row = await repository.document(read, request.document_id)
        candidates = await _candidates(read, request, [row]) if row is not None else []
    if row is None:
        return HubRetrieveReply(hub=node.hub, outcome="not-found", message="no such document")
    [disclosure] = await disclosures(node, [row], candidates)
    decision, permitted = disclosure.decision, disclosure.permit
    async with node.db.transaction() as session:
        await _audit_retrieve(node, session, request, row, disclosure)
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
    disclosure: Disclosure,
) -> None:
    decision = disclosure.decision
    await node.audit.record(
        session,
        action="federated.retrieve",
        actor=await remote_actor(node, request.requester, request.requester_hub),
        outcome="success" if disclosure.permit else "denied",
        patient_key=row.patient_key,
        document_ids=[row.document_id],
        purpose=disclosure.access.purpose.value,
        rule=decision.rule.value if decision else None,
        detail=_access_detail(request, [disclosure]),
    )


async def serve(node: HubNode) -> None:
    """Answer other hubs' federated searches and retrievals (queue group: every replica of the hub)."""
    bus = node.bus

    async def search(request: HubSearchRequest) -> HubSearchReply:
        return await answer_search(node, request)

    async def retrieve(request: HubRetrieveRequest) -> HubRetrieveReply:
        return await answer_retrieve(node, request)

    async def asker(sender: str | None, request: HubSearchRequest | HubRetrieveRequest) -> None:
        await node.registry.check_asker(sender, request.requester, request.requester_hub)

    # Any asking hub (the subject's last token), checked by asker() against the institution it names.
    search_subject = RPCS[Operation.HUB_SEARCH].pattern(to=node.hub)
    retrieve_subject = RPCS[Operation.HUB_RETRIEVE].pattern(to=node.hub)
    await bus.serve(search_subject, QUEUE, HubSearchRequest, search, verify=asker)
    await bus.serve(retrieve_subject, QUEUE, HubRetrieveRequest, retrieve, verify=asker)
