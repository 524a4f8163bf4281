"""All SQL of the hub: documents, Tasks, SubmissionSets, Subscriptions and delivered imaging studies."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, func, insert, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from hie_hub.models import DeliveredStudy, Document, SubmissionSet, Subscription, Task


async def document(session: AsyncSession, document_id: str) -> Document | None:
    return await session.scalar(select(Document).where(Document.document_id == document_id))


# Built once: constructing the SELECT ... IN on every call was a fifth of this lookup's CPU, which
# every ITI-65 publish makes (py-spy, bench publish path).
_DOCUMENTS_BY_ID = select(Document).where(Document.document_id.in_(bindparam("ids", expanding=True)))


async def documents_by_id(session: AsyncSession, document_ids: Collection[str]) -> dict[str, Document]:
    if not document_ids:
        return {}
    rows = await session.scalars(_DOCUMENTS_BY_ID, {"ids": list(document_ids)})
    return {row.document_id: row for row in rows}


async def documents_of_patient(
    session: AsyncSession,
    patient_key: str,
    *,
    types: Collection[str] | None = None,
    statuses: Collection[str] | None = None,
    authors: Collection[str] | None = None,
    created_from: datetime | None = None,
    created_before: datetime | None = None,
) -> list[Document]:
    """A patient's documents, newest first (ties by document id); who may see which is the caller's
    concern. ``created_from`` is inclusive, ``created_before`` exclusive."""
    query = select(Document).where(Document.patient_key == patient_key)
    if types is not None:
        query = query.where(Document.document_type.in_(list(types)))
    if statuses is not None:
        query = query.where(Document.status.in_(list(statuses)))
    if authors is not None:
        query = query.where(Document.author_institution.in_(list(authors)))
    if created_from is not None:
        query = query.where(Document.created_at >= created_from)
    if created_before is not None:
        query = query.where(Document.created_at < created_before)
    query = query.order_by(Document.created_at.desc(), Document.document_id.desc())
    return list((await session.scalars(query)).all())


def add_document(session: AsyncSession, row: Document) -> None:
    session.add(row)


async def insert_publication(
    session: AsyncSession,
    documents: Sequence[dict[str, Any]],
    submission_set: dict[str, Any] | None,
    tasks: Sequence[dict[str, Any]],
) -> None:
    """One publish's new rows in one Core INSERT per table: no ORM flush, no read-back. A document id
    already stored raises IntegrityError (the unique constraint is the idempotency check)."""
    if documents:
        await session.execute(insert(Document), list(documents))
    if submission_set is not None:
        await session.execute(insert(SubmissionSet).values(**submission_set))
    if tasks:
        await session.execute(insert(Task), list(tasks))


def add_recipients(row: Document, recipients: Sequence[str]) -> bool:
    """Address an already stored document to more institutions; True if anything changed."""
    merged = list(dict.fromkeys([*row.recipients, *recipients]))
    if merged == row.recipients:
        return False
    row.recipients = merged
    return True


async def task(session: AsyncSession, task_id: str) -> Task | None:
    return await session.get(Task, task_id)


def add_task(session: AsyncSession, row: Task) -> None:
    session.add(row)


async def tasks(
    session: AsyncSession,
    *,
    owner: str | None = None,
    requester: str | None = None,
    statuses: Collection[str] | None = None,
    since: datetime | None = None,
    after: tuple[datetime, str] | None = None,
    limit: int = 100,
) -> list[Task]:
    """Tasks newest change first; with ``since`` (changed strictly after that instant: long polling)
    oldest change first, so that a poller advancing ``_since`` page by page never skips one.
    ``after`` is the (updated_at, id) of the last row of the previous page (keyset paging)."""
    query = select(Task)
    if owner is not None:
        query = query.where(Task.owner == owner)
    if requester is not None:
        query = query.where(Task.requester == requester)
    if statuses is not None:
        query = query.where(Task.status.in_(list(statuses)))
    if since is not None:
        query = query.where(Task.updated_at > since)
    if since is None:
        if after is not None:
            at, key = after
            query = query.where(or_(Task.updated_at < at, and_(Task.updated_at == at, Task.id > key)))
        query = query.order_by(Task.updated_at.desc(), Task.id)
    else:
        if after is not None:
            at, key = after
            query = query.where(or_(Task.updated_at > at, and_(Task.updated_at == at, Task.id > key)))
        query = query.order_by(Task.updated_at, Task.id)
    return list((await session.scalars(query.limit(limit))).all())


async def count_tasks(
    session: AsyncSession,
    *,
    owner: str | None,
    requester: str | None,
    statuses: Collection[str] | None,
    since: datetime | None,
) -> int:
    """How many Tasks ``tasks`` finds in all pages (Bundle.total)."""
    query = select(func.count()).select_from(Task)
    if owner is not None:
        query = query.where(Task.owner == owner)
    if requester is not None:
        query = query.where(Task.requester == requester)
    if statuses is not None:
        query = query.where(Task.status.in_(list(statuses)))
    if since is not None:
        query = query.where(Task.updated_at > since)
    return int(await session.scalar(query) or 0)


async def tasks_of_submission(
    session: AsyncSession, requester: str, patient_key: str, document_ids: Collection[str]
) -> list[Task]:
    """The Tasks a publish of exactly these documents created (to answer a replay the same way)."""
    wanted = set(document_ids)
    rows = await session.scalars(
        select(Task).where(Task.requester == requester, Task.patient_key == patient_key).order_by(Task.id)
    )
    return [row for row in rows if set(row.focus) == wanted]


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
    if submitted_from is not None:
        query = query.where(SubmissionSet.submitted_at >= submitted_from)
    if submitted_before is not None:
        query = query.where(SubmissionSet.submitted_at < submitted_before)
    query = query.order_by(SubmissionSet.submitted_at.desc(), SubmissionSet.id.desc())
    return list((await session.scalars(query)).all())


async def submission_set_of(
    session: AsyncSession, author: str, patient_key: str, document_ids: Collection[str]
) -> SubmissionSet | None:
    """The SubmissionSet that published exactly these documents (to answer a replay the same way)."""
    wanted = set(document_ids)
    rows = await session.scalars(
        select(SubmissionSet)
        .where(SubmissionSet.author_institution == author, SubmissionSet.patient_key == patient_key)
        .order_by(SubmissionSet.submitted_at)
    )
    return next((row for row in rows if set(row.document_ids) == wanted), None)


async def subscription(session: AsyncSession, subscription_id: str) -> Subscription | None:
    return await session.get(Subscription, subscription_id)


async def subscriptions_of(session: AsyncSession, institution: str) -> list[Subscription]:
    rows = await session.scalars(
        select(Subscription).where(Subscription.institution == institution).order_by(Subscription.created_at)
    )
    return list(rows.all())


async def task_of_exchange(session: AsyncSession, exchange_id: str, hub: str) -> Task | None:
    """This hub's copy of an exchange's Task: the one it received when it owns the exchange (the
    requester's copy too when both parties belong to this hub), else the one it sent."""
    rows = await session.scalars(select(Task).where(Task.exchange_id == exchange_id).order_by(Task.id))
    found = list(rows.all())
    return next((row for row in found if row.owner_hub == hub), found[0] if found else None)


async def tasks_owned_for(session: AsyncSession, owner: str, patient_keys: Collection[str]) -> list[Task]:
    """The exchanges addressed to ``owner`` about these patients, most recently changed first."""
    if not patient_keys:
        return []
    query = select(Task).where(Task.owner == owner, Task.patient_key.in_(list(patient_keys)))
    return list((await session.scalars(query.order_by(Task.updated_at.desc(), Task.id))).all())


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
