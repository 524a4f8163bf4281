"""Checking a hub's audit chain from outside the running service (the ``hie audit verify`` command).

Two checks. The chain (hie_platform.audit): every record's hash covers the previous hash and every
column of the record, so a record altered in place, removed in the middle or reordered breaks the
chain at that sequence. The checkpoints (hie_platform.audit_anchor, published by the hub on
``hie.audit.checkpoint.<hub>`` into HIE_AUDIT): each states, under the hub's signature, the head's
sequence and hash at a moment. A checkpoint beyond the database's last record means the newest records
were deleted (truncation); a checkpoint whose hash is not the stored hash at its sequence means the
chain was rewritten (a record altered and every later hash recomputed). Records after the newest
checkpoint are protected by the chain alone: deleting them is not detectable until a checkpoint covers
them. Checkpoints come from JetStream (``read_from_nats``) or from a file of JSON lines
(``read_from_file``: one envelope, as published, or one checkpoint object per line).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from hie_hub.models import PLATFORM
from hie_platform.audit import AuditTrail, ChainCheck
from hie_platform.audit_anchor import signature_valid, utc_text
from hie_platform.db import Database
from hie_platform.outbox import Outbox
from hie_schemas import streams, subjects
from hie_schemas.envelope import Envelope, Source
from hie_schemas.events import AuditCheckpoint


@dataclass(frozen=True)
class AuditReport:
    """The chain check, the findings (one readable line each) and how far the checkpoints vouch."""

    chain: ChainCheck
    findings: list[str] = field(default_factory=list)
    last_sequence: int = 0
    anchored: AuditCheckpoint | None = None  # the newest checkpoint that matches the database

    @property
    def ok(self) -> bool:
        return self.chain.ok and not self.findings

    def summary(self) -> str:
        line = f"audit chain intact: {self.chain.records} records"
        if self.anchored is None:
            return f"{line}; no signed checkpoint covers them: all are only chain-protected"
        after = self.last_sequence - self.anchored.sequence
        return (
            f"{line}; verified up to checkpoint {self.anchored.sequence} "
            f"(signed {utc_text(self.anchored.issued_at)}); {after} records after the last checkpoint "
            "are only chain-protected"
        )


def _trail() -> AuditTrail:
    return AuditTrail(PLATFORM.audit, Outbox(PLATFORM.outbox, Source(service="hie", node="verify")), "verify")


async def verify(database_url: str, schema: str | None = None) -> ChainCheck:
    """Walk the hub's whole audit chain in sequence order; ``ok`` is False at the first broken link."""
    db = Database(database_url, schema)
    try:
        async with db.read_sessions() as session:
            return await _trail().verify(session)
    finally:
        await db.dispose()


async def verify_against(
    database_url: str,
    schema: str | None,
    checkpoints: list[AuditCheckpoint],
    public_key: Ed25519PublicKey,
) -> AuditReport:
    """The chain, then every checkpoint of the hub against it (signature, truncation, rewrite)."""
    findings: list[str] = []
    valid: list[AuditCheckpoint] = []
    for checkpoint in checkpoints:
        if signature_valid(checkpoint, public_key):
            valid.append(checkpoint)
        else:
            findings.append(
                f"forged checkpoint: the checkpoint at sequence {checkpoint.sequence} "
                f"(key {checkpoint.key_id}) does not verify with the hub's public key"
            )
    wanted = {c.sequence for c in valid}
    stored: dict[int, str] = {}
    last = 0

    def seen(sequence: int, digest: str) -> None:
        nonlocal last
        last = max(last, sequence)
        if sequence in wanted:
            stored[sequence] = digest

    db = Database(database_url, schema)
    try:
        async with db.read_sessions() as session:
            chain = await _trail().verify(session, seen)
    finally:
        await db.dispose()
    if not chain.ok:
        findings.insert(
            0, f"chain broken at sequence {chain.first_bad_sequence} ({chain.records} records read)"
        )
    findings += _truncation(valid, last, chain.records)
    findings += _rewrite(valid, stored)
    matched = [c for c in valid if stored.get(c.sequence) == c.head_hash]
    anchored = max(matched, key=lambda c: c.sequence, default=None)
    return AuditReport(chain=chain, findings=findings, last_sequence=last, anchored=anchored)


def _truncation(valid: list[AuditCheckpoint], last: int, records: int) -> list[str]:
    beyond = [c for c in valid if c.sequence > last or c.count > records]
    if not beyond:
        return []
    newest = max(beyond, key=lambda c: c.sequence)
    return [
        f"truncated: checkpoint {newest.sequence} (signed {utc_text(newest.issued_at)}) counts "
        f"{newest.count} records, but the database ends at sequence {last} ({records} records)"
    ]


def _rewrite(valid: list[AuditCheckpoint], stored: dict[int, str]) -> list[str]:
    differ = sorted(
        (c for c in valid if c.sequence in stored and stored[c.sequence] != c.head_hash),
        key=lambda c: c.sequence,
    )
    if not differ:
        return []
    first = differ[0]
    more = f" (and {len(differ) - 1} later checkpoints)" if len(differ) > 1 else ""
    return [
        f"rewritten: checkpoint {first.sequence} (signed {utc_text(first.issued_at)}) has head hash "
        f"{first.head_hash[:16]}…, the database's record {first.sequence} has {stored[first.sequence][:16]}…"
        f"{more}"
    ]


def parse_checkpoint(raw: bytes | str, hub: str | None) -> AuditCheckpoint | None:
    """One JSON line: an envelope as published, or the checkpoint itself; None if of another hub."""
    data = json.loads(raw)
    if isinstance(data, dict) and "data" in data and "type" in data:
        checkpoint = Envelope.model_validate(data).payload(AuditCheckpoint)
    else:
        checkpoint = AuditCheckpoint.model_validate(data)
    return checkpoint if hub is None or checkpoint.hub == hub else None


def read_from_file(path: Path, hub: str | None) -> list[AuditCheckpoint]:
    lines = (line for line in path.read_text().splitlines() if line.strip())
    return [c for line in lines if (c := parse_checkpoint(line, hub)) is not None]


async def read_from_nats(url: str, hub: str, stream: str = streams.AUDIT.name) -> list[AuditCheckpoint]:
    """Every checkpoint of ``hub`` kept in the stream, oldest first (needs only the message-get API)."""
    import nats
    from nats.js.errors import NotFoundError

    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False, name="hie-audit-verify")
    try:
        js = nc.jetstream()
        subject = subjects.audit_checkpoint(hub)
        found: list[AuditCheckpoint] = []
        sequence = 1
        while True:
            try:
                message = await js.get_msg(stream, seq=sequence, subject=subject, next=True)
            except NotFoundError:
                return found
            if message.data is not None and (checkpoint := parse_checkpoint(message.data, hub)) is not None:
                found.append(checkpoint)
            sequence = (message.seq or sequence) + 1
    finally:
        await nc.close()
