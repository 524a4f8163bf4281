"""Checking a hub's audit chain from outside the running service (the ``hie audit verify`` command).

Every record's hash covers the previous hash and the record (hie_platform.audit): an altered record,
a removed one in the middle or a reordering breaks the chain at that sequence. Removing the newest
records leaves a shorter valid chain; compare ``records`` with the last sequence published on
``hie.audit.record.appended`` (HIE_AUDIT) to see that.
"""

from __future__ import annotations

from hie_hub.models import PLATFORM
from hie_platform.audit import AuditTrail, ChainCheck
from hie_platform.db import Database
from hie_platform.outbox import Outbox
from hie_schemas.envelope import Source


async def verify(database_url: str, schema: str | None = None) -> ChainCheck:
    """Walk the hub's whole audit chain in sequence order; ``ok`` is False at the first broken link."""
    db = Database(database_url, schema)
    try:
        trail = AuditTrail(
            PLATFORM.audit, Outbox(PLATFORM.outbox, Source(service="hie", node="verify")), "verify"
        )
        async with db.read_sessions() as session:
            return await trail.verify(session)
    finally:
        await db.dispose()
