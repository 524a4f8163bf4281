"""SQLite's plan of the statement a repository function runs, for tests that pin an index choice."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine


async def explain(engine: AsyncEngine, run: Callable[[], Awaitable[object]], table: str) -> str:
    """EXPLAIN QUERY PLAN of the one statement on ``table`` that ``run`` executes on ``engine``, with
    the parameters it was executed with; the plan's steps joined by spaces."""
    statements: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if table in statement:
            statements.append((statement, parameters))

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        await run()
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)
    ((statement, parameters),) = statements
    async with engine.connect() as conn:
        plan = (await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)).all()
    return " ".join(str(step[-1]) for step in plan)
