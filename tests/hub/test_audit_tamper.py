"""Tampering with a hub's audit trail by someone who can write its database but does not hold the hub's
checkpoint key: deleting the newest records, rewriting a record with every later hash recomputed,
editing a column the old hash did not cover. A real hub (in-process uvicorn, SQLite and PostgreSQL)
appends the records and publishes its signed checkpoints through its outbox to a real nats-server;
`hie audit verify` reads them back from JetStream (or from a file `hie audit checkpoints` wrote)."""

from __future__ import annotations

import asyncio
import stat
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hub_support import eventually, root_conftest
from sqlalchemy import delete, select, update
from typer.testing import CliRunner

from hie_cli.main import app as cli
from hie_hub.app import create_app
from hie_hub.audit.verify import read_from_nats
from hie_hub.config import HubSettings
from hie_hub.models import PLATFORM
from hie_platform.audit import GENESIS, row_hash
from hie_platform.audit_anchor import CheckpointSigner
from hie_platform.bus import Bus
from hie_platform.db import Database
from hie_platform.natsd import free_port
from hie_schemas import subjects
from hie_schemas.envelope import Envelope, Source

RECORDS = 12
EVERY = 5  # checkpoints at sequences 5 and 10; 11 and 12 are only chain-protected


@dataclass
class AnchoredHub:
    slug: str
    nats_url: str
    database_url: str
    schema: str | None
    public_key: Path
    db: Database

    async def verify(self, *extra: str) -> Any:
        args = ["audit", "verify", "--database-url", self.database_url]
        args += ["--schema", self.schema] if self.schema else []
        args += ["--hub", self.slug, "--checkpoint-key", str(self.public_key), *extra]
        args += [] if "--checkpoints-file" in extra else ["--nats-url", self.nats_url]
        # The command runs its own event loop, as it does from a shell: in a thread here.
        return await asyncio.to_thread(CliRunner().invoke, cli, args)


@asynccontextmanager
async def running_hub(
    config: pytest.Config, nats_url: str, registry_url: str, database: tuple[str, str | None], **audit: Any
) -> AsyncIterator[tuple[HubSettings, Any]]:
    """A real hub node under uvicorn with a fresh slug (its own checkpoint subject) and a key file."""
    url, schema = database
    slug = f"t{uuid.uuid4().hex[:10]}"
    port = free_port()
    settings = HubSettings(
        hub=slug,
        port=port,
        database_url=url,
        database_schema=schema,
        nats_url=nats_url,
        registry_url=registry_url,
        node=f"test-{slug}",
        **audit,
    )
    app = create_app(settings)
    running = await root_conftest(config).RunningApp(app, port).start()
    try:
        yield settings, app.state.runtime
    finally:
        await running.stop()


async def append(runtime: Any, records: int) -> None:
    """Audit records appended by the hub's own trail, as its endpoints do."""
    for n in range(records):
        async with runtime.db.transaction() as session:
            await runtime.audit.record(
                session, action="document.read", actor=None, outcome="success", detail={"n": n}
            )
    runtime.relay.kick()


async def checkpoint_at(nats_url: str, hub: str, sequence: int) -> None:
    async def found() -> bool | None:
        return True if any(c.sequence == sequence for c in await read_from_nats(nats_url, hub)) else None

    await eventually(found, f"the checkpoint at sequence {sequence} in HIE_AUDIT")


@pytest.fixture
async def hub(
    pytestconfig: pytest.Config,
    hub_nats: str,
    hub_registry: Any,
    database: tuple[str, str | None],
    tmp_path: Path,
) -> AsyncIterator[AnchoredHub]:
    """A real hub node that checkpoints every 5 records, with 12 records appended by its own trail."""
    key_file = tmp_path / "keys" / "audit-checkpoint.pem"
    async with running_hub(
        pytestconfig,
        hub_nats,
        hub_registry.url,
        database,
        audit_checkpoint_key_file=key_file,
        audit_checkpoint_every=EVERY,
        audit_checkpoint_seconds=3600.0,  # only the every-5 checkpoints while the test runs
    ) as (settings, runtime):
        await append(runtime, RECORDS)
        await checkpoint_at(hub_nats, settings.hub, 2 * EVERY)
        url, schema = database
        db = Database(url, schema)
        public = key_file.with_name(key_file.name + ".pub")
        yield AnchoredHub(settings.hub, hub_nats, url, schema, public, db)
        await db.dispose()


async def test_an_intact_chain_is_verified_up_to_its_last_checkpoint(
    hub: AnchoredHub, tmp_path: Path
) -> None:
    """The control: nothing touched, exit 0, and the report says how far the checkpoints vouch."""
    result = await hub.verify()
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == (
        f"audit chain intact: {RECORDS} records; verified up to checkpoint 10 (signed "
        + result.stdout.split("(signed ")[1].split(")")[0]
        + "); 2 records after the last checkpoint are only chain-protected"
    )
    # The operator's other path: a copy of the checkpoints in a file.
    exported = await asyncio.to_thread(
        CliRunner().invoke, cli, ["audit", "checkpoints", "--nats-url", hub.nats_url, "--hub", hub.slug]
    )
    assert exported.exit_code == 0, exported.stderr
    copy = tmp_path / "checkpoints.jsonl"
    copy.write_text(exported.stdout)
    from_file = await hub.verify("--checkpoints-file", str(copy))
    assert (from_file.exit_code, from_file.stdout) == (0, result.stdout)


async def test_deleting_the_newest_records_is_found_as_truncation(hub: AnchoredHub) -> None:
    t = PLATFORM.audit
    async with hub.db.transaction() as session:
        await session.execute(delete(t).where(t.c.sequence > 8))
    result = await hub.verify()
    assert result.exit_code == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("hie audit verify: truncated: checkpoint 10 ")
    assert line.endswith("counts 10 records, but the database ends at sequence 8 (8 records)")


async def test_a_record_rewritten_with_every_later_hash_recomputed_is_found_by_the_checkpoint(
    hub: AnchoredHub,
) -> None:
    t = PLATFORM.audit
    async with hub.db.transaction() as session:
        rows = (await session.execute(select(t).order_by(t.c.sequence))).all()
        prev = GENESIS
        for row in rows:
            record = dict(row.record)
            if row.sequence == 3:
                record["patient_key"] = "f" * 64  # someone else's patient, read by nobody
            digest = row_hash(prev, row.sequence, row.recorded_at, record)
            await session.execute(
                update(t)
                .where(t.c.sequence == row.sequence)
                .values(record=record, prev_hash=prev, hash=digest)
            )
            prev = digest
    chain_only = await asyncio.to_thread(
        CliRunner().invoke,
        cli,
        ["audit", "verify", "--database-url", hub.database_url]
        + (["--schema", hub.schema] if hub.schema else []),
    )
    assert chain_only.exit_code == 0  # the chain alone cannot tell: that is what the checkpoints are for
    result = await hub.verify()
    assert result.exit_code == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("hie audit verify: rewritten: checkpoint 5 ")
    assert line.endswith("(and 1 later checkpoints)")


async def test_an_edited_recorded_at_breaks_the_chain(hub: AnchoredHub) -> None:
    t = PLATFORM.audit
    async with hub.db.transaction() as session:
        recorded_at = (await session.execute(select(t.c.recorded_at).where(t.c.sequence == 4))).scalar_one()
        await session.execute(
            update(t).where(t.c.sequence == 4).values(recorded_at=recorded_at - timedelta(hours=3))
        )
    result = await hub.verify()
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"hie audit verify: chain broken at sequence 4 ({RECORDS} records read)"
    ]


async def test_a_checkpoint_signed_with_another_key_is_refused(hub: AnchoredHub) -> None:
    """Whoever can publish on the hub's checkpoint subject still cannot vouch for a shorter chain."""
    forger = CheckpointSigner(Ed25519PrivateKey.generate(), hub.slug, "forger")
    t = PLATFORM.audit
    async with hub.db.transaction() as session:
        await session.execute(delete(t).where(t.c.sequence > 8))
        head = (await session.execute(select(t.c.hash).where(t.c.sequence == 8))).scalar_one()
    forged = forger.sign(8, head, count=8).model_copy(update={"key_id": forger.key_id})
    bus = await Bus.connect(hub.nats_url, name="forger")
    try:
        await bus.publish(
            subjects.audit_checkpoint(hub.slug), Envelope.wrap(forged, Source(service="x", node="x"))
        )
    finally:
        await bus.close()
    result = await hub.verify()
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0] == (
        f"hie audit verify: forged checkpoint: the checkpoint at sequence 8 (key {forger.key_id}) "
        "does not verify with the hub's public key"
    )
    assert lines[1].startswith("hie audit verify: truncated: checkpoint 10 ")


async def test_a_quiet_hub_anchors_its_newest_records_on_its_timer(
    pytestconfig: pytest.Config,
    hub_nats: str,
    hub_registry: Any,
    database: tuple[str, str | None],
    tmp_path: Path,
) -> None:
    """Three records, far fewer than AUDIT_CHECKPOINT_EVERY: the timer checkpoints them, so deleting the
    newest is found; the key file is the owner's only."""
    key_file = tmp_path / "audit-checkpoint.pem"
    async with running_hub(
        pytestconfig,
        hub_nats,
        hub_registry.url,
        database,
        audit_checkpoint_key_file=key_file,
        audit_checkpoint_every=1000,
        audit_checkpoint_seconds=0.2,
    ) as (settings, runtime):
        await append(runtime, 3)
        await checkpoint_at(hub_nats, settings.hub, 3)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    url, schema = database
    db = Database(url, schema)
    hub = AnchoredHub(settings.hub, hub_nats, url, schema, key_file.with_name(key_file.name + ".pub"), db)
    try:
        intact = await hub.verify()
        assert intact.exit_code == 0, intact.stderr
        assert "verified up to checkpoint 3 " in intact.stdout
        async with db.transaction() as session:
            await session.execute(delete(PLATFORM.audit).where(PLATFORM.audit.c.sequence == 3))
        truncated = await hub.verify()
    finally:
        await db.dispose()
    assert truncated.exit_code == 1
    assert truncated.stderr.startswith("hie audit verify: truncated: checkpoint 3 ")
