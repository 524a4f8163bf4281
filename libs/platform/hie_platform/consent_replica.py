"""A service's replica of the consent feed, so that it decides consent locally (design §4).

The one replica code of every service that decides consent: hub nodes (``hie_hub.consent_replica``)
and imaging gateways (``hie_imaging.consent``). Each service gives it its durable consumer name, its
``consent_replica`` table and its settings.

- **Feed**: every ConsentRecorded (HIE_CONSENT, ``hie.consent.consent.recorded``) is applied into the
  ``consent_replica`` table by a durable pull consumer (``hub-<slug>-consent``, shared by a hub's
  replicas; ``imaging-<slug>-consent`` for a gateway). Versions of one patient are applied in order
  (a version arrives only after the one before it; a duplicate is skipped), so the table is the
  patient's history as the consent service keeps it, without exclusion reasons or signers. A version
  ahead of its predecessor is held back (nak) for ``consent_replica_hold_seconds``, then set aside in
  the table so that only its patient is decided stale (``hie_platform.consent_versions``; a peer's
  release is read back within a second by the settle worker).
- **Liveness**: the consent service publishes a heartbeat every second with the stream sequence of
  its last ConsentRecorded and the age of its unpublished backlog. A heartbeat counts only once this
  consumer has acknowledged everything up to that sequence (its ack floor, or nothing pending), so
  the replica is *current as of* the moment it heard the heartbeat (stamped on arrival, confirmed
  by the beat worker), minus the backlog's age.
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
from enum import StrEnum
from typing import Any

import nats
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import ValidationError
from sqlalchemy import Table, bindparam, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from hie_platform.consent_memory import ConsentMemory, consent_state, state_of_row
from hie_platform.consent_versions import (
    ApplyBatch,
    ReplicaVersions,
    Row,
    consent_replica_table,
    overdue,
    track_held,
)
from hie_platform.logging import get_logger
from hie_platform.runtime import Runtime
from hie_platform.settings import ReplicaSettings
from hie_platform.workers import PeriodicWorker, Worker
from hie_schemas import streams, subjects
from hie_schemas.consent import ConsentState
from hie_schemas.envelope import Envelope
from hie_schemas.events import CONSENT_FEED_HEARTBEAT, ConsentFeedHeartbeat, ConsentRecorded

__all__ = ["ConsentReplica", "ConsentWatch", "Freshness", "consent_replica_table"]

log = get_logger(__name__)

_CHANGES_KEPT = 50_000  # patients whose last change is remembered for watches, at most
_CHANGES_HORIZON_SECONDS = 600.0  # a watch older than this after a prune counts as changed


class Freshness(StrEnum):
    STARTING = "starting"
    CURRENT = "current"
    STALE = "stale"


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
        self._beat = asyncio.Event()  # a heartbeat came: the beat worker confirms it
        self._reported = Freshness.STARTING
        # Patient -> a version this process held back (nak) for want of its predecessor: decided as
        # stale until memory holds that version (applied here, or by a peer and merged).
        self.gapped: dict[str, int] = {}
        # Versions set aside in the table (hie_platform.consent_versions), by any process: stale too.
        self.held: dict[str, set[int]] = {}
        self.versions = ReplicaVersions(table)
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
        self._rows_after = select(*self.versions.columns).where(table.c.stream_sequence > bindparam("since"))
        self._workers = [
            Worker(f"consent-replica-{durable}", self._run),
            # The peers' versions between heartbeats; a failing read is logged once by the worker.
            PeriodicWorker(
                f"consent-replica-poll-{durable}",
                self._poll,
                settings.consent_replica_poll_seconds,
                run_now=False,
            ),
            PeriodicWorker(f"consent-replica-settle-{durable}", self._settle_held, 1.0, run_now=False),
            Worker(f"consent-replica-beats-{durable}", self._confirm_beats),
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
        """Stamps a beat as it arrives (no I/O here, so beats never queue behind a slow check: a beat
        stamped when a late check got to it would count as fresher than it is); the beat worker
        confirms it."""
        try:
            beat = Envelope.from_bytes(msg.data).payload(ConsentFeedHeartbeat)
        except (ValidationError, ValueError):
            return
        self._pending.append((beat.stream_sequence, self._clock() - max(0.0, beat.lag_seconds)))
        self._beat.set()

    async def _confirm_beats(self) -> None:
        while True:
            await self._beat.wait()
            self._beat.clear()
            await self._confirm()

    async def _confirm(self) -> None:
        """Count the beats heard so far that the durable's ack floor (and this memory) now covers."""
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
        if patient_key in self.held:
            return False
        waiting = self.gapped.get(patient_key)
        if waiting is not None and not self.memory.knows(patient_key, waiting):
            return False
        return self.memory.whole(patient_key)

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

    def _merge(self, rows: Sequence[Any], *, advance: bool = True) -> set[str]:
        """Merge rows read back from the table. ``advance``: they are every row above a sequence, so
        the newest of them moves the poll's starting point (not so for one patient's rows)."""
        top = max(row.stream_sequence for row in rows) if advance else 0
        new = (row for row in rows if not row.held and not self.memory.knows(row.patient_key, row.version))
        changed = self.memory.merge((state_of_row(row) for row in new), top)
        changed |= track_held(self.held, rows)  # after the memory: a released version is in it first
        for key in changed & self.gapped.keys():  # held back here, applied by a peer since
            if self.memory.knows(key, self.gapped[key]):
                del self.gapped[key]
        return changed

    async def _settle_held(self) -> None:
        """Every second while versions are set aside (not on the heartbeat's path, so a slow one
        delays no beat): read those patients' rows back (what peers released) and release the
        versions whose predecessor a peer applied before it saw them set aside."""
        if self.held:
            rows = await self.versions.settle(self.runtime.db, sorted(self.held))
            self._mark_changed(self._merge(rows, advance=False) if rows else set())

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
        batch = ApplyBatch()
        async with self.runtime.db.transaction() as session:
            for msg in msgs:
                await self._apply_one(session, batch, msg)
        # In memory only now, after the commit, and before the acks; marked for watches at once, as
        # a decision could see it.
        self.memory.merge(batch.merged, batch.top)
        self.applied_versions += len(batch.merged)
        track_held(self.held, [Row(key, version, True) for key, version in batch.set_aside])
        track_held(self.held, [Row(key, version, False) for key, version in batch.released])
        aside = {key for key, _ in batch.set_aside}
        self._mark_changed(batch.applied | (batch.blocked.keys() - self.gapped.keys()) | aside)
        self.applied_sequence = max(self.applied_sequence, batch.top)
        # Acknowledged only after the commit: a crash in between means a redelivery, skipped above.
        for msg in batch.acks:
            await msg.ack()
        for msg in batch.terms:
            await msg.term()
        await self._nak(batch.later, 0.2)
        gapped = {key: v for key, v in self.gapped.items() if not self.memory.knows(key, v)}
        self.gapped = {key: v for key, v in gapped.items() if key not in batch.applied} | batch.blocked

    async def _apply_one(self, session: AsyncSession, batch: ApplyBatch, msg: Msg) -> None:
        try:
            envelope = Envelope.from_bytes(msg.data)
            event = envelope.payload(ConsentRecorded)
        except (ValidationError, ValueError):
            log.error("malformed consent event terminated", subject=msg.subject)
            batch.terms.append(msg)
            return
        key = event.patient_key
        if key in batch.blocked:
            batch.later.append(msg)  # keep this patient's versions in order behind the missing one
            return
        if key not in batch.latest:
            batch.latest[key], batch.aside[key] = await self.versions.of_patient(session, key)
        latest, aside = batch.latest[key], batch.aside[key]
        if event.version <= latest or event.version in aside:
            batch.acks.append(msg)  # already applied or set aside (redelivery or a replayed stream)
            return
        if event.version != latest + 1:
            if not overdue(msg, self.settings.consent_replica_hold_seconds):
                log.warning("consent version ahead of its predecessor; waiting", version=event.version)
                batch.blocked[key] = event.version
                batch.later.append(msg)
                return
            sequence = await self.versions.add(session, event, envelope.id, msg, held=True)
            log.error(
                "consent version set aside: its predecessor has not arrived; the patient is decided stale",
                version=event.version,
                missing=latest + 1,
                stream_sequence=sequence,
            )
            aside.add(event.version)
            batch.set_aside.append((key, event.version))
            batch.acks.append(msg)
            return
        sequence = await self.versions.add(session, event, envelope.id, msg, held=False)
        state = consent_state(
            event.version,
            event.policy,
            event.effective_at,
            event.excluded_institutions,
            event.excluded_departments,
        )
        released = await self.versions.release(session, key, event.version, aside, sequence)
        batch.merged += [(key, state), *((key, later) for later in released)]
        batch.released += [(key, later.version) for later in released]
        batch.top = max(batch.top, sequence)
        batch.latest[key] = released[-1].version if released else event.version
        batch.applied.add(key)
        batch.acks.append(msg)
