"""No poison message stalls an outbox (issue 12 point 7): rows that cannot be published — a subject the
service's NATS user may not publish on, an event over the server's max_payload — are retried with
backoff and set aside as dead letters, while every row behind them is published; against a real
nats-server with authorization and a small max_payload, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import MetaData, select

from hie_platform.bus import Bus
from hie_platform.db import Database, PlatformTables, platform_tables
from hie_platform.natsd import find_nats_server, free_port, wait_for_port
from hie_platform.outbox import EventTooLarge, Outbox, OutboxCollector, OutboxRelay, RetryPolicy, stream_of
from hie_schemas import streams, subjects
from hie_schemas.envelope import Envelope, Source
from hie_schemas.events import ConsentRecorded

SOURCE = Source(service="test", node="poison")
MAX_PAYLOAD = 256 * 1024
DENIED_HUB = "denied"  # the relay's NATS user may not publish on its imaging work queue
POLICY = RetryPolicy(max_attempts=3, base_seconds=0.2, max_seconds=2.0, publish_timeout=1.0)


class AuthorizedNats:
    """A nats-server whose one user may publish anywhere but on DENIED_HUB's imaging work queue;
    its config can be changed and reloaded."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.config = root / "nats.conf"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://relay:relay-pw@127.0.0.1:{self.port}"

    def write_config(self, deny: bool) -> None:
        # Like a hub's account: no STREAM.INFO or STREAM.NAMES, so the relay judges by what it sees.
        refused = ["$JS.API.STREAM.INFO.>", "$JS.API.STREAM.NAMES"]
        refused += [subjects.hub_imaging_jobs(DENIED_HUB)] if deny else []
        denied = ", deny: [" + ", ".join(f'"{r}"' for r in refused) + "]"
        self.config.write_text(
            f"max_payload: {MAX_PAYLOAD}\n"
            f'jetstream {{ store_dir: "{self.root / "js"}" }}\n'
            "authorization { users: [ { user: relay, password: relay-pw, permissions: {\n"
            f'  publish: {{ allow: [">"]{denied} }}, subscribe: {{ allow: [">"] }} }} }} ] }}\n'
        )

    def start(self) -> AuthorizedNats:
        self.write_config(deny=True)
        args = [find_nats_server(), "-c", str(self.config), "-a", "127.0.0.1", "-p", str(self.port)]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for_port("127.0.0.1", self.port, 15.0, self.process)
        return self

    def allow_everything(self) -> None:
        """What the operator does once the cause is fixed: the permission granted, the config reloaded."""
        assert self.process is not None
        self.write_config(deny=False)
        self.process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[AuthorizedNats]:
    server = AuthorizedNats(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
async def bus(nats: AuthorizedNats) -> AsyncIterator[Bus]:
    b = await Bus.connect(nats.url, "poison-test")
    await b.ensure_streams()
    yield b
    await b.close()


@pytest.fixture
async def store(database_with: Any) -> tuple[Database, PlatformTables]:
    metadata = MetaData()
    tables = platform_tables(metadata)
    return await database_with(metadata), tables


def recorded(key: str, channel: str = "desk") -> ConsentRecorded:
    return ConsentRecorded(
        patient_key=key.ljust(64, "0"),
        version=1,
        policy="ENTIRE_CONSENT",
        effective_at=datetime.now(UTC),
        recorded_by="11301001",
        channel=channel,
    )


def oversized(key: str) -> ConsentRecorded:
    """Under the server's max_payload by itself, over it with the publish's headers: sent, it would
    make the server close the connection and lose every publish in flight with it."""
    base = len(Envelope.wrap(recorded(key), SOURCE).to_bytes())
    return recorded(key, channel="x" * (MAX_PAYLOAD - 100 - base + len("desk")))


async def rows(db: Database, tables: PlatformTables) -> dict[str, Any]:
    async with db.read_sessions() as session:
        result = await session.execute(select(tables.outbox))
        return {row.event_id: row for row in result}


async def published_keys(bus: Bus) -> list[str]:
    sub = await bus.js.subscribe(
        subjects.CONSENT_RECORDED, stream=streams.CONSENT.name, ordered_consumer=True
    )
    seen: list[str] = []
    try:
        while True:
            msg = await sub.next_msg(timeout=1.0)
            seen.append(Envelope.from_bytes(msg.data).payload(ConsentRecorded).patient_key)
    except TimeoutError:
        return seen
    finally:
        await sub.unsubscribe()


async def until(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, f"{what}: not before the deadline"
        await asyncio.sleep(0.05)


def metric(relay: OutboxRelay, name: str) -> float | None:
    registry = CollectorRegistry()
    registry.register(OutboxCollector("test", lambda: relay))
    return registry.get_sample_value(name, {"service": "test"})


async def hie_outbox(*args: str) -> str:
    """The operator's command, as a separate process (`hie outbox …`)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hie_cli.main",
        "outbox",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    assert process.returncode == 0, out.decode()
    return out.decode()


async def test_poison_rows_are_dead_lettered_and_never_hold_back_the_rows_behind_them(
    store: tuple[Database, PlatformTables], bus: Bus, nats: AuthorizedNats, database: tuple[str, str | None]
) -> None:
    db, tables = store
    # Written without the size check, as by a service before this limit existed.
    outbox = Outbox(tables.outbox, SOURCE)
    async with db.transaction() as session:
        denied = await outbox.add(session, subjects.hub_imaging_jobs(DENIED_HUB), recorded("denied"))
        big = await outbox.add(session, subjects.CONSENT_RECORDED, oversized("big"))
        good = [await outbox.add(session, subjects.CONSENT_RECORDED, recorded(f"good{i}")) for i in range(3)]
    good_keys = [e.payload(ConsentRecorded).patient_key for e in good]

    relay = OutboxRelay(db, tables.outbox, bus, interval=0.1, policy=POLICY)
    relay.start()
    try:
        # The good rows behind the two bad ones are published, in order, while the bad ones are retried.
        async def good_published() -> bool:
            return all(r.sent_at for e, r in (await rows(db, tables)).items() if e in {g.id for g in good})

        await until(good_published, "the good rows published")
        assert [k for k in await published_keys(bus) if k in good_keys] == good_keys

        async def both_dead() -> bool:
            found = await rows(db, tables)
            return all(found[e.id].dead_at is not None for e in (denied, big))

        await until(both_dead, "both bad rows dead-lettered")
        found = await rows(db, tables)
        for envelope in (denied, big):
            row = found[envelope.id]
            assert (row.attempts, row.sent_at) == (POLICY.max_attempts, None)
        assert "refused the subject" in found[denied.id].last_error
        assert "max_payload" in found[big.id].last_error
        assert bus.connected  # the oversized event was never sent: the connection is intact

        # The gauge is read from the database after the dead letters' commit: a moment later.
        async def gauge_shows_both() -> bool:
            return metric(relay, "hie_outbox_dead_letters") == 2

        await until(gauge_shows_both, "the dead-letter gauge at 2")
        assert (metric(relay, "hie_outbox_publish_failures_total") or 0) >= 2 * POLICY.max_attempts
        assert metric(relay, "hie_outbox_dead_lettered_total") == 2
    finally:
        await relay.stop()

    # Restarted, the relay does not go back to the dead letters: a new row is published at once.
    async with db.transaction() as session:
        after = await outbox.add(session, subjects.CONSENT_RECORDED, recorded("after-restart"))
    restarted = OutboxRelay(db, tables.outbox, bus, interval=0.1, policy=POLICY)
    assert await restarted.flush() == 1
    found = await rows(db, tables)
    assert found[after.id].sent_at is not None
    assert [found[e.id].attempts for e in (denied, big)] == [POLICY.max_attempts] * 2

    # The operator grants the permission and puts that dead letter back in line; it is published.
    nats.allow_everything()
    url, schema = database
    out = await hie_outbox(
        "retry", "--database-url", url, *(["--schema", schema] if schema else []), "--event-id", denied.id
    )
    assert "1 dead letter(s) put back in line" in out
    restarted.start()
    try:

        async def denied_sent() -> bool:
            return (await rows(db, tables))[denied.id].sent_at is not None

        await until(denied_sent, "the retried row published after the permission was granted")
        await restarted.refresh_stats()
        assert metric(restarted, "hie_outbox_dead_letters") == 1  # the oversized one stays aside
    finally:
        await restarted.stop()


async def test_backoff_doubles_and_a_retry_never_comes_early(
    store: tuple[Database, PlatformTables], bus: Bus
) -> None:
    db, tables = store
    async with db.transaction() as session:
        env = await Outbox(tables.outbox, SOURCE).add(session, subjects.CONSENT_RECORDED, oversized("late"))
    relay = OutboxRelay(db, tables.outbox, bus, policy=RetryPolicy(max_attempts=4, base_seconds=0.1))
    retry_times: list[datetime] = []
    while len(retry_times) < 3:
        if await relay.flush():
            row = (await rows(db, tables))[env.id]
            retry_times.append(row.next_attempt_at)
            # Not due before its retry time: an immediate second pass does not touch it.
            assert await relay.flush() == 0
        await asyncio.sleep(0.02)
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(retry_times)]
    # next(k) = attempt(k) + delay(k) and attempt(k) >= next(k-1): each gap is at least delay(k).
    assert gaps[0] >= relay.policy.delay(2)
    assert gaps[1] >= relay.policy.delay(3)
    assert relay.policy.delay(3) == 2 * relay.policy.delay(2)


async def test_an_event_too_large_to_travel_is_refused_before_anything_is_stored(
    store: tuple[Database, PlatformTables], bus: Bus
) -> None:
    db, tables = store
    outbox = Outbox(tables.outbox, SOURCE, max_payload=lambda: int(bus.nc.max_payload))

    async def change_with_big_event() -> None:
        async with db.transaction() as session:
            await outbox.add(session, subjects.CONSENT_RECORDED, recorded("kept"))
            await outbox.add(session, subjects.CONSENT_RECORDED, oversized("refused"))

    with pytest.raises(EventTooLarge) as refused:
        await change_with_big_event()
    assert refused.value.status == 413
    assert await rows(db, tables) == {}  # the whole change rolled back, the event beside it too


async def test_while_nats_is_down_no_attempt_is_counted(
    store: tuple[Database, PlatformTables], bus: Bus, nats: AuthorizedNats
) -> None:
    db, tables = store
    async with db.transaction() as session:
        env = await Outbox(tables.outbox, SOURCE).add(session, subjects.CONSENT_RECORDED, recorded("outage"))
    relay = OutboxRelay(db, tables.outbox, bus, policy=RetryPolicy(max_attempts=1, publish_timeout=0.5))
    nats.stop()
    for _ in range(3):  # more passes than the one attempt a row may fail before it is set aside
        assert await relay.flush() == 0
    row = (await rows(db, tables))[env.id]
    assert (row.attempts, row.dead_at, row.sent_at) == (0, None, None)

    nats.start()  # the same port and store: the bus reconnects

    async def sent() -> bool:
        await relay.flush()
        return (await rows(db, tables))[env.id].sent_at is not None

    await until(sent, "the row published once NATS is back")
    assert (await rows(db, tables))[env.id].attempts == 0


def test_the_stream_of_a_subject_is_known_without_asking_jetstream() -> None:
    assert stream_of(subjects.CONSENT_RECORDED) == streams.CONSENT.name
    assert stream_of(subjects.hub_imaging_jobs("snubh")) == streams.IMAGING_JOBS.name
    assert stream_of(subjects.hub_inbox_wildcard("snubh").replace(">", "delivery.severance")) == (
        streams.HUB_INBOX.name
    )
    assert stream_of("hie.nowhere") is None
