"""NATS and JetStream: connection, streams, de-duplicated publishes, RPC, durable idempotent consumers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError
from pydantic import BaseModel, ValidationError
from sqlalchemy import Table, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from hie_platform.logging import CORRELATION_HEADER, correlation_id, get_logger
from hie_schemas import streams
from hie_schemas.envelope import Envelope

log = get_logger(__name__)
T = TypeVar("T", bound=BaseModel)
EnvelopeHandler = Callable[[Envelope], Awaitable[None]]


class PermanentEventError(Exception):
    """An event that can never be processed (malformed, wrong version): terminated, not redelivered."""


class RpcError(Exception):
    """A request/reply call that failed: no responder, timeout, or an error reply."""


class Bus:
    """One NATS connection with its JetStream context, shared by a service's components."""

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self._tasks: list[asyncio.Task[None]] = []

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
            raise RpcError(f"{subject}: {type(exc).__name__}") from exc
        if msg.headers and msg.headers.get("Hie-Error"):
            raise RpcError(f"{subject}: {msg.headers['Hie-Error']}")
        return reply_type.model_validate_json(msg.data)

    async def serve(
        self, subject: str, queue: str, request_type: type[T], handler: Callable[[T], Awaitable[BaseModel]]
    ) -> None:
        """Answer request/reply calls on ``subject`` in queue group ``queue`` (the service's name)."""

        async def on_msg(msg: Msg) -> None:
            token = correlation_id.set(msg.headers.get(CORRELATION_HEADER) if msg.headers else None)
            try:
                reply = await handler(request_type.model_validate_json(msg.data))
                await msg.respond(reply.model_dump_json().encode())
            except ValidationError:
                await self.nc.publish(msg.reply, b"", headers={"Hie-Error": "invalid request"})
            except Exception as exc:
                log.error("rpc handler failed", subject=subject, exc_info=exc)
                await self.nc.publish(msg.reply, b"", headers={"Hie-Error": "handler failed"})
            finally:
                correlation_id.reset(token)

        await self.nc.subscribe(subject, queue=queue, cb=on_msg)

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
        self._tasks.append(
            asyncio.create_task(self._consume(stream, durable, filter_subject, handler, batch, ack_wait))
        )

    async def _consume(
        self,
        stream: str,
        durable: str,
        filter_subject: str,
        handler: EnvelopeHandler,
        batch: int,
        ack_wait: float,
    ) -> None:
        config = ConsumerConfig(durable_name=durable, ack_wait=ack_wait, max_ack_pending=1000)
        while True:
            try:
                sub = await self.js.pull_subscribe(
                    filter_subject, durable=durable, stream=stream, config=config
                )
                break
            except Exception as exc:
                log.warning("cannot subscribe yet", durable=durable, error=str(exc))
                await asyncio.sleep(1.0)
        try:
            await self._pull(sub, durable, handler, batch)
        finally:
            # A pending pull subscription would hold up drain() on shutdown.
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _pull(self, sub: Any, durable: str, handler: EnvelopeHandler, batch: int) -> None:
        while True:
            try:
                msgs = await sub.fetch(batch, timeout=1.0)
            except (nats.errors.TimeoutError, TimeoutError):
                # Nothing to fetch within the second (nats-py raises either, depending on where
                # the deadline struck): poll again.
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("fetch failed", durable=durable, error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                await self._handle(msg, durable, handler)

    async def _handle(self, msg: Msg, durable: str, handler: EnvelopeHandler) -> None:
        try:
            envelope = Envelope.from_bytes(msg.data)
        except ValidationError:
            log.error("malformed event terminated", durable=durable, subject=msg.subject)
            await msg.term()
            return
        token = correlation_id.set(envelope.correlation_id)
        try:
            await handler(envelope)
            await msg.ack()
        except PermanentEventError as exc:
            log.error("event terminated", durable=durable, event_id=envelope.id, error=str(exc))
            await msg.term()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            deliveries = msg.metadata.num_delivered if msg.metadata else 1
            delay = min(30.0, 0.2 * 2 ** min(deliveries, 8))
            log.warning(
                "event handler failed; will retry",
                durable=durable,
                event_id=envelope.id,
                delay=delay,
                error=f"{type(exc).__name__}: {exc}",
            )
            with contextlib.suppress(Exception):
                await msg.nak(delay=delay)
        finally:
            correlation_id.reset(token)

    async def delete_consumer(self, stream: str, durable: str) -> None:
        with contextlib.suppress(NotFoundError):
            await self.js.delete_consumer(stream, durable)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        with contextlib.suppress(Exception):
            await self.nc.drain()


async def first_time(session: AsyncSession, processed: Table, consumer: str, event_id: str) -> bool:
    """Record that ``consumer`` handled ``event_id`` in the handler's transaction; False if it already had."""
    seen = await session.scalar(
        select(processed.c.event_id).where(processed.c.consumer == consumer, processed.c.event_id == event_id)
    )
    if seen is not None:
        return False
    await session.execute(
        insert(processed).values(consumer=consumer, event_id=event_id, processed_at=datetime.now(UTC))
    )
    return True
