"""The SQL that the domain repositories' patient searches share."""

from __future__ import annotations

from datetime import datetime
from typing import TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import QueryableAttribute

R = TypeVar("R")


def newest_first(
    query: Select[R],
    at: QueryableAttribute[datetime],
    key: QueryableAttribute[str],
    *,
    start: datetime | None,
    before: datetime | None,
) -> Select[R]:
    """``query`` narrowed to ``start <= at < before`` (an absent bound is no bound), newest first and
    ties by ``key``: the order a search's keyset pages (core.params.Cursor) follow."""
    if start is not None:
        query = query.where(at >= start)
    if before is not None:
        query = query.where(at < before)
    return query.order_by(at.desc(), key.desc())
