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
