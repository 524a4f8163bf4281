"""The ``consent_replica`` table: one row per replicated consent version, and the statements that
apply a version, set one aside and release it (used by ``hie_platform.consent_replica``).

A version is applied only right after its predecessor. One whose predecessor has still not come
``consent_replica_hold_seconds`` after it entered the stream (redelivered meanwhile) is **set
aside**: stored with ``held`` true and acknowledged, so the durable's ack floor moves past it and the
rest of the feed (every other patient) stays current. While a patient has a version set aside every
process of the service decides that patient stale (it learns of the row as of any other); when the
predecessor arrives, the process that applies it releases the set-aside versions behind it in the
same transaction, under the predecessor's stream sequence so that the peers' poll reads them at
once. Before this, such a version was held back by nak for good, the floor stayed below it, no
heartbeat counted and the whole replica went stale within the staleness bound.

What it covers: a hole the consent service cannot see (a message lost or purged from HIE_CONSENT, a
version published outside its outbox). A version the consent service has not published (a dead
letter in its outbox) is in its heartbeat's backlog age, and that makes every replica stale on
purpose: no replica can tell which patient it concerns (docs/consent.md, "Replication").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from nats.aio.msg import Msg
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    false,
    insert,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from hie_platform.consent_memory import as_utc, state_of_row
from hie_platform.db import Database
from hie_platform.logging import get_logger
from hie_schemas.consent import ConsentState
from hie_schemas.events import ConsentRecorded

TABLE = "consent_replica"
log = get_logger(__name__)


def consent_replica_columns() -> list[Column[Any]]:
    """The table's columns as it was first created (the imaging gateway's migration 0003 uses them;
    later columns are added by later migrations: ``held_column``)."""
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


def held_column() -> Column[bool]:
    """True while the version is set aside (its predecessor missing): not part of the history."""
    return Column("held", Boolean, nullable=False, default=False, server_default=false())


def consent_replica_table(metadata: MetaData) -> Table:
    """Declare the ``consent_replica`` table on a service's metadata (its migrations create it)."""
    table = Table(TABLE, metadata, *consent_replica_columns(), held_column())
    Index("ix_consent_replica_stream_sequence", table.c.stream_sequence)
    return table


class ReplicaVersions:
    """The statements of the apply transaction, on one service's ``consent_replica`` table."""

    def __init__(self, table: Table) -> None:
        self.table = table
        t = table.c
        columns = (t.patient_key, t.version, t.policy, t.effective_at, t.excluded_institutions)
        self.columns = (*columns, t.excluded_departments, t.stream_sequence, t.held)

    async def of_patient(self, session: AsyncSession, patient_key: str) -> tuple[int, set[int]]:
        """The newest applied version (0: none) and the versions set aside."""
        t = self.table.c
        rows = (await session.execute(select(t.version, t.held).where(t.patient_key == patient_key))).all()
        applied = [row.version for row in rows if not row.held]
        return max(applied, default=0), {row.version for row in rows if row.held}

    async def add(
        self, session: AsyncSession, event: ConsentRecorded, event_id: str, msg: Msg, held: bool
    ) -> int:
        """Store one version (applied, or set aside); return its stream sequence."""
        sequence = msg.metadata.sequence.stream if msg.metadata else 0
        await session.execute(
            insert(self.table).values(
                patient_key=event.patient_key,
                version=event.version,
                policy=event.policy.value,
                effective_at=as_utc(event.effective_at),
                excluded_institutions=list(event.excluded_institutions),
                excluded_departments=list(event.excluded_departments),
                event_id=event_id,
                stream_sequence=sequence,
                applied_at=datetime.now(UTC),
                held=held,
            )
        )
        return sequence

    async def release(
        self, session: AsyncSession, patient_key: str, latest: int, aside: set[int], sequence: int = 0
    ) -> list[ConsentState]:
        """Apply the set-aside versions that follow ``latest`` without a gap; return them in order
        (``aside`` loses them). Idempotent: a version another process released is not in ``aside``.
        With ``sequence`` (the releasing message's) the rows take it as their stream sequence."""
        released: list[ConsentState] = []
        t = self.table.c
        values: dict[str, Any] = {"held": False, "applied_at": datetime.now(UTC)}
        if sequence:
            values["stream_sequence"] = sequence
        while latest + 1 in aside:
            latest += 1
            aside.discard(latest)
            where = (t.patient_key == patient_key, t.version == latest)
            await session.execute(update(self.table).where(*where).values(**values))
            row = (await session.execute(select(*self.columns).where(*where))).one()
            released.append(state_of_row(row)[1])
        return released

    async def settle(self, db: Database, patient_keys: Sequence[str]) -> list[Any]:
        """Release these patients' set-aside versions whose predecessor is applied now (by a peer
        that had not seen them set aside); return every row of these patients as it is then."""
        async with db.reader.connect() as conn:
            rows = await self.of_patients(conn, patient_keys)
        ready = releasable(rows)
        if not ready:
            return rows
        async with db.transaction() as session:
            for key in ready:
                latest, aside = await self.of_patient(session, key)
                await self.release(session, key, latest, aside)
        log.warning("consent versions released behind a peer's version", patients=len(ready))
        async with db.reader.connect() as conn:
            return await self.of_patients(conn, patient_keys)

    async def of_patients(self, conn: AsyncConnection, patient_keys: Sequence[str]) -> list[Any]:
        """Every row of these patients, applied and set aside (read in chunks: a bind-parameter
        list has a limit, 32,767 on asyncpg)."""
        rows: list[Any] = []
        for start in range(0, len(patient_keys), _CHUNK):
            chunk = patient_keys[start : start + _CHUNK]
            rows += (
                await conn.execute(select(*self.columns).where(self.table.c.patient_key.in_(chunk)))
            ).all()
        return rows


_CHUNK = 1_000


def overdue(msg: Msg, hold_seconds: float) -> bool:
    """A version ahead of its predecessor has waited long enough to be set aside: it entered the
    stream ``hold_seconds`` ago and has come again since (so a version that only came back with a
    failed batch, after a database outage, is not set aside at once)."""
    meta = msg.metadata
    if meta is None or meta.num_delivered < 2:
        return False
    return (datetime.now(UTC) - meta.timestamp).total_seconds() >= hold_seconds


class Row(NamedTuple):
    """What ``track_held`` reads of a row."""

    patient_key: str
    version: int
    held: bool


def releasable(rows: Iterable[Any]) -> list[str]:
    """The patients among these rows (each patient's every row) with a set-aside version right after
    their newest applied one."""
    latest: dict[str, int] = {}
    aside: dict[str, set[int]] = {}
    for row in rows:
        if row.held:
            aside.setdefault(row.patient_key, set()).add(row.version)
        else:
            latest[row.patient_key] = max(latest.get(row.patient_key, 0), row.version)
    return sorted(key for key, versions in aside.items() if latest.get(key, 0) + 1 in versions)


def track_held(held: dict[str, set[int]], rows: Iterable[Any]) -> set[str]:
    """Update ``held`` (patient -> versions set aside) from rows read back; return the patients whose
    set changed. A patient's entry is removed once it is empty."""
    changed: set[str] = set()
    for row in rows:
        aside = held.get(row.patient_key)
        if row.held and (aside is None or row.version not in aside):
            held.setdefault(row.patient_key, set()).add(row.version)
            changed.add(row.patient_key)
        elif not row.held and aside is not None and row.version in aside:
            aside.discard(row.version)
            changed.add(row.patient_key)
    for key in changed:
        if not held.get(key, True):
            del held[key]
    return changed


@dataclass
class ApplyBatch:
    """What one apply transaction did, acted on after its commit."""

    acks: list[Msg] = field(default_factory=list)
    terms: list[Msg] = field(default_factory=list)
    later: list[Msg] = field(default_factory=list)  # naked: to come again
    applied: set[str] = field(default_factory=set)
    blocked: dict[str, int] = field(default_factory=dict)  # patient -> the version held back
    merged: list[tuple[str, ConsentState]] = field(default_factory=list)
    set_aside: list[tuple[str, int]] = field(default_factory=list)
    released: list[tuple[str, int]] = field(default_factory=list)  # set aside before, applied now
    latest: dict[str, int] = field(default_factory=dict)  # patient -> newest applied version
    aside: dict[str, set[int]] = field(default_factory=dict)  # patient -> versions set aside
    top: int = 0
