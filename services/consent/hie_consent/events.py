"""The consent service on NATS: the decision RPC, the history consumers, and the feed's heartbeat."""

from __future__ import annotations

from datetime import UTC, datetime

from nats.js.errors import NotFoundError

from hie_consent import history, repository, service
from hie_consent.config import ConsentSettings
from hie_consent.repository import as_utc
from hie_platform.bus import Incoming
from hie_platform.runtime import Runtime
from hie_platform.workers import PeriodicWorker
from hie_schemas import contract, streams, subjects
from hie_schemas.envelope import Envelope
from hie_schemas.events import CONSENT_FEED_HEARTBEAT, ConsentFeedHeartbeat, DecisionReply, DecisionRequest

QUEUE = "consent"


async def start(runtime: Runtime, settings: ConsentSettings) -> None:
    """Answer decisions (queue group: replicas share the load) and follow the exchange and audit streams."""

    async def on_decide(request: DecisionRequest) -> DecisionReply:
        async with runtime.db.transaction() as session:
            decision = await service.decide_flow(session, runtime, request.query, actor=None, via="nats")
        return DecisionReply(decision=decision)

    # The Bus has checked that each envelope's type is its subject's kind and that a hub's fact comes
    # from the hub of the institution it names (hie_schemas.contract).
    async def on_exchange(incoming: Incoming) -> None:
        async with runtime.db.transaction() as session:
            await history.record_exchange_event(
                session, runtime, settings.history_consumer, incoming.envelope
            )

    async def on_audit(incoming: Incoming) -> None:
        sender = incoming.address.sender
        async with runtime.db.transaction() as session:
            await history.record_audit_event(
                session, runtime, settings.access_consumer, incoming.envelope, sender
            )

    async def verify_decide(asker: str | None, request: DecisionRequest) -> None:
        await service.check_asker(runtime, asker, request.query)

    await runtime.bus.serve(
        subjects.CONSENT_DECIDE,
        queue=QUEUE,
        request_type=DecisionRequest,
        handler=on_decide,
        verify=verify_decide,
    )
    exchanges = contract.durable(contract.Role.CONSENT, streams.EXCHANGE)
    # Both history consumers write only to the database: a fetched batch is one transaction.
    runtime.bus.consume_kinds(
        settings.history_consumer,
        exchanges,
        exchanges.filter(),
        dict.fromkeys(exchanges.kinds, on_exchange),
        runtime.registry.hub_of,
        one_transaction=runtime.db,
    )
    accesses = contract.durable(contract.Role.CONSENT, streams.AUDIT)
    runtime.bus.consume_kinds(
        settings.access_consumer,
        accesses,
        accesses.filter(),
        {contract.Kind.AUDIT_RECORDED: on_audit},
        runtime.registry.hub_of,
        one_transaction=runtime.db,
    )


class FeedHeartbeat:
    """Says every second that the consent feed is alive and how far it has published.

    Core NATS on ``hie.feed.consent.heartbeat`` (outside every stream: a heartbeat is only worth its
    freshness, and a stream would keep one a second forever). Each beat first measures the outbox's
    backlog of unpublished consent versions, then reads the stream's last ConsentRecorded sequence: a
    version committed before the beat is either published at or below that sequence or counted in
    the lag. When the database or JetStream cannot be read, no beat goes out, and hubs fail closed
    after their staleness bound.
    """

    def __init__(self, runtime: Runtime, interval: float) -> None:
        self.runtime = runtime
        self.interval = interval
        # A failing beat is logged once while it keeps failing and once when it recovers.
        self._worker = PeriodicWorker("consent-feed-heartbeat", self._step, interval)

    def start(self) -> None:
        self._worker.start()

    async def stop(self) -> None:
        await self._worker.stop()

    async def _step(self) -> None:
        await self.beat()

    async def beat(self) -> ConsentFeedHeartbeat:
        now = datetime.now(UTC)
        outbox = self.runtime.tables.outbox
        async with self.runtime.db.read_sessions() as session:
            oldest = await repository.oldest_unsent(session, outbox, subjects.CONSENT_RECORDED)
        try:
            last = await self.runtime.bus.js.get_last_msg(streams.CONSENT.name, subjects.CONSENT_RECORDED)
            sequence = int(last.seq or 0)
        except NotFoundError:
            sequence = 0  # nothing recorded yet
        lag = max(0.0, (now - as_utc(oldest)).total_seconds()) if oldest is not None else 0.0
        beat = ConsentFeedHeartbeat(
            stream_sequence=sequence, lag_seconds=lag, interval_seconds=self.interval, sent_at=now
        )
        envelope = Envelope.wrap(beat, self.runtime.source)
        await self.runtime.bus.nc.publish(CONSENT_FEED_HEARTBEAT, envelope.to_bytes())
        return beat
