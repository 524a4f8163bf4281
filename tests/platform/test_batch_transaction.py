"""One transaction per fetched batch (``Database.batch``, ``consume_kinds(one_transaction=...)``):
committed once and acknowledged after, or rolled back whole and handled message by message, on real
SQLite and PostgreSQL and a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Column, MetaData, String, Table, event, func, insert, select

from hie_platform.bus import Bus, Incoming, first_time
from hie_platform.db import BatchAbandoned, Database, PlatformTables, platform_tables
from hie_schemas import contract, streams
from hie_schemas.codes import DocumentType
from hie_schemas.envelope import Envelope, Source
from hie_schemas.events import DocumentPublished

METADATA = MetaData()
TABLES = platform_tables(METADATA)
NOTES = Table("notes", METADATA, Column("key", String(64), primary_key=True))


@pytest.fixture
async def store(database_with: Any) -> tuple[Database, PlatformTables]:
    return await database_with(METADATA), TABLES


def commits_of(db: Database) -> list[int]:
    """A list that grows by one at every commit of the writer engine."""
    commits: list[int] = []
    event.listen(db.writer.sync_engine, "commit", lambda _conn: commits.append(1))
    return commits


async def notes(db: Database) -> list[str]:
    async with db.read_sessions() as session:
        return sorted((await session.scalars(select(NOTES.c.key))).all())


async def note(db: Database, key: str) -> None:
    async with db.transaction() as session:
        await session.execute(insert(NOTES).values(key=key))


async def test_a_batch_commits_every_transaction_inside_once(store) -> None:  # type: ignore[no-untyped-def]
    db, _ = store
    commits = commits_of(db)
    async with db.batch():
        for key in ("a", "b", "c"):
            await note(db, key)
        assert await notes(db) == []  # nothing is visible before the batch commits
    assert await notes(db) == ["a", "b", "c"]
    assert len(commits) == 1


async def test_an_error_swallowed_inside_a_batch_still_rolls_it_all_back(store) -> None:  # type: ignore[no-untyped-def]
    db, _ = store

    async def handlers() -> None:
        async with db.batch():
            await note(db, "kept?")
            with contextlib.suppress(RuntimeError):
                async with db.transaction():
                    raise RuntimeError("a handler's failure that its caller ignores")
            await note(db, "after")

    with pytest.raises(BatchAbandoned):
        await handlers()
    assert await notes(db) == []
    await note(db, "later")  # the database is usable afterwards
    assert await notes(db) == ["later"]


async def test_a_task_started_inside_a_batch_has_transactions_of_its_own(store) -> None:  # type: ignore[no-untyped-def]
    db, _ = store
    if db.is_sqlite:
        pytest.skip("one writer connection on SQLite: the task would wait for the batch's")
    async with db.batch():
        await note(db, "in-batch")
        await asyncio.create_task(note(db, "own"))
        assert await notes(db) == ["own"]  # committed by itself while the batch is still open
    assert await notes(db) == ["in-batch", "own"]


# --- the consumer ---------------------------------------------------------------------------------

SOURCE = Source(service="hub", node="test")


def published(hub: str, key: str) -> bytes:
    fact = DocumentPublished(
        hub=hub,
        patient_key=key.ljust(64, "0"),
        author_institution="11301001",
        document_ids=[key],
        document_types=[DocumentType.CARE_RECORD_SUMMARY],
        published_at=datetime.now(UTC),
    )
    return Envelope.wrap(fact, SOURCE).to_bytes()


async def until(predicate, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.05)


async def consume(
    db: Database, tables: PlatformTables, bus: Bus, hub: str, fail: set[str], refused: int | None = 4
) -> list[str]:
    """Ten facts in the stream before the consumer starts (so that one fetch brings them all), then a
    consumer whose handler notes each patient once; keys in ``fail`` fail on their first try, and
    fact number ``refused`` names another hub (refused by the Bus). Returns the keys as the handler
    was called."""
    consumer = contract.durable(contract.Role.REGISTRY, streams.EXCHANGE)
    subject = contract.subject(contract.Kind.DOCUMENT_PUBLISHED, sender=hub)
    for i in range(10):
        await bus.js.publish(subject, published("elsewhere" if i == refused else hub, f"{hub}{i}"))
    calls: list[str] = []

    async def handler(incoming: Incoming) -> None:
        assert isinstance(incoming.payload, DocumentPublished)
        key = incoming.payload.document_ids[0]
        calls.append(key)
        async with db.transaction() as session:
            if not await first_time(session, tables.processed, "test", incoming.envelope.id):
                return
            await session.execute(insert(NOTES).values(key=key))
            if key in fail:
                fail.discard(key)
                raise ConnectionError("a transient failure, after the handler wrote")

    async def hub_of(code: str) -> str | None:
        return hub

    bus.consume_kinds(
        f"test-batch-{hub}",
        consumer,
        subject,
        {contract.Kind.DOCUMENT_PUBLISHED: handler},
        hub_of,
        one_transaction=db,
    )
    return calls


async def test_a_refused_fact_in_a_batch_leaves_the_others_kept_once(store, bus, unique) -> None:  # type: ignore[no-untyped-def]
    db, tables = store
    hub = f"b{unique}"
    commits = commits_of(db)
    calls = await consume(db, tables, bus, hub, fail=set())
    expected = sorted(f"{hub}{i}" for i in range(10) if i != 4)

    async def all_noted() -> bool:
        return await notes(db) == expected

    await until(all_noted)
    # Fact 4 (another hub's) was refused, so the batch was handled again one by one: every other
    # fact once in the batch that was rolled back and once on its own, each committed once.
    assert f"{hub}4" not in calls
    assert len(commits) == 9
    await asyncio.sleep(0.5)  # nothing comes back: all were acknowledged or terminated
    assert await notes(db) == expected


async def test_a_batch_of_good_facts_is_one_commit(store, bus, unique) -> None:  # type: ignore[no-untyped-def]
    db, tables = store
    hub = f"g{unique}"
    commits = commits_of(db)
    await consume(db, tables, bus, hub, fail=set(), refused=None)

    async def all_noted() -> bool:
        return len(await notes(db)) == 10

    await until(all_noted)
    assert len(commits) == 1
    await asyncio.sleep(0.5)
    async with db.read_sessions() as session:
        assert await session.scalar(select(func.count()).select_from(tables.processed)) == 10
    assert len(commits) == 1  # acknowledged: nothing was redelivered


async def test_a_failure_in_a_batch_loses_nothing_and_keeps_nothing_twice(store, bus, unique) -> None:  # type: ignore[no-untyped-def]
    db, tables = store
    hub = f"f{unique}"
    calls = await consume(db, tables, bus, hub, fail={f"{hub}2"})
    expected = sorted(f"{hub}{i}" for i in range(10) if i != 4)

    async def all_noted() -> bool:
        return await notes(db) == expected

    await until(all_noted)  # the failing fact came back (redelivered) and was noted once
    assert calls.count(f"{hub}2") >= 2
    async with db.read_sessions() as session:
        assert await session.scalar(select(func.count()).select_from(tables.processed)) == 9
