"""A request's database work in the order a disclosure needs: read, ask the consent gate, then write.

Two rules keep a disclosure cheap under load; this unit makes them the shape of the code instead of a
call to remember between two injected sessions:

- the read transaction ends before the consent gate is asked: the gate reads too (its replica), and a
  request that kept its reader connection while waiting could exhaust the pool under load;
- the write session is touched only once the gate has answered and the rows are prepared: SQLite has
  one writer connection (hie_platform.db), so a write begun before the question would hold every
  other request's write behind the gate.

``async with unit.reading() as read:`` is a read phase; ``unit.writing()`` hands out the request's
write session, which the request scope commits (a refusal marked with ``raise_after_commit`` keeps its
audit record). Asking the gate or taking the write session inside a read phase raises at once, so a
misplaced step fails in the tests rather than under load.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar

from sqlalchemy.ext.asyncio import AsyncSession

from hie_platform.db import Database

# Set while the current task is inside a read phase (a task's context is its own).
_IN_READ_PHASE: ContextVar[bool] = ContextVar("hie_hub_in_read_phase", default=False)


class ReadPhaseOpen(RuntimeError):
    """A step that must follow the read phase was taken inside it (a programming error, not a 4xx)."""


def outside_read_phase(step: str) -> None:
    """Refuse ``step`` inside a read phase: it would hold a reader connection while it waits."""
    if _IN_READ_PHASE.get():
        raise ReadPhaseOpen(f"{step} inside a read phase: end the phase first (UnitOfWork.reading)")


class UnitOfWork:
    """One request's read phases and its write session, in that order."""

    def __init__(self, db: Database, session: AsyncSession) -> None:
        self._db = db
        self._session = session

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncSession]:
        """A read phase: a read session of its own, closed on exit, which ends its transaction and
        returns its connection to the pool. The rows it loaded stay usable (read sessions do not
        expire them); the session does not: it is closed for good, and SQLAlchemy refuses a later
        query on it (``close_resets_only=False``). A request may hold several phases, one at a time."""
        outside_read_phase("a read phase opened")
        marked = _IN_READ_PHASE.set(True)
        try:
            async with self._db.read_sessions(close_resets_only=False) as read:
                yield read
        finally:
            _IN_READ_PHASE.reset(marked)

    def writing(self) -> AsyncSession:
        """The request's write session, for what is written once the consent gate has answered."""
        outside_read_phase("the write session taken")
        return self._session
