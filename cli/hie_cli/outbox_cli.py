"""`hie outbox …`: a service's outbox dead letters — list them, put them back in line after a fix."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from sqlalchemy import MetaData

from hie_cli.commands import command_group
from hie_platform.db import Database, platform_tables
from hie_platform.outbox import dead_letters, retry_dead_letters
from hie_platform.runtime import redact_url

app = command_group("A service's outbox dead letters (events that could not be published).")

DatabaseUrl = Annotated[
    str,
    typer.Option(
        "--database-url", metavar="URL", help="the service's database (its HIE_<SERVICE>_DATABASE_URL)"
    ),
]
Schema = Annotated[
    str | None, typer.Option(metavar="SCHEMA", help="PostgreSQL schema of the service, if any")
]
EventIds = Annotated[
    list[str] | None,
    typer.Option(
        "--event-id", metavar="ID", help="retry only this event (repeatable); default: every dead letter"
    ),
]


async def _list(url: str, schema: str | None) -> Sequence[Any]:
    db = Database(url, schema)
    try:
        async with db.read_sessions() as session:
            return await dead_letters(session, platform_tables(MetaData()).outbox)
    finally:
        await db.dispose()


async def _retry(url: str, schema: str | None, event_ids: list[str]) -> int:
    db = Database(url, schema)
    try:
        async with db.transaction() as session:
            return await retry_dead_letters(session, platform_tables(MetaData()).outbox, event_ids)
    finally:
        await db.dispose()


def _cannot_read(command: str, url: str, exc: Exception) -> typer.Exit:
    print(f"hie outbox {command}: cannot read {redact_url(url)}: {type(exc).__name__}", file=sys.stderr)
    return typer.Exit(2)


@app.command("list")
def list_dead_letters(database_url: DatabaseUrl, schema: Schema = None) -> None:
    """Print the dead letters: event id, subject, attempts, when set aside, last error."""
    try:
        rows = asyncio.run(_list(database_url, schema))
    except Exception as exc:
        raise _cannot_read("list", database_url, exc) from None
    for row in rows:
        print(f"{row.event_id}\t{row.subject}\t{row.attempts}\t{row.dead_at}\t{row.last_error}")
    print(f"{len(rows)} dead letter(s)")


@app.command("retry")
def retry(database_url: DatabaseUrl, schema: Schema = None, event_id: EventIds = None) -> None:
    """Put dead letters back in line with fresh attempts; the running relay publishes them."""
    try:
        count = asyncio.run(_retry(database_url, schema, event_id or []))
    except Exception as exc:
        raise _cannot_read("retry", database_url, exc) from None
    print(f"{count} dead letter(s) put back in line")
