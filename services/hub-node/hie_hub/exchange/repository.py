"""The SQL of one ITI-65 publish: its new rows in one Core INSERT per table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession

from hie_hub.models import Document, SubmissionSet, Task


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
