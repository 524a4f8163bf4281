"""Sending an exchange to its recipients: who may receive, what kind of exchange it is, and the Task,
Delivery and facts that one exchange writes (in the publishing transaction, through the outbox)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from hie_hub import repository
from hie_hub.core.disclosure import purpose_extensions
from hie_hub.documents import Submission, SubmittedDocument
from hie_hub.models import Document, Task
from hie_hub.node import HubNode
from hie_hub.subscriptions.service import task_changed
from hie_hub.tasks.schemas import TaskStatus, build_task, exchange_kind
from hie_platform.errors import Issue, Unprocessable
from hie_schemas.auth import TokenClaims
from hie_schemas.consent import Purpose
from hie_schemas.contract import Kind, subject
from hie_schemas.directory import InstitutionKind
from hie_schemas.events import DeliveredDocument, Delivery, ExchangeKind, ExchangeSent
from hie_schemas.identifiers import InvalidIdentifierError, validate_institution_code

# A purpose that makes any documents an exchange of its own kind (no referral needed).
KIND_BY_PURPOSE = {
    Purpose.PATIENT_REQUEST: ExchangeKind.PATIENT_REQUEST,
    Purpose.PUBLIC_AGENCY: ExchangeKind.PUBLIC_AGENCY,
}


@dataclass(frozen=True)
class Recipient:
    code: str
    hub: str


async def recipients(node: HubNode, submission: Submission) -> list[Recipient]:
    """Each intended recipient must be a participant in good standing, reachable through a hub.

    A public agency belongs to no hub: it receives only submissions with the purpose public-agency,
    which stay at the holder's hub for the agency to read there.
    """
    found: list[Recipient] = []
    issues: list[Issue] = []
    for code in submission.intended_recipients:
        try:
            validate_institution_code(code)
        except InvalidIdentifierError as exc:
            issues.append(Issue(f"intended recipient {code!r}: {exc.reason}", code="processing"))
            continue
        view = await node.runtime.registry.institution(code)
        agency = view is not None and view.kind is InstitutionKind.PUBLIC_AGENCY
        if view is None or not view.in_good_standing:
            state = "is unknown to the registry" if view is None else f"is {view.state.value}"
            message = f"intended recipient {code} {state}; it is not a participant in good standing"
            issues.append(Issue(message, code="processing"))
        elif agency != (submission.purpose is Purpose.PUBLIC_AGENCY):
            message = (
                f"intended recipient {code} is a public agency: send with the purpose public-agency"
                if agency
                else f"the purpose public-agency needs a public agency as recipient; {code} is not one"
            )
            issues.append(Issue(message, code="business-rule"))
        elif agency:
            found.append(Recipient(code, node.hub))
        elif view.hub is None:
            issues.append(Issue(f"intended recipient {code} belongs to no hub", code="processing"))
        else:
            found.append(Recipient(code, view.hub))
    if issues:
        raise Unprocessable(issues[0].diagnostics, issues=issues)
    return found


def leading(submission: Submission) -> tuple[ExchangeKind, SubmittedDocument] | None:
    """The kind of exchange a submission makes and its leading document, if it makes one."""
    kind = KIND_BY_PURPOSE.get(submission.purpose)
    if kind is not None:
        return kind, submission.documents[0]
    found = exchange_kind(doc.document_type for doc in submission.documents)
    return None if found is None else (found[0], submission.documents[found[1]])


async def send(
    node: HubNode,
    session: AsyncSession,
    actor: TokenClaims,
    submission: Submission,
    rows: list[Document],
    recipient: Recipient,
    lead: tuple[ExchangeKind, SubmittedDocument],
    consent_version: int | None,
    now: datetime,
) -> Task:
    """One exchange: the Task, the Delivery to the recipient's hub (even this one) and the fact."""
    kind, lead_document = lead
    ids = [row.document_id for row in rows]
    exchange_id, task_id = str(uuid.uuid4()), str(uuid.uuid4())
    task = build_task(
        task_id=task_id,
        exchange_id=exchange_id,
        kind=kind,
        requester=actor.inst,
        owner=recipient.code,
        patient_key=submission.patient_key,
        focus=lead_document.document_id,
        inputs=[i for i in ids if i != lead_document.document_id],
        at=now,
    )
    task["extension"] = purpose_extensions(submission.purpose, submission.justification)
    row = Task(
        id=task_id,
        exchange_id=exchange_id,
        status=TaskStatus.REQUESTED.value,
        requester=actor.inst,
        requester_hub=node.hub,
        owner=recipient.code,
        owner_hub=recipient.hub,
        patient_key=submission.patient_key,
        focus=ids,
        task=task,
        updated_at=now,
    )
    repository.add_task(session, row)
    await task_changed(node, session, row)
    for doc_row in rows:
        doc_row.exchange_id = doc_row.exchange_id or exchange_id
    studies = list(dict.fromkeys(s for doc in submission.documents for s in doc.studies))
    sent = ExchangeSent(
        exchange_id=exchange_id,
        kind=kind,
        task_id=task_id,
        from_institution=actor.inst,
        from_hub=node.hub,
        to_institution=recipient.code,
        to_hub=recipient.hub,
        patient_key=submission.patient_key,
        document_ids=ids,
        document_types=[doc.document_type for doc in submission.documents],
        studies=studies,
        document_created_at=lead_document.created_at,
        purpose=submission.purpose,
        justification=submission.justification,
        consent_version=consent_version,
        sent_at=now,
    )
    delivered = [DeliveredDocument(document_reference=r.docref, document=r.bundle) for r in rows]
    outbox = node.runtime.outbox
    await outbox.add(
        session,
        subject(Kind.DELIVERY, to=recipient.hub, sender=node.hub),
        Delivery(exchange=sent, task=task, documents=delivered),
    )
    await outbox.add(session, subject(Kind.EXCHANGE_SENT, sender=node.hub), sent)
    return row
