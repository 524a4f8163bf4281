"""All SQL of the consent service."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import TypeVar, cast

from sqlalchemy import Insert, Table, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from hie_consent.models import (
    AccessEntry,
    ConsentExclusion,
    ConsentSignature,
    ConsentVersion,
    DocumentIndex,
    EndedPortalSession,
    ExchangeEntry,
    IdentityChallenge,
)
from hie_platform.db import insert_or_skip
from hie_platform.errors import Conflict


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes for timezone-aware columns; everything here is stored in UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# --- consent versions -------------------------------------------------------------------------------


async def versions(session: AsyncSession, patient_key: str) -> list[ConsentVersion]:
    """A patient's consent versions, oldest first."""
    query = (
        select(ConsentVersion)
        .where(ConsentVersion.patient_key == patient_key)
        .order_by(ConsentVersion.version)
    )
    return list((await session.scalars(query)).all())


async def version(session: AsyncSession, resource_id: str, number: int | None) -> ConsentVersion | None:
    """One version of a Consent resource, the latest when ``number`` is None."""
    query = select(ConsentVersion).where(ConsentVersion.resource_id == resource_id)
    if number is not None:
        query = query.where(ConsentVersion.version == number)
    return await session.scalar(query.order_by(ConsentVersion.version.desc()).limit(1))


async def add_version(session: AsyncSession, row: ConsentVersion) -> None:
    session.add(row)
    try:
        await session.flush()
    except IntegrityError:
        # Two desks recorded a version for the same patient at once; the later one asks again.
        raise Conflict("the patient's consent changed concurrently; read it again and retry") from None


def add_exclusions(session: AsyncSession, rows: Iterable[ConsentExclusion]) -> None:
    session.add_all(list(rows))


def add_signature(session: AsyncSession, row: ConsentSignature) -> None:
    session.add(row)


async def signature(session: AsyncSession, consent_version_id: int) -> ConsentSignature | None:
    return await session.get(ConsentSignature, consent_version_id)


async def signed_versions(session: AsyncSession, version_ids: Sequence[int]) -> set[int]:
    if not version_ids:
        return set()
    query = select(ConsentSignature.consent_version_id).where(
        ConsentSignature.consent_version_id.in_(version_ids)
    )
    return set((await session.scalars(query)).all())


async def exclusions(session: AsyncSession, patient_key: str) -> list[ConsentExclusion]:
    query = (
        select(ConsentExclusion)
        .where(ConsentExclusion.patient_key == patient_key)
        .order_by(ConsentExclusion.version, ConsentExclusion.id)
    )
    return list((await session.scalars(query)).all())


# --- one-time-code challenges -----------------------------------------------------------------------


def add_challenge(session: AsyncSession, row: IdentityChallenge) -> None:
    session.add(row)


async def challenge(session: AsyncSession, challenge_id: str) -> IdentityChallenge | None:
    """A challenge, locked for update (PostgreSQL) so that two guesses at once are counted twice."""
    query = select(IdentityChallenge).where(IdentityChallenge.id == challenge_id).with_for_update()
    return await session.scalar(query)


async def latest_challenge(session: AsyncSession, patient_key: str) -> IdentityChallenge | None:
    query = (
        select(IdentityChallenge)
        .where(IdentityChallenge.patient_key == patient_key)
        .order_by(IdentityChallenge.created_at.desc())
        .limit(1)
        .with_for_update()
    )
    return await session.scalar(query)


async def lock_of(session: AsyncSession, patient_key: str, now: datetime) -> datetime | None:
    """Until when the patient's identity verification is locked, if it is."""
    query = (
        select(IdentityChallenge.locked_until)
        .where(IdentityChallenge.patient_key == patient_key, IdentityChallenge.locked_until > now)
        .order_by(IdentityChallenge.locked_until.desc())
        .limit(1)
    )
    until = await session.scalar(query)
    return as_utc(until) if until is not None else None


async def close_open_challenges(session: AsyncSession, patient_key: str, now: datetime) -> None:
    """A new code replaces the patient's earlier ones: only the latest can be answered."""
    await session.execute(
        update(IdentityChallenge)
        .where(
            IdentityChallenge.patient_key == patient_key,
            IdentityChallenge.verified_at.is_(None),
            IdentityChallenge.expires_at > now,
        )
        .values(expires_at=now)
        # No in-Python evaluation: SQLite hands back naive datetimes that do not compare with ``now``.
        .execution_options(synchronize_session=False)
    )


# --- ended portal sessions --------------------------------------------------------------------------


async def session_ended(session: AsyncSession, jti: str) -> bool:
    """Whether the patient session ``jti`` was signed out (by any replica: the row is in the database)."""
    query = select(EndedPortalSession.jti).where(EndedPortalSession.jti == jti)
    return await session.scalar(query) is not None


async def end_session(session: AsyncSession, jti: str, keep_until: datetime, now: datetime) -> None:
    """Record the session as ended (once) and prune the rows whose tokens can no longer pass anyway.

    A concurrent sign-out of the same session raises IntegrityError on commit: it is ended either way.
    """
    await session.execute(
        delete(EndedPortalSession)
        .where(EndedPortalSession.expires_at < now)
        .execution_options(synchronize_session=False)
    )
    if await session_ended(session, jti):
        return
    session.add(EndedPortalSession(jti=jti, expires_at=keep_until, ended_at=now))
    await session.flush()


# --- the patient's history --------------------------------------------------------------------------


async def sent_entry(session: AsyncSession, exchange_id: str) -> ExchangeEntry | None:
    query = (
        select(ExchangeEntry)
        .where(ExchangeEntry.exchange_id == exchange_id, ExchangeEntry.status == "sent")
        .order_by(ExchangeEntry.id)
        .limit(1)
    )
    return await session.scalar(query)


async def add_entry(session: AsyncSession, entry: ExchangeEntry | AccessEntry) -> None:
    """One Core INSERT of the columns the entry was given (the others take their defaults): the ORM's
    unit of work (session.add, then flush) was 17 % of the consent service's CPU while it took in
    the history events of the hub bench's publishes (py-spy)."""
    table = cast(Table, type(entry).__table__)
    given = vars(entry)
    values = {column.key: given[column.key] for column in table.columns if column.key in given}
    await session.execute(_insert(table), values)


@functools.cache
def _insert(table: Table) -> Insert:
    """One INSERT per table, given its values at execution: a statement built with ``.values()`` for
    every entry made SQLAlchemy derive its cache key anew each time, 120-125 µs of CPU per entry
    instead of 40 (SQLite, 2,000 exchange-history entries in one transaction)."""
    return insert(table)


_Entry = TypeVar("_Entry", ExchangeEntry, AccessEntry)


async def _newest_first(session: AsyncSession, entry: type[_Entry], patient_key: str) -> list[_Entry]:
    query = (
        select(entry)
        .where(entry.patient_key == patient_key)
        .order_by(entry.occurred_at.desc(), entry.id.desc())
    )
    return list((await session.scalars(query)).all())


async def exchange_history(session: AsyncSession, patient_key: str) -> list[ExchangeEntry]:
    """A patient's exchange history, newest first."""
    return await _newest_first(session, ExchangeEntry, patient_key)


async def access_history(session: AsyncSession, patient_key: str) -> list[AccessEntry]:
    """Every recorded access to the patient's records, newest first."""
    return await _newest_first(session, AccessEntry, patient_key)


async def index_documents(session: AsyncSession, types: dict[str, str]) -> None:
    """Remember each document's type (a document id has one type for good: one already known is
    kept as it is). One INSERT that skips known ids: the SELECT, ORM add and flush it replaced were
    most of the consent service's work per DocumentPublished (py-spy, hub bench)."""
    if types:
        rows = [{"document_id": doc, "document_type": kind} for doc, kind in types.items()]
        await session.execute(insert_or_skip(session, cast(Table, DocumentIndex.__table__)), rows)


async def document_types(session: AsyncSession, document_ids: Iterable[str]) -> dict[str, str]:
    ids = sorted(set(document_ids))
    if not ids:
        return {}
    rows = await session.execute(
        select(DocumentIndex.document_id, DocumentIndex.document_type).where(
            DocumentIndex.document_id.in_(ids)
        )
    )
    return {row.document_id: row.document_type for row in rows}


async def oldest_unsent(session: AsyncSession, outbox: Table, subject: str) -> datetime | None:
    """When the oldest event on ``subject`` still waiting in the outbox was written."""
    query = select(func.min(outbox.c.created_at)).where(
        outbox.c.sent_at.is_(None), outbox.c.subject == subject
    )
    oldest: datetime | None = await session.scalar(query)
    return oldest
