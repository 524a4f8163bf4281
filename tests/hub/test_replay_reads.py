"""A publish replayed (the client retries after a lost response) is answered from the Tasks and the
SubmissionSet the first publish made (hie_hub.exchange.service._replay). They are read by patient:
given the author too, SQLite chose the author's index and read everything a clinic ever sent on every
replay. Real SQLite, the hub's own tables."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from query_plans import explain

from hie_hub.lists import repository as lists_repository
from hie_hub.models import Base, SubmissionSet, Task
from hie_hub.tasks import repository as tasks_repository
from hie_platform.db import Database

KEY, OTHER_KEY = "k" * 64, "o" * 64
CLINIC, OTHER_CLINIC, HOSPITAL = "11301001", "11301002", "31100002"


def task(n: int, requester: str, patient_key: str, focus: list[str]) -> Task:
    return Task(
        id=f"t-{n}",
        exchange_id=f"x-{n}",
        status="requested",
        requester=requester,
        requester_hub="severance",
        owner=HOSPITAL,
        owner_hub="snubh",
        patient_key=patient_key,
        focus=focus,
        task={"resourceType": "Task", "id": f"t-{n}"},
        updated_at=datetime.now(UTC),
    )


def submission_set(
    n: int, author: str, patient_key: str, documents: list[str], minutes: int
) -> SubmissionSet:
    return SubmissionSet(
        id=f"s-{n}",
        patient_key=patient_key,
        author_institution=author,
        submitted_at=datetime.now(UTC) - timedelta(minutes=minutes),
        status="current",
        document_ids=documents,
        recipients=[HOSPITAL],
        resource={"resourceType": "List", "id": f"s-{n}"},
    )


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'hub.db'}")
    async with database.writer.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    async with database.transaction() as session:
        session.add_all(
            [
                task(1, CLINIC, KEY, ["d-1"]),
                task(2, CLINIC, KEY, ["d-1"]),  # the same documents to a second recipient
                task(3, OTHER_CLINIC, KEY, ["d-1"]),  # another author's Task naming the same ids
                task(4, CLINIC, OTHER_KEY, ["d-1"]),  # the author's Task of another patient
                task(5, CLINIC, KEY, ["d-1", "d-2"]),  # a publish of more documents
                submission_set(1, OTHER_CLINIC, KEY, ["d-1"], minutes=3),
                submission_set(2, CLINIC, OTHER_KEY, ["d-1"], minutes=2),
                submission_set(3, CLINIC, KEY, ["d-1"], minutes=1),
            ]
        )
    yield database
    await database.dispose()


async def test_a_replay_finds_exactly_the_first_publishs_tasks_and_set(db: Database) -> None:
    async with db.read_sessions() as read:
        tasks = await tasks_repository.tasks_of_submission(read, CLINIC, KEY, ["d-1"])
        listed = await lists_repository.submission_set_of(read, CLINIC, KEY, ["d-1"])
        both = await tasks_repository.tasks_of_submission(read, CLINIC, KEY, ["d-2", "d-1"])
        none = await lists_repository.submission_set_of(read, CLINIC, KEY, ["d-2"])
    assert [t.id for t in tasks] == ["t-1", "t-2"]
    assert listed is not None
    assert listed.id == "s-3"
    assert [t.id for t in both] == ["t-5"]
    assert none is None


Lookup = Callable[[Any], Awaitable[object]]


@pytest.mark.parametrize(
    ("lookup", "table", "index"),
    [
        (
            lambda read: tasks_repository.tasks_of_submission(read, CLINIC, KEY, ["d-1"]),
            "tasks",
            "ix_tasks_patient_owner",
        ),
        (
            lambda read: lists_repository.submission_set_of(read, CLINIC, KEY, ["d-1"]),
            "submission_sets",
            "ix_submission_sets_patient_key",
        ),
    ],
    ids=["tasks", "submission-set"],
)
async def test_a_replay_reads_by_patient_not_everything_the_author_sent(
    db: Database, lookup: Lookup, table: str, index: str
) -> None:

    async def replay_lookup() -> None:
        async with db.read_sessions() as read:
            await lookup(read)

    details = await explain(db.reader, replay_lookup, table)
    assert index in details, details
