"""Async SQLAlchemy for SQLite (embedded default) and PostgreSQL (production), and the platform tables.

SQLite runs in WAL mode behind a single writer connection: with SQLAlchemy's default pool every
connection competes for the write lock and p99 climbs to seconds under write load, while one writer
with several readers keeps writes queued in-process and reads unblocked. Statements run on the
event loop, not one thread hop each (``hie_platform.sqlite_inloop``).

The unit of work (``Database.transaction``) has three hooks that keep the writer's hold short and
the callers plain: steps run just before the commit (``before_commit``: the audit chain's append
takes its lock there, not for the whole request), a refusal that commits what it recorded and is
raised afterwards (``raise_after_commit``), and callbacks after a commit that wrote events
(``Database.on_event_commit``: the outbox relay is woken by the commit itself).

A durable consumer may take a whole fetched batch of events in one transaction (``Database.batch``):
every ``transaction()`` its handlers open inside is that one, committed once for the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    event,
    text,
)
from sqlalchemy.dialects.postgresql import Insert as PostgresInsert
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import Insert as SQLiteInsert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import AsyncAdaptedQueuePool
from sqlalchemy.sql.dml import Insert

from . import sqlite_inloop
from .logging import get_logger
from .workers import PeriodicWorker

log = get_logger(__name__)

_SCHEMA = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def validate_schema_name(schema: str) -> str:
    if not _SCHEMA.fullmatch(schema):
        raise ValueError(f"invalid database schema name: {schema!r}")
    return schema


def connect_args_for(url: str, schema: str | None) -> dict[str, Any]:
    """Driver arguments: a search_path for a PostgreSQL schema, a lock timeout for SQLite."""
    backend = make_url(url).get_backend_name()
    if backend == "postgresql" and schema:
        return {"server_settings": {"search_path": validate_schema_name(schema)}}
    if backend == "sqlite":
        return {"timeout": 30}
    return {}


def json_text(value: Any) -> str:
    """JSON columns as orjson writes them (the publish profile had json.dumps of every stored document
    at 6% of the hub's CPU); values orjson refuses (integers beyond 64 bits) fall back to json."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, ensure_ascii=False)


def _engine_options(url: str, schema: str | None) -> dict[str, Any]:
    return {
        "connect_args": connect_args_for(url, schema),
        "json_serializer": json_text,
        "json_deserializer": orjson.loads,
    }


# session.info keys of the unit of work
_BEFORE_COMMIT = "hie.before_commit"
_RAISE_AFTER_COMMIT = "hie.raise_after_commit"
_EVENTS_WRITTEN = "hie.events_written"

CommitStep = Callable[[AsyncSession], Awaitable[None]]
_E = TypeVar("_E", bound=Exception)


def before_commit(session: AsyncSession, key: str, step: CommitStep, order: int = 0) -> None:
    """Run ``step`` once, just before this transaction commits (lower ``order`` first); a step may
    add further steps. Only ``Database.transaction`` runs them: any other commit is refused."""
    steps: dict[str, tuple[int, CommitStep]] = session.info.setdefault(_BEFORE_COMMIT, {})
    steps.setdefault(key, (order, step))


def events_written(session: AsyncSession) -> None:
    """This transaction wrote outbox rows: ``Database.on_event_commit`` callbacks run after commit."""
    session.info[_EVENTS_WRITTEN] = True


def raise_after_commit(session: AsyncSession, error: _E) -> _E:
    """Mark ``error`` as one that keeps what the transaction wrote (a refusal's audit row and event):
    when exactly this error leaves ``Database.transaction``, it commits, then the error goes on."""
    session.info[_RAISE_AFTER_COMMIT] = error
    return error


@event.listens_for(Session, "before_commit")
def _refuse_unrun_steps(session: Session) -> None:
    if session.info.get(_BEFORE_COMMIT):
        raise RuntimeError("steps pending before commit (audit records): commit through Database.transaction")


def _sqlite_pragmas(read_only: bool, checkpoints_apart: Callable[[], bool] = lambda: False) -> Any:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        if read_only:
            cursor.execute("PRAGMA query_only=ON")
        elif checkpoints_apart():
            cursor.execute(_NO_AUTOCHECKPOINT)
            dbapi_connection.driver_connection.commits_checkpoint = False
        cursor.close()

    return on_connect


_NO_AUTOCHECKPOINT = "PRAGMA wal_autocheckpoint=0"
# Past this many frames (SQLite's own automatic checkpoint's threshold, about 4 MB) the WAL is
# truncated. A PASSIVE checkpoint on another connection never rewinds it while the writer keeps
# committing (the writer appends again before the checkpoint has caught up: with the truncation
# turned off, the WAL reached 45.6 MB while tests/platform/test_sqlite_inloop.py wrote 36 MB), and
# nothing else would shrink it.
WAL_TRUNCATE_FRAMES = 1000
# How long a truncation may wait for readers that hold an older snapshot (it is tried again later).
_CHECKPOINT_BUSY_SECONDS = 0.2


def _checkpoint(path: str, mode: str) -> int:
    """A checkpoint of the WAL into the database file on a connection of its own; the frames the WAL
    holds afterwards. PASSIVE copies what no reader still needs and syncs, without waiting for
    readers or blocking the writer; TRUNCATE also empties the WAL, once no writer and no older reader
    is left (taken while the caller holds the process's one writer connection)."""
    with contextlib.closing(
        sqlite3.connect(path, timeout=_CHECKPOINT_BUSY_SECONDS, isolation_level=None)
    ) as conn:
        busy, frames, _ = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        return 0 if mode == "TRUNCATE" and not busy else int(frames)


class BatchAbandoned(Exception):
    """A handler inside ``Database.batch`` left its ``transaction()`` with an error: the batch's
    transaction is rolled back whatever the handler did with the error (it may have swallowed it)."""


@dataclass
class _Shared:
    session: AsyncSession
    task: asyncio.Task[Any] | None
    failed: bool = False


class Database:
    """A writer engine (one connection on SQLite) and a reader engine, with session factories."""

    def __init__(self, url: str, schema: str | None = None, pool_size: int = 10) -> None:
        self.url = url
        self.schema = schema
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        options = _engine_options(url, schema)
        # Called after each commit that wrote outbox rows (the relay registers its kick).
        self.on_event_commit: list[Callable[[], None]] = []
        self._file = parsed.database if parsed.database and parsed.database != ":memory:" else None
        self._checkpointer: PeriodicWorker | None = None
        if self.is_sqlite:
            if self._file is not None:
                Path(self._file).parent.mkdir(parents=True, exist_ok=True)
            # Statements run on the event loop; a lock wait goes to a thread (hie_platform.sqlite_inloop).
            options["module"] = sqlite_inloop.dbapi()
            self.writer: AsyncEngine = create_async_engine(
                url, poolclass=AsyncAdaptedQueuePool, pool_size=1, max_overflow=0, **options
            )
            self.reader: AsyncEngine = create_async_engine(
                url, poolclass=AsyncAdaptedQueuePool, pool_size=4, max_overflow=4, **options
            )
            writer_pragmas = _sqlite_pragmas(
                read_only=False, checkpoints_apart=lambda: self._checkpointer is not None
            )
            event.listen(self.writer.sync_engine, "connect", writer_pragmas)
            event.listen(self.reader.sync_engine, "connect", _sqlite_pragmas(read_only=True))
        else:
            self.writer = create_async_engine(
                url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True, **options
            )
            self.reader = self.writer
        self.sessions = async_sessionmaker(self.writer, expire_on_commit=False)
        self.read_sessions = async_sessionmaker(self.reader, expire_on_commit=False)
        self._shared: ContextVar[_Shared | None] = ContextVar(f"hie.db.batch.{id(self)}", default=None)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A unit of work: commit on success, roll back on any exception but the one marked by
        ``raise_after_commit``, which commits first. ``on_event_commit`` runs once the session is
        closed: a caller that still kicks the relay by hand right after then wakes it for one pass,
        not two (the statement count of a publish showed two outbox reads per request)."""
        shared = self._shared.get()
        if shared is not None and shared.task is asyncio.current_task():
            try:
                yield shared.session  # committed, or rolled back, with the whole batch
            except BaseException:
                shared.failed = True
                raise
            return
        error: BaseException | None = None
        async with self.sessions() as session:
            try:
                yield session
            except BaseException as exc:
                if session.info.pop(_RAISE_AFTER_COMMIT, None) is not exc:
                    await session.rollback()
                    raise
                error = exc
            await self._commit(session)
        if session.info.pop(_EVENTS_WRITTEN, False):
            for callback in self.on_event_commit:
                callback()
        if error is not None:
            raise error

    @asynccontextmanager
    async def batch(self) -> AsyncIterator[None]:
        """One transaction for every ``transaction()`` opened inside, in this task (a task started
        inside gets transactions of its own): committed once at the end, with the same hooks. Any
        error that leaves one of those ``transaction()`` blocks rolls the whole batch back, even if
        its caller swallowed it (``BatchAbandoned``); the caller then handles each item on its own.

        Measured (hub bench, CRS publishes by 8 clients): a history consumer fetched 2 to 9 events
        at a time, and the per-event transaction (begin, commit in a thread, session set-up) was
        about a third of the consent service's CPU."""
        async with self.transaction() as session:
            shared = _Shared(session, asyncio.current_task())
            token = self._shared.set(shared)
            try:
                yield
            finally:
                self._shared.reset(token)
            if shared.failed:
                raise BatchAbandoned("a handler's transaction failed inside the batch")

    async def _commit(self, session: AsyncSession) -> None:
        try:
            while steps := session.info.pop(_BEFORE_COMMIT, None):
                for _, step in sorted(steps.values(), key=lambda s: s[0]):
                    await step(session)
            await session.commit()
        except BaseException:
            session.info.pop(_BEFORE_COMMIT, None)
            session.info.pop(_EVENTS_WRITTEN, None)
            await session.rollback()
            raise

    async def ping(self) -> bool:
        try:
            async with self.reader.connect() as conn:
                await conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    async def checkpoint_apart(self, interval: float = 1.0) -> None:
        """SQLite: move the WAL's checkpoints out of the commits into a thread of their own, every
        ``interval`` seconds (nothing to do on PostgreSQL or in memory).

        SQLite's automatic checkpoint runs inside the commit that takes the WAL past 1,000 pages: it
        writes those pages back and syncs, up to 38 ms measured here, while the one writer
        connection waits and every request that writes queues behind it (hie_platform.sqlite_inloop
        runs that commit in a thread so that the event loop goes on, but the writer does not). A
        PASSIVE checkpoint on another connection neither waits for readers nor blocks the writer; past
        ``WAL_TRUNCATE_FRAMES`` the WAL is truncated while the writer is held for that moment."""
        if not self.is_sqlite or self._file is None or self._checkpointer is not None:
            return
        path = self._file
        warned = False

        async def step() -> bool:
            nonlocal warned
            frames = await asyncio.to_thread(_checkpoint, path, "PASSIVE")
            if frames >= WAL_TRUNCATE_FRAMES:
                # The bulk is copied already, without the writer waiting; now hold the one writer
                # connection (writes queue in the process, the loop goes on) while the WAL is emptied:
                # what is left to copy since the PASSIVE pass, a sync, the truncation.
                async with self.writer.connect():
                    frames = await asyncio.to_thread(_checkpoint, path, "TRUNCATE")
            # A WAL that stays long: a reader that keeps a snapshot open past the truncation's 0.2 s.
            # Said once until it is short again.
            if frames >= 10 * WAL_TRUNCATE_FRAMES and not warned:
                log.warning("sqlite WAL not truncated", path=path, frames=frames)
            warned = frames >= 10 * WAL_TRUNCATE_FRAMES
            return False

        self._checkpointer = PeriodicWorker("sqlite-checkpoint", step, interval)
        async with self.writer.connect() as conn:  # the writer connection already open, if any
            await conn.exec_driver_sql(_NO_AUTOCHECKPOINT)
            driver = (await conn.get_raw_connection()).driver_connection
            if driver is not None:
                driver.commits_checkpoint = False
        self._checkpointer.start()

    async def dispose(self) -> None:
        if self._checkpointer is not None:
            await self._checkpointer.stop()
            self._checkpointer = None
        await self.writer.dispose()
        if self.reader is not self.writer:
            await self.reader.dispose()


def dialect_insert(session: AsyncSession, table: Table) -> PostgresInsert | SQLiteInsert:
    """The INSERT of the session's dialect (SQLite or PostgreSQL), which has ``on_conflict_do_*``."""
    return insert_of(session.get_bind().dialect.name, table)


def insert_of(dialect: str, table: Table) -> PostgresInsert | SQLiteInsert:
    """The INSERT of a dialect by name, for statements built once per dialect."""
    return postgresql_insert(table) if dialect == "postgresql" else sqlite_insert(table)


def insert_or_skip(session: AsyncSession, table: Table) -> Insert:
    """``INSERT ... ON CONFLICT (primary key) DO NOTHING`` in the session's dialect: a row whose key
    is there already is skipped, with no SELECT first and no race between two writers (on
    PostgreSQL the second waits for the first's row, then inserts nothing). Execute it with a row's
    values (a dict) or a list of rows.

    Built once per dialect and table (statements are immutable) and given its values at execution:
    every consumer runs it for every event (bus.first_time), and a statement built anew with
    ``.values()`` each time, SQLAlchemy then deriving its cache key again, made a first_time cost 77
    µs of CPU instead of 34 (SQLite, 2,000 in one transaction; 172 vs 103-122 on PostgreSQL)."""
    return _insert_or_skip(session.get_bind().dialect.name, table)


@functools.cache
def _insert_or_skip(dialect: str, table: Table) -> Insert:
    return insert_of(dialect, table).on_conflict_do_nothing(index_elements=list(table.primary_key.columns))


# --- platform tables: every service's metadata carries them; migrations create them ---------------


def outbox_columns() -> list[Column[Any]]:
    return [
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("event_id", String(64), nullable=False, unique=True),
        Column("subject", String(255), nullable=False),
        Column("payload", LargeBinary, nullable=False),
        Column("correlation_id", String(64), nullable=True),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("sent_at", DateTime(timezone=True), nullable=True),
    ]


def outbox_retry_columns() -> list[Column[Any]]:
    """Added by each service's outbox-retry migration: a row that fails to publish is retried with
    backoff, then set aside (``dead_at``) so that it never holds back the rows behind it."""
    return [
        Column("attempts", Integer, nullable=False, server_default=text("0")),
        Column("next_attempt_at", DateTime(timezone=True), nullable=True),
        Column("last_error", String(500), nullable=True),
        Column("dead_at", DateTime(timezone=True), nullable=True),
    ]


def processed_columns() -> list[Column[Any]]:
    return [
        Column("consumer", String(100), primary_key=True),
        Column("event_id", String(64), primary_key=True),
        Column("processed_at", DateTime(timezone=True), nullable=False),
    ]


def audit_columns() -> list[Column[Any]]:
    return [
        Column("sequence", Integer, primary_key=True, autoincrement=False),
        Column("recorded_at", DateTime(timezone=True), nullable=False),
        Column("record", JSON, nullable=False),
        Column("prev_hash", String(64), nullable=False),
        Column("hash", String(64), nullable=False),
    ]


@dataclass(frozen=True)
class PlatformTables:
    outbox: Table
    processed: Table
    audit: Table


def platform_tables(metadata: MetaData) -> PlatformTables:
    """Declare the outbox, processed-event and audit tables on a service's metadata."""
    outbox = Table("outbox", metadata, *outbox_columns(), *outbox_retry_columns())
    Index("ix_outbox_unsent", outbox.c.sent_at, outbox.c.id)
    return PlatformTables(
        outbox=outbox,
        processed=Table("processed_events", metadata, *processed_columns()),
        audit=Table("audit_log", metadata, *audit_columns()),
    )
