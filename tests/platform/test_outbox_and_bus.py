"""Outbox, relay, JetStream and idempotent consumers against a real nats-server and real databases."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import MetaData, func, select

from hie_platform.bus import first_time
from hie_platform.db import Database, PlatformTables, platform_tables
from hie_platform.outbox import Outbox, OutboxRelay
from hie_schemas import streams, subjects
from hie_schemas.envelope import Envelope, Source
from hie_schemas.events import ConsentRecorded

SOURCE = Source(service="test", node="t1")


def recorded(version: int, key: str) -> ConsentRecorded:
    """A ConsentRecorded for the session's shared HIE_CONSENT stream. The tests publish only a
    patient's first version (1): a version whose predecessor never comes is held back by every
    consent replica started on that stream later, which then never becomes current (found when two
    pytest-xdist workers ran test_consent_memory.py after this file; docs/consent.md, Known gaps)."""
    return ConsentRecorded(
        patient_key=key,
        version=version,
        policy="ENTIRE_CONSENT",
        effective_at=datetime.now(UTC),
        recorded_by="11301001",
        channel="desk",
    )


@pytest.fixture
async def store(database_with: Any) -> tuple[Database, PlatformTables]:
    metadata = MetaData()
    tables = platform_tables(metadata)
    return await database_with(metadata), tables


async def until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.02)


async def test_committed_events_are_published_and_rolled_back_ones_are_not(store, bus, unique) -> None:  # type: ignore[no-untyped-def]
    db, tables = store
    outbox = Outbox(tables.outbox, SOURCE)
    key_ok, key_rolled_back = unique.ljust(64, "a"), unique.ljust(64, "b")
    async with db.transaction() as session:
        await outbox.add(session, subjects.CONSENT_RECORDED, recorded(1, key_ok))

    async def failing_change() -> None:
        async with db.transaction() as session:
            await outbox.add(session, subjects.CONSENT_RECORDED, recorded(1, key_rolled_back))
            raise RuntimeError("the change failed")

    with pytest.raises(RuntimeError):
        await failing_change()

    # The relay starts only now: a crash between commit and publish would look exactly like this.
    relay = OutboxRelay(db, tables.outbox, bus)
    assert await relay.flush() == 1
    assert await relay.flush() == 0

    sub = await bus.js.subscribe(
        subjects.CONSENT_RECORDED, stream=streams.CONSENT.name, ordered_consumer=True
    )
    seen: list[str] = []
    try:
        while True:
            msg = await sub.next_msg(timeout=1.0)
            seen.append(Envelope.from_bytes(msg.data).payload(ConsentRecorded).patient_key)
    except TimeoutError:
        pass
    finally:
        await sub.unsubscribe()
    assert key_ok in seen
    assert key_rolled_back not in seen


async def test_republishing_the_same_event_id_is_deduplicated(bus, unique) -> None:  # type: ignore[no-untyped-def]
    env = Envelope.wrap(recorded(1, unique.ljust(64, "c")), SOURCE)
    first = await bus.js.publish(subjects.CONSENT_RECORDED, env.to_bytes(), headers={"Nats-Msg-Id": env.id})
    again = await bus.js.publish(subjects.CONSENT_RECORDED, env.to_bytes(), headers={"Nats-Msg-Id": env.id})
    assert not first.duplicate
    assert again.duplicate
    assert again.seq == first.seq


async def test_durable_consumer_is_idempotent_and_retries_failures(store, bus, unique) -> None:  # type: ignore[no-untyped-def]
    db, tables = store
    key = unique.ljust(64, "d")
    handled: list[int] = []
    failures = {"left": 2}

    async def handler(envelope: Envelope) -> None:
        event = envelope.payload(ConsentRecorded)
        if event.patient_key != key:
            return
        if failures["left"] > 0:
            failures["left"] -= 1
            raise ConnectionError("transient failure")
        async with db.transaction() as session:
            if await first_time(session, tables.processed, "test-consumer", envelope.id):
                handled.append(event.version)

    bus.consume(streams.CONSENT.name, f"test-{unique}", subjects.CONSENT_RECORDED, handler)
    env = Envelope.wrap(recorded(1, key), SOURCE)
    # The same event delivered twice (a publisher retry outside the dedup window, or a redelivery).
    for headers in ({"Nats-Msg-Id": env.id}, {"Nats-Msg-Id": env.id + "-retry"}):
        await bus.js.publish(subjects.CONSENT_RECORDED, env.to_bytes(), headers=headers)

    async def processed_once() -> bool:
        async with db.read_sessions() as session:
            count = await session.scalar(select(func.count()).select_from(tables.processed))
        return count == 1 and failures["left"] == 0

    await until(processed_once)
    await asyncio.sleep(0.3)  # give a wrong second delivery the chance to show up before asserting
    assert handled == [1]


async def test_a_consumer_whose_loop_crashes_is_restarted_and_goes_on(bus, unique, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A durable consumer is a supervised worker: its pull loop failing (not a handler: those are
    redelivered) is logged and the consumer binds and pulls again, instead of ending silently."""
    key = unique.ljust(64, "r")
    got: list[int] = []
    pull = bus._pull
    crashes = {"left": 1}

    async def crashing_pull(*args: Any) -> None:
        if crashes["left"]:
            crashes["left"] -= 1
            raise RuntimeError("the pull loop broke")
        await pull(*args)

    async def handler(envelope: Envelope) -> None:
        event = envelope.payload(ConsentRecorded)
        if event.patient_key == key:
            got.append(event.version)

    monkeypatch.setattr(bus, "_pull", crashing_pull)
    bus.consume(streams.CONSENT.name, f"test-{unique}", subjects.CONSENT_RECORDED, handler)
    env = Envelope.wrap(recorded(1, key), SOURCE)
    await bus.js.publish(subjects.CONSENT_RECORDED, env.to_bytes(), headers={"Nats-Msg-Id": env.id})

    async def delivered() -> bool:
        return got == [1]

    await until(delivered)
    assert crashes["left"] == 0
    (consumer,) = bus._consumers
    assert consumer.crashes == 1
    assert consumer.running


async def test_first_time_records_an_event_once_per_consumer(store: tuple[Database, PlatformTables]) -> None:
    db, tables = store
    async with db.transaction() as session:
        assert await first_time(session, tables.processed, "inbox", "event-1")
        assert not await first_time(session, tables.processed, "inbox", "event-1")
        assert await first_time(session, tables.processed, "locator", "event-1")
    async with db.transaction() as session:
        assert not await first_time(session, tables.processed, "inbox", "event-1")
        assert await first_time(session, tables.processed, "inbox", "event-2")
    async with db.read_sessions() as session:
        assert await session.scalar(select(func.count()).select_from(tables.processed)) == 3


async def test_first_time_of_two_replicas_at_once_lets_one_through(
    store: tuple[Database, PlatformTables],
) -> None:
    """Two replicas handed the same redelivered event: the second waits for the first's row and is told
    it was handled, instead of failing its transaction (PostgreSQL; SQLite has one writer)."""
    db, tables = store
    if db.is_sqlite:
        pytest.skip("one writer connection on SQLite: two transactions cannot overlap")
    first_in = asyncio.Event()
    release_first = asyncio.Event()

    async def replica(hold: bool) -> bool:
        async with db.transaction() as session:
            handled = await first_time(session, tables.processed, "inbox", "event-x")
            if hold:
                first_in.set()
                await release_first.wait()
            return handled

    first = asyncio.create_task(replica(hold=True))
    await first_in.wait()
    second = asyncio.create_task(replica(hold=False))
    await asyncio.sleep(0.3)
    assert not second.done()  # waits on the first's uncommitted row
    release_first.set()
    assert await first is True
    assert await second is False
