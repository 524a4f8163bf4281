"""ITI-67 reads a patient's matching documents without their DocumentReferences and bundles, then
those of the page only (hie_hub.documents.repository): a patient with hundreds of documents made
every search read (and parse) them all. Real SQLite, the hub's own tables."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from query_plans import explain
from sqlalchemy import event, select
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm.exc import DetachedInstanceError

from hie_hub.core.disclosure import exchange_accesses
from hie_hub.documents import repository
from hie_hub.models import Base, Document, Task
from hie_hub.tasks import repository as tasks_repository
from hie_platform.db import Database
from hie_schemas.consent import Purpose
from hie_schemas.documents.profiles import JUSTIFICATION_EXTENSION_URL, PURPOSE_EXTENSION_URL

KEY = "k" * 64


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'hub.db'}")
    async with database.writer.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    now = datetime.now(UTC)
    async with database.transaction() as session:
        for n in range(5):
            session.add(
                Document(
                    document_id=f"doc-{n}",
                    author_institution="11301001",
                    patient_key=KEY,
                    document_type="referral",
                    created_at=now - timedelta(days=n),
                    docref={"resourceType": "DocumentReference", "id": f"doc-{n}"},
                    bundle={"resourceType": "Bundle", "id": f"doc-{n}", "n": n},
                    recipients=[],
                    origin="published",
                    published_at=now,
                )
            )
    yield database
    await database.dispose()


def statements_of(db: Database) -> list[str]:
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    event.listen(db.reader.sync_engine, "before_cursor_execute", record)
    return seen


async def test_the_patients_documents_are_read_without_their_contents(db: Database) -> None:
    statements = statements_of(db)
    async with db.read_sessions() as read:
        rows = await repository.documents_of_patient(read, KEY, contents=False)
        # Never loaded behind the caller's back, even in its session.
        with pytest.raises(InvalidRequestError):
            _ = rows[0].bundle
        with pytest.raises(InvalidRequestError):
            _ = rows[0].docref
    assert [row.document_id for row in rows] == [f"doc-{n}" for n in range(5)]  # newest first
    (query,) = statements
    assert "documents.bundle" not in query
    assert "documents.docref" not in query


async def test_the_contents_of_the_page_are_read_in_one_query(db: Database) -> None:
    async with db.read_sessions() as read:
        rows = await repository.documents_of_patient(read, KEY, contents=False)
    statements = statements_of(db)
    page = rows[1:3]
    async with db.read_sessions() as read:  # the rows' own session is closed by now
        await repository.load_contents(read, page)
    assert [row.bundle for row in page] == [
        {"resourceType": "Bundle", "id": "doc-1", "n": 1},
        {"resourceType": "Bundle", "id": "doc-2", "n": 2},
    ]
    assert [row.docref["id"] for row in page] == ["doc-1", "doc-2"]
    assert len(statements) == 1
    with pytest.raises(DetachedInstanceError):
        _ = rows[0].bundle  # off the page: still not read
    with pytest.raises(DetachedInstanceError):
        _ = rows[0].docref


async def test_by_default_the_bundles_come_with_the_rows(db: Database) -> None:
    async with db.read_sessions() as read:
        rows = await repository.documents_of_patient(read, KEY)
    assert rows[4].bundle["n"] == 4


HOSPITAL, CLINIC = "21100001", "11301001"


def _task(
    n: int,
    focus: list[str],
    *,
    owner: str = HOSPITAL,
    patient_key: str = KEY,
    extension: list[dict[str, Any]] | None = None,
) -> Task:
    at = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=n)
    resource: dict[str, Any] = {"resourceType": "Task", "id": f"task-{n}", "extension": extension or []}
    return Task(
        id=f"task-{n}",
        exchange_id=f"exchange-{n}",
        status="requested",
        requester=CLINIC,
        requester_hub="hub-a",
        owner=owner,
        owner_hub="hub-b",
        patient_key=patient_key,
        focus=focus,
        task=resource,
        updated_at=at,
    )


def _emergency(why: str) -> list[dict[str, Any]]:
    return [
        {"url": PURPOSE_EXTENSION_URL, "valueCoding": {"code": Purpose.EMERGENCY.value}},
        {"url": JUSTIFICATION_EXTENSION_URL, "valueString": why},
    ]


async def test_each_row_gets_the_purposes_of_the_exchanges_that_sent_it(db: Database) -> None:
    async with db.transaction() as session:
        for n in range(5):
            row = await session.scalar(select(Document).where(Document.document_id == f"doc-{n}"))
            assert row is not None
            row.recipients = [HOSPITAL] if n < 3 else [] if n == 4 else [CLINIC]
            if n == 3:  # the hospital's own document, sent to the clinic
                row.author_institution = HOSPITAL
        session.add_all(
            [
                _task(1, ["doc-0", "doc-1"]),
                _task(2, ["doc-0"], extension=_emergency("unconscious")),
                _task(3, ["doc-0"]),  # treatment again: the same access as task 1, kept once
                _task(4, ["doc-2"], patient_key="j" * 64),  # another patient's exchange
                _task(5, ["doc-9"]),  # a document not among the rows
                _task(6, ["doc-4"]),  # doc-4 is not addressed to the hospital: no access through it
                _task(7, ["doc-3"], owner=CLINIC),  # the clinic's exchange, not the hospital's
                _task(8, ["doc-3"]),  # the hospital's exchange: not the clinic's to read by
            ]
        )
    async with db.read_sessions() as read:
        rows = await repository.documents_of_patient(read, KEY, contents=False)
        found = await exchange_accesses(read, HOSPITAL, rows)
        own = await exchange_accesses(read, CLINIC, rows)
    by_id = {row.document_id: accesses for row, accesses in zip(rows, found, strict=True)}
    # Newest exchange first; one access per purpose and justification, named by its newest exchange.
    assert [(a.purpose, a.justification, a.exchange_id) for a in by_id["doc-0"]] == [
        (Purpose.TREATMENT, None, "exchange-3"),
        (Purpose.EMERGENCY, "unconscious", "exchange-2"),
    ]
    assert [a.exchange_id for a in by_id["doc-1"]] == ["exchange-1"]
    assert [by_id["doc-2"], by_id["doc-3"], by_id["doc-4"]] == [[], [], []]
    assert all(a.institution == HOSPITAL for accesses in found for a in accesses)
    # The clinic: its own documents without an exchange; the hospital's doc-3 through its own Task only.
    assert [[a.exchange_id for a in accesses] for accesses in own] == [[], [], [], ["exchange-7"], []]


async def test_a_readers_exchanges_are_found_by_patient_not_by_scanning_the_reader(db: Database) -> None:
    """SQLite chose ix_tasks_owner for `owner = ? AND patient_key IN (...)` and read every Task the
    hospital owns (thousands in make load) on every search; the plan must use the patient."""

    async def lookup() -> None:
        async with db.read_sessions() as read:
            await tasks_repository.exchanges_owned_for(read, HOSPITAL, {KEY})

    details = await explain(db.reader, lookup, "tasks")
    assert "ix_tasks_patient_owner" in details, details
