"""The SQL of Tasks (one per exchange and party): search, counts, replays, the exchange's copy."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Row, and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from hie_hub.models import Task


async def task(session: AsyncSession, task_id: str) -> Task | None:
    return await session.get(Task, task_id)


def add_task(session: AsyncSession, row: Task) -> None:
    session.add(row)


def _matching(
    owner: str | None, requester: str | None, statuses: Collection[str] | None, since: datetime | None
) -> list[ColumnElement[bool]]:
    """The WHERE clauses of a Task search, shared by the page and its count."""
    clauses: list[ColumnElement[bool]] = []
    if owner is not None:
        clauses.append(Task.owner == owner)
    if requester is not None:
        clauses.append(Task.requester == requester)
    if statuses is not None:
        clauses.append(Task.status.in_(list(statuses)))
    if since is not None:
        clauses.append(Task.updated_at > since)
    return clauses


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
    query = select(Task).where(*_matching(owner, requester, statuses, since))
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
    query = select(func.count()).select_from(Task).where(*_matching(owner, requester, statuses, since))
    return int(await session.scalar(query) or 0)


async def tasks_of_submission(
    session: AsyncSession, requester: str, patient_key: str, document_ids: Collection[str]
) -> list[Task]:
    """The Tasks a publish of exactly these documents created (to answer a replay the same way).
    Read by patient, the requester kept here: given both, SQLite chose ix_tasks_requester and read
    every Task the institution ever sent (20,000: 18–22 ms a replay, with the SubmissionSet's)."""
    wanted = set(document_ids)
    rows = await session.scalars(select(Task).where(Task.patient_key == patient_key).order_by(Task.id))
    return [row for row in rows if row.requester == requester and set(row.focus) == wanted]


async def task_of_exchange(session: AsyncSession, exchange_id: str, hub: str) -> Task | None:
    """This hub's copy of an exchange's Task: the one it received when it owns the exchange (the
    requester's copy too when both parties belong to this hub), else the one it sent."""
    rows = await session.scalars(select(Task).where(Task.exchange_id == exchange_id).order_by(Task.id))
    found = list(rows.all())
    return next((row for row in found if row.owner_hub == hub), found[0] if found else None)


async def exchanges_owned_for(
    session: AsyncSession, owner: str, patient_keys: Collection[str]
) -> Sequence[Row[tuple[str, str, list[str], dict[str, Any]]]]:
    """The exchanges addressed to ``owner`` about these patients, most recently changed first: each
    Task's owner, exchange, focus and resource (columns, not ORM objects: a search reads them all)."""
    if not patient_keys:
        return []
    query = select(Task.owner, Task.exchange_id, Task.focus, Task.task).where(
        Task.owner == owner, Task.patient_key.in_(list(patient_keys))
    )
    return (await session.execute(query.order_by(Task.updated_at.desc(), Task.id))).all()
