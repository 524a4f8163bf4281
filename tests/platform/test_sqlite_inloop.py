"""SQLite statements on the event loop (hie_platform/sqlite_inloop.py): no thread per statement, and
never a wait for a lock on the loop."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from hie_platform.db import Database


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Database]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    async with db.transaction() as session:
        await session.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)"))
    yield db
    await db.dispose()


async def test_statements_run_on_the_loop_thread(database: Database) -> None:
    """The cost removed was a hop to a connection thread for every statement (aiosqlite)."""
    loop_thread = threading.get_ident()
    for engine in (database.writer, database.reader):
        async with engine.connect() as conn:
            raw = await conn.get_raw_connection()
            raw.driver_connection._conn.create_function("thread_id", 0, threading.get_ident)
            ran_on = (await conn.execute(text("SELECT thread_id()"))).scalar_one()
            assert ran_on == loop_thread


async def test_a_write_waiting_for_another_connections_lock_leaves_the_loop_free(
    database: Database, tmp_path: Path
) -> None:
    """Another connection (another process, or a tool) holds the write lock: our write waits for it in
    a thread, the loop keeps running other tasks, and the write lands once the lock is released."""
    holder = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO t (id, v) VALUES (1, 'holder')")

    async def write() -> None:
        async with database.transaction() as session:
            await session.execute(text("INSERT INTO t (id, v) VALUES (2, 'ours')"))

    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    ticker = asyncio.create_task(tick())
    writing = asyncio.create_task(write())
    try:
        while ticks < 20:  # the loop runs while our write is held up by the lock
            await asyncio.sleep(0.005)
            assert not writing.done(), "the write finished while another connection held the lock"
        holder.execute("COMMIT")
        await writing
    finally:
        ticker.cancel()
        holder.close()
    async with database.read_sessions() as read:
        rows = (await read.execute(text("SELECT id, v FROM t ORDER BY id"))).all()
    assert [tuple(r) for r in rows] == [(1, "holder"), (2, "ours")]


async def test_a_constraint_violation_is_sqlalchemys_error_and_rolls_back(database: Database) -> None:
    async with database.transaction() as session:
        await session.execute(text("INSERT INTO t (id, v) VALUES (1, 'kept')"))

    async def duplicate() -> None:
        async with database.transaction() as session:
            await session.execute(text("INSERT INTO t (id, v) VALUES (2, 'rolled back')"))
            await session.execute(text("INSERT INTO t (id, v) VALUES (1, 'duplicate')"))

    with pytest.raises(IntegrityError):
        await duplicate()
    async with database.transaction() as session:  # the writer connection is usable again
        await session.execute(text("INSERT INTO t (id, v) VALUES (3, 'after')"))
    async with database.read_sessions() as read:
        rows = (await read.execute(text("SELECT id, v FROM t ORDER BY id"))).all()
    assert [tuple(r) for r in rows] == [(1, "kept"), (3, "after")]


_CANCELLED_WRITE = """
import asyncio, sqlite3, sys, threading
from sqlalchemy import text
from hie_platform.db import Database

async def main(path):
    db = Database(f"sqlite+aiosqlite:///{path}")
    async with db.transaction() as session:
        await session.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"))
    for _ in range(10):
        holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN IMMEDIATE")
        holder.execute("INSERT INTO t (v) VALUES ('holder')")

        async def write():
            async with db.transaction() as session:
                await session.execute(text("INSERT INTO t (v) VALUES ('cancelled')"))

        task = asyncio.create_task(write())
        await asyncio.sleep(0.05)  # the write now waits for the lock in a thread
        threading.Timer(0.1, lambda: (holder.execute("COMMIT"), holder.close())).start()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        await db.dispose()
        db = Database(f"sqlite+aiosqlite:///{path}")
    async with db.read_sessions() as read:
        print(sorted(set((await read.execute(text("SELECT v FROM t"))).scalars())))
    await db.dispose()

asyncio.run(main(sys.argv[1]))
"""


def test_a_cancelled_write_waiting_for_a_lock_then_disposed_does_not_crash(tmp_path: Path) -> None:
    """Cancelling a write whose statement waits for a lock in a thread, then disposing the engine,
    closed the connection under the running statement: the process died of a segmentation fault.
    Now nothing touches the connection until the thread's call has ended. Run in a child process, so
    that a crash fails this test and not the whole run."""
    result = subprocess.run(
        [sys.executable, "-c", _CANCELLED_WRITE, str(tmp_path / "x.db")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "['holder']"


async def _autocheckpoint(db: Database) -> int:
    async with db.writer.connect() as conn:
        return int((await conn.exec_driver_sql("PRAGMA wal_autocheckpoint")).scalar_one())


async def _write_batch(db: Database, batch: int) -> None:
    """One transaction of 100 rows of 1.2 KB (ids from ``batch * 100``)."""
    async with db.transaction() as session:
        rows = [{"id": batch * 100 + i, "v": "x" * 1200} for i in range(100)]
        await session.execute(text("INSERT INTO t (id, v) VALUES (:id, :v)"), rows)


async def _write_mb(db: Database, batches: int) -> None:
    for batch in range(batches):
        await _write_batch(db, batch)


async def test_checkpoints_run_apart_from_the_commits(database: Database, tmp_path: Path) -> None:
    """With checkpoint_apart (every service's runtime) no commit runs a checkpoint: SQLite's automatic
    one (past 1,000 pages of WAL, 4 MB) is off on the writer, so the database file does not grow while
    the WAL takes 4.8 MB; the worker's pass then copies it back."""
    assert await _autocheckpoint(database) == 1000  # SQLite's default until then
    await database.checkpoint_apart(interval=3600)  # one pass at start, then only when kicked
    worker = database._checkpointer
    assert worker is not None
    assert await _autocheckpoint(database) == 0
    for _ in range(100):
        if worker.passes:
            break
        await asyncio.sleep(0.02)
    file = tmp_path / "x.db"
    await _write_mb(database, 40)
    assert file.stat().st_size < 100_000  # every page is still in the WAL
    passes = worker.passes
    worker.kick()
    for _ in range(200):
        if worker.passes > passes:
            break
        await asyncio.sleep(0.02)
    assert file.stat().st_size > 4_000_000
    async with database.transaction() as session:
        assert (await session.execute(text("SELECT count(*) FROM t"))).scalar_one() == 4000


async def test_without_checkpoints_apart_a_commit_checkpoints(database: Database, tmp_path: Path) -> None:
    """The control: SQLite's automatic checkpoint, in the commit that passes 1,000 pages."""
    await _write_mb(database, 40)
    assert (tmp_path / "x.db").stat().st_size > 3_000_000


async def test_a_new_writer_connection_keeps_the_checkpoints_apart(database: Database) -> None:
    await database.checkpoint_apart(interval=3600)
    await database.writer.dispose()  # the pool opens a new connection: the pragma is per connection
    assert await _autocheckpoint(database) == 0
    assert await _commit_threads(database) == {threading.get_ident()}


async def _commit_threads(db: Database) -> set[int]:
    """The threads a write transaction's COMMIT ran on (sqlite3's trace callback sees the statement)."""
    threads: set[int] = set()
    async with db.writer.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        raw._conn.set_trace_callback(
            lambda sql: threads.add(threading.get_ident()) if sql.strip().upper() == "COMMIT" else None
        )
    async with db.transaction() as session:
        await session.execute(text("INSERT INTO t (v) VALUES ('x')"))
    return threads


async def test_commits_run_on_the_loop_once_they_no_longer_checkpoint(database: Database) -> None:
    """A commit that may checkpoint goes to a thread (it may sync the disk); once the checkpoints run
    apart, a commit only appends to the WAL and stays on the loop: one thread hop less per write."""
    loop_thread = threading.get_ident()
    before = await _commit_threads(database)
    assert before
    assert loop_thread not in before
    await database.checkpoint_apart(interval=3600)
    assert await _commit_threads(database) == {loop_thread}


async def test_the_wal_stays_short_while_the_writer_keeps_writing(database: Database, tmp_path: Path) -> None:
    """A PASSIVE checkpoint on another connection never rewinds the WAL while the writer keeps
    committing; past 1,000 frames the worker truncates it, so it does not grow with the writes."""
    await database.checkpoint_apart(interval=0.02)
    wal = tmp_path / "x.db-wal"
    largest = 0
    for batch in range(300):  # 36 MB in all, 120 KB a transaction, a millisecond apart
        await _write_batch(database, batch)
        largest = max(largest, wal.stat().st_size if wal.exists() else 0)
        await asyncio.sleep(0.001)
    # Without the truncation the WAL reached 45.6 MB here (measured with the truncation turned off).
    assert largest < 16_000_000
    async with database.transaction() as session:
        assert (await session.execute(text("SELECT count(*) FROM t"))).scalar_one() == 30_000
