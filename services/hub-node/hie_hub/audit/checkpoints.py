"""The hub's signed audit checkpoints: its chain's head anchored in JetStream (HIE_AUDIT), outside the
hub's database, so that `hie audit verify` finds the newest records deleted or the chain rewritten.

A checkpoint is written to the outbox (published after commit, like every fact) on
``hie.audit.checkpoint.<hub>``: by the record that makes the sequence a multiple of
``AUDIT_CHECKPOINT_EVERY`` (in that record's transaction, under the trail's lock), and every
``AUDIT_CHECKPOINT_SECONDS`` when the head has moved since (so a quiet hub's newest records are
anchored too), and once more when the hub stops; a head that another process of the hub has already
checkpointed is not checkpointed again. The key is ``AUDIT_CHECKPOINT_KEY_FILE`` (Ed25519,
created 0600 if missing, public key beside it as ``.pub``); without that setting there are no
checkpoints and the start logs a warning.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from hie_hub.config import HubSettings
from hie_platform.audit import TAKE_CHAIN_LOCK
from hie_platform.audit_anchor import CheckpointSigner, load_or_create_key
from hie_platform.logging import get_logger
from hie_platform.runtime import Runtime
from hie_platform.workers import PeriodicWorker
from hie_schemas import subjects
from hie_schemas.envelope import Envelope
from hie_schemas.events import AuditCheckpoint

log = get_logger(__name__)


class AuditCheckpoints:
    """Signs and publishes checkpoints of one hub's chain; the trail calls ``checkpoint``."""

    def __init__(self, runtime: Runtime, signer: CheckpointSigner, every: int, interval: float) -> None:
        self.runtime = runtime
        self.signer = signer
        self.every = every
        self.interval = interval
        self._anchored = 0  # the head sequence this node last checkpointed on its timer
        # final_pass: the head written before the stop is checkpointed (the relay, stopped after, flushes it).
        self.worker = PeriodicWorker("audit-checkpoints", self.checkpoint_head, interval, final_pass=True)

    @classmethod
    def attach(cls, settings: HubSettings, runtime: Runtime) -> AuditCheckpoints | None:
        """Load (or create) the hub's key and make the trail checkpoint its head; None without a key."""
        if settings.audit_checkpoint_key_file is None:
            log.warning("audit checkpoints off: set HIE_HUB_AUDIT_CHECKPOINT_KEY_FILE", hub=settings.hub)
            return None
        key = load_or_create_key(settings.audit_checkpoint_key_file)
        signer = CheckpointSigner(key, settings.hub, settings.node)
        checkpoints = cls(runtime, signer, settings.audit_checkpoint_every, settings.audit_checkpoint_seconds)
        runtime.audit.anchor = checkpoints
        log.info("audit checkpoints on", hub=settings.hub, key_id=signer.key_id)
        return checkpoints

    async def checkpoint(self, session: AsyncSession, sequence: int, head_hash: str) -> None:
        # Sequences run from 1 without gaps, so the head's sequence is also the record count.
        signed = self.signer.sign(sequence, head_hash, count=sequence)
        await self.runtime.outbox.add(session, subjects.audit_checkpoint(self.signer.hub), signed)

    async def checkpoint_head(self) -> None:
        """Checkpoint the committed head unless a checkpoint already covers it: the timers of a hub's
        processes (HIE_HUB_WORKERS, replicas) take turns on the chain's lock and anchor a head once."""
        t = self.runtime.tables.audit
        async with self.runtime.db.transaction() as session:
            if session.get_bind().dialect.name == "postgresql":
                # The appenders' lock: the head holds still until this checkpoint is written.
                await session.execute(TAKE_CHAIN_LOCK)
            head = (
                await session.execute(select(t.c.sequence, t.c.hash).order_by(t.c.sequence.desc()).limit(1))
            ).first()
            if head is None or head.sequence == self._anchored:
                return
            if await self._anchored_at(session) >= head.sequence:
                self._anchored = head.sequence
                return
            await self.checkpoint(session, head.sequence, head.hash)
        self._anchored = head.sequence  # the commit that wrote the event kicked the relay

    async def _anchored_at(self, session: AsyncSession) -> int:
        """The sequence of the newest checkpoint written (by any process of this hub), 0 if none."""
        o = self.runtime.tables.outbox
        newest = (
            await session.execute(
                select(o.c.payload)
                .where(o.c.subject == subjects.audit_checkpoint(self.signer.hub))
                .order_by(o.c.id.desc())
                .limit(1)
            )
        ).scalar()
        if newest is None:
            return 0
        return Envelope.from_bytes(newest).payload(AuditCheckpoint).sequence

    def start(self) -> None:
        self.worker.start()

    async def stop(self) -> None:
        await self.worker.stop()
