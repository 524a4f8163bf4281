"""The consent replica decides from memory: the memory is the table, in every process (issue 13 point 4).

Real nats-server (the session's), real consent service (its heartbeat) and registry, the hub's
replica binding on SQLite and PostgreSQL. Consent versions are published to HIE_CONSENT as the
consent service publishes them, so a test can also send them out of order or twice.

"Two processes" are two replicas of one hub, each with its own runtime (NATS connection, database
engine, memory) on one database and one durable consumer: what two worker processes of a hub hold.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import insert, select

from hie_consent.app import create_app as create_consent_app
from hie_consent.config import ConsentSettings
from hie_hub.app import MIGRATIONS as HUB_MIGRATIONS
from hie_hub.config import HubSettings
from hie_hub.consent_replica import ConsentReplica, replica_table
from hie_hub.models import PLATFORM as HUB_TABLES
from hie_platform.bus import Bus
from hie_platform.consent_gate import ConsentGate
from hie_platform.consent_replica import Freshness
from hie_platform.natsd import free_port
from hie_platform.runtime import Runtime, start_runtime
from hie_platform.settings import ConsentSource, ReplicaSettings
from hie_schemas import subjects
from hie_schemas.consent import ConsentPolicy, ConsentState, FlowQuery
from hie_schemas.envelope import Envelope, Source
from hie_schemas.events import ConsentRecorded

HOLDER, RECIPIENT = "11100001", "31100002"  # seeded, in good standing
ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"
FEED = Source(service="consent", node="test-feed")
T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[T | None]], what: str, timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        found = await check()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)


@dataclass
class Node:
    """One process of a hub: its runtime, its replica and its gate."""

    runtime: Runtime
    replica: ConsentReplica
    gate: ConsentGate


@asynccontextmanager
async def node(
    slug: str, url: str, schema: str | None, nats_url: str, registry_url: str, name: str, **replica: Any
) -> AsyncIterator[Node]:
    settings = HubSettings(
        hub=slug,
        database_url=url,
        database_schema=schema,
        nats_url=nats_url,
        registry_url=registry_url,
        node=f"test-{slug}-{name}",
    )
    async with start_runtime(settings, "hub-node", HUB_TABLES, HUB_MIGRATIONS) as runtime:
        replica = ConsentReplica(
            runtime,
            slug,
            ReplicaSettings(consent_confirm_denials=False, consent_source=ConsentSource.REPLICA, **replica),
        )
        await replica.start()
        try:
            yield Node(runtime, replica, ConsentGate(runtime.bus, 2.0, replica, hub=slug))
        finally:
            await replica.stop()


@pytest.fixture(scope="module")
async def heartbeat(
    pytestconfig: pytest.Config, nats_url: str, registry: Any, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[None]:
    """The real consent service: its heartbeat says how far HIE_CONSENT goes."""
    port = free_port()
    data = tmp_path_factory.mktemp("consent")
    settings = ConsentSettings(
        database_url=f"sqlite+aiosqlite:///{data / 'consent.db'}",
        nats_url=nats_url,
        registry_url=registry.url,
        port=port,
        node="test-consent-memory",
        history_consumer=f"consent-history-{uuid.uuid4().hex[:8]}",
        access_consumer=f"consent-access-{uuid.uuid4().hex[:8]}",
    )
    running_app = pytestconfig.pluginmanager.get_plugin(str(ROOT_CONFTEST)).RunningApp
    running = await running_app(create_consent_app(settings), port).start()
    yield
    await running.stop()


@dataclass
class HubEnv:
    """Where a test's hub processes run: the session's NATS and registry, one database, a unique slug
    part; the consent service's heartbeat is running."""

    url: str
    schema: str | None
    nats_url: str
    registry_url: str
    unique: str


@pytest.fixture
def hub(
    heartbeat: None, nats_url: str, registry: Any, database: tuple[str, str | None], unique: str
) -> HubEnv:
    return HubEnv(database[0], database[1], nats_url, registry.url, unique)


@pytest.fixture
async def feed(nats_url: str) -> AsyncIterator[Callable[..., Awaitable[None]]]:
    bus = await Bus.connect(nats_url, name="test-consent-feed")
    start = datetime.now(UTC) - timedelta(hours=1)

    async def publish(
        key: str, version: int, policy: ConsentPolicy, *excluded: str, again: bool = False
    ) -> None:
        event = Envelope.wrap(
            ConsentRecorded(
                patient_key=key,
                version=version,
                policy=policy,
                effective_at=start + timedelta(minutes=version),
                excluded_institutions=list(excluded),
                excluded_departments=["2300"] if excluded else [],
                recorded_by="11301001",
                channel="sign-pad",
            ),
            FEED,
        )
        await bus.publish(subjects.CONSENT_RECORDED, event)
        if again:  # a second copy JetStream cannot de-duplicate (another message id)
            await bus.publish_raw(subjects.CONSENT_RECORDED, event.to_bytes(), f"{event.id}-again", None)

    yield publish
    await bus.close()


def new_key() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex


async def table_of(n: Node) -> dict[str, list[ConsentState]]:
    t = replica_table().c
    found: dict[str, list[ConsentState]] = {}
    async with n.runtime.db.read_sessions() as session:
        rows = await session.execute(select(replica_table()).order_by(t.patient_key, t.version))
        for row in rows:
            at = row.effective_at if row.effective_at.tzinfo else row.effective_at.replace(tzinfo=UTC)
            found.setdefault(row.patient_key, []).append(
                ConsentState(
                    version=row.version,
                    policy=ConsentPolicy(row.policy),
                    effective_at=at,
                    excluded_institutions=frozenset(row.excluded_institutions),
                    excluded_departments=frozenset(row.excluded_departments),
                )
            )
    return found


def memory_of(n: Node) -> dict[str, list[ConsentState]]:
    return {key: list(n.replica.history(key)) for key in n.replica.memory}


async def memory_is_the_table(n: Node, *expected: tuple[str, list[int]]) -> dict[str, list[ConsentState]]:
    """Wait until the memory holds the expected versions and equals the table, row for row."""

    async def same() -> dict[str, list[ConsentState]] | None:
        if any([s.version for s in n.replica.history(k)] != v for k, v in expected):
            return None
        table = await table_of(n)
        return table if memory_of(n) == table else None

    return await eventually(same, f"the memory of {n.runtime.source.node} equal to its table")


async def test_the_memory_is_the_table_after_events_a_restart_and_a_rebuild(
    nats_url: str,
    registry: Any,
    database: tuple[str, str | None],
    tmp_path: Path,
    unique: str,
    feed: Callable[..., Awaitable[None]],
) -> None:
    url, schema = database
    slug = f"m{unique}"
    excluded, early, twice, later = new_key(), new_key(), new_key(), new_key()
    async with node(slug, url, schema, nats_url, registry.url, "a") as a:
        await feed(excluded, 1, ConsentPolicy.ENTIRE_CONSENT)
        await feed(excluded, 2, ConsentPolicy.PARTIAL_CONSENT, RECIPIENT)
        await feed(early, 2, ConsentPolicy.ENTIRE_WITHDRAWAL)  # overtakes its predecessor
        await feed(twice, 1, ConsentPolicy.ENTIRE_CONSENT, again=True)
        await feed(early, 1, ConsentPolicy.ENTIRE_CONSENT)
        table = await memory_is_the_table(a, (excluded, [1, 2]), (early, [1, 2]), (twice, [1]))
        assert table[excluded][1].excluded_institutions == frozenset({RECIPIENT})
        assert table[excluded][1].excluded_departments == frozenset({"2300"})
        assert a.replica.whole(early)

    await feed(excluded, 3, ConsentPolicy.ENTIRE_WITHDRAWAL)  # while the hub is down
    await feed(later, 1, ConsentPolicy.ENTIRE_CONSENT)
    async with node(slug, url, schema, nats_url, registry.url, "a") as restarted:
        await memory_is_the_table(restarted, (excluded, [1, 2, 3]), (early, [1, 2]), (later, [1]))

    # The same hub on an empty database: its consumer is ahead of the table, so both are rebuilt.
    fresh = f"sqlite+aiosqlite:///{tmp_path / 'replaced.db'}"
    async with node(slug, fresh, None, nats_url, registry.url, "a") as rebuilt:
        await memory_is_the_table(rebuilt, (excluded, [1, 2, 3]), (early, [1, 2]), (twice, [1]), (later, [1]))


def flow(key: str) -> FlowQuery:
    now = datetime.now(UTC)
    return FlowQuery(
        patient_key=key,
        holder=HOLDER,
        holder_department="2300",
        recipient=RECIPIENT,
        document_created_at=now,
        at=now,
    )


async def decided(nodes: list[Node], key: str, rule: str) -> None:
    async def all_of_them() -> bool | None:
        rules = [(await n.gate.decide(flow(key))).rule.value for n in nodes]
        return True if all(r == rule for r in rules) else None

    await eventually(all_of_them, f"{rule} for {key[:8]} at every process")


async def test_two_processes_sharing_a_durable_both_decide_right(
    hub: HubEnv, feed: Callable[..., Awaitable[None]]
) -> None:
    url, schema, nats_url, registry_url = hub.url, hub.schema, hub.nats_url, hub.registry_url
    slug = f"s{hub.unique}"
    keys = [new_key() for _ in range(12)]
    async with (
        node(slug, url, schema, nats_url, registry_url, "a") as a,
        node(slug, url, schema, nats_url, registry_url, "b") as b,
    ):
        assert await a.replica.wait_current(30.0), "process a never heard the consent feed"
        assert await b.replica.wait_current(30.0), "process b never heard the consent feed"
        took: list[float] = []
        for key in keys:
            await feed(key, 1, ConsentPolicy.ENTIRE_CONSENT)
            await decided([a, b], key, "permit-consent")
            started = time.perf_counter()
            await feed(key, 2, ConsentPolicy.ENTIRE_WITHDRAWAL)
            await decided([a, b], key, "deny-withdrawn")
            took.append(time.perf_counter() - started)
        print(
            f"\nwithdrawal in force at both processes: median {statistics.median(took) * 1000:.0f} ms, "
            f"max {max(took) * 1000:.0f} ms after it was published; versions applied by a "
            f"{a.replica.applied_versions}, by b {b.replica.applied_versions}"
        )
        # Each version was inserted by one process only (the durable hands a message to one puller;
        # a redelivery finds it in the table): the other decided right from what it read back.
        expected = [(key, [1, 2]) for key in keys]
        assert await memory_is_the_table(a, *expected) == await memory_is_the_table(b, *expected)


async def test_a_version_whose_predecessor_never_comes_stops_only_its_patient(
    hub: HubEnv, feed: Callable[..., Awaitable[None]]
) -> None:
    """Version 3 without 2 in the stream (2 lost or purged from it): after the hold time it is set
    aside. Only its patient is decided stale; the replica stays current past its staleness bound, at
    the process that pulled it, at its peer and at a process started afterwards; when 2 comes, 3
    follows it everywhere."""
    url, schema, nats_url, registry_url = hub.url, hub.schema, hub.nats_url, hub.registry_url
    slug = f"g{hub.unique}"
    bound = 2.0  # the staleness bound, short: the old failure was the whole replica stale after it
    settings = {"consent_staleness_seconds": bound, "consent_replica_hold_seconds": 1.0}
    gap, other = new_key(), new_key()
    async with (
        node(slug, url, schema, nats_url, registry_url, "a", **settings) as a,
        node(slug, url, schema, nats_url, registry_url, "b", **settings) as b,
    ):
        assert await a.replica.wait_current(30.0)
        assert await b.replica.wait_current(30.0)
        await feed(gap, 1, ConsentPolicy.ENTIRE_CONSENT)
        await feed(gap, 3, ConsentPolicy.ENTIRE_WITHDRAWAL)

        async def set_aside() -> bool | None:
            return True if all(n.replica.held.get(gap) == {3} for n in (a, b)) else None

        await eventually(set_aside, "version 3 set aside at both processes")
        await decided([a, b], gap, "deny-consent-feed-stale")
        await asyncio.sleep(2.5 * bound)
        assert [a.replica.state(), b.replica.state()] == [Freshness.CURRENT, Freshness.CURRENT]
        await feed(other, 1, ConsentPolicy.ENTIRE_CONSENT)
        await decided([a, b], other, "permit-consent")
        async with node(slug, url, schema, nats_url, registry_url, "c", **settings) as c:
            assert await c.replica.wait_current(30.0), "a process started after the set-aside: never current"
            assert c.replica.held.get(gap) == {3}
            await decided([a, b, c], gap, "deny-consent-feed-stale")
            await feed(gap, 2, ConsentPolicy.ENTIRE_CONSENT)  # the dead letter retried at the consent service
            await decided([a, b, c], gap, "deny-withdrawn")
            for n in (a, b, c):
                await memory_is_the_table(n, (gap, [1, 2, 3]), (other, [1]))
                assert gap not in n.replica.held
                assert n.replica.whole(gap)


async def test_a_version_left_set_aside_behind_its_applied_predecessor_is_released(
    hub: HubEnv, feed: Callable[..., Awaitable[None]]
) -> None:
    """Two processes racing on PostgreSQL can commit version 3 set aside (its predecessor not yet
    committed when it looked) and version 2 applied (version 3 not yet committed when it looked): the
    table is written here as they would leave it. The settle worker releases 3 within a second or so,
    and until then the patient is decided stale, never on version 2 alone."""
    key = new_key()
    async with node(f"h{hub.unique}", hub.url, hub.schema, hub.nats_url, hub.registry_url, "a") as a:
        assert await a.replica.wait_current(30.0)
        await feed(key, 1, ConsentPolicy.ENTIRE_CONSENT)
        await decided([a], key, "permit-consent")
        top = a.replica.memory.top_sequence
        table = replica_table()
        now = datetime.now(UTC)

        def row(version: int, policy: ConsentPolicy, held: bool, sequence: int) -> dict[str, Any]:
            return {
                "patient_key": key,
                "version": version,
                "policy": policy.value,
                "effective_at": now - timedelta(minutes=10 - version),
                "excluded_institutions": [],
                "excluded_departments": [],
                "event_id": uuid.uuid4().hex,
                "stream_sequence": sequence,
                "applied_at": now,
                "held": held,
            }

        async with a.runtime.db.transaction() as session:
            withdrawal, consent = ConsentPolicy.ENTIRE_WITHDRAWAL, ConsentPolicy.ENTIRE_CONSENT
            await session.execute(insert(table).values(row(3, withdrawal, True, top + 1)))
            await session.execute(insert(table).values(row(2, consent, False, top + 2)))
        rules: set[str] = set()  # decided once version 2 is in memory

        async def released() -> bool | None:
            rule = (await a.gate.decide(flow(key))).rule.value
            if a.replica.memory.knows(key, 2):
                rules.add(rule)
            return True if a.replica.memory.knows(key, 3) and a.replica.whole(key) else None

        await eventually(released, "version 3 released by the settle worker")
        await decided([a], key, "deny-withdrawn")
        assert "permit-consent" not in rules, "decided on version 2 while version 3 was set aside"
        assert not a.replica.held
        await memory_is_the_table(a, (key, [1, 2, 3]))
