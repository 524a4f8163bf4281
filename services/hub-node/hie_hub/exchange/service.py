"""Publishing documents (IHE ITI-65) and pushing referrals/returns to the recipient's hub.

Consent is asked of the decision point before anything is written; a refusal stores nothing but the
refusal itself (audit + ExchangeDenied), and a permitted exchange writes its documents, the
SubmissionSet, one Task per recipient, the status of replaced documents and the events in one
transaction (outbox).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from hie_hub.core.bundles import Created, transaction_response
from hie_hub.core.disclosure import Access, flow_query
from hie_hub.core.unit import UnitOfWork, outside_read_phase
from hie_hub.documents import Submission, SubmittedDocument, federation, lifecycle, parse_submission
from hie_hub.documents import repository as documents_repo
from hie_hub.documents.schemas import rename_references, scrub_rrn, stamp_metadata
from hie_hub.exchange import repository, sending
from hie_hub.exchange.sending import Recipient
from hie_hub.lists import repository as lists_repo
from hie_hub.models import Document, DocumentStatus, Origin, Task
from hie_hub.node import HubNode
from hie_hub.subscriptions.service import task_changed
from hie_hub.tasks import repository as tasks_repo
from hie_platform.db import raise_after_commit
from hie_platform.errors import Conflict, Forbidden, Issue, Unprocessable
from hie_platform.http import after_commit
from hie_schemas.auth import TokenClaims
from hie_schemas.consent import Decision, FlowQuery, Purpose
from hie_schemas.contract import Kind, subject
from hie_schemas.envelope import EventPayload
from hie_schemas.events import DocumentPublished, ExchangeDenied, ExchangeKind


@dataclass(frozen=True)
class Refusal:
    recipient: str
    document_id: str
    decision: Decision


class ExchangeRefused(Forbidden):
    """The patient's consent does not cover the flow; raised once the refusal record is kept (the write
    session commits it before the error goes on: hie_platform.db.raise_after_commit)."""

    def __init__(self, refusals: list[Refusal]) -> None:
        issues = [
            Issue(
                f"consent refuses document {r.document_id} to {r.recipient}: rule {r.decision.rule.value}"
                + (f" ({r.decision.reason})" if r.decision.reason else ""),
                code="forbidden",
            )
            for r in refusals
        ]
        super().__init__(issues[0].diagnostics, issues=issues)
        self.refusals = refusals


@dataclass(frozen=True)
class _Addressed:
    """Whom a submission goes to, and the kind and leading document of the exchange it makes."""

    recipients: list[Recipient]
    lead: tuple[ExchangeKind, SubmittedDocument] | None


@dataclass
class _Publication:
    """Every row and event one publish writes, prepared before the writer is taken."""

    at: datetime
    recipients: list[str]
    documents: list[dict[str, Any]]  # new documents (Core INSERT)
    held: list[str]  # ids of documents already stored (sent before): only addressed anew
    submission_set: dict[str, Any]
    exchanges: list[sending.Exchange] = field(default_factory=list)

    @property
    def events(self) -> list[tuple[str, EventPayload]]:
        return [event for exchange in self.exchanges for event in exchange.events]


async def publish(node: HubNode, unit: UnitOfWork, actor: TokenClaims, body: Any) -> dict[str, Any]:
    """ITI-65 for one institution of this hub: the transaction-response; a consent refusal is raised
    (ExchangeRefused) after its record is committed.

    The reads end before the consent is asked; the write session is taken after the consent
    answers, and only once every row is prepared, so no write lock is held while the decision point
    is asked or while documents are rewritten.
    """
    submission = parse_submission(
        body, secret=node.settings.patient_key_bytes, base_url=node.settings.fhir_base
    )
    async with unit.reading() as read:
        stored = await _held(read, actor, submission)
        if len(stored) == len(submission.documents):
            # A replay (retry after a lost response): answer as the first time, store nothing new.
            held = [stored[d.document_id] for d in submission.documents]
            return await _replay(read, actor, submission, held)
        addressed = await _addressed(node, submission)
        await lifecycle.check_replacements(read, actor, submission)
    now = datetime.now(UTC)
    decisions = await _decide(node, unit, actor, submission, addressed.recipients, now)
    publication = _prepare(node.hub, actor, submission, addressed, stored, decisions, now)
    session = unit.writing()
    await _write(node, session, actor, submission, publication)
    await _announce(node, session, actor, submission, publication, decisions)
    ids = [doc.document_id for doc in submission.documents]
    versions = {i: stored[i].version if i in stored else 1 for i in ids}
    at = stored[ids[0]].published_at if ids[0] in stored else now  # as a replay will answer
    tasks = [Task(**exchange.task) for exchange in publication.exchanges]
    return _response(submission, publication.submission_set["id"], versions, at, tasks)


async def _replay(
    read: AsyncSession, actor: TokenClaims, submission: Submission, rows: list[Document]
) -> dict[str, Any]:
    """A replay (retry after a lost response): answer as the first time, store nothing new."""
    ids = [row.document_id for row in rows]
    tasks = await tasks_repo.tasks_of_submission(read, actor.inst, submission.patient_key, ids)
    listed = await lists_repo.submission_set_of(read, actor.inst, submission.patient_key, ids)
    versions = {row.document_id: row.version or 1 for row in rows}
    return _response(submission, listed.id if listed else None, versions, rows[0].published_at, tasks)


async def _held(read: AsyncSession, actor: TokenClaims, submission: Submission) -> dict[str, Document]:
    """The submission's documents this hub already holds; only the author publishes its documents."""
    for doc in submission.documents:
        if doc.author_institution != actor.inst:
            raise Forbidden(
                f"document {doc.document_id} is authored by {doc.author_institution}; "
                f"institution {actor.inst} may publish only its own documents"
            )
    stored = await documents_repo.documents_by_id(read, [doc.document_id for doc in submission.documents])
    foreign = sorted(i for i, row in stored.items() if row.author_institution != actor.inst)
    if foreign:
        raise Conflict(f"document id {foreign[0]} is already held for another author")
    return stored


async def _addressed(node: HubNode, submission: Submission) -> _Addressed:
    recipients = await sending.recipients(node, submission)
    lead = sending.leading(submission)
    if recipients and lead is None:
        raise Unprocessable(
            "a submission with intended recipients needs a referral, return, consult reply or transfer "
            "opinion, or the purpose patient-request or public-agency"
        )
    return _Addressed(recipients, lead)


async def _decide(
    node: HubNode,
    unit: UnitOfWork,
    actor: TokenClaims,
    submission: Submission,
    recipients: list[Recipient],
    now: datetime,
) -> dict[tuple[str, str], Decision]:
    """Consent for every (document, recipient); a refusal is recorded and raised after its commit."""
    pairs = [(doc, r) for r in recipients for doc in submission.documents]
    outside_read_phase("the consent gate asked")
    decisions = await node.consent.decide_all([_flow(submission, doc, r, now) for doc, r in pairs])
    refusals = [
        Refusal(r.code, doc.document_id, d)
        for (doc, r), d in zip(pairs, decisions, strict=True)
        if not d.permit
    ]
    if refusals:
        session = unit.writing()
        await _record_refusal(node, session, actor, submission, refusals, now)
        raise raise_after_commit(session, ExchangeRefused(refusals))
    return {(doc.document_id, r.code): d for (doc, r), d in zip(pairs, decisions, strict=True)}


def _prepare(
    hub: str,
    actor: TokenClaims,
    submission: Submission,
    addressed: _Addressed,
    stored: dict[str, Document],
    decisions: dict[tuple[str, str], Decision],
    now: datetime,
) -> _Publication:
    """Every row and event of a permitted publish, before the writer is taken (issue 13 point 1)."""
    codes = [r.code for r in addressed.recipients]
    renames = _renames(submission)
    rows = [
        _document_row(doc, submission.patient_key, renames, codes, now)
        if doc.document_id not in stored
        else _held_row(stored[doc.document_id])
        for doc in submission.documents
    ]
    publication = _Publication(
        at=now,
        recipients=codes,
        documents=[row for row in rows if row["document_id"] not in stored],
        held=list(stored),
        submission_set=_submission_set_row(actor, submission, codes, now),
    )
    if addressed.lead is not None:
        lead_id = addressed.lead[1].document_id
        for recipient in addressed.recipients:
            version = decisions[(lead_id, recipient.code)].consent_version
            publication.exchanges.append(
                sending.prepare(hub, actor, submission, rows, recipient, addressed.lead, version, now)
            )
    for row in publication.documents:
        row["exchange_id"] = publication.exchanges[0].exchange_id if publication.exchanges else None
    return publication


def _held_row(row: Document) -> dict[str, Any]:
    return {"document_id": row.document_id, "docref": row.docref, "bundle": row.bundle}


async def _write(
    node: HubNode,
    session: AsyncSession,
    actor: TokenClaims,
    submission: Submission,
    publication: _Publication,
) -> None:
    """The writes of a permitted publish: a few Core INSERTs; the events are written at commit."""
    for subject_, payload in publication.events:
        await node.outbox.add(session, subject_, payload, defer=True)
    tasks = [exchange.task for exchange in publication.exchanges]
    try:
        await repository.insert_publication(session, publication.documents, publication.submission_set, tasks)
    except IntegrityError as exc:
        # Published concurrently (the unique document id is the check): the retry replays the winner.
        raise Conflict("the same document is being published concurrently; retry the request") from exc
    if publication.held:
        first = publication.exchanges[0].exchange_id if publication.exchanges else None
        await _address_held(session, publication.held, publication.recipients, first)
    await lifecycle.supersede(node, session, actor, submission, publication.at)
    for exchange in publication.exchanges:
        await task_changed(node, session, Task(**exchange.task))


def _flow(submission: Submission, doc: SubmittedDocument, recipient: Recipient, now: datetime) -> FlowQuery:
    access = Access(recipient.code, submission.purpose, submission.justification)
    return flow_query(submission.patient_key, doc, access, now)


def _emergency_detail(submission: Submission) -> dict[str, Any]:
    """Break-the-glass is recorded with its justification and flagged (의료법 §21-2 exception)."""
    if submission.purpose is not Purpose.EMERGENCY:
        return {}
    return {"flagged": True, "justification": submission.justification}


async def _record_refusal(
    node: HubNode,
    session: AsyncSession,
    actor: TokenClaims,
    submission: Submission,
    refusals: list[Refusal],
    now: datetime,
) -> None:
    first_by_recipient = {r.recipient: r for r in reversed(refusals)}
    for refusal in first_by_recipient.values():
        await node.outbox.add(
            session,
            subject(Kind.EXCHANGE_DENIED, sender=node.hub),
            ExchangeDenied(
                from_institution=actor.inst,
                from_hub=node.hub,
                to_institution=refusal.recipient,
                patient_key=submission.patient_key,
                rule=refusal.decision.rule.value,
                denied_at=now,
            ),
        )
    first = refusals[0].decision
    refused = [
        {"recipient": r.recipient, "document_id": r.document_id, "rule": r.decision.rule.value}
        for r in refusals
    ]
    await _audit(
        node,
        session,
        actor,
        submission,
        action="exchange.deny",
        outcome="denied",
        rule=first.rule.value,
        consent_version=first.consent_version,
        detail={"refused": refused},
    )


async def _audit(
    node: HubNode,
    session: AsyncSession,
    actor: TokenClaims,
    submission: Submission,
    *,
    action: str,
    outcome: str,
    rule: str | None,
    consent_version: int | None,
    detail: dict[str, Any],
) -> None:
    """The audit record of a submission: its patient, documents and purpose, break-the-glass flagged."""
    await node.audit.record(
        session,
        action=action,
        actor=actor,
        outcome=outcome,
        patient_key=submission.patient_key,
        document_ids=[d.document_id for d in submission.documents],
        purpose=submission.purpose.value,
        rule=rule,
        consent_version=consent_version,
        detail=detail | _emergency_detail(submission),
    )


def _renames(submission: Submission) -> dict[str, str]:
    # One id for a document's DocumentReference and its Bundle (MHD leaves the choice to the server).
    return {
        f"DocumentReference/{d.document_reference.get('id')}": f"DocumentReference/{d.document_id}"
        for d in submission.documents
    }


async def _address_held(
    session: AsyncSession, held: list[str], recipients: list[str], exchange_id: str | None
) -> None:
    """Documents already stored (sent before) are only addressed anew; read in the write session, so
    that two publishes addressing the same document do not lose each other's recipients."""
    for row in (await documents_repo.documents_by_id(session, held)).values():
        documents_repo.add_recipients(row, recipients)
        row.exchange_id = row.exchange_id or exchange_id


async def _announce(
    node: HubNode,
    session: AsyncSession,
    actor: TokenClaims,
    submission: Submission,
    publication: _Publication,
    decisions: dict[tuple[str, str], Decision],
) -> None:
    """DocumentPublished (feeds the registry's record locator) and the audit record, both written at
    commit. The event (outbox) is the durable path; once the transaction commits the locator is also
    told at once (federation.declare, awaited before the response), so a walk-in search finds them."""
    ids = [doc.document_id for doc in submission.documents]
    published = DocumentPublished(
        hub=node.hub,
        patient_key=submission.patient_key,
        author_institution=actor.inst,
        document_ids=ids,
        document_types=[doc.document_type for doc in submission.documents],
        published_at=publication.at,
    )
    fact = subject(Kind.DOCUMENT_PUBLISHED, sender=node.hub)
    envelope = await node.outbox.add(session, fact, published, defer=True)
    after_commit(session, lambda: federation.declare(node, fact, envelope, published))
    decided = list(decisions.values())
    await _audit(
        node,
        session,
        actor,
        submission,
        action="document.publish",
        outcome="success",
        rule=decided[0].rule.value if decided else None,
        consent_version=max(
            (d.consent_version for d in decided if d.consent_version is not None), default=None
        ),
        detail={
            "recipients": publication.recipients,
            "tasks": [e.task["id"] for e in publication.exchanges],
            "replaces": [old for doc in submission.documents for old in doc.replaces],
        },
    )


def _submission_set_row(
    actor: TokenClaims, submission: Submission, recipients: list[str], now: datetime
) -> dict[str, Any]:
    """The SubmissionSet List kept for ITI-66, its entries pointing at the stored DocumentReferences."""
    resource = scrub_rrn(
        rename_references(submission.submission_set, _renames(submission)), submission.patient_key
    )
    resource["date"] = resource.get("date") or now.isoformat()
    return {
        "id": str(resource["id"]),
        "patient_key": submission.patient_key,
        "author_institution": actor.inst,
        "submitted_at": _instant(resource["date"]) or now,
        "status": str(resource.get("status") or "current"),
        "document_ids": [doc.document_id for doc in submission.documents],
        "recipients": recipients,
        "resource": resource,
    }


def _instant(value: Any) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) and "T" in value else None
    except ValueError:
        return None
    return parsed if parsed is not None and parsed.tzinfo is not None else None


def _document_row(
    doc: SubmittedDocument, patient_key: str, renames: dict[str, str], recipients: list[str], now: datetime
) -> dict[str, Any]:
    docref = stamp_metadata(
        scrub_rrn(rename_references(doc.document_reference, renames), patient_key),
        author=doc.author_institution,
        department=doc.author_department,
        created_at=doc.created_at,
    )
    docref["id"] = doc.document_id
    docref["status"] = DocumentStatus.CURRENT.value
    # ITI-67 'date' searches the document's time (Composition.date); the DocumentReference says so.
    docref["date"] = doc.created_at.isoformat()
    return {
        "document_id": doc.document_id,
        "author_institution": doc.author_institution,
        "author_department": doc.author_department,
        "patient_key": patient_key,
        "document_type": doc.document_type.value,
        "created_at": doc.created_at,
        "status": DocumentStatus.CURRENT.value,
        "docref": docref,
        "bundle": scrub_rrn(doc.document, patient_key),
        "recipients": recipients,
        "origin": Origin.LOCAL.value,
        "exchange_id": None,
        "published_at": now,
        "version": 1,
    }


def _response(
    submission: Submission, list_id: str | None, versions: dict[str, int], at: datetime, tasks: list[Task]
) -> dict[str, Any]:
    """The transaction-response: one entry per request entry in request order (FHIR R4); the Tasks
    made are named on the entry of the DocumentReference they are about (Task.focus). ``versions``:
    each document's version, in the submission's order."""
    first = next(iter(versions))
    about: dict[str, list[str]] = {}
    for task in sorted(tasks, key=lambda t: (t.owner, t.id)):
        lead = str((task.task.get("focus") or {}).get("reference", "")).rpartition("/")[2]
        focus = lead if lead in versions else first
        about.setdefault(focus, []).append(task.id)
    created: list[Created] = []
    for resource_type, stored_id in submission.entry_order:
        if resource_type == "List":
            if list_id is not None:
                created.append(Created("List", list_id, at))
        elif resource_type == "DocumentReference":
            version = versions.get(stored_id, 1)
            created.append(Created(resource_type, stored_id, at, version, tuple(about.get(stored_id, ()))))
        else:
            created.append(Created(resource_type, stored_id, at))
    return transaction_response(list(versions), created)
