"""Transactional outbox: an event is written in the same transaction as the change it reports, and a
relay publishes it to JetStream after commit. A crash between commit and publish loses nothing: the
relay finds the row on its next pass, and Nats-Msg-Id de-duplicates a publish that was retried.

No poison message: a row that cannot be published (refused by the server, no acknowledgement, over
the server's max_payload) is retried with exponential backoff and, after ``max_attempts``, set aside
as a dead letter (``dead_at``) for an operator; it never holds back the rows behind it. While the bus
itself is down nothing is counted against any row.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import nats.errors
from nats.js.errors import NotFoundError
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Table, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from hie_platform.bus import Bus
from hie_platform.db import Database, before_commit, events_written
from hie_platform.errors import PayloadTooLarge
from hie_platform.logging import CORRELATION_HEADER, correlation_id, get_logger
from hie_platform.workers import PeriodicWorker
from hie_schemas import streams, subjects
from hie_schemas.envelope import Envelope, EventPayload, Source

log = get_logger(__name__)

# NATS counts the headers (Nats-Msg-Id, correlation id: under 200 bytes) against max_payload, and a
# message over it makes the server close the connection with everything in flight on it.
HEADER_ALLOWANCE = 1024
# Raised while publishing when the connection, not the row, is the problem: nothing is counted.
_BUS_DOWN = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionDrainingError,
    nats.errors.OutboundBufferLimitError,
)


def max_event_bytes(max_payload: int) -> int:
    """The largest serialized envelope that travels on a server with this max_payload."""
    return max_payload - HEADER_ALLOWANCE


class EventTooLarge(PayloadTooLarge):
    """An event bigger than NATS carries: refused in the request (413), before anything is stored."""


_DEFERRED = "hie.outbox.deferred"


class Outbox:
    """Writes events into the current transaction: at once, or (``defer``) all together in one
    INSERT just before the commit, after the audit chain's append (whose events join them)."""

    def __init__(self, table: Table, source: Source, max_payload: Callable[[], int] | None = None) -> None:
        self.table = table
        self.source = source
        # The connected server's max_payload, read at each write (it comes with the server's INFO).
        self.max_payload = max_payload

    async def add(
        self,
        session: AsyncSession,
        subject: str,
        payload: EventPayload,
        event_id: str | None = None,
        *,
        defer: bool = False,
    ) -> Envelope:
        envelope = Envelope.wrap(payload, self.source, correlation_id.get(), event_id)
        body = envelope.to_bytes()
        if self.max_payload is not None and len(body) > (limit := max_event_bytes(self.max_payload())):
            # Raised inside the request's transaction: the change it reports is rolled back with it.
            raise EventTooLarge(
                f"the {payload.event_type} event would be {len(body)} bytes; at most {limit} bytes "
                "can travel between nodes (NATS max_payload less headers)"
            )
        row = {
            "event_id": envelope.id,
            "subject": subject,
            "payload": body,
            "correlation_id": envelope.correlation_id,
            "created_at": envelope.occurred_at,
        }
        events_written(session)
        if defer:
            key = f"{_DEFERRED}.{self.table.name}"
            session.info.setdefault(key, []).append(row)
            before_commit(session, key, self._write_deferred, order=10)
        else:
            await session.execute(insert(self.table).values(**row))
        return envelope

    async def _write_deferred(self, session: AsyncSession) -> None:
        if rows := session.info.pop(f"{_DEFERRED}.{self.table.name}", None):
            await session.execute(insert(self.table), rows)


@dataclass(frozen=True)
class RetryPolicy:
    """How often a row that failed to publish is tried again before it becomes a dead letter."""

    max_attempts: int = 10
    base_seconds: float = 1.0
    max_seconds: float = 300.0
    publish_timeout: float = 5.0

    def delay(self, attempts: int) -> float:
        return float(min(self.max_seconds, self.base_seconds * 2 ** max(0, attempts - 1)))


@dataclass
class RelayStats:
    """What /metrics shows about one relay (collected by OutboxCollector)."""

    published: int = 0
    failures: int = 0
    dead_lettered: int = 0
    dead_letters: int = 0  # rows set aside now (refreshed from the database)
    pending: int = 0  # rows still to publish, dead letters excluded
    refreshed_at: float = float("-inf")


@dataclass
class _Pass:
    sent: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    too_large: set[int] = field(default_factory=set)  # failed for certain, whatever the bus's state
    subjects: dict[int, str] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)  # before this pass
    acked_streams: set[str] = field(default_factory=set)  # streams that took a publish of this pass
    waiting: dict[int, str] = field(default_factory=dict)  # failed, not the row's fault: uncounted
    bus_down: bool = False


def stream_of(subject: str) -> str | None:
    """The federation stream that takes ``subject`` (hie_schemas.streams), if any."""
    return next((s.name for s in streams.ALL if any(subjects.matches(p, subject) for p in s.subjects)), None)


def _headers(event_id: str, cid: str | None) -> dict[str, str]:
    headers = {"Nats-Msg-Id": event_id}
    if cid:
        headers[CORRELATION_HEADER] = cid
    return headers


class OutboxRelay:
    """Publishes committed outbox rows in order; woken by ``kick()`` after a commit, and every second.

    A batch is sent in outbox order on one connection and its acknowledgements are awaited together.
    A row whose publish fails gets a retry time and no longer blocks the rows behind it.
    """

    def __init__(
        self,
        db: Database,
        table: Table,
        bus: Bus,
        interval: float = 1.0,
        batch: int = 200,
        policy: RetryPolicy | None = None,
        stats_every: float = 10.0,
    ) -> None:
        self.db = db
        self.table = table
        self.bus = bus
        self.interval = interval
        self.batch = batch
        self.policy = policy or RetryPolicy()
        self.stats = RelayStats()
        self.stats_every = stats_every
        self._bus_down_logged = False
        self._can_probe = True
        # A pass at once (rows left from before a restart go out now), then every interval or on a kick.
        self.worker = PeriodicWorker("outbox-relay", self._pass, interval)

    def kick(self) -> None:
        self.worker.kick()

    def start(self) -> None:
        # Woken by every commit that wrote outbox rows (hie_platform.db), not by hand at each call site.
        self.db.on_event_commit.append(self.kick)
        self.worker.start()

    async def stop(self) -> None:
        if self.kick in self.db.on_event_commit:
            self.db.on_event_commit.remove(self.kick)
        await self.worker.stop()
        with contextlib.suppress(Exception):
            await self.flush()  # what the last commits wrote; what is left waits for the next start

    async def _pass(self) -> bool:
        """One batch; True while batches come back full (more is waiting). The gauges' counts are read
        again at the end of a pass once they are ``stats_every`` seconds old."""
        if await self.flush() == self.batch:
            return True
        if asyncio.get_running_loop().time() - self.stats.refreshed_at >= self.stats_every:
            await self.refresh_stats()
        return False

    async def flush(self) -> int:
        """Publish up to one batch of due rows; returns how many were settled (published, or given a
        retry time or set aside); 0 when the bus is down, which leaves every row as it was."""
        rows = await self._due_rows()
        if not rows:
            return 0
        outcome = await self._publish(rows)
        self.stats.failures += len(outcome.failed)
        if outcome.bus_down:
            outcome.failed.clear()
        else:
            await self._keep_only_row_faults(outcome)
        if outcome.bus_down or outcome.waiting:
            if not self._bus_down_logged:
                log.warning("outbox relay: NATS or a stream unavailable; its rows wait, no attempt counted")
            self._bus_down_logged = True
        elif outcome.sent:
            self._bus_down_logged = False
        await self._settle(outcome)
        return len(outcome.sent) + len(outcome.failed)

    async def _due_rows(self) -> Sequence[Any]:
        t = self.table
        now = datetime.now(UTC)
        async with self.db.read_sessions() as session:
            result = await session.execute(
                select(t.c.id, t.c.event_id, t.c.subject, t.c.payload, t.c.correlation_id, t.c.attempts)
                .where(
                    t.c.sent_at.is_(None),
                    t.c.dead_at.is_(None),
                    t.c.next_attempt_at.is_(None) | (t.c.next_attempt_at <= now),
                )
                .order_by(t.c.id)
                .limit(self.batch)
            )
            return result.all()

    async def _publish(self, rows: Sequence[Any]) -> _Pass:
        """Send the rows in order without waiting, then wait once for all their acknowledgements."""
        outcome = _Pass(
            attempts={row.id: int(row.attempts) for row in rows},
            subjects={row.id: row.subject for row in rows},
        )
        if not self.bus.connected:
            outcome.bus_down = True
            return outcome
        limit = max_event_bytes(self.bus.nc.max_payload)
        acks: dict[asyncio.Future[Any], int] = {}
        for row in rows:
            if len(row.payload) > limit:
                # Never sent: the server would close the connection, and every publish in flight with it.
                outcome.failed[row.id] = f"{len(row.payload)} bytes exceeds NATS max_payload ({limit} usable)"
                outcome.too_large.add(row.id)
                continue
            try:
                ack = await self.bus.js.publish_async(
                    row.subject, row.payload, headers=_headers(row.event_id, row.correlation_id)
                )
            except _BUS_DOWN:
                outcome.bus_down = True
                break
            except Exception as exc:
                outcome.failed[row.id] = f"{type(exc).__name__}: {exc}"
                continue
            acks[ack] = row.id
        if acks:
            done, late = await asyncio.wait(acks, timeout=self.policy.publish_timeout)
            for ack in late:
                ack.cancel()  # frees its slot among nats-py's pending async publishes
                outcome.failed[acks[ack]] = f"no acknowledgement within {self.policy.publish_timeout:g}s"
            for ack in done:
                if (refusal := ack.exception()) is None:
                    outcome.sent.append(acks[ack])
                    outcome.acked_streams.add(ack.result().stream)
                else:
                    outcome.failed[acks[ack]] = f"{type(refusal).__name__}: {refusal}"
        if outcome.failed and not self.bus.connected:
            outcome.bus_down = True
        return outcome

    async def _keep_only_row_faults(self, outcome: _Pass) -> None:
        """A failure counts against a row when it is the row's for certain (too large, or the server
        refused the subject to this user) or when its stream is up: it took another publish of the
        same pass, or answers STREAM.INFO. Otherwise (a stream leader election, JetStream down) the
        row waits a little, uncounted."""
        answers: dict[str, bool] = {}
        refused = str(self.bus.nc.last_error or "").lower()
        for row_id in [r for r in outcome.failed if r not in outcome.too_large]:
            subject = outcome.subjects[row_id]
            if f'permissions violation for publish to "{subject.lower()}"' in refused:
                outcome.failed[row_id] = f"NATS refused the subject to this user: {outcome.failed[row_id]}"
                continue
            stream = stream_of(subject)
            if stream is not None and stream in outcome.acked_streams:
                continue
            if subject not in answers:
                answers[subject] = await self._stream_answers(subject)
            if not answers[subject]:
                outcome.waiting[row_id] = outcome.failed.pop(row_id)

    async def _stream_answers(self, subject: str) -> bool:
        """Ask JetStream whether the stream of ``subject`` is up (where this NATS user may ask)."""
        if not self._can_probe:
            return False
        try:
            async with asyncio.timeout(min(2.0, self.policy.publish_timeout)):
                stream = await self.bus.js.find_stream_name_by_subject(subject)
                await self.bus.js.stream_info(stream)
        except NotFoundError:
            return True  # no stream takes this subject: nothing will, the row's publish is at fault
        except asyncio.CancelledError:
            raise
        except Exception:
            refused = str(self.bus.nc.last_error or "").lower()
            if "permissions violation" in refused and "js.api.stream" in refused:
                self._can_probe = False  # this user may not ask (a hub's account): witnesses only
            return False
        return True

    async def _settle(self, outcome: _Pass) -> None:
        if not outcome.sent and not outcome.failed and not outcome.waiting:
            return
        t = self.table
        now = datetime.now(UTC)
        dead: list[int] = []
        async with self.db.transaction() as session:
            if outcome.sent:
                await session.execute(update(t).where(t.c.id.in_(outcome.sent)).values(sent_at=now))
            if outcome.waiting:
                await session.execute(
                    update(t)
                    .where(t.c.id.in_(list(outcome.waiting)))
                    .values(next_attempt_at=now + timedelta(seconds=self.policy.base_seconds))
                )
            for row_id, error in outcome.failed.items():
                attempts = outcome.attempts[row_id] + 1
                is_dead = attempts >= self.policy.max_attempts
                await session.execute(
                    update(t)
                    .where(t.c.id == row_id)
                    .values(
                        attempts=attempts,
                        last_error=error[:500],
                        next_attempt_at=now + timedelta(seconds=self.policy.delay(attempts)),
                        dead_at=now if is_dead else None,
                    )
                )
                if is_dead:
                    dead.append(row_id)
        self.stats.published += len(outcome.sent)
        self.stats.dead_lettered += len(dead)
        for row_id, error in outcome.failed.items():
            log.warning(
                "outbox dead letter" if row_id in dead else "outbox publish failed; will retry",
                row=row_id,
                error=error[:200],
            )
        if dead:
            await self.refresh_stats()

    async def refresh_stats(self) -> None:
        """Read how many rows are pending and how many are dead letters (for the gauges)."""
        async with self.db.read_sessions() as session:
            counts = await outbox_counts(session, self.table)
        self.stats.pending, self.stats.dead_letters = counts
        self.stats.refreshed_at = asyncio.get_running_loop().time()


# --- operations: the gauges' source, and the operator's retry of dead letters ---------------------


async def outbox_counts(session: AsyncSession, table: Table) -> tuple[int, int]:
    """(rows still to publish, dead letters) of one outbox."""
    unsent = table.c.sent_at.is_(None)
    pending = await session.scalar(select(func.count()).where(unsent, table.c.dead_at.is_(None)))
    dead = await session.scalar(select(func.count()).where(unsent, table.c.dead_at.is_not(None)))
    return int(pending or 0), int(dead or 0)


async def dead_letters(session: AsyncSession, table: Table) -> Sequence[Any]:
    """The dead letters, oldest first: what an operator inspects before retrying them."""
    t = table
    result = await session.execute(
        select(t.c.id, t.c.event_id, t.c.subject, t.c.created_at, t.c.attempts, t.c.dead_at, t.c.last_error)
        .where(t.c.sent_at.is_(None), t.c.dead_at.is_not(None))
        .order_by(t.c.id)
    )
    return result.all()


async def retry_dead_letters(session: AsyncSession, table: Table, event_ids: Iterable[str] = ()) -> int:
    """Put dead letters (all, or those named) back in line with fresh attempts; the relay publishes
    them on its next pass. Returns how many were put back."""
    t = table
    query = update(t).where(t.c.sent_at.is_(None), t.c.dead_at.is_not(None))
    if ids := list(event_ids):
        query = query.where(t.c.event_id.in_(ids))
    result = await session.execute(
        query.values(dead_at=None, attempts=0, next_attempt_at=None).execution_options(
            synchronize_session=False
        )
    )
    return int(getattr(result, "rowcount", 0) or 0)


class OutboxCollector(Collector):
    """Exposes a service's relay on its /metrics (the relay lives in the lifespan, found at scrape)."""

    def __init__(self, service: str, relay: Callable[[], OutboxRelay | None]) -> None:
        self.service = service
        self.relay = relay

    def collect(self) -> Iterable[Metric]:
        relay = self.relay()
        if relay is None:
            return
        stats, labels = relay.stats, [self.service]
        families: list[Metric] = []
        for name, text, value in (
            ("hie_outbox_published", "Outbox rows published to JetStream", stats.published),
            (
                "hie_outbox_publish_failures",
                "Outbox publishes that failed (each retry counts)",
                stats.failures,
            ),
            ("hie_outbox_dead_lettered", "Outbox rows set aside as dead letters", stats.dead_lettered),
        ):
            counter = CounterMetricFamily(name, text, labels=["service"])
            counter.add_metric(labels, value)
            families.append(counter)
        for name, text, value in (
            ("hie_outbox_dead_letters", "Outbox rows set aside, waiting for an operator", stats.dead_letters),
            ("hie_outbox_pending", "Outbox rows still to publish (dead letters excluded)", stats.pending),
        ):
            gauge = GaugeMetricFamily(name, text, labels=["service"])
            gauge.add_metric(labels, value)
            families.append(gauge)
        yield from families


def outbox_collector(service: str, app: Any) -> OutboxCollector:
    """The collector of a service app whose lifespan puts its runtime (and relay) on ``app.state``."""

    def relay() -> OutboxRelay | None:
        runtime = getattr(app.state, "runtime", None)
        found: OutboxRelay | None = getattr(runtime, "relay", None)
        return found

    return OutboxCollector(service, relay)
