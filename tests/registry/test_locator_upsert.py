"""The locator entry and the exchange counts are upserts (one statement, no read first) on SQLite
and PostgreSQL: the first sighting sets both times, a later one moves last_seen forward only, and a
count goes up by one each time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from hie_platform.db import Database
from hie_registry import repository
from hie_registry.models import Base, ExchangeCount, LocatorEntry

KEY = "a" * 64
T0 = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)


@pytest.fixture
async def db(database_with: Any) -> Database:
    store: Database = await database_with(Base.metadata)
    return store


async def entry(db: Database) -> tuple[datetime, datetime]:
    async with db.read_sessions() as read:
        row = (await read.execute(select(LocatorEntry.first_seen, LocatorEntry.last_seen))).one()
    return row.first_seen.replace(tzinfo=UTC), row.last_seen.replace(tzinfo=UTC)


async def test_last_seen_moves_forward_only(db: Database) -> None:
    for at in (T0, T0 + timedelta(hours=2), T0 + timedelta(hours=1)):  # the last one comes late
        async with db.transaction() as session:
            await repository.seen(session, KEY, "severance", at)
    assert await entry(db) == (T0, T0 + timedelta(hours=2))


async def test_an_exchange_is_counted_once_per_call_by_month_and_kind(db: Database) -> None:
    for at, kind in (
        (T0, "referral"),
        (T0, "referral"),
        (T0, "return"),
        (T0 + timedelta(days=30), "referral"),
    ):
        async with db.transaction() as session:
            await repository.count_exchange(session, at, kind)
    async with db.read_sessions() as read:
        rows = (
            await read.execute(select(ExchangeCount.month, ExchangeCount.kind, ExchangeCount.count))
        ).all()
    assert sorted(tuple(r) for r in rows) == [
        ("2026-12", "referral", 2),
        ("2026-12", "return", 1),
        ("2027-01", "referral", 1),
    ]
