"""The SQL of delivered imaging studies (ImagingStudy): by exchange, by id, a patient's."""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from hie_hub.models import DeliveredStudy


async def delivered_study(
    session: AsyncSession, study_uid: str, exchange_id: str, *, lock: bool = False
) -> DeliveredStudy | None:
    """The study as delivered in one exchange; ``lock`` holds its row until the transaction ends
    (PostgreSQL), so that two replicas applying progress to it take turns."""
    query = select(DeliveredStudy).where(
        DeliveredStudy.study_instance_uid == study_uid, DeliveredStudy.exchange_id == exchange_id
    )
    return await session.scalar(query.with_for_update() if lock else query)


async def delivered_study_by_id(session: AsyncSession, study_id: str) -> DeliveredStudy | None:
    return await session.get(DeliveredStudy, study_id)


async def delivered_studies_of_patient(
    session: AsyncSession, patient_key: str, *, study_uids: Collection[str] | None = None
) -> list[DeliveredStudy]:
    """A patient's delivered studies, most recently recorded first (ties by id)."""
    query = select(DeliveredStudy).where(DeliveredStudy.patient_key == patient_key)
    if study_uids is not None:
        query = query.where(DeliveredStudy.study_instance_uid.in_(list(study_uids)))
    query = query.order_by(DeliveredStudy.recorded_at.desc(), DeliveredStudy.id.desc())
    return list((await session.scalars(query)).all())


def add_delivered_study(session: AsyncSession, row: DeliveredStudy) -> None:
    session.add(row)
