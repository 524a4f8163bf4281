"""Append-only, hash-chained audit records (ATNA/BALP in spirit): each record's hash covers the one
before it, so altering or removing any record breaks the chain from that point on."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from hie_platform.outbox import Outbox
from hie_schemas import subjects
from hie_schemas.auth import TokenClaims
from hie_schemas.events import AuditRecorded

GENESIS = "0" * 64


def chain_hash(prev_hash: str, record: dict[str, Any]) -> str:
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256((prev_hash + canonical).encode()).hexdigest()


@dataclass(frozen=True)
class ChainCheck:
    ok: bool
    records: int
    first_bad_sequence: int | None = None


class AuditTrail:
    """Appends audit records in the caller's transaction and emits them through the outbox."""

    def __init__(self, table: Table, outbox: Outbox, node: str) -> None:
        self.table = table
        self.outbox = outbox
        self.node = node

    async def record(
        self,
        session: AsyncSession,
        *,
        action: str,
        actor: TokenClaims | None,
        outcome: str,
        patient_key: str | None = None,
        document_ids: list[str] | None = None,
        purpose: str | None = None,
        rule: str | None = None,
        consent_version: int | None = None,
        detail: dict[str, Any] | None = None,
    ) -> int:
        t = self.table
        if session.get_bind().dialect.name == "postgresql":
            # Serialize appenders across replicas sharing one database.
            await session.execute(text("SELECT pg_advisory_xact_lock(7243001)"))
        last = (
            await session.execute(select(t.c.sequence, t.c.hash).order_by(t.c.sequence.desc()).limit(1))
        ).first()
        sequence = (last.sequence + 1) if last else 1
        prev_hash = last.hash if last else GENESIS
        now = datetime.now(UTC)
        record = {
            "sequence": sequence,
            "recorded_at": now.isoformat(),
            "node": self.node,
            "action": action,
            "actor_client": actor.sub if actor else None,
            "actor_institution": actor.inst if actor else None,
            "patient_key": patient_key,
            "document_ids": document_ids or [],
            "purpose": purpose,
            "outcome": outcome,
            "rule": rule,
            "consent_version": consent_version,
            "detail": detail or {},
        }
        digest = chain_hash(prev_hash, record)
        await session.execute(
            insert(t).values(
                sequence=sequence, recorded_at=now, record=record, prev_hash=prev_hash, hash=digest
            )
        )
        await self.outbox.add(
            session,
            subjects.AUDIT_RECORDED,
            AuditRecorded(
                node=self.node,
                sequence=sequence,
                hash=digest,
                action=action,
                actor_institution=record["actor_institution"],
                patient_key=patient_key,
                document_ids=record["document_ids"],
                purpose=purpose,
                outcome=outcome,
                rule=rule,
                consent_version=consent_version,
                recorded_at=now,
            ),
        )
        return sequence

    async def verify(self, session: AsyncSession) -> ChainCheck:
        t = self.table
        prev = GENESIS
        expected = 1
        count = 0
        rows = await session.stream(
            select(t.c.sequence, t.c.record, t.c.prev_hash, t.c.hash).order_by(t.c.sequence)
        )
        async for row in rows:
            count += 1
            if row.sequence != expected or row.prev_hash != prev or chain_hash(prev, row.record) != row.hash:
                return ChainCheck(ok=False, records=count, first_bad_sequence=expected)
            prev = row.hash
            expected += 1
        return ChainCheck(ok=True, records=count)
