"""The SQL of SubmissionSets (List): by id, a patient's, and the one a replay answers with."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from hie_hub.core.sql import newest_first
from hie_hub.models import SubmissionSet


def add_submission_set(session: AsyncSession, row: SubmissionSet) -> None:
    session.add(row)


async def submission_set(session: AsyncSession, list_id: str) -> SubmissionSet | None:
    return await session.get(SubmissionSet, list_id)


async def submission_sets_of_patient(
    session: AsyncSession,
    patient_key: str,
    *,
    statuses: Collection[str] | None = None,
    submitted_from: datetime | None = None,
    submitted_before: datetime | None = None,
) -> list[SubmissionSet]:
    """A patient's SubmissionSets, newest first (ties by id)."""
    query = select(SubmissionSet).where(SubmissionSet.patient_key == patient_key)
    if statuses is not None:
        query = query.where(SubmissionSet.status.in_(list(statuses)))
    query = newest_first(
        query, SubmissionSet.submitted_at, SubmissionSet.id, start=submitted_from, before=submitted_before
    )
    return list((await session.scalars(query)).all())


async def submission_set_of(
    session: AsyncSession, author: str, patient_key: str, document_ids: Collection[str]
) -> SubmissionSet | None:
    """The SubmissionSet that published exactly these documents (to answer a replay the same way).
    Read by patient, the author kept here (as ``tasks_of_submission``: not every set the author
    ever submitted)."""
    wanted = set(document_ids)
    rows = await session.scalars(
        select(SubmissionSet)
        .where(SubmissionSet.patient_key == patient_key)
        .order_by(SubmissionSet.submitted_at)
    )
    return next(
        (row for row in rows if row.author_institution == author and set(row.document_ids) == wanted), None
    )
