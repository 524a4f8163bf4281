"""The gateway on NATS: the exchange consumer that links studies, and study progress events."""

from __future__ import annotations

from collections import OrderedDict
from datetime import UTC, datetime

from hie_imaging import service
from hie_imaging.schemas import StudyStatus
from hie_platform.bus import Incoming, first_time
from hie_platform.logging import get_logger
from hie_platform.runtime import Runtime
from hie_platform.workers import PeriodicWorker
from hie_schemas import contract, streams
from hie_schemas.events import ExchangeSent, StudyProgress

log = get_logger(__name__)


class ProgressReporter:
    """Publishes StudyProgress (through the outbox) for studies whose counts changed.

    Callers `touch()` a study after any change; a pass every `interval` seconds writes one event per
    touched study whose counts differ from the last published ones, so a series of 500 instances
    makes a handful of events, not 500.
    """

    def __init__(self, runtime: Runtime, hub: str, interval: float = 0.5, remember: int = 10_000) -> None:
        self._runtime = runtime
        self._hub = hub
        self._remember = remember
        self._dirty: set[str] = set()
        self._published: OrderedDict[str, StudyStatus] = OrderedDict()
        # A pass each interval (the first one interval after start), and a last one on stop.
        self._worker = PeriodicWorker("study-progress", self._pass, interval, run_now=False, final_pass=True)

    def touch(self, *study_uids: str) -> None:
        self._dirty.update(study_uids)

    def start(self) -> None:
        self._worker.start()

    async def stop(self) -> None:
        await self._worker.stop()

    async def _pass(self) -> None:
        await self.flush()

    async def flush(self) -> int:
        if not self._dirty:
            return 0
        studies, self._dirty = self._dirty, set()
        published: list[StudyStatus] = []
        try:
            async with self._runtime.db.transaction() as session:
                statuses = await service.studies_status(session, studies)
                for study_uid in sorted(statuses):
                    status = statuses[study_uid]
                    if self._published.get(study_uid) == status:
                        continue
                    await self._runtime.outbox.add(
                        session,
                        contract.subject(contract.Kind.STUDY_PROGRESS, sender=self._hub),
                        _progress(self._hub, status),
                    )
                    published.append(status)
        except BaseException:
            self._dirty |= studies
            raise
        for status in published:
            self._published[status.study_instance_uid] = status
            self._published.move_to_end(status.study_instance_uid)
        while len(self._published) > self._remember:
            self._published.popitem(last=False)
        return len(published)


def _progress(hub: str, status: StudyStatus) -> StudyProgress:
    return StudyProgress(
        hub=hub,
        study_instance_uid=status.study_instance_uid,
        exchange_id=status.exchange_id,
        received=status.received,
        relayed=status.relayed,
        delivered=status.delivered,
        failed=status.failed,
        state=status.state,
        updated_at=datetime.now(UTC),
    )


def follow_exchanges(runtime: Runtime, hub: str, durable: str, reporter: ProgressReporter) -> None:
    """Link the studies of every exchange from or to this hub (durable, idempotent by event id)."""

    async def on_exchange(incoming: Incoming) -> None:
        # The Bus refused an ExchangeSent whose subject's hub is not the sending institution's hub
        # (a hub cannot make this gateway relay a study on another hub's word).
        sent = incoming.payload
        if not isinstance(sent, ExchangeSent) or hub not in (sent.from_hub, sent.to_hub) or not sent.studies:
            return
        async with runtime.db.transaction() as session:
            if not await first_time(session, runtime.tables.processed, durable, incoming.envelope.id):
                return
            touched = await service.link_exchange(session, runtime.outbox, hub, sent, datetime.now(UTC))
        if touched:
            reporter.touch(*touched)
            log.info("exchange claimed held studies", exchange_id=sent.exchange_id, studies=len(touched))

    consumer = contract.durable(contract.Role.GATEWAY, streams.EXCHANGE)
    runtime.bus.consume_kinds(
        durable,
        consumer,
        consumer.filter(hub),
        {contract.Kind.EXCHANGE_SENT: on_exchange},
        runtime.registry.hub_of,
    )
