"""NATS and JetStream: connection, streams, de-duplicated publishes, RPC, durable idempotent consumers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import BadRequestError, NotFoundError
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ValidationError
from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncSession

from hie_platform.db import Database, insert_or_skip
from hie_platform.errors import RpcError, RpcRemoteError
from hie_platform.logging import CORRELATION_HEADER, correlation_id, get_logger
from hie_platform.workers import Worker, describe
from hie_schemas import contract, streams
from hie_schemas.envelope import Envelope, EventPayload

log = get_logger(__name__)
T = TypeVar("T", bound=BaseModel)
P = TypeVar("P", bound=EventPayload)
EnvelopeHandler = Callable[[Envelope], Awaitable[None]]
# The hub of an institution, as the registry says (None: no such institution, or no hub).
HubOf = Callable[[str], Awaitable[str | None]]

# Process-wide (one service per process in a deployment); rendered by every service's /metrics.
BUS_METRICS = CollectorRegistry()
REFUSED = Counter(
    "hie_bus_refused_messages_total",
    "Messages a consumer refused and terminated: unknown subject, type not the subject's kind, "
    "malformed, or a sender that is not the hub of the institution the message claims",
    ["kind", "reason"],
    registry=BUS_METRICS,
)


class _BusCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        yield from BUS_METRICS.collect()


def bus_collector() -> Collector:
    """The bus's metrics for a service's /metrics registry (hie_platform.http)."""
    return _BusCollector()


class PermanentEventError(Exception):
    """An event that can never be processed (malformed, wrong version): terminated, not redelivered."""


class RefusedMessage(PermanentEventError):
    """A message refused for what it claims (subject, type, sender): counted, logged, terminated."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Incoming:
    """A message whose subject, type and sender have been checked: what a kind's handler receives."""

    address: contract.Address
    envelope: Envelope
    payload: EventPayload


KindHandler = Callable[[Incoming], Awaitable[None]]


async def check_sender(address: contract.Address, payload: EventPayload, hub_of: HubOf) -> None:
    """The subject's sender must be the hub the payload claims, and the hub of its institutions."""
    spec = contract.MESSAGES[address.kind]
    if not spec.sender_bound:
        return
    sender = address.sender
    central = {r.value for r in spec.publishers & contract.CENTRAL_ROLES}
    if sender in central:
        return  # only that central service's NATS user may publish with its name
    claimed = contract.claim(payload)
    if any(hub != sender for hub in claimed.hubs):
        raise RefusedMessage("sender-mismatch", "a hub field is not the sending hub")
    hubs = [await hub_of(code) for code in claimed.institutions]
    if claimed.any_institution:
        if sender not in hubs:
            raise RefusedMessage("sender-mismatch", "no claimed institution belongs to the sending hub")
    elif any(hub is None for hub in hubs):
        raise RefusedMessage("unknown-institution", "a claimed institution has no hub in the registry")
    elif any(hub != sender for hub in hubs):
        raise RefusedMessage("sender-mismatch", "a claimed institution belongs to another hub")


def refused(kind: str, exc: RefusedMessage, **where: Any) -> None:
    """Count and log a refusal: the kind, the reason and where; never the payload (patient data)."""
    REFUSED.labels(kind, exc.reason).inc()
    log.warning("message refused", kind=kind, reason=exc.reason, detail=str(exc), **where)


class Bus:
    """One NATS connection with its JetStream context, shared by a service's components."""

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self._consumers: list[Worker] = []  # the durable consumers, each a supervised worker

    @classmethod
    async def connect(cls, url: str, name: str, connect_timeout: float = 5.0) -> Bus:
        """Connect to ``url``: one server, or a cluster as comma-separated URLs (tried in turn, and
        on reconnect; the servers a cluster advertises are added as they become known)."""

        async def _disconnected() -> None:
            log.warning("nats disconnected")

        async def _reconnected() -> None:
            log.info("nats reconnected")

        async def _error(exc: Exception) -> None:
            log.warning("nats error", error=str(exc))

        servers = [part.strip() for part in url.split(",") if part.strip()]
        nc = await nats.connect(
            servers,
            name=name,
            connect_timeout=connect_timeout,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            drain_timeout=5,
            disconnected_cb=_disconnected,
            reconnected_cb=_reconnected,
            error_cb=_error,
        )
        return cls(nc)

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    async def ensure_streams(
        self, specs: Sequence[streams.StreamSpec] = streams.ALL, replicas: int = 1
    ) -> None:
        """Create or update the federation's streams (idempotent; every service may call it).

        ``replicas`` is the JetStream replication factor: 1 on a single server, 3 on a 3-node cluster
        (a stream then survives the loss of any one server, its leader included). Every service of a
        federation must use the same value, or each start-up would change the streams back and forth.
        """
        for spec in specs:
            config = StreamConfig(
                name=spec.name,
                subjects=list(spec.subjects),
                retention=RetentionPolicy(spec.retention.value),
                storage=StorageType.FILE,
                num_replicas=replicas,
                duplicate_window=float(spec.duplicate_window_seconds),
                max_age=float(spec.max_age_seconds),
            )
            try:
                await self.js.add_stream(config)
            except BadRequestError:
                await self.js.update_stream(config)

    async def publish(self, subject: str, envelope: Envelope) -> None:
        """JetStream publish with Nats-Msg-Id = event id, so a retried publish is de-duplicated."""
        await self.publish_raw(subject, envelope.to_bytes(), envelope.id, envelope.correlation_id)

    async def publish_raw(self, subject: str, payload: bytes, event_id: str, cid: str | None) -> None:
        headers = {"Nats-Msg-Id": event_id}
        if cid:
            headers[CORRELATION_HEADER] = cid
        await self.js.publish(subject, payload, headers=headers, timeout=5.0)

    async def request(self, subject: str, body: BaseModel, reply_type: type[T], timeout: float = 2.0) -> T:
        headers = {CORRELATION_HEADER: cid} if (cid := correlation_id.get()) else None
        try:
            msg = await self.nc.request(
                subject, body.model_dump_json().encode(), timeout=timeout, headers=headers
            )
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            raise RpcError.from_nats(subject, exc) from exc
        if msg.headers and msg.headers.get("Hie-Error"):
            raise RpcRemoteError(subject, msg.headers["Hie-Error"])
        return reply_type.model_validate_json(msg.data)

    async def serve(
        self,
        subject: str,
        queue: str,
        request_type: type[T],
        handler: Callable[[T], Awaitable[BaseModel]],
        verify: Callable[[str | None, T], Awaitable[None]] | None = None,
    ) -> None:
        """Answer request/reply calls on ``subject`` in queue group ``queue`` (the service's name).

        ``verify`` gets the asking hub (the request subject's sender token) and the request, and raises
        RefusedMessage when the request claims someone the asker is not."""

        async def on_msg(msg: Msg) -> None:
            token = correlation_id.set(msg.headers.get(CORRELATION_HEADER) if msg.headers else None)
            try:
                request = request_type.model_validate_json(msg.data)
                if verify is not None:
                    parsed = contract.parse_rpc(msg.subject)
                    await verify(parsed[2] if parsed else None, request)
                reply = await handler(request)
                await msg.respond(reply.model_dump_json().encode())
            except ValidationError:
                await self.nc.publish(msg.reply, b"", headers={"Hie-Error": "invalid request"})
            except RefusedMessage as exc:
                parsed = contract.parse_rpc(msg.subject)
                refused(parsed[0].value if parsed else "unknown", exc, subject=msg.subject)
                await self.nc.publish(msg.reply, b"", headers={"Hie-Error": f"refused: {exc.reason}"})
            except Exception as exc:
                log.error("rpc handler failed", subject=subject, exc_info=exc)
                await self.nc.publish(msg.reply, b"", headers={"Hie-Error": "handler failed"})
            finally:
                correlation_id.reset(token)

        await self.nc.subscribe(subject, queue=queue, cb=on_msg)

    async def follow(self, subject: str, model: type[P], apply: Callable[[P], Awaitable[None]]) -> None:
        """Call ``apply`` with each ``model`` payload published on ``subject``, over core NATS (for a
        cache kept current, not a ledger: nothing is redelivered); a message that does not decode as
        ``model`` is ignored."""

        async def on_msg(msg: Msg) -> None:
            try:
                payload = Envelope.from_bytes(msg.data).payload(model)
            except (ValidationError, ValueError):
                return
            await apply(payload)

        await self.nc.subscribe(subject, cb=on_msg)

    def consume_kinds(
        self,
        durable: str,
        consumer: contract.Durable,
        filter_subject: str,
        handlers: Mapping[contract.Kind, KindHandler],
        hub_of: HubOf,
        batch: int = 32,
        ack_wait: float = 30.0,
        one_transaction: Database | None = None,
    ) -> None:
        """A durable consumer that dispatches on the SUBJECT's kind (contract.parse), refuses an
        envelope whose type is not that kind's or whose sender is not the hub it claims, and hands the
        rest to ``handlers``; kinds the consumer sees but does not handle are acknowledged.

        ``one_transaction``: the handlers' transactions on that database are one per fetched batch
        (``Database.batch``), acknowledged after its commit. Only for handlers whose every effect is
        in that transaction: when one message fails, the batch is rolled back and each message is
        handled again on its own (refused ones terminated, failing ones redelivered)."""

        async def dispatch(msg: Msg) -> Envelope | None:
            address = contract.parse(msg.subject)
            if address is None:
                raise RefusedMessage("unknown-subject")
            spec = contract.MESSAGES[address.kind]
            try:
                envelope = Envelope.from_bytes(msg.data)
            except ValidationError:
                raise RefusedMessage("malformed", "not an envelope") from None
            if envelope.type != spec.envelope_type:
                raise RefusedMessage(
                    "type-mismatch", f"{envelope.type[:64]!r} on a {address.kind.value} subject"
                )
            handler = handlers.get(address.kind)
            if handler is None or spec.payload is None:
                return envelope
            try:
                payload = envelope.payload(spec.payload)
            except (ValidationError, ValueError):
                raise RefusedMessage("malformed", f"not a valid {address.kind.value}") from None
            await check_sender(address, payload, hub_of)
            token = correlation_id.set(envelope.correlation_id)
            try:
                await handler(Incoming(address, envelope, payload))
            finally:
                correlation_id.reset(token)
            return envelope

        stream = consumer.stream.name
        self._start_consumer(
            durable,
            lambda: self._consume(
                stream, durable, filter_subject, dispatch, batch, ack_wait, True, one_transaction
            ),
        )

    def consume(
        self,
        stream: str,
        durable: str,
        filter_subject: str,
        handler: EnvelopeHandler,
        batch: int = 32,
        ack_wait: float = 30.0,
    ) -> None:
        """Run a durable pull consumer in the background; ack on success, back off and redeliver on error."""
        self._start_consumer(
            durable, lambda: self._consume(stream, durable, filter_subject, handler, batch, ack_wait)
        )

    def _start_consumer(self, durable: str, run: Callable[[], Awaitable[None]]) -> None:
        """A consumer is a Worker: a crash of its loop is logged and it binds and pulls again."""
        worker = Worker(f"consumer-{durable}", run)
        worker.start()
        self._consumers.append(worker)

    async def _refilter(self, stream: str, durable: str, filter_subject: str, config: ConsumerConfig) -> None:
        """A durable made before its subjects changed keeps its old filter (nats-py binds to it as it
        is, and would wait forever): move it to the new filter (an update, NATS >= 2.10)."""
        try:
            info = await self.js.consumer_info(stream, durable)
        except NotFoundError:
            return
        if info.config.filter_subject not in (None, filter_subject):
            log.warning("durable consumer moved to its new filter", durable=durable, filter=filter_subject)
            config.name = durable
            config.filter_subject = filter_subject
            await self.js.add_consumer(stream, config=config)

    async def _consume(
        self,
        stream: str,
        durable: str,
        filter_subject: str,
        handler: Any,
        batch: int,
        ack_wait: float,
        kinds: bool = False,
        unit: Database | None = None,
    ) -> None:
        config = ConsumerConfig(durable_name=durable, ack_wait=ack_wait, max_ack_pending=1000)
        sub = await self.pull_subscription(stream, durable, filter_subject, config)
        try:
            await self._pull(sub, durable, handler, batch, kinds, unit)
        finally:
            # A pending pull subscription would hold up drain() on shutdown.
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def pull_subscription(
        self, stream: str, durable: str, filter_subject: str, config: ConsumerConfig
    ) -> JetStreamContext.PullSubscription:
        """Bind the durable pull consumer, trying again each second until NATS takes it (at start-up
        the stream may not exist yet). Every durable consumer of the services binds through here."""
        while True:
            try:
                await self._refilter(stream, durable, filter_subject, config)
                return await self.js.pull_subscribe(
                    filter_subject, durable=durable, stream=stream, config=config
                )
            except Exception as exc:
                log.warning("cannot subscribe yet", durable=durable, error=str(exc))
                await asyncio.sleep(1.0)

    async def fetch(
        self, sub: JetStreamContext.PullSubscription, batch: int, timeout: float, durable: str
    ) -> list[Msg]:
        """Up to `batch` messages within `timeout`; none when nothing came (nats-py raises either
        TimeoutError, depending on where the deadline struck) or the fetch failed (logged, and
        returned after a half-second pause so that a broken connection is not polled in a loop)."""
        try:
            return await sub.fetch(batch, timeout=timeout)
        except (nats.errors.TimeoutError, TimeoutError):
            return []
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("fetch failed", durable=durable, error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.5)
            return []

    async def _pull(
        self, sub: Any, durable: str, handler: Any, batch: int, kinds: bool, unit: Database | None
    ) -> None:
        while True:
            msgs = await self.fetch(sub, batch, 1.0, durable)
            if unit is not None and len(msgs) > 1 and await self._in_one_transaction(msgs, handler, unit):
                continue
            for msg in msgs:
                if kinds:
                    await self._dispatch(msg, durable, handler)
                else:
                    await self._handle(msg, durable, handler)

    async def _in_one_transaction(
        self, msgs: list[Msg], dispatch: Callable[[Msg], Awaitable[Envelope | None]], unit: Database
    ) -> bool:
        """Dispatch a fetched batch in one transaction and acknowledge it after the commit; False,
        with nothing kept, when any message failed (the caller then handles each on its own)."""
        try:
            async with unit.batch():
                for msg in msgs:
                    await dispatch(msg)
        except asyncio.CancelledError:
            raise
        except Exception:
            return False
        for msg in msgs:
            # Committed: an acknowledgement lost now only brings the message back, and the handlers'
            # first_time() lets it through once.
            with contextlib.suppress(Exception):
                await msg.ack()
        return True

    async def _handle(self, msg: Msg, durable: str, handler: EnvelopeHandler) -> None:
        try:
            envelope = Envelope.from_bytes(msg.data)
        except ValidationError:
            log.error("malformed event terminated", durable=durable, subject=msg.subject)
            await msg.term()
            return
        token = correlation_id.set(envelope.correlation_id)
        try:
            await self._settle(msg, durable, handler(envelope), event_id=envelope.id)
        finally:
            correlation_id.reset(token)

    async def _dispatch(
        self, msg: Msg, durable: str, dispatch: Callable[[Msg], Awaitable[Envelope | None]]
    ) -> None:
        """consume_kinds: refusals terminated (counted); failures redelivered with backoff."""
        await self._settle(msg, durable, dispatch(msg), subject=msg.subject)

    async def _settle(self, msg: Msg, durable: str, work: Awaitable[object], **where: str) -> None:
        """Acknowledge ``msg`` once ``work`` is done; terminate it when it can never be processed (a
        refusal is counted); otherwise redeliver it with a backoff. ``where`` names it in the logs."""
        try:
            await work
            await msg.ack()
        except RefusedMessage as exc:
            address = contract.parse(msg.subject)
            sender = address.sender if address else None
            refused(address.kind.value if address else "unknown", exc, durable=durable, sender=sender)
            await msg.term()
        except PermanentEventError as exc:
            log.error("event terminated", durable=durable, **where, error=str(exc))
            await msg.term()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            deliveries = msg.metadata.num_delivered if msg.metadata else 1
            delay = min(30.0, 0.2 * 2 ** min(deliveries, 8))
            log.warning(
                "event handler failed; will retry", durable=durable, **where, delay=delay, error=describe(exc)
            )
            with contextlib.suppress(Exception):
                await msg.nak(delay=delay)

    async def delete_consumer(self, stream: str, durable: str) -> None:
        with contextlib.suppress(NotFoundError):
            await self.js.delete_consumer(stream, durable)

    async def close(self) -> None:
        consumers, self._consumers = self._consumers, []
        # All at once: each stop cancels until its pull has ended (a pull can drop one cancellation).
        await asyncio.gather(*(consumer.stop() for consumer in consumers))
        with contextlib.suppress(Exception):
            await self.nc.drain()


async def first_time(session: AsyncSession, processed: Table, consumer: str, event_id: str) -> bool:
    """Record that ``consumer`` handled ``event_id`` in the handler's transaction; False if it already had.

    One INSERT ... ON CONFLICT DO NOTHING on the (consumer, event_id) key, not a SELECT and then an
    INSERT: one statement less per event for every consumer, and two replicas that take the same
    redelivered event at once no longer race to an IntegrityError (on PostgreSQL the second waits
    for the first's row and then inserts nothing)."""
    row = {"consumer": consumer, "event_id": event_id, "processed_at": datetime.now(UTC)}
    result = await session.execute(insert_or_skip(session, processed), row)
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]
