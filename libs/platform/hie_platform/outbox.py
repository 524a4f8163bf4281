"""Transactional outbox: an event is written in the same transaction as the change it reports, and a
relay publishes it to JetStream after commit. A crash between commit and publish loses nothing: the
relay finds the row on its next pass, and Nats-Msg-Id de-duplicates a publish that was retried."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

from sqlalchemy import Table, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from hie_platform.bus import Bus
from hie_platform.db import Database
from hie_platform.logging import correlation_id, get_logger
from hie_schemas.envelope import Envelope, EventPayload, Source

log = get_logger(__name__)


class Outbox:
    """Writes events into the current transaction."""

    def __init__(self, table: Table, source: Source) -> None:
        self.table = table
        self.source = source

    async def add(
        self, session: AsyncSession, subject: str, payload: EventPayload, event_id: str | None = None
    ) -> Envelope:
        envelope = Envelope.wrap(payload, self.source, correlation_id.get(), event_id)
        await session.execute(
            insert(self.table).values(
                event_id=envelope.id,
                subject=subject,
                payload=envelope.to_bytes(),
                correlation_id=envelope.correlation_id,
                created_at=envelope.occurred_at,
            )
        )
        return envelope


class OutboxRelay:
    """Publishes committed outbox rows in order; woken by ``kick()`` after a commit, and every second."""

    def __init__(self, db: Database, table: Table, bus: Bus, interval: float = 1.0, batch: int = 200) -> None:
        self.db = db
        self.table = table
        self.bus = bus
        self.interval = interval
        self.batch = batch
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def kick(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self.flush()

    async def _run(self) -> None:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that
        # arrives as the event fires (cpython gh-86296), and the relay would never stop.
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            if self._stopping:
                return
            self._wake.clear()
            try:
                while await self.flush() == self.batch:
                    pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox relay pass failed; will retry", error=f"{type(exc).__name__}: {exc}")

    async def flush(self) -> int:
        """Publish up to one batch of unsent rows; returns how many were published."""
        t = self.table
        async with self.db.read_sessions() as session:
            rows = (
                await session.execute(
                    select(t.c.id, t.c.event_id, t.c.subject, t.c.payload, t.c.correlation_id)
                    .where(t.c.sent_at.is_(None))
                    .order_by(t.c.id)
                    .limit(self.batch)
                )
            ).all()
        if not rows:
            return 0
        sent: list[int] = []
        try:
            for row in rows:
                await self.bus.publish_raw(row.subject, row.payload, row.event_id, row.correlation_id)
                sent.append(row.id)
        finally:
            if sent:
                async with self.db.transaction() as session:
                    await session.execute(update(t).where(t.c.id.in_(sent)).values(sent_at=datetime.now(UTC)))
        return len(sent)
