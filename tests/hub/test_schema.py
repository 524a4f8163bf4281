"""The hub's migrations build exactly the indexes its models declare, on SQLite and PostgreSQL: an
index a model drops stays dropped in the databases that were migrated (it costs every write)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import inspect

from hie_hub.app import MIGRATIONS
from hie_hub.models import Base
from hie_platform.db import Database


async def test_the_migrated_indexes_are_the_models(
    migrated_database: Callable[[Path], Awaitable[Database]],
) -> None:
    db = await migrated_database(MIGRATIONS)

    def indexes(conn: Any) -> dict[str, set[str]]:
        inspector = inspect(conn)
        return {
            table: {
                str(ix["name"])
                for ix in inspector.get_indexes(table, schema=db.schema)
                if not ix.get("duplicates_constraint")  # PostgreSQL's index behind a UNIQUE constraint
            }
            for table in Base.metadata.tables
        }

    async with db.writer.connect() as conn:
        migrated = await conn.run_sync(indexes)
    declared = {name: {str(ix.name) for ix in table.indexes} for name, table in Base.metadata.tables.items()}
    assert migrated == declared
    assert "ix_tasks_patient_key" not in migrated["tasks"]
    assert "ix_tasks_patient_owner" in migrated["tasks"]
