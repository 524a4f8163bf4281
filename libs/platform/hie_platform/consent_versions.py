"""The ``consent_replica`` table: one row per replicated consent version, and the statements that
apply a version, set one aside and release it (used by ``hie_platform.consent_replica``).

A version is applied only right after its predecessor. One whose predecessor has not arrived after
``consent_replica_hold_deliveries`` deliveries is **set aside**: stored with ``held`` true and
acknowledged, so the durable's ack floor moves past it and the rest of the feed (every other
patient) stays current. While a patient has a version set aside every process of the service
decides that patient stale (it learns of the row as of any other); when the predecessor arrives, the
process that applies it releases the set-aside versions behind it in the same transaction. Before
this, such a version was held back by nak for good, the floor stayed below it, no heartbeat counted
and the whole replica went stale within the staleness bound (docs/consent.md, "Replication").
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

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
from sqlalchemy.ext.asyncio import AsyncSession

from hie_platform.consent_memory import as_utc, consent_state
from hie_schemas.consent import ConsentState
from hie_schemas.events import ConsentRecorded

TABLE = "consent_replica"


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


def state_of(row: Any) -> ConsentState:
    return consent_state(
        row.version, row.policy, row.effective_at, row.excluded_institutions, row.excluded_departments
    )


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
        self, session: AsyncSession, patient_key: str, latest: int, aside: set[int]
    ) -> list[ConsentState]:
        """Apply the set-aside versions that follow ``latest`` without a gap; return them in order
        (``aside`` loses them). Idempotent: a version another process released is not in ``aside``."""
        released: list[ConsentState] = []
        t = self.table.c
        while latest + 1 in aside:
            latest += 1
            aside.discard(latest)
            where = (t.patient_key == patient_key, t.version == latest)
            await session.execute(
                update(self.table).where(*where).values(held=False, applied_at=datetime.now(UTC))
            )
            row = (await session.execute(select(*self.columns).where(*where))).one()
            released.append(state_of(row))
        return released

    async def of_patients(self, session: AsyncSession, patient_keys: Sequence[str]) -> list[Any]:
        """Every row of these patients, applied and set aside."""
        query = select(*self.columns).where(self.table.c.patient_key.in_(patient_keys))
        return list((await session.execute(query)).all())
