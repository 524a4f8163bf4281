"""A service's replica of the consent feed, so that it decides consent locally (design §4).

The one replica code of every service that decides consent: hub nodes (``hie_hub.consent_replica``)
and imaging gateways (``hie_imaging.consent``). Each service gives it its durable consumer name, its
``consent_replica`` table and its settings.

- **Feed**: every ConsentRecorded (HIE_CONSENT, ``hie.consent.consent.recorded``) is applied into the
  ``consent_replica`` table by a durable pull consumer (``hub-<slug>-consent``, shared by a hub's
  replicas; ``imaging-<slug>-consent`` for a gateway). Versions of one patient are applied in order
  (a version arrives only after the one before it; a duplicate is skipped), so the table is the
  patient's history as the consent service keeps it, without exclusion reasons or signers.
- **Liveness**: the consent service publishes a heartbeat every second with the stream sequence of
  its last ConsentRecorded and the age of its unpublished backlog. A heartbeat counts only once this
  consumer has acknowledged everything up to that sequence (its ack floor, or nothing pending), so
  the replica is *current as of* the moment it heard the heartbeat, minus the backlog's age.
- **Staleness**: the replica is ``current`` while that moment is at most
  ``consent_staleness_seconds`` (30) old, ``stale`` once it is older, ``starting`` until the first
  confirmed heartbeat after the process started. A stale replica fails closed (``decide_replicated``).
- **Rebuild**: if the consumer has acknowledged more than the table holds (the database was replaced
  or restored), the consumer is recreated from the start of the stream and the table rebuilt;
  applying is idempotent.
- **Watch**: ``watch()`` before a decision, then ``ConsentWatch.changed(patient_key)`` (thread-safe,
  no I/O) says whether this process has applied a version for that patient since, or the replica
  has gone stale: a long transfer asks it between instances and decides again when it says so. It
  sees the versions *this process* applied, so it is exact only where one process consumes the
  durable (an imaging gateway); a hub's replicas share theirs and do not use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import nats
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import JSON, Column, DateTime, Index, Integer, MetaData, String, Table, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from hie_platform.logging import get_logger
from hie_platform.runtime import Runtime
from hie_schemas import streams, subjects
from hie_schemas.consent import ConsentPolicy, ConsentState
from hie_schemas.envelope import Envelope
from hie_schemas.events import CONSENT_FEED_HEARTBEAT, ConsentFeedHeartbeat, ConsentRecorded

log = get_logger(__name__)

TABLE = "consent_replica"
_CHANGES_KEPT = 50_000  # patients whose last change is remembered for watches, at most
_CHANGES_HORIZON_SECONDS = 600.0  # a watch older than this after a prune counts as changed


class ConsentSource(StrEnum):
    AUTO = "auto"
    REPLICA = "replica"
    CENTRAL = "central"


class ReplicaSettings(BaseSettings):
    """The replica's settings. Each service reads them with its own prefix (a subclass that sets
    ``env_prefix``: ``HIE_HUB_`` for a hub node, ``HIE_IMAGING_`` for a gateway)."""

    model_config = SettingsConfigDict(extra="ignore")

    consent_staleness_seconds: float = 30.0
    # auto: local once current, the central decision point while starting; replica: local only,
    # failing closed while starting; central: always the central point.
    consent_source: ConsentSource = ConsentSource.AUTO
    # A local consent-based denial is checked with the central point when it answers (read-your-writes
    # for a consent recorded a moment ago); a permit never waits for it.
    consent_confirm_denials: bool = True
    consent_replica_batch: int = 256
    consent_replica_ack_wait_seconds: float = 10.0


class Freshness(StrEnum):
    STARTING = "starting"
    CURRENT = "current"
    STALE = "stale"


def consent_replica_columns() -> list[Column[Any]]:
    """The ``consent_replica`` table's columns: one row per replicated consent version."""
    return [
        Column("patient_key", String(64), primary_key=True),
        Column("version", Integer, primary_key=True),
        Column("policy", String(32), nullable=False),
        Column("effective_at", DateTime(timezone=True), nullable=False),
        Column("excluded_institutions", JSON, nullable=False),
        Column("excluded_departments", JSON, nullable=False),
        Column("event_id", String(64), nullable=False),
        # The HIE_CONSENT sequence it came from: the replica's position, to rebuild after a lost database.
        Column("stream_sequence", Integer, nullable=False),
        Column("applied_at", DateTime(timezone=True), nullable=False),
    ]


def consent_replica_table(metadata: MetaData) -> Table:
    """Declare the ``consent_replica`` table on a service's metadata (its migrations create it)."""
    table = Table(TABLE, metadata, *consent_replica_columns())
    Index("ix_consent_replica_stream_sequence", table.c.stream_sequence)
    return table


def _utc(value: datetime) -> datetime:
    """SQLite hands back (and stores) naive datetimes: they are UTC here."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass(frozen=True)
class ConsentWatch:
    """What the replica knew when a decision was taken; asks whether that may no longer hold."""

    replica: ConsentReplica
    stamp: float
    current: bool  # the replica was current then: going stale since is a change

    def changed(self, patient_key: str) -> bool:
        """True if a version of this patient was applied (or held back) since, or the replica went
        stale. Thread-safe and free of I/O: a DICOM association thread asks it per instance."""
        if self.replica.changed_since(patient_key, self.stamp):
            return True
        return self.current and self.replica.state() is not Freshness.CURRENT


class ConsentReplica:
    """Applies the consent feed into the service's database and knows how current that copy is."""

    def __init__(
        self,
        runtime: Runtime,
        durable: str,
        table: Table,
        settings: ReplicaSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runtime = runtime
        self.settings = settings
        self.durable = durable
        self.table = table
        self._clock = clock
        self._current_at: float | None = None  # monotonic time the replica was last known current
        self._pending: list[tuple[int, float]] = []  # heartbeats not yet covered by our ack floor
        self._reported = Freshness.STARTING
        self.gapped: set[str] = set()  # patients whose next version is missing: decided as stale
        self.applied_sequence = 0  # the highest HIE_CONSENT sequence in the table (for metrics)
        self._changes: dict[str, float] = {}  # patient key -> when this process last changed it
        self._forgotten_before = float("-inf")
        self._sub: Any = None
        self._heartbeats: Any = None
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._prepare_consumer()
        self._heartbeats = await self.runtime.bus.nc.subscribe(CONSENT_FEED_HEARTBEAT, cb=self._on_heartbeat)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._heartbeats is not None:
            with contextlib.suppress(Exception):
                await self._heartbeats.unsubscribe()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def _prepare_consumer(self) -> None:
        js = self.runtime.bus.js
        stream = streams.CONSENT.name
        position = await self.position()
        self.applied_sequence = position
        try:
            info = await js.consumer_info(stream, self.durable)
        except NotFoundError:
            info = None
        floor = info.ack_floor.stream_seq if info is not None and info.ack_floor else 0
        if info is not None and floor > position:
            # The consumer acknowledged versions this database does not hold: rebuild from the start.
            log.warning("consent replica behind its consumer; rebuilding", position=position, ack_floor=floor)
            await js.delete_consumer(stream, self.durable)
            info = None
        if info is None:
            await js.add_consumer(
                stream,
                ConsumerConfig(
                    durable_name=self.durable,
                    filter_subject=subjects.CONSENT_RECORDED,
                    deliver_policy=DeliverPolicy.ALL,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=self.settings.consent_replica_ack_wait_seconds,
                    max_ack_pending=4 * self.settings.consent_replica_batch,
                ),
            )
        self._sub = await js.pull_subscribe_bind(durable=self.durable, stream=stream)

    # --- how current ----------------------------------------------------------------------------------

    def state(self) -> Freshness:
        """How current the replica is now (no side effect: safe from any thread)."""
        if self._current_at is None:
            return Freshness.STARTING
        if self._clock() - self._current_at <= self.settings.consent_staleness_seconds:
            return Freshness.CURRENT
        return Freshness.STALE

    def freshness(self) -> Freshness:
        """``state()``, logging each change of it."""
        state = self.state()
        if state is not self._reported:
            level = log.warning if state is Freshness.STALE else log.info
            level("consent replica " + state.value, staleness=self.staleness_seconds())
            self._reported = state
        return state

    def staleness_seconds(self) -> float | None:
        """How long ago the replica was last known to hold every recorded version (None: not yet)."""
        return None if self._current_at is None else self._clock() - self._current_at

    async def wait_current(self, timeout: float) -> bool:
        deadline = self._clock() + timeout
        while self.freshness() is not Freshness.CURRENT:
            if self._clock() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            beat = Envelope.from_bytes(msg.data).payload(ConsentFeedHeartbeat)
        except (ValidationError, ValueError):
            return
        self._pending.append((beat.stream_sequence, self._clock() - max(0.0, beat.lag_seconds)))
        try:
            info = await self.runtime.bus.js.consumer_info(streams.CONSENT.name, self.durable, timeout=2.0)
        except Exception as exc:
            log.debug("consent consumer info unavailable", error=type(exc).__name__)
            return
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        # Nothing undelivered and nothing unacknowledged: every message the beat could mean is applied.
        drained = not info.num_pending and not info.num_ack_pending
        covered = [heard for sequence, heard in self._pending if drained or sequence <= floor]
        if covered:
            best = max(covered)
            self._current_at = best if self._current_at is None else max(self._current_at, best)
        horizon = self._clock() - self.settings.consent_staleness_seconds
        self._pending = [
            (sequence, heard)
            for sequence, heard in self._pending
            if not (drained or sequence <= floor) and heard >= horizon
        ]

    # --- watching for changes -----------------------------------------------------------------------

    def watch(self) -> ConsentWatch:
        """Take this before reading the histories a decision uses (see ConsentWatch)."""
        return ConsentWatch(self, self._clock(), self.state() is Freshness.CURRENT)

    def changed_since(self, patient_key: str, stamp: float) -> bool:
        if stamp < self._forgotten_before:
            return True  # older than what is remembered: assume it changed
        changed_at = self._changes.get(patient_key)
        return changed_at is not None and changed_at >= stamp

    def _mark_changed(self, patient_keys: Iterable[str]) -> None:
        now = self._clock()
        changes = self._changes
        if len(changes) > _CHANGES_KEPT:
            horizon = now - _CHANGES_HORIZON_SECONDS
            # A new dict, swapped in whole: a reader in another thread sees the old or the new one.
            changes = {key: at for key, at in changes.items() if at >= horizon}
            self._forgotten_before = horizon
        for key in patient_keys:
            changes[key] = now
        self._changes = changes

    # --- the replicated history -------------------------------------------------------------------

    async def position(self) -> int:
        async with self.runtime.db.read_sessions() as session:
            value = await session.scalar(select(func.max(self.table.c.stream_sequence)))
        return int(value or 0)

    async def histories(self, patient_keys: Iterable[str]) -> dict[str, list[ConsentState]]:
        """Each patient's replicated versions, oldest first (one query for a whole decision batch)."""
        keys = sorted(set(patient_keys))
        found: dict[str, list[ConsentState]] = {key: [] for key in keys}
        if not keys:
            return found
        t = self.table.c
        async with self.runtime.db.read_sessions() as session:
            rows = await session.execute(
                select(self.table).where(t.patient_key.in_(keys)).order_by(t.patient_key, t.version)
            )
            for row in rows:
                found[row.patient_key].append(
                    ConsentState(
                        version=row.version,
                        policy=ConsentPolicy(row.policy),
                        effective_at=_utc(row.effective_at),
                        excluded_institutions=frozenset(row.excluded_institutions),
                        excluded_departments=frozenset(row.excluded_departments),
                    )
                )
        return found

    # --- applying the feed ------------------------------------------------------------------------

    async def _run(self) -> None:
        idle = True
        while True:
            try:
                # One message at a time while idle: a pull for more would linger until its timeout.
                size = 1 if idle else self.settings.consent_replica_batch
                msgs: list[Msg] = await self._sub.fetch(size, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                idle = True
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("consent feed fetch failed", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.5)
                continue
            try:
                await self._apply(msgs)
            except asyncio.CancelledError:
                await self._nak(msgs, None)  # redelivered at once to whoever pulls next
                raise
            except Exception as exc:
                log.warning("consent feed apply failed; will retry", error=f"{type(exc).__name__}: {exc}")
                await self._nak(msgs, 0.5)
                await asyncio.sleep(0.5)
                continue
            metadata = msgs[-1].metadata
            idle = not (metadata and metadata.num_pending)

    @staticmethod
    async def _nak(msgs: Iterable[Msg], delay: float | None) -> None:
        for msg in msgs:
            with contextlib.suppress(Exception):
                await msg.nak(delay=delay)

    async def _apply(self, msgs: list[Msg]) -> None:
        acks: list[Msg] = []
        terms: list[Msg] = []
        later: list[Msg] = []
        applied: set[str] = set()
        blocked: set[str] = set()
        top = 0
        async with self.runtime.db.transaction() as session:
            latest: dict[str, int] = {}
            for msg in msgs:
                try:
                    envelope = Envelope.from_bytes(msg.data)
                    event = envelope.payload(ConsentRecorded)
                except (ValidationError, ValueError):
                    log.error("malformed consent event terminated", subject=msg.subject)
                    terms.append(msg)
                    continue
                key = event.patient_key
                if key in blocked:
                    later.append(msg)  # keep this patient's versions in order behind the missing one
                    continue
                if key not in latest:
                    latest[key] = await self._latest_version(session, key)
                if event.version <= latest[key]:
                    acks.append(msg)  # already applied (redelivery or a replayed stream)
                    continue
                if event.version != latest[key] + 1:
                    log.warning("consent version ahead of its predecessor; waiting", version=event.version)
                    blocked.add(key)
                    later.append(msg)
                    continue
                row = self._row(event, envelope.id, msg)
                await session.execute(insert(self.table).values(**row))
                top = max(top, row["stream_sequence"])
                latest[key] = event.version
                applied.add(key)
                acks.append(msg)
        # Marked before the acks: a watch must see the change as soon as a decision could.
        self._mark_changed(applied | (blocked - self.gapped))
        self.applied_sequence = max(self.applied_sequence, top)
        # Acknowledged only after the commit: a crash in between means a redelivery, skipped above.
        for msg in acks:
            await msg.ack()
        for msg in terms:
            await msg.term()
        await self._nak(later, 0.2)
        self.gapped = (self.gapped - applied) | blocked

    async def _latest_version(self, session: AsyncSession, patient_key: str) -> int:
        t = self.table.c
        value = await session.scalar(select(func.max(t.version)).where(t.patient_key == patient_key))
        return int(value or 0)

    @staticmethod
    def _row(event: ConsentRecorded, event_id: str, msg: Msg) -> dict[str, Any]:
        return {
            "patient_key": event.patient_key,
            "version": event.version,
            "policy": event.policy.value,
            "effective_at": _utc(event.effective_at),
            "excluded_institutions": list(event.excluded_institutions),
            "excluded_departments": list(event.excluded_departments),
            "event_id": event_id,
            "stream_sequence": msg.metadata.sequence.stream if msg.metadata else 0,
            "applied_at": datetime.now(UTC),
        }
