"""ITI-67 reads a patient's matching documents without their bundles, then the bundles of the page
only (hie_hub.documents.repository): a patient with hundreds of documents made every search read
them all. Real SQLite, the hub's own tables."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm.exc import DetachedInstanceError

from hie_hub.documents import repository
from hie_hub.models import Base, Document
from hie_platform.db import Database

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


async def test_the_patients_documents_are_read_without_their_bundles(db: Database) -> None:
    statements = statements_of(db)
    async with db.read_sessions() as read:
        rows = await repository.documents_of_patient(read, KEY, bundles=False)
        with pytest.raises(InvalidRequestError):
            _ = rows[0].bundle  # never loaded behind the caller's back, even in its session
    assert [row.document_id for row in rows] == [f"doc-{n}" for n in range(5)]  # newest first
    (query,) = statements
    assert "documents.bundle" not in query


async def test_the_bundles_of_the_page_are_read_in_one_query(db: Database) -> None:
    async with db.read_sessions() as read:
        rows = await repository.documents_of_patient(read, KEY, bundles=False)
    statements = statements_of(db)
    page = rows[1:3]
    async with db.read_sessions() as read:  # the rows' own session is closed by now
        await repository.load_bundles(read, page)
    assert [row.bundle for row in page] == [
        {"resourceType": "Bundle", "id": "doc-1", "n": 1},
        {"resourceType": "Bundle", "id": "doc-2", "n": 2},
    ]
    assert len(statements) == 1
    with pytest.raises(DetachedInstanceError):
        _ = rows[0].bundle  # off the page: still not read


async def test_by_default_the_bundles_come_with_the_rows(db: Database) -> None:
    async with db.read_sessions() as read:
        rows = await repository.documents_of_patient(read, KEY)
    assert rows[4].bundle["n"] == 4
