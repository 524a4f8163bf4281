"""Document status after publication (IHE MHD): a replacement supersedes the document it names
(DocumentReference.relatesTo code replaces), and the author may mark a document entered-in-error.

Every hub that holds a copy (delivered in an exchange) is told with a DocumentStatusNotice, so that
a superseded or erroneous document is marked as such wherever it is found.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from hie_hub.core.params import fhir_body
from hie_hub.documents import Submission, repository
from hie_hub.models import Document, DocumentStatus, Task
from hie_hub.node import HubNode, record_treatment
from hie_platform.errors import BadRequest, Conflict, Forbidden, NotFound, Unprocessable
from hie_platform.logging import get_logger
from hie_schemas.auth import TokenClaims
from hie_schemas.contract import Kind, subject
from hie_schemas.events import DocumentStatusNotice

log = get_logger(__name__)

# Elements of a DocumentReference the hub maintains itself; a client's PUT may differ in these.
_SERVER_ELEMENTS = frozenset({"meta", "status", "text"})


async def check_replacements(read: AsyncSession, actor: TokenClaims, submission: Submission) -> None:
    """Every document named by relatesTo replaces must be a current document of the same author and
    patient held here; otherwise nothing is stored (422)."""
    wanted = [old for doc in submission.documents for old in doc.replaces]
    held = await repository.documents_by_id(read, wanted)
    for old in wanted:
        row = held.get(old)
        if row is None or row.author_institution != actor.inst:
            raise Unprocessable(
                f"relatesTo replaces DocumentReference/{old}: no document of {actor.inst} with that id "
                "is held at this hub",
                expression=("DocumentReference.relatesTo",),
            )
        if row.patient_key != submission.patient_key:
            raise Unprocessable(
                f"relatesTo replaces DocumentReference/{old}, which is about another patient",
                expression=("DocumentReference.relatesTo",),
            )
        if row.status != DocumentStatus.CURRENT.value:
            raise Conflict(
                f"DocumentReference/{old} is {row.status}; only a current document can be replaced",
                expression=("DocumentReference.relatesTo",),
            )


async def supersede(
    node: HubNode, session: AsyncSession, actor: TokenClaims, submission: Submission, now: datetime
) -> None:
    """Mark the replaced documents superseded (in the publishing transaction) and tell other hubs."""
    for doc in submission.documents:
        if not doc.replaces:
            continue
        rows = list((await repository.documents_by_id(session, doc.replaces)).values())
        if any(row.status != DocumentStatus.CURRENT.value for row in rows):
            raise Conflict("a replaced document changed status concurrently; retry the request")
        await _change(node, session, actor.inst, rows, DocumentStatus.SUPERSEDED, now, doc.document_id)


async def mark_entered_in_error(
    node: HubNode, session: AsyncSession, actor: TokenClaims, document_id: str, body: Any
) -> dict[str, Any]:
    """PUT DocumentReference/{id} by its author with status entered-in-error (nothing else may change)."""
    body = fhir_body(body, "DocumentReference")
    if body.get("id") != document_id:
        raise BadRequest("DocumentReference.id must match the URL", expression=("DocumentReference.id",))
    row = await repository.document(session, document_id)
    if row is None or (row.author_institution != actor.inst and actor.inst not in row.recipients):
        raise NotFound(f"no document {document_id} visible to institution {actor.inst}")
    if row.author_institution != actor.inst:
        raise Forbidden(f"only the author ({row.author_institution}) may change the status of a document")
    requested = body.get("status")
    if requested == row.status:
        return row.docref  # a repeated PUT changes nothing
    if requested != DocumentStatus.ENTERED_IN_ERROR.value:
        raise Unprocessable(
            "the author may only set status entered-in-error (a replacement supersedes through ITI-65 "
            "with relatesTo replaces)",
            expression=("DocumentReference.status",),
        )
    changed = sorted(k for k in {*body, *row.docref} - _SERVER_ELEMENTS if body.get(k) != row.docref.get(k))
    if changed:
        raise Unprocessable(
            f"only DocumentReference.status may change; these differ: {', '.join(changed[:8])}",
            expression=tuple(f"DocumentReference.{k}" for k in changed[:8]),
        )
    now = datetime.now(UTC)
    await _change(node, session, actor.inst, [row], DocumentStatus.ENTERED_IN_ERROR, now, None)
    await record_treatment(
        node.audit,
        session,
        "document.entered-in-error",
        actor,
        row.patient_key,
        document_ids=[row.document_id],
    )
    return row.docref


def set_status(row: Document, status: DocumentStatus) -> None:
    # A new dict: the JSON column notices assignment, not mutation in place. (R4 has no "replaced-by"
    # relation: the replacement's relatesTo replaces is the link between the two.)
    row.status = status.value
    row.docref = {**row.docref, "status": status.value}


async def _change(
    node: HubNode,
    session: AsyncSession,
    author: str,
    rows: Sequence[Document],
    status: DocumentStatus,
    now: datetime,
    replaced_by: str | None,
) -> None:
    for row in rows:
        set_status(row, status)
    for hub, ids in (await _holders(session, node.hub, rows)).items():
        await node.outbox.add(
            session,
            subject(Kind.DOCUMENT_STATUS, to=hub, sender=node.hub),
            DocumentStatusNotice(
                document_ids=ids,
                status=status.value,
                by_institution=author,
                patient_key=rows[0].patient_key,
                replaced_by=replaced_by,
                changed_at=now,
            ),
        )


async def _holders(session: AsyncSession, own_hub: str, rows: Sequence[Document]) -> dict[str, list[str]]:
    """The other hubs each document was delivered to (the owners' hubs of its exchanges)."""
    ids = {row.document_id for row in rows}
    patients = {row.patient_key for row in rows}
    tasks = await session.scalars(
        select(Task).where(Task.patient_key.in_(patients), Task.requester_hub == own_hub)
    )
    holders: dict[str, list[str]] = {}
    for task in tasks:
        if task.owner_hub == own_hub:
            continue
        for doc_id in sorted(ids & set(task.focus)):
            if doc_id not in holders.setdefault(task.owner_hub, []):
                holders[task.owner_hub].append(doc_id)
    return holders


async def apply_notice(session: AsyncSession, notice: DocumentStatusNotice) -> int:
    """Bring this hub's copies to the author's status; only the author's word counts. Returns how
    many copies changed."""
    status = DocumentStatus(notice.status)
    changed = 0
    for row in (await repository.documents_by_id(session, notice.document_ids)).values():
        if row.author_institution != notice.by_institution or row.patient_key != notice.patient_key:
            log.warning("document-status notice from a non-author ignored", document_id=row.document_id)
            continue
        if row.status != status.value:
            set_status(row, status)
            changed += 1
    return changed
