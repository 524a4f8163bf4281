"""Alembic per service, run programmatically (no alembic.ini): ``upgrade()`` and a shared env body."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command, context, op
from alembic.config import Config
from sqlalchemy import MetaData, pool, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import create_async_engine

from hie_platform.db import (
    audit_columns,
    connect_args_for,
    outbox_columns,
    outbox_retry_columns,
    processed_columns,
    validate_schema_name,
)

# The advisory lock key of migrations on PostgreSQL (the audit chain's is 7243001).
MIGRATION_LOCK = 7243003


def alembic_config(script_location: Path, database_url: str, schema: str | None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    cfg.attributes["schema"] = schema
    cfg.attributes["database_url"] = database_url
    return cfg


def upgrade(
    script_location: Path, database_url: str, schema: str | None = None, revision: str = "head"
) -> None:
    """Bring a service's database to ``revision``; blocking (run it in a thread from async code)."""
    command.upgrade(alembic_config(script_location, database_url, schema), revision)


def run_env(target_metadata: MetaData) -> None:
    """The body of every service's migrations/env.py."""
    config = context.config
    url: str = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url") or ""
    schema: str | None = config.attributes.get("schema")
    is_sqlite = make_url(url).get_backend_name() == "sqlite"
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return

    def do_run(connection: Connection) -> None:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=is_sqlite,
            version_table_schema=schema,
        )
        with context.begin_transaction():
            context.run_migrations()

    async def run_async() -> None:
        engine = create_async_engine(url, poolclass=pool.NullPool, connect_args=connect_args_for(url, schema))
        try:
            async with engine.connect() as connection:
                if not is_sqlite:
                    # Processes that start together (a hub's HIE_HUB_WORKERS, pods' init containers)
                    # migrate one after the other: the next finds the schema at head. Held by this
                    # connection's session until it closes.
                    await connection.execute(text(f"SELECT pg_advisory_lock({MIGRATION_LOCK})"))
                    await connection.commit()
                if schema and not is_sqlite:
                    await connection.execute(
                        text(f'CREATE SCHEMA IF NOT EXISTS "{validate_schema_name(schema)}"')
                    )
                    await connection.commit()
                await connection.run_sync(do_run)
        finally:
            await engine.dispose()

    asyncio.run(run_async())


def create_platform_tables() -> None:
    """Called from each service's first revision: the outbox, processed-event and audit tables."""
    op.create_table("outbox", *outbox_columns())
    op.create_index("ix_outbox_unsent", "outbox", ["sent_at", "id"])
    op.create_table("processed_events", *processed_columns())
    op.create_table("audit_log", *audit_columns())


def add_outbox_retry_columns() -> None:
    """Called from each service's outbox-retry revision (the first revision keeps the original table)."""
    for column in outbox_retry_columns():
        op.add_column("outbox", column)


def drop_outbox_retry_columns() -> None:
    with op.batch_alter_table("outbox") as batch:
        for column in reversed(outbox_retry_columns()):
            batch.drop_column(column.name)


def drop_platform_tables() -> None:
    for table in ("audit_log", "processed_events", "outbox"):
        op.drop_table(table)
