"""All SQL of the gateway."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from hie_imaging.models import NO_EXCHANGE, Instance, State, StudyLink


async def instances_of(session: AsyncSession, sop_instance_uid: str) -> Sequence[Instance]:
    return (
        await session.scalars(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid))
    ).all()


async def instances_of_many(session: AsyncSession, sop_uids: Collection[str]) -> dict[str, list[Instance]]:
    rows = await session.scalars(select(Instance).where(Instance.sop_instance_uid.in_(list(sop_uids))))
    found: dict[str, list[Instance]] = {}
    for row in rows:
        found.setdefault(row.sop_instance_uid, []).append(row)
    return found


async def links_of_studies(session: AsyncSession, study_uids: Collection[str]) -> dict[str, list[StudyLink]]:
    query = select(StudyLink).where(StudyLink.study_instance_uid.in_(list(study_uids)))
    found: dict[str, list[StudyLink]] = {}
    for link in await session.scalars(query.order_by(StudyLink.linked_at, StudyLink.exchange_id)):
        found.setdefault(link.study_instance_uid, []).append(link)
    return found


async def study_instances(session: AsyncSession, study_uid: str, role: str) -> Sequence[Instance]:
    """Locked (PostgreSQL) so that a purge pass and a linking event do not both claim a held row."""
    query = select(Instance).where(Instance.study_instance_uid == study_uid, Instance.role == role)
    return (await session.scalars(query.order_by(Instance.sop_instance_uid).with_for_update())).all()


async def links_of_study(session: AsyncSession, study_uid: str) -> Sequence[StudyLink]:
    query = select(StudyLink).where(StudyLink.study_instance_uid == study_uid)
    return (await session.scalars(query.order_by(StudyLink.linked_at, StudyLink.exchange_id))).all()


async def link(session: AsyncSession, study_uid: str, exchange_id: str) -> StudyLink | None:
    return await session.get(StudyLink, (study_uid, exchange_id))


async def queued_with_links(
    session: AsyncSession, sop_uids: Collection[str]
) -> list[tuple[Instance, StudyLink]]:
    """The queued rows of these instances, each with the exchange it goes to."""
    query = (
        select(Instance, StudyLink)
        .join(
            StudyLink,
            (StudyLink.study_instance_uid == Instance.study_instance_uid)
            & (StudyLink.exchange_id == Instance.exchange_id),
        )
        .where(Instance.sop_instance_uid.in_(list(sop_uids)), Instance.state == State.QUEUED.value)
    )
    return [(row[0], row[1]) for row in (await session.execute(query)).all()]


async def set_outcomes(
    session: AsyncSession,
    sop_uids: Collection[str],
    exchange_id: str,
    state: State,
    now: datetime,
    *,
    attempts: int | None = None,
    error: str | None = None,
) -> None:
    """Move queued rows on; a row that is no longer queued (another worker finished it) is left alone."""
    values: dict[str, object] = {"state": state.value, "updated_at": now, "last_error": error}
    if attempts is not None:
        values["attempts"] = attempts
    await session.execute(
        update(Instance)
        .where(
            Instance.sop_instance_uid.in_(list(sop_uids)),
            Instance.exchange_id == exchange_id,
            Instance.state == State.QUEUED.value,
        )
        .values(**values)
    )


@dataclass(frozen=True)
class StudyCounts:
    received: int
    by_state: dict[str, int]
    exchange_ids: list[str]
    attempts: int
    last_error: str | None


async def study_counts(session: AsyncSession, study_uid: str) -> StudyCounts | None:
    where = Instance.study_instance_uid == study_uid
    # One statement for every count, so they agree with each other: on SQLite each SELECT outside a
    # write transaction reads its own snapshot, and the recorder commits new rows in between.
    received = select(func.count(func.distinct(Instance.sop_instance_uid))).where(where).scalar_subquery()
    attempts = select(func.max(Instance.attempts)).where(where).scalar_subquery()
    rows = (
        await session.execute(
            select(Instance.state, func.count(), received, attempts).where(where).group_by(Instance.state)
        )
    ).all()
    if not rows:
        return None
    by_state = {str(state): int(count) for state, count, _, _ in rows}
    total, most_attempts = int(rows[0][2]), int(rows[0][3] or 0)  # the same on every row
    exchanges = (
        await session.scalars(
            select(Instance.exchange_id).where(where, Instance.exchange_id != NO_EXCHANGE).distinct()
        )
    ).all()
    last_error = await session.scalar(
        select(Instance.last_error)
        .where(where, Instance.last_error.is_not(None))
        .order_by(Instance.updated_at.desc())
        .limit(1)
    )
    return StudyCounts(
        received=total,
        by_state=by_state,
        exchange_ids=sorted(exchanges),
        attempts=most_attempts,
        last_error=last_error,
    )


async def senders_of_study(session: AsyncSession, study_uid: str) -> set[str]:
    query = select(Instance.sender_institution).where(
        Instance.study_instance_uid == study_uid, Instance.sender_institution.is_not(None)
    )
    return {str(code) for code in (await session.scalars(query.distinct())).all()}


async def stale_held(session: AsyncSession, cutoff: datetime, limit: int) -> list[tuple[str, str]]:
    """(SOP, study) of instances held since before `cutoff`, locked until the transaction ends."""
    query = (
        select(Instance.sop_instance_uid, Instance.study_instance_uid)
        .where(Instance.state == State.HELD.value, Instance.received_at < cutoff)
        .order_by(Instance.received_at)
        .limit(limit)
        .with_for_update()
    )
    return [(str(sop), str(study)) for sop, study in (await session.execute(query)).all()]


async def mark_purged(session: AsyncSession, sop_uids: Collection[str], now: datetime) -> None:
    await session.execute(
        update(Instance)
        .where(Instance.sop_instance_uid.in_(list(sop_uids)), Instance.state == State.HELD.value)
        .values(state=State.PURGED.value, updated_at=now)
    )


async def queued_instances(session: AsyncSession) -> list[tuple[str, str]]:
    """(SOP Instance UID, Study Instance UID) of everything waiting to be relayed."""
    query = (
        select(Instance.sop_instance_uid, Instance.study_instance_uid)
        .where(Instance.state == State.QUEUED.value)
        .distinct()
    )
    return [(str(sop), str(study)) for sop, study in (await session.execute(query)).all()]
