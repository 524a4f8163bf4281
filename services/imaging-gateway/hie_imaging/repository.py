"""All SQL of the gateway."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

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


def _state_of_row() -> ColumnElement[str]:
    """The state as a condition on rows already found by their key (``state || ''``): given both, SQLite
    chose ix_instances_state_received and read every instance in that state, so a relay batch cost
    the whole backlog (20,000 queued: 18–22 ms a batch). An expression is never answered from an
    index (sqlite.org/optoverview.html, "Disqualifying WHERE clause terms"); PostgreSQL takes it too."""
    return Instance.state + ""


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
        .where(Instance.sop_instance_uid.in_(list(sop_uids)), _state_of_row() == State.QUEUED.value)
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
            _state_of_row() == State.QUEUED.value,
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


async def studies_counts(session: AsyncSession, study_uids: Collection[str]) -> dict[str, StudyCounts]:
    """The counts of each study that has instances: three statements whatever the number of studies
    (the progress reporter asks for every study touched since its last pass; three statements per
    study were 12 % of a gateway's samples in `make load`, with its 4-instance studies)."""
    uids = list(study_uids)
    if not uids:
        return {}
    same_study = Instance.study_instance_uid == _OTHER.study_instance_uid
    # One statement for every count of a study, so they agree with each other: on SQLite each
    # SELECT outside a write transaction reads its own snapshot, and the recorder commits new rows
    # in between.
    received = select(func.count(func.distinct(_OTHER.sop_instance_uid))).where(same_study)
    attempts = select(func.max(_OTHER.attempts)).where(same_study)
    rows = await session.execute(
        select(
            Instance.study_instance_uid,
            Instance.state,
            func.count(),
            received.scalar_subquery(),
            attempts.scalar_subquery(),
        )
        .where(Instance.study_instance_uid.in_(uids))
        .group_by(Instance.study_instance_uid, Instance.state)
    )
    found: dict[str, StudyCounts] = {}
    for study, state, count, total, most_attempts in rows:
        if study not in found:  # total and attempts are the same on every row of a study
            found[study] = StudyCounts(int(total), {}, [], int(most_attempts or 0), None)
        found[study].by_state[str(state)] = int(count)
    if not found:
        return found
    exchanges = await session.execute(
        select(Instance.study_instance_uid, Instance.exchange_id)
        .where(Instance.study_instance_uid.in_(list(found)), Instance.exchange_id != NO_EXCHANGE)
        .distinct()
    )
    for study, exchange_id in exchanges:
        found[study].exchange_ids.append(exchange_id)
    for counts in found.values():
        counts.exchange_ids.sort()
    for study, error in await _last_errors(session, list(found)):
        found[study] = replace(found[study], last_error=error)
    return found


async def _last_errors(session: AsyncSession, study_uids: list[str]) -> Sequence[tuple[str, str]]:
    """The newest error of each study that has one (by the row's last update)."""
    newest = (
        func.row_number()
        .over(partition_by=Instance.study_instance_uid, order_by=Instance.updated_at.desc())
        .label("newest")
    )
    ranked = (
        select(Instance.study_instance_uid, Instance.last_error, newest)
        .where(Instance.study_instance_uid.in_(study_uids), Instance.last_error.is_not(None))
        .subquery()
    )
    rows = await session.execute(
        select(ranked.c.study_instance_uid, ranked.c.last_error).where(ranked.c.newest == 1)
    )
    return [(str(study), str(error)) for study, error in rows]


_OTHER = aliased(Instance)


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
        .where(Instance.sop_instance_uid.in_(list(sop_uids)), _state_of_row() == State.HELD.value)
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
