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
- **Memory** (``hie_platform.consent_memory``): decisions read the table's versions from memory,
  never the database. The memory is loaded from the table at start and merged into (idempotently):
  (1) right after this process's own apply transaction commits, before its acks; (2) from the table,
  for the versions *other processes* applied: a hub's replicas share one durable, so each process
  sees only the messages it pulled. Every heartbeat, after reading the durable's ack floor F, the
  process reads the rows above the floor it last caught up to and then takes F as its new floor
  (everything at or below F is acknowledged, so committed: the read misses nothing). A heartbeat
  counts towards ``current`` only after that read succeeded, so the memory is current exactly when
  the table was. Between heartbeats a poll every ``consent_replica_poll_seconds`` (0.1) reads the rows
  above the newest sequence seen (minus the in-flight window) so that a peer's withdrawal is in
  force here within about that interval, not a heartbeat; the heartbeat read is the guarantee. A
  patient whose versions have a hole in memory (a peer's earlier version not merged yet) is decided
  as stale. Chosen over an own ordered consumer per process because a hub's NATS account may use
  only its durables' consumer API (hie_platform.nats_accounts): an ephemeral consumer per process
  would need a contract change.
- **Watch**: ``watch()`` before a decision, then ``ConsentWatch.changed(patient_key)`` (thread-safe,
  no I/O) says whether this process's memory took a version for that patient since (its own apply or
  a peer's, merged as above), or the replica has gone stale: a long transfer asks it between
  instances and decides again when it says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import nats
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import ValidationError
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    func,
    insert,
    select,
)
from sqlalchemy.ext.asyncio import AsyncSession

from hie_platform.consent_memory import ConsentMemory, as_utc, consent_state, state_of_row
from hie_platform.logging import get_logger
from hie_platform.runtime import Runtime
from hie_platform.settings import ReplicaSettings
from hie_platform.workers import PeriodicWorker, Worker
from hie_schemas import streams, subjects
from hie_schemas.consent import ConsentState
from hie_schemas.envelope import Envelope
from hie_schemas.events import CONSENT_FEED_HEARTBEAT, ConsentFeedHeartbeat, ConsentRecorded

log = get_logger(__name__)

TABLE = "consent_replica"
_CHANGES_KEPT = 50_000  # patients whose last change is remembered for watches, at most
_CHANGES_HORIZON_SECONDS = 600.0  # a watch older than this after a prune counts as changed


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
        self.applied_versions = 0  # versions this process applied (its peers on the durable the rest)
        self.memory = ConsentMemory()
        self._memory_floor = -1  # every table row at or below this sequence is in memory (-1: none)
        self._changes: dict[str, float] = {}  # patient key -> when this process last changed it
        self._forgotten_before = float("-inf")
        self._sub: Any = None
        self._heartbeats: Any = None
        # Built once, run on a bare connection: the poll runs ten times a second in every hub and
        # gateway process, and building the query and an ORM session for it each time was the
        # largest share of an idle process's CPU (py-spy; docs/consent.md, "Replication").
        t = table.c
        columns = (t.patient_key, t.version, t.policy, t.effective_at, t.excluded_institutions)
        self._rows_after = select(*columns, t.excluded_departments, t.stream_sequence).where(
            t.stream_sequence > bindparam("since")
        )
        self._workers = [
            Worker(f"consent-replica-{durable}", self._run),
            # The peers' versions between heartbeats; a failing read is logged once by the worker.
            PeriodicWorker(
                f"consent-replica-poll-{durable}",
                self._poll,
                settings.consent_replica_poll_seconds,
                run_now=False,
            ),
        ]

    # --- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        floor = await self._prepare_consumer()
        await self._catch_up(floor)  # the whole table: nothing is in memory yet
        self._heartbeats = await self.runtime.bus.nc.subscribe(CONSENT_FEED_HEARTBEAT, cb=self._on_heartbeat)
        for worker in self._workers:
            worker.start()

    async def stop(self) -> None:
        if self._heartbeats is not None:
            with contextlib.suppress(Exception):
                await self._heartbeats.unsubscribe()
        for worker in self._workers:
            await worker.stop()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def _prepare_consumer(self) -> int:
        """Bind to the durable (created, or recreated for a rebuild); return its ack floor."""
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
            info, floor = None, 0
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
        return floor if info is not None else 0

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
        try:
            await self._catch_up(floor)  # what peers applied up to the floor: in memory before it counts
        except Exception as exc:
            log.warning("consent replica memory not caught up", error=type(exc).__name__)
            return
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

    def history(self, patient_key: str) -> Sequence[ConsentState]:
        """The patient's replicated versions, oldest first: from memory, no I/O."""
        return self.memory.history(patient_key)

    def whole(self, patient_key: str) -> bool:
        """No version of the patient is held back here or missing from memory (else: decide stale)."""
        return patient_key not in self.gapped and self.memory.whole(patient_key)

    async def histories(self, patient_keys: Iterable[str]) -> dict[str, list[ConsentState]]:
        """Each patient's replicated versions, oldest first (from memory)."""
        return {key: list(self.memory.history(key)) for key in set(patient_keys)}

    async def _catch_up(self, floor: int | None) -> None:
        """Merge the table's rows other processes applied. With ``floor`` (an ack floor read before
        this call) everything at or below it is committed, so it becomes the memory's floor; without
        it (the poll) only the rows above the newest sequence seen, minus the in-flight window."""
        since = self._memory_floor
        if floor is None:
            window = 4 * self.settings.consent_replica_batch  # the durable's max_ack_pending
            since = max(since, self.memory.top_sequence - window)
        changed: set[str] = set()
        async with self.runtime.db.reader.connect() as conn:
            if self._memory_floor < 0:
                # The load at start, in parts: it does not hold every row and every state at once.
                result = await conn.stream(self._rows_after, {"since": since})
                async for rows in result.partitions(5_000):
                    changed |= self._merge(rows)
            else:  # a heartbeat's or a poll's few rows (usually none): one plain read
                rows = (await conn.execute(self._rows_after, {"since": since})).all()
                changed = self._merge(rows) if rows else changed
        if self._memory_floor >= 0:  # not the load at start: no watch is older than that
            self._mark_changed(changed)
        if floor is not None:
            self._memory_floor = max(self._memory_floor, floor)

    def _merge(self, rows: Sequence[Any]) -> set[str]:
        top = max(row.stream_sequence for row in rows)
        new = (row for row in rows if not self.memory.knows(row.patient_key, row.version))
        return self.memory.merge((state_of_row(row) for row in new), top)

    async def _poll(self) -> None:
        await self._catch_up(None)

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
        merged: list[tuple[str, ConsentState]] = []
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
                merged.append((key, self._state(row)))
                top = max(top, row["stream_sequence"])
                latest[key] = event.version
                applied.add(key)
                acks.append(msg)
        # In memory only now, after the commit, and before the acks; marked for watches at once, as
        # a decision could see it.
        self.memory.merge(merged, top)
        self.applied_versions += len(merged)
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
    def _state(row: dict[str, Any]) -> ConsentState:
        return consent_state(
            row["version"],
            row["policy"],
            row["effective_at"],
            row["excluded_institutions"],
            row["excluded_departments"],
        )

    @staticmethod
    def _row(event: ConsentRecorded, event_id: str, msg: Msg) -> dict[str, Any]:
        return {
            "patient_key": event.patient_key,
            "version": event.version,
            "policy": event.policy.value,
            "effective_at": as_utc(event.effective_at),
            "excluded_institutions": list(event.excluded_institutions),
            "excluded_departments": list(event.excluded_departments),
            "event_id": event_id,
            "stream_sequence": msg.metadata.sequence.stream if msg.metadata else 0,
            "applied_at": datetime.now(UTC),
        }
