"""Sending an exchange to its recipients: who may receive, what kind of exchange it is, and the Task,
Delivery and facts that one exchange writes (prepared here, written by the publishing transaction,
the events through the outbox)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from hie_hub.core.disclosure import purpose_extensions
from hie_hub.documents import Submission, SubmittedDocument
from hie_hub.node import HubNode
from hie_hub.tasks.schemas import TaskStatus, build_task, exchange_kind
from hie_platform.errors import Issue, Unprocessable
from hie_schemas.auth import TokenClaims
from hie_schemas.consent import Purpose
from hie_schemas.contract import Kind, subject
from hie_schemas.directory import InstitutionKind
from hie_schemas.envelope import EventPayload
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
        view = await node.registry.institution(code)
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


@dataclass(frozen=True)
class Exchange:
    """What one exchange writes: its Task row and its events (the Delivery, then ExchangeSent)."""

    exchange_id: str
    task: dict[str, Any]
    events: tuple[tuple[str, EventPayload], ...]


def prepare(
    hub: str,
    actor: TokenClaims,
    submission: Submission,
    documents: Sequence[dict[str, Any]],
    recipient: Recipient,
    lead: tuple[ExchangeKind, SubmittedDocument],
    consent_version: int | None,
    now: datetime,
) -> Exchange:
    """One exchange of stored ``documents`` (rows as written): nothing touches the database here, so
    that the publishing transaction holds the writer only for its INSERTs (issue 13 point 1)."""
    kind, lead_document = lead
    ids = [row["document_id"] for row in documents]
    exchange_id, task_id = str(uuid.uuid4()), str(uuid.uuid4())
    row = _task_row(hub, actor, submission, recipient, lead, ids, exchange_id, task_id, now)
    sent = ExchangeSent(
        exchange_id=exchange_id,
        kind=kind,
        task_id=task_id,
        from_institution=actor.inst,
        from_hub=hub,
        to_institution=recipient.code,
        to_hub=recipient.hub,
        patient_key=submission.patient_key,
        document_ids=ids,
        document_types=[doc.document_type for doc in submission.documents],
        studies=list(dict.fromkeys(s for doc in submission.documents for s in doc.studies)),
        document_created_at=lead_document.created_at,
        purpose=submission.purpose,
        justification=submission.justification,
        consent_version=consent_version,
        sent_at=now,
    )
    delivered = [DeliveredDocument(document_reference=r["docref"], document=r["bundle"]) for r in documents]
    delivery = Delivery(exchange=sent, task=row["task"], documents=delivered)
    events = (
        (subject(Kind.DELIVERY, to=recipient.hub, sender=hub), delivery),
        (subject(Kind.EXCHANGE_SENT, sender=hub), sent),
    )
    return Exchange(exchange_id, row, events)


def _task_row(
    hub: str,
    actor: TokenClaims,
    submission: Submission,
    recipient: Recipient,
    lead: tuple[ExchangeKind, SubmittedDocument],
    ids: list[str],
    exchange_id: str,
    task_id: str,
    now: datetime,
) -> dict[str, Any]:
    """The requester's copy of the exchange's Task (status requested), as a tasks row."""
    kind, lead_document = lead
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
    return {
        "id": task_id,
        "exchange_id": exchange_id,
        "status": TaskStatus.REQUESTED.value,
        "requester": actor.inst,
        "requester_hub": hub,
        "owner": recipient.code,
        "owner_hub": recipient.hub,
        "patient_key": submission.patient_key,
        "focus": ids,
        "task": task,
        "updated_at": now,
        "version": 1,
    }
