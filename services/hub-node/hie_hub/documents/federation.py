"""Walk-in search across hubs (임의방문): the asking side.

``GET {hub}/fhir/DocumentReference?patient.identifier=…&_federated=true`` from an institution of this
hub: the record locator names the hubs that hold documents for the patient, every one of them (and
this hub) is asked in parallel within one deadline, and each answers as the data holder for the
asking institution. The searchset carries an OperationOutcome entry for every hub that denied, timed
out, failed or could not be reached: partial results are explicit, never silent. A document found
elsewhere is retrieved through this hub (ITI-68 at the usual URL) for as long as a grant lasts; the
holder decides again at retrieval.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from hie_hub.core.disclosure import Access
from hie_hub.core.params import Cursor
from hie_hub.core.unit import UnitOfWork
from hie_hub.documents import holder
from hie_hub.documents.service import DocumentQuery
from hie_hub.models import FederatedGrant
from hie_hub.node import HubNode
from hie_platform.errors import (
    FhirError,
    Issue,
    RpcError,
    RpcNoResponders,
    RpcRemoteError,
    RpcTimeout,
    operation_outcome,
)
from hie_platform.logging import get_logger
from hie_schemas import subjects
from hie_schemas.auth import TokenClaims
from hie_schemas.consent import Purpose
from hie_schemas.contract import Operation, rpc_subject
from hie_schemas.envelope import Envelope
from hie_schemas.events import (
    DocumentPublished,
    HubRetrieveReply,
    HubRetrieveRequest,
    HubSearchReply,
    HubSearchRequest,
    LocateReply,
    LocateRequest,
)

log = get_logger(__name__)
LOCATOR_TIMEOUT = 1.0
# How long ITI-65 waits, after its commit, for the locator to take this hub's new entry; past it the
# DocumentPublished event (outbox, then JetStream) catches up and ITI-65 answers all the same.
LOCATE_ADD_TIMEOUT = 0.5
# Names the hub an OperationOutcome is about (issue.details), so that a client can tell them apart.
HUB_SYSTEM = "https://hie-federation.kr/fhir/CodeSystem/hub"


@dataclass
class FederatedResult:
    """The merged matches (newest first), one OperationOutcome per hub that did not answer fully."""

    document_references: list[dict[str, Any]] = field(default_factory=list)
    holders: dict[str, str] = field(default_factory=dict)  # document id -> hub
    outcomes: list[dict[str, Any]] = field(default_factory=list)
    hubs: dict[str, str] = field(default_factory=dict)  # hub -> ok | denied | timeout | unreachable | ...


def _outcome(severity: str, code: str, message: str, hub: str | None) -> dict[str, Any]:
    outcome = operation_outcome([Issue(message, code=code, severity=severity)])
    if hub is not None:
        outcome["issue"][0]["details"] = {"coding": [{"system": HUB_SYSTEM, "code": hub}], "text": hub}
    return outcome


async def _locate(node: HubNode, patient_key: str, result: FederatedResult) -> list[str]:
    """The hubs to ask: the locator's answer and always this hub; this hub alone if it is away."""
    try:
        reply = await node.bus.request(
            subjects.REGISTRY_LOCATE, LocateRequest(patient_key=patient_key), LocateReply, LOCATOR_TIMEOUT
        )
    except (RpcError, ValidationError):
        message = "the record locator did not answer: only this hub was searched"
        result.outcomes.append(_outcome("warning", "incomplete", message, None))
        return [node.hub]
    if reply.behind:
        message = (
            "the record locator had not yet taken in every hub's latest publications: a hub that "
            "published for this patient within the last seconds may be missing"
        )
        result.outcomes.append(_outcome("warning", "incomplete", message, None))
    return [node.hub, *(h for h in dict.fromkeys(reply.hubs) if h != node.hub)]


async def declare(node: HubNode, fact: str, envelope: Envelope, published: DocumentPublished) -> None:
    """Tell the record locator that this hub now holds documents for the patient, so that a walk-in
    search from any hub finds them as soon as ITI-65 returns. When the registry does not take it in
    time, the DocumentPublished event (``envelope`` on subject ``fact``) is put in the stream now, not
    at the relay's next pass (its relay publish is then a duplicate JetStream drops): the locator
    reports itself behind until it has taken the fact in, so searches say they may be incomplete
    rather than miss silently. Never raises: ITI-65 has committed and answers whatever happens.

    A patient key the locator has confirmed before (``node.located``) is not declared again: the
    entry exists, and the event that follows moves its last_seen."""
    if published.patient_key in node.located:
        return
    subject = rpc_subject(Operation.REGISTRY_LOCATE_ADD, sender=node.hub)
    try:
        await node.bus.request(subject, published, LocateReply, LOCATE_ADD_TIMEOUT)
        node.located.add(published.patient_key)
        return
    except (RpcError, ValidationError) as exc:
        log.warning("record locator did not take the new entry in time", error=type(exc).__name__)
    try:
        body, cid = envelope.to_bytes(), envelope.correlation_id
        publish = node.bus.publish_raw(fact, body, envelope.id, cid)
        await asyncio.wait_for(publish, LOCATE_ADD_TIMEOUT)
    except Exception as exc:  # the outbox relay still has it: only the early publish failed
        log.warning("document-published event left to the outbox relay", error=type(exc).__name__)


async def _ask(node: HubNode, hub: str, request: HubSearchRequest, deadline: float) -> HubSearchReply:
    """One hub's reply; raises the typed RPC error (hie_platform.errors) that says why there is none:
    RpcTimeout, RpcNoResponders (the hub is away), or RpcError (it failed or answered nonsense)."""
    if hub == node.hub:
        try:
            return await asyncio.wait_for(holder.answer_search(node, request), deadline)
        except TimeoutError as exc:
            raise RpcTimeout(hub, "the local search took longer than the deadline") from exc
        except FhirError as exc:
            raise RpcRemoteError(hub, exc.diagnostics) from exc
    subject = rpc_subject(Operation.HUB_SEARCH, to=hub, sender=node.hub)
    try:
        return await node.bus.request(subject, request, HubSearchReply, timeout=deadline)
    except ValidationError as exc:
        raise RpcError(subject, "the reply is not a HubSearchReply") from exc


# Why a hub's records are missing, by the RPC error its search raised: (state, issue code, message).
_UNANSWERED: dict[type[RpcError], tuple[str, str, str]] = {
    RpcTimeout: ("timeout", "timeout", "did not answer within the deadline"),
    RpcNoResponders: ("unreachable", "transient", "is unreachable"),
}


def _unanswered(result: FederatedResult, hub: str, error: RpcError) -> None:
    state, code, why = _UNANSWERED.get(type(error), ("error", "transient", "failed to answer"))
    log.warning("federated search: a hub gave no reply", hub=hub, state=state, error=str(error))
    result.hubs[hub] = state
    result.outcomes.append(_outcome("error", code, f"hub {hub} {why}; its records are missing", hub))


def _merge(result: FederatedResult, hub: str, reply: HubSearchReply, asker: str) -> None:
    result.hubs[hub] = reply.outcome
    if reply.outcome == "denied":
        message = f"hub {hub}: {reply.message} (rule {reply.rule})"
        result.outcomes.append(_outcome("error", "suppressed", message, hub))
    elif reply.outcome != "ok":
        result.outcomes.append(_outcome("error", "processing", f"hub {hub} refused: {reply.message}", hub))
    elif reply.withheld:
        message = f"hub {hub} withheld some documents under the patient's consent for {asker}"
        result.outcomes.append(_outcome("information", "suppressed", message, hub))
    for reference in reply.document_references:
        document_id = str(reference.get("id"))
        if document_id not in result.holders:
            result.holders[document_id] = hub
            result.document_references.append(reference)


def _position(reference: dict[str, Any]) -> tuple[datetime, str]:
    """Where a result sorts: its date (the document's time, stamped by its hub) and id."""
    try:
        at = datetime.fromisoformat(str(reference.get("date")))
    except ValueError:
        at = datetime.min.replace(tzinfo=UTC)
    return (at if at.tzinfo is not None else at.replace(tzinfo=UTC)), str(reference.get("id"))


def page(
    references: list[dict[str, Any]], query: DocumentQuery
) -> tuple[list[dict[str, Any]], Cursor | None]:
    """One page of the merged results (keyset on date and id, as the local search pages)."""
    rows = references
    if query.cursor is not None:
        after = (query.cursor.at, query.cursor.key)
        rows = [r for r in rows if _position(r) < after]
    returned = rows[: query.count]
    if len(rows) > query.count and returned:
        at, key = _position(returned[-1])
        return returned, Cursor(at, key)
    return returned, None


async def search(
    node: HubNode, unit: UnitOfWork, actor: TokenClaims, query: DocumentQuery, access: Access
) -> FederatedResult:
    """Ask every holding hub; merge, record grants for retrieval and audit the search here (the write
    session is taken once every hub has answered or timed out)."""
    result = FederatedResult()
    hubs = await _locate(node, query.patient_key, result)
    request = HubSearchRequest(
        patient_key=query.patient_key,
        requester=actor.inst,
        requester_hub=node.hub,
        purpose=access.purpose,
        justification=access.justification,
        filter=query.filter,
    )
    deadline = node.settings.federated_timeout_seconds
    asks = (_ask(node, hub, request, deadline) for hub in hubs)
    replies = await asyncio.gather(*asks, return_exceptions=True)
    for hub, reply in zip(hubs, replies, strict=True):
        if isinstance(reply, RpcError):
            _unanswered(result, hub, reply)
        elif isinstance(reply, BaseException):
            raise reply
        else:
            _merge(result, hub, reply, actor.inst)
    result.document_references.sort(key=_position, reverse=True)
    now = datetime.now(UTC)
    session = unit.writing()
    # Grants that ran out are of no use to anyone: forget them as new ones are made.
    await session.execute(delete(FederatedGrant).where(FederatedGrant.expires_at < now))
    expires = now + timedelta(seconds=node.settings.federated_grant_seconds)
    for document_id, hub in result.holders.items():
        session.add(
            FederatedGrant(
                document_id=document_id,
                requester=actor.inst,
                holder_hub=hub,
                patient_key=query.patient_key,
                purpose=access.purpose.value,
                justification=access.justification,
                expires_at=expires,
            )
        )
    detail = {"federated": True, "hubs": result.hubs} | access.audit_detail()
    await node.audit.record(
        session,
        action="federated.search",
        actor=actor,
        outcome="success" if not result.outcomes else "partial",
        patient_key=query.patient_key,
        document_ids=list(result.holders),
        purpose=access.purpose.value,
        detail=detail,
    )
    return result


async def grant(session: AsyncSession, actor: TokenClaims, document_id: str) -> FederatedGrant | None:
    """The latest unexpired grant to retrieve a federated result through this hub."""
    now = datetime.now(UTC)
    rows = await session.scalars(
        select(FederatedGrant)
        .where(
            FederatedGrant.document_id == document_id,
            FederatedGrant.requester == actor.inst,
            FederatedGrant.expires_at > now,
        )
        .order_by(FederatedGrant.id.desc())
        .limit(1)
    )
    return rows.first()


async def retrieve(node: HubNode, actor: TokenClaims, found: FederatedGrant) -> HubRetrieveReply:
    """Retrieve a federated result from its holder (this hub in-process, another over NATS); raises
    RpcError (typed: timeout, no responders, remote error) when the holder gives no usable reply."""
    request = HubRetrieveRequest(
        document_id=found.document_id,
        requester=actor.inst,
        requester_hub=node.hub,
        purpose=Purpose(found.purpose),
        justification=found.justification,
    )
    if found.holder_hub == node.hub:
        return await holder.answer_retrieve(node, request)
    subject = rpc_subject(Operation.HUB_RETRIEVE, to=found.holder_hub, sender=node.hub)
    try:
        return await node.bus.request(
            subject, request, HubRetrieveReply, timeout=node.settings.federated_timeout_seconds
        )
    except ValidationError as exc:
        raise RpcError(subject, "the reply is not a HubRetrieveReply") from exc
