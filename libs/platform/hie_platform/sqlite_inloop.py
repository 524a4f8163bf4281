"""SQLite for SQLAlchemy's asyncio engine without a thread hop per statement.

aiosqlite runs every call (execute, fetchall, commit, even ``cursor()``) on the connection's own
thread and hands the result back through a future: measured on this project's hub, about 280 µs of
CPU per one-row statement, mostly the hop (epoll wake-up, queue put, future), while SQLite itself
answers such a statement in a few microseconds. A referral publish runs a dozen statements.

This driver keeps aiosqlite's interface (SQLAlchemy's ``sqlite+aiosqlite`` dialect drives it
unchanged, given as the engine's ``module``) but runs each statement on the event loop, where it
takes as long as SQLite takes (in a microbenchmark through an AsyncSession, a one-row SELECT went
from 395-496 to 133-223 µs of CPU). Two things must never happen on the loop:

- a wait for a lock held by another connection (another process, or a second engine on the same
  file): the busy timeout is 0 on the loop, and a statement that finds the database locked runs
  again in a worker thread with the full timeout, so the loop keeps serving and the holder of the
  lock can finish. In one process the single writer (``hie_platform.db``) never meets a lock of its
  own readers: in WAL mode readers don't block the writer, nor the writer its readers;
- a wait for the disk: a commit that wrote runs in a thread (one hop per write transaction), since
  it may run a WAL checkpoint, which writes the pages back and syncs (up to 38 ms measured here
  after a few MB of writes, against a median commit of 37 µs). A service's runtime takes the
  checkpoints out of the commits (``Database.checkpoint_apart``: SQLite's automatic checkpoint off,
  a PASSIVE one every second on a connection of its own, in a thread, and a truncation of the WAL
  past 1,000 pages); its commits then only append to the WAL, without a sync (synchronous=NORMAL),
  and run on the loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterable, Sequence

# sqlite3 exposes the error classes SQLAlchemy's adapter reads from the module it is given.
from sqlite3 import (  # noqa: F401  (re-exported for AsyncAdapt_aiosqlite_dbapi)
    DatabaseError,
    Error,
    IntegrityError,
    NotSupportedError,
    OperationalError,
    ProgrammingError,
    sqlite_version,
    sqlite_version_info,
)
from typing import Any, TypeVar

from sqlalchemy.dialects.sqlite.aiosqlite import AsyncAdapt_aiosqlite_dbapi

__version__ = "1.0"

_T = TypeVar("_T")
_LOCKED = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}


def _is_locked(error: sqlite3.OperationalError) -> bool:
    return getattr(error, "sqlite_errorcode", None) in _LOCKED


def _consume(future: asyncio.Future[Any]) -> None:
    """Read a thread call's outcome, so that one whose caller was cancelled logs no warning."""
    if not future.cancelled():
        future.exception()


class Connection:
    """One sqlite3 connection, driven from the event loop (the aiosqlite ``Connection`` surface)."""

    def __init__(self, connection: sqlite3.Connection, busy_timeout_ms: int) -> None:
        self._connection: sqlite3.Connection | None = connection
        self._busy_timeout_ms = busy_timeout_ms
        # The call running in a thread, if any. Nothing else touches the connection until it ends:
        # a caller cancelled while it waited (a request that went away, a shutdown) leaves the thread
        # running, and closing or rolling back under it crashed the process (a segmentation fault,
        # reproduced by cancelling a write held up by a lock and disposing the engine).
        self._in_thread: asyncio.Future[Any] | None = None
        # False once SQLite's automatic checkpoint is off on this connection (hie_platform.db runs the
        # checkpoints apart): a commit then only appends to the WAL, with no sync (synchronous=NORMAL).
        self.commits_checkpoint = True

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._connection is None:
            raise ValueError("no active connection")
        return self._connection

    async def settled(self) -> None:
        """Wait until no call of this connection runs in a thread."""
        pending = self._in_thread
        if pending is not None and not pending.done():
            await asyncio.wait([pending])

    async def run(self, call: Callable[[], _T]) -> _T:
        """``call()`` on the loop; if the database is locked, again in a thread, waiting for the lock."""
        await self.settled()
        try:
            return call()
        except sqlite3.OperationalError as error:
            if not _is_locked(error):
                raise
        return await self._threaded(call)

    async def _threaded(self, call: Callable[[], _T]) -> _T:
        await self.settled()
        pending: asyncio.Future[_T] = asyncio.ensure_future(asyncio.to_thread(self._waiting, call))
        pending.add_done_callback(_consume)
        self._in_thread = pending
        # Shielded: if the caller is cancelled, the call still ends in its thread before anything
        # else may use the connection (``settled``).
        return await asyncio.shield(pending)

    def _waiting(self, call: Callable[[], _T]) -> _T:
        conn = self._conn
        conn.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms}")
        try:
            return call()
        finally:
            conn.execute("PRAGMA busy_timeout=0")

    @property
    def isolation_level(self) -> str | None:
        return self._conn.isolation_level

    def cursor(self) -> Cursor:
        return Cursor(self, self._conn.cursor())

    async def execute(self, sql: str, parameters: Sequence[Any] = ()) -> Cursor:
        cursor = self.cursor()
        await cursor.execute(sql, parameters)
        return cursor

    async def commit(self) -> None:
        await self.settled()
        conn = self._conn
        if not conn.in_transaction:  # nothing written: a read's "commit" is a no-op
            return
        if not self.commits_checkpoint:
            await self.run(conn.commit)
            return
        # A commit can run a WAL checkpoint (it writes the pages back and syncs the file, tens of ms
        # after a few MB of writes): in a thread, so the loop never waits on the disk.
        await self._threaded(conn.commit)

    async def rollback(self) -> None:
        await self.settled()
        self._conn.rollback()

    async def close(self) -> None:
        await self.settled()
        self._close()

    def stop(self) -> None:
        """Close now, or as soon as the call running in a thread ends (SQLAlchemy's terminate)."""
        pending = self._in_thread
        if pending is not None and not pending.done():
            pending.add_done_callback(lambda _: self._close())
        else:
            self._close()

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def create_function(self, *args: Any, **kwargs: Any) -> None:
        await self.settled()
        self._conn.create_function(*args, **kwargs)


class Cursor:
    """The aiosqlite ``Cursor`` surface over a sqlite3 cursor."""

    def __init__(self, owner: Connection, cursor: sqlite3.Cursor) -> None:
        self._owner = owner
        self._cursor = cursor

    async def __aenter__(self) -> Cursor:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def execute(self, sql: str, parameters: Sequence[Any] = ()) -> Cursor:
        await self._owner.run(lambda: self._cursor.execute(sql, parameters))
        return self

    async def executemany(self, sql: str, parameters: Iterable[Sequence[Any]]) -> Cursor:
        rows = list(parameters)
        await self._owner.run(lambda: self._cursor.executemany(sql, rows))
        return self

    async def fetchone(self) -> Any:
        await self._owner.settled()
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        await self._owner.settled()
        return self._cursor.fetchmany(self._cursor.arraysize if size is None else size)

    async def fetchall(self) -> list[Any]:
        await self._owner.settled()
        return self._cursor.fetchall()

    async def close(self) -> None:
        await self._owner.settled()
        self._cursor.close()

    async def nextset(self) -> None:
        return None

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value


async def _open(database: str, timeout: float = 5.0, **kwargs: Any) -> Connection:
    kwargs.pop("check_same_thread", None)
    # A lock wait happens in a thread (Connection.run); on the loop the connection never waits.
    connection = sqlite3.connect(database, timeout=0, check_same_thread=False, **kwargs)
    return Connection(connection, busy_timeout_ms=int(timeout * 1000))


class _Opening:
    """What aiosqlite's ``connect`` returns: awaitable, with the ``_thread`` SQLAlchemy marks as a
    daemon (there is none here)."""

    class _NoThread:
        daemon = True

    _thread = _NoThread()

    def __init__(self, database: str, kwargs: dict[str, Any]) -> None:
        self._database, self._kwargs = database, kwargs

    def __await__(self) -> Any:
        return _open(self._database, **self._kwargs).__await__()


def connect(database: str, **kwargs: Any) -> _Opening:
    """aiosqlite's ``connect``."""
    return _Opening(database, kwargs)


def dbapi() -> AsyncAdapt_aiosqlite_dbapi:
    """The module to give ``create_async_engine(..., module=...)`` for a ``sqlite+aiosqlite`` URL."""
    import sys

    return AsyncAdapt_aiosqlite_dbapi(sys.modules[__name__], sqlite3)
