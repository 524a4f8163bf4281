"""Publishing documents (IHE ITI-65) and pushing referrals/returns to the recipient's hub.

Consent is asked of the decision point before anything is written; a refusal stores nothing but the
refusal itself (audit + ExchangeDenied), and a permitted exchange writes its documents, the
SubmissionSet, one Task per recipient, the status of replaced documents and the events in one
transaction (outbox).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from hie_hub import repository, sending
from hie_hub.core.bundles import Created, transaction_response
from hie_hub.core.disclosure import release
from hie_hub.documents import Submission, SubmittedDocument, federation, lifecycle, parse_submission
from hie_hub.documents.schemas import rename_references, scrub_rrn, stamp_metadata
from hie_hub.models import Document, DocumentStatus, Origin, SubmissionSet, Task
from hie_hub.node import HubNode
from hie_hub.sending import Recipient
from hie_platform.errors import Conflict, Forbidden, Issue, Unprocessable
from hie_platform.http import after_commit
from hie_schemas.auth import TokenClaims
from hie_schemas.consent import Decision, FlowQuery, Purpose
from hie_schemas.contract import Kind, subject
from hie_schemas.events import DocumentPublished, ExchangeDenied


@dataclass(frozen=True)
class Refusal:
    recipient: str
    document_id: str
    decision: Decision


class ExchangeRefused(Forbidden):
    """The patient's consent does not cover the flow; returned (not raised) so the refusal record commits."""

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


async def publish(
    node: HubNode, read: AsyncSession, session: AsyncSession, actor: TokenClaims, body: Any
) -> dict[str, Any] | ExchangeRefused:
    """ITI-65 for one institution of this hub: the transaction-response, or the consent refusal.

    Reads go through ``read`` and the write session is first touched after the consent answers, so
    no write lock is held while the decision point is asked.
    """
    submission = parse_submission(
        body, secret=node.settings.patient_key_bytes, base_url=node.settings.fhir_base
    )
    for doc in submission.documents:
        if doc.author_institution != actor.inst:
            raise Forbidden(
                f"document {doc.document_id} is authored by {doc.author_institution}; "
                f"institution {actor.inst} may publish only its own documents"
            )
    ids = [doc.document_id for doc in submission.documents]
    stored = await repository.documents_by_id(read, ids)
    foreign = sorted(i for i, row in stored.items() if row.author_institution != actor.inst)
    if foreign:
        raise Conflict(f"document id {foreign[0]} is already held for another author")
    if len(stored) == len(ids):
        # A replay (retry after a lost response): answer as the first time, store nothing new.
        return await _replay(read, actor, submission, [stored[i] for i in ids])

    recipients = await sending.recipients(node, submission)
    lead = sending.leading(submission)
    if recipients and lead is None:
        raise Unprocessable(
            "a submission with intended recipients needs a referral, return, consult reply or transfer "
            "opinion, or the purpose patient-request or public-agency"
        )
    await lifecycle.check_replacements(read, actor, submission)
    await release(read)
    now = datetime.now(UTC)
    pairs = [(doc, r) for r in recipients for doc in submission.documents]
    decisions = await node.consent.decide_all([_flow(submission, doc, r, now) for doc, r in pairs])
    refusals = [
        Refusal(r.code, doc.document_id, d)
        for (doc, r), d in zip(pairs, decisions, strict=True)
        if not d.permit
    ]
    if refusals:
        await _record_refusal(node, session, actor, submission, refusals, now)
        return ExchangeRefused(refusals)

    existing = await repository.documents_by_id(session, ids)
    if existing.keys() != stored.keys():
        # A publish of the same documents committed while consent was asked: answer as it did.
        if len(existing) == len(ids):
            return await _replay(session, actor, submission, [existing[i] for i in ids])
        raise Conflict("some of these documents are being published concurrently; retry the request")
    rows = _store_documents(session, submission, existing, recipients, now)
    list_id = _store_submission_set(session, actor, submission, recipients, now)
    try:
        await session.flush()
    except IntegrityError as exc:
        # Two publishes raced past both checks (PostgreSQL: neither saw the other's rows); the
        # loser's retry replays the winner's answer.
        raise Conflict("the same document is being published concurrently; retry the request") from exc
    await lifecycle.supersede(node, session, actor, submission, now)
    versions = {
        (doc.document_id, r.code): d.consent_version for (doc, r), d in zip(pairs, decisions, strict=True)
    }
    created_tasks: list[Task] = []
    if lead is not None:
        for recipient in recipients:
            version = versions.get((lead[1].document_id, recipient.code))
            created_tasks.append(
                await sending.send(node, session, actor, submission, rows, recipient, lead, version, now)
            )
    # Feeds the registry's record locator: this hub now holds documents for the patient. The event
    # (outbox) is the durable path; once the transaction commits, the locator is also told at once
    # (federation.declare, awaited before the response), so a walk-in search finds the documents.
    published = DocumentPublished(
        hub=node.hub,
        patient_key=submission.patient_key,
        author_institution=actor.inst,
        document_ids=ids,
        document_types=[doc.document_type for doc in submission.documents],
        published_at=now,
    )
    fact = subject(Kind.DOCUMENT_PUBLISHED, sender=node.hub)
    envelope = await node.runtime.outbox.add(session, fact, published)
    after_commit(session, lambda: federation.declare(node, fact, envelope, published))
    await node.runtime.audit.record(
        session,
        action="document.publish",
        actor=actor,
        outcome="success",
        patient_key=submission.patient_key,
        document_ids=ids,
        purpose=submission.purpose.value,
        rule=decisions[0].rule.value if decisions else None,
        consent_version=max(
            (d.consent_version for d in decisions if d.consent_version is not None), default=None
        ),
        detail={
            "recipients": [r.code for r in recipients],
            "tasks": [t.id for t in created_tasks],
            "replaces": [old for doc in submission.documents for old in doc.replaces],
        }
        | _emergency_detail(submission),
    )
    return _response(submission, list_id, rows, created_tasks)


async def _replay(
    read: AsyncSession, actor: TokenClaims, submission: Submission, rows: list[Document]
) -> dict[str, Any]:
    """A replay (retry after a lost response): answer as the first time, store nothing new."""
    ids = [row.document_id for row in rows]
    tasks = await repository.tasks_of_submission(read, actor.inst, submission.patient_key, ids)
    listed = await repository.submission_set_of(read, actor.inst, submission.patient_key, ids)
    return _response(submission, listed.id if listed else None, rows, tasks)


def _flow(submission: Submission, doc: SubmittedDocument, recipient: Recipient, now: datetime) -> FlowQuery:
    return FlowQuery(
        patient_key=submission.patient_key,
        holder=doc.author_institution,
        holder_department=doc.author_department,
        recipient=recipient.code,
        purpose=submission.purpose,
        document_created_at=doc.created_at,
        at=now,
        justification=submission.justification,
    )


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
        await node.runtime.outbox.add(
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
    await node.runtime.audit.record(
        session,
        action="exchange.deny",
        actor=actor,
        outcome="denied",
        patient_key=submission.patient_key,
        document_ids=[d.document_id for d in submission.documents],
        purpose=submission.purpose.value,
        rule=refusals[0].decision.rule.value,
        consent_version=refusals[0].decision.consent_version,
        detail={
            "refused": [
                {"recipient": r.recipient, "document_id": r.document_id, "rule": r.decision.rule.value}
                for r in refusals
            ]
        }
        | _emergency_detail(submission),
    )


def _renames(submission: Submission) -> dict[str, str]:
    # One id for a document's DocumentReference and its Bundle (MHD leaves the choice to the server).
    return {
        f"DocumentReference/{d.document_reference.get('id')}": f"DocumentReference/{d.document_id}"
        for d in submission.documents
    }


def _store_documents(
    session: AsyncSession,
    submission: Submission,
    existing: dict[str, Document],
    recipients: list[Recipient],
    now: datetime,
) -> list[Document]:
    """Store the new documents; a document already held (sent before) is only addressed anew."""
    codes = [r.code for r in recipients]
    renames = _renames(submission)
    rows: list[Document] = []
    for doc in submission.documents:
        row = existing.get(doc.document_id)
        if row is None:
            row = _document_row(doc, submission.patient_key, renames, codes, now)
            repository.add_document(session, row)
        else:
            repository.add_recipients(row, codes)
        rows.append(row)
    return rows


def _store_submission_set(
    session: AsyncSession,
    actor: TokenClaims,
    submission: Submission,
    recipients: list[Recipient],
    now: datetime,
) -> str:
    """Keep the SubmissionSet List for ITI-66, its entries pointing at the stored DocumentReferences."""
    resource = scrub_rrn(
        rename_references(submission.submission_set, _renames(submission)), submission.patient_key
    )
    resource["date"] = resource.get("date") or now.isoformat()
    submitted_at = _instant(resource["date"]) or now
    repository.add_submission_set(
        session,
        SubmissionSet(
            id=str(resource["id"]),
            patient_key=submission.patient_key,
            author_institution=actor.inst,
            submitted_at=submitted_at,
            status=str(resource.get("status") or "current"),
            document_ids=[doc.document_id for doc in submission.documents],
            recipients=[r.code for r in recipients],
            resource=resource,
        ),
    )
    return str(resource["id"])


def _instant(value: Any) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) and "T" in value else None
    except ValueError:
        return None
    return parsed if parsed is not None and parsed.tzinfo is not None else None


def _document_row(
    doc: SubmittedDocument, patient_key: str, renames: dict[str, str], recipients: list[str], now: datetime
) -> Document:
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
    return Document(
        document_id=doc.document_id,
        author_institution=doc.author_institution,
        author_department=doc.author_department,
        patient_key=patient_key,
        document_type=doc.document_type.value,
        created_at=doc.created_at,
        status=DocumentStatus.CURRENT.value,
        docref=docref,
        bundle=scrub_rrn(doc.document, patient_key),
        recipients=recipients,
        origin=Origin.LOCAL.value,
        exchange_id=None,
        published_at=now,
    )


def _response(
    submission: Submission, list_id: str | None, rows: list[Document], tasks: list[Task]
) -> dict[str, Any]:
    """The transaction-response: one entry per request entry in request order (FHIR R4); the Tasks
    made are named on the entry of the DocumentReference they are about (Task.focus)."""
    at = rows[0].published_at
    versions = {row.document_id: row.version or 1 for row in rows}
    about: dict[str, list[str]] = {}
    for task in sorted(tasks, key=lambda t: (t.owner, t.id)):
        lead = str((task.task.get("focus") or {}).get("reference", "")).rpartition("/")[2]
        focus = lead if lead in versions else rows[0].document_id
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
    return transaction_response([row.document_id for row in rows], created)
