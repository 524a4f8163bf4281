"""Finding and reading documents (IHE ITI-67 / ITI-68) as the data holder: who may see what.

A document is visible to its author's institution and to the institutions it was addressed to; for
anyone but the author the patient's consent is asked at the moment of reading (it may have been
withdrawn since the exchange), for the purpose of the exchange that sent it there: a patient-requested
transfer (의료법 §21-3) or an emergency with its justification (§21-2) is read as it was sent, and
audited so. Every search and read is audited with the documents it disclosed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from hie_hub.core.disclosure import (
    Access,
    Disclosure,
    Shown,
    by_access,
    disclosures,
    exchange_accesses,
    newest_version,
    record_disclosure,
    record_search,
)
from hie_hub.core.params import DEFAULT_COUNT, Cursor, DateBound, Found
from hie_hub.core.unit import UnitOfWork
from hie_hub.documents import repository
from hie_hub.models import Document
from hie_hub.node import HubNode
from hie_platform.db import raise_after_commit
from hie_platform.errors import Forbidden, NotFound
from hie_schemas.auth import TokenClaims
from hie_schemas.events import DocumentFilter


@dataclass(frozen=True)
class DocumentQuery:
    """An ITI-67 search: ``filter`` as every holding hub applies it (DOCUMENT_SEARCH fills it);
    ``dates`` the exact bounds of the document's time (Composition.date = DocumentReference.date)."""

    patient_key: str
    filter: DocumentFilter = field(default_factory=DocumentFilter)
    dates: Sequence[DateBound] = ()
    count: int = DEFAULT_COUNT
    cursor: Cursor | None = None


def addressed_to(row: Document, institution: str) -> bool:
    return row.author_institution == institution or institution in row.recipients


async def matching(read: AsyncSession, query: DocumentQuery) -> list[Document]:
    """The patient's documents that match the filters, newest first (the order pages follow), without
    the documents and their DocumentReferences: consent and paging need only the metadata, and
    reading every bundle (some 10 KB each) of a patient with hundreds of documents was most of a
    search's work (make load). ``search`` reads both for the page."""
    rows = await repository.documents_of_patient(
        read, query.patient_key, **query.filter.model_dump(), contents=False
    )
    return [row for row in rows if all(b.admits(row.created_at) for b in query.dates)]


def page(rows: list[Document], query: DocumentQuery) -> tuple[list[Document], Cursor | None]:
    """The page after ``query.cursor`` (keyset on (created_at, document_id), descending): stable while
    documents are added, since a cursor names a position, not an offset."""
    if query.cursor is not None:
        at, key = query.cursor.at, query.cursor.key
        rows = [r for r in rows if (r.created_at, r.document_id) < (at, key)]
    returned = rows[: query.count]
    more = len(rows) > query.count and returned
    last = returned[-1] if more else None
    return returned, Cursor(last.created_at, last.document_id) if last is not None else None


async def search(
    node: HubNode, unit: UnitOfWork, actor: TokenClaims, query: DocumentQuery
) -> Found[Document]:
    """ITI-67: the patient's documents the caller may see now; refused ones are left out silently."""
    async with unit.reading() as read:
        addressed = [row for row in await matching(read, query) if addressed_to(row, actor.inst)]
        candidates = await _candidates(read, actor, addressed)
    decided = await disclosures(node, addressed, candidates)
    visible = [(row, d) for row, d in zip(addressed, decided, strict=True) if d.permit]
    returned, next_cursor = page([row for row, _ in visible], query)
    async with unit.reading() as read:
        await repository.load_contents(read, returned)
    withheld = len(addressed) - len(visible)
    await _audit_search(node, unit.writing(), actor, query, returned, visible, withheld)
    return Found(returned, len(visible), next_cursor)


async def _audit_search(
    node: HubNode,
    session: AsyncSession,
    actor: TokenClaims,
    query: DocumentQuery,
    returned: list[Document],
    visible: list[tuple[Document, Disclosure]],
    withheld: int,
) -> None:
    """One record per purpose the returned documents were disclosed for, the search's own first
    (written even when it returned nothing)."""
    shown = {row.document_id for row in returned}
    groups = by_access(actor.inst, (((row, d), d.access) for row, d in visible if row.document_id in shown))
    counts = {"matched": len(visible), "withheld_by_consent": withheld}
    records = [
        (
            access,
            Shown(
                [row.document_id for row, _ in group],
                newest_version([d.decision for _, d in (visible if n == 0 else group)]),
                _exchanges(d.access for _, d in group),
            ),
        )
        for n, (access, group) in enumerate(groups.items())
    ]
    await record_search(node, session, "document.search", actor, query.patient_key, counts, records)


def _exchanges(accesses: Iterable[Access]) -> dict[str, Any]:
    """The exchanges whose purpose disclosed the documents (none for the reader's own treatment)."""
    ids = sorted({a.exchange_id for a in accesses if a.exchange_id is not None})
    return {"exchange_ids": ids} if ids else {}


async def _candidates(read: AsyncSession, actor: TokenClaims, rows: list[Document]) -> list[list[Access]]:
    """What each row is decided for: the purposes of the exchanges that sent it to the reader, or
    treatment where none did (the author's own documents, which no one is asked about)."""
    by_exchange = await exchange_accesses(read, actor.inst, rows)
    return [accesses or [Access(actor.inst)] for accesses in by_exchange]


async def read_document(
    node: HubNode, unit: UnitOfWork, actor: TokenClaims, document_id: str, action: str
) -> Document:
    """ITI-68 (and the DocumentReference read): the document; a consent refusal is raised after its
    audit record is committed (hie_platform.db.raise_after_commit)."""
    async with unit.reading() as read:
        row = await repository.document(read, document_id)
        if row is None or not addressed_to(row, actor.inst):
            raise NotFound(f"no document {document_id} visible to institution {actor.inst}")
        candidates = await _candidates(read, actor, [row])
    [disclosed] = await disclosures(node, [row], candidates)
    decision = disclosed.decision
    session = unit.writing()
    await record_disclosure(
        node,
        session,
        action,
        actor,
        row.patient_key,
        disclosed,
        document_ids=[row.document_id],
        detail=_exchanges([disclosed.access]),
    )
    if decision is not None and not decision.permit:
        refusal = Forbidden(
            f"consent refuses document {document_id} to {actor.inst}: rule {decision.rule.value}"
        )
        raise raise_after_commit(session, refusal)
    return row
