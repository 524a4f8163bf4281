"""The relay reads and moves the instances of a batch by their key, whatever the backlog: given the
state as well, SQLite chose the state's index and read every queued (or held) instance for each
batch, so draining a backlog after an outage cost its size squared. Real SQLite, the gateway's tables."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from query_plans import explain
from sqlalchemy import insert, select

from hie_imaging import repository
from hie_imaging.models import Base, Instance, State, StudyLink
from hie_platform.db import Database

NOW = datetime.now(UTC)


def instance(n: int, state: State) -> dict[str, Any]:
    return {
        "sop_instance_uid": f"1.2.{n}",
        "exchange_id": f"9.{n % 2}",
        "study_instance_uid": "1.3.1",
        "series_instance_uid": "1.4.1",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "size": 1000,
        "calling_ae": "CT_MODALITY",
        "sender_institution": None,
        "role": "origin",
        "state": state.value,
        "attempts": 0,
        "last_error": None,
        "received_at": NOW,
        "updated_at": NOW,
    }


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'imaging.db'}")
    async with database.writer.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    async with database.transaction() as session:
        await session.execute(
            insert(Instance), [instance(n, State.QUEUED if n < 6 else State.HELD) for n in range(8)]
        )
        for exchange in ("9.0", "9.1"):
            session.add(
                StudyLink(
                    study_instance_uid="1.3.1",
                    exchange_id=exchange,
                    kind="referral",
                    from_institution="11301001",
                    to_institution="31100002",
                    from_hub="severance",
                    to_hub="snubh",
                    patient_key="k" * 64,
                    purpose="TREATMENT",
                    document_created_at=NOW,
                    linked_at=NOW,
                )
            )
    yield database
    await database.dispose()


async def test_a_batch_moves_only_its_own_queued_rows(db: Database) -> None:
    async with db.transaction() as session:
        found = await repository.queued_with_links(session, ["1.2.0", "1.2.1", "1.2.6"])
        await repository.set_outcomes(session, ["1.2.0", "1.2.2", "1.2.1"], "9.0", State.DELIVERED, NOW)
        await repository.mark_purged(session, ["1.2.6", "1.2.0"], NOW)
    async with db.read_sessions() as read:
        states = dict((await read.execute(select(Instance.sop_instance_uid, Instance.state))).all())
    assert sorted((row.sop_instance_uid, link.exchange_id) for row, link in found) == [
        ("1.2.0", "9.0"),
        ("1.2.1", "9.1"),
    ]
    # 1.2.1 goes to the other exchange; 1.2.6 was held, not queued; 1.2.0 was no longer held.
    assert states == {
        "1.2.0": "delivered",
        "1.2.1": "queued",
        "1.2.2": "delivered",
        "1.2.3": "queued",
        "1.2.4": "queued",
        "1.2.5": "queued",
        "1.2.6": "purged",
        "1.2.7": "held",
    }


Statement = Callable[[Any], Awaitable[object]]


@pytest.mark.parametrize(
    "run",
    [
        lambda s: repository.queued_with_links(s, ["1.2.0", "1.2.1"]),
        lambda s: repository.set_outcomes(s, ["1.2.0", "1.2.2", "1.2.4", "1.2.6"], "9.0", State.RELAYED, NOW),
        lambda s: repository.mark_purged(s, ["1.2.6"], NOW),
    ],
    ids=["queued-with-links", "set-outcomes", "mark-purged"],
)
async def test_a_batch_is_found_by_key_not_by_state(db: Database, run: Statement) -> None:

    async def batch() -> None:
        async with db.transaction() as session:
            await run(session)

    details = await explain(db.writer, batch, "instances")
    assert "ix_instances_state_received" not in details, details
    assert "sqlite_autoindex_instances_1" in details, details
