"""The SQL of stored documents (DocumentReference): look-ups, the patient search, recipients."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import defer
from sqlalchemy.orm.attributes import set_committed_value

from hie_hub.core.sql import newest_first
from hie_hub.models import Document


async def document(session: AsyncSession, document_id: str) -> Document | None:
    return await session.scalar(select(Document).where(Document.document_id == document_id))


# Built once: constructing the SELECT ... IN on every call was a fifth of this lookup's CPU, which
# every ITI-65 publish makes (py-spy, bench publish path).
_DOCUMENTS_BY_ID = select(Document).where(Document.document_id.in_(bindparam("ids", expanding=True)))


async def documents_by_id(session: AsyncSession, document_ids: Collection[str]) -> dict[str, Document]:
    if not document_ids:
        return {}
    rows = await session.scalars(_DOCUMENTS_BY_ID, {"ids": list(document_ids)})
    return {row.document_id: row for row in rows}


async def documents_of_patient(
    session: AsyncSession,
    patient_key: str,
    *,
    types: Collection[str] | None = None,
    statuses: Collection[str] | None = None,
    authors: Collection[str] | None = None,
    created_from: datetime | None = None,
    created_before: datetime | None = None,
    contents: bool = True,
) -> list[Document]:
    """A patient's documents, newest first (ties by document id); who may see which is the caller's
    concern. ``created_from`` is inclusive, ``created_before`` exclusive. Without ``contents`` neither
    the DocumentReference nor the document is read (touching ``docref`` or ``bundle`` raises):
    ``load_contents`` fills in those of the rows that are shown."""
    query = select(Document).where(Document.patient_key == patient_key)
    if not contents:
        query = query.options(defer(Document.docref, raiseload=True), defer(Document.bundle, raiseload=True))
    if types is not None:
        query = query.where(Document.document_type.in_(list(types)))
    if statuses is not None:
        query = query.where(Document.status.in_(list(statuses)))
    if authors is not None:
        query = query.where(Document.author_institution.in_(list(authors)))
    query = newest_first(
        query, Document.created_at, Document.document_id, start=created_from, before=created_before
    )
    return list((await session.scalars(query)).all())


async def load_contents(session: AsyncSession, rows: Sequence[Document]) -> None:
    """Read the DocumentReference (``docref``) and the document (``bundle``) of rows loaded without
    them, in one query; the rows may belong to a session already closed."""
    if not rows:
        return
    result = await session.execute(
        select(Document.id, Document.docref, Document.bundle).where(Document.id.in_([row.id for row in rows]))
    )
    contents: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {
        row.id: (row.docref, row.bundle) for row in result
    }
    for row in rows:
        docref, bundle = contents[row.id]  # documents are never deleted
        set_committed_value(row, "docref", docref)
        set_committed_value(row, "bundle", bundle)


def add_document(session: AsyncSession, row: Document) -> None:
    session.add(row)


def add_recipients(row: Document, recipients: Sequence[str]) -> bool:
    """Address an already stored document to more institutions; True if anything changed."""
    merged = list(dict.fromkeys([*row.recipients, *recipients]))
    if merged == row.recipients:
        return False
    row.recipients = merged
    return True
