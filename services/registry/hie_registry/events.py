"""The registry's bus handlers: the record locator and exchange statistics fed by hub events, and the
locate RPCs for hubs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from sqlalchemy.ext.asyncio import AsyncSession

from hie_platform.bus import Incoming, RefusedMessage, first_time
from hie_platform.runtime import Runtime
from hie_registry import repository
from hie_registry.directory_index import DirectoryIndex
from hie_registry.models import PLATFORM
from hie_schemas import contract, streams, subjects
from hie_schemas.events import DocumentPublished, ExchangeSent, LocateReply, LocateRequest
from hie_schemas.identifiers import InvalidIdentifierError, validate_patient_key

CONSUMER = "registry-locator"


async def _seen(session: AsyncSession, published: DocumentPublished) -> None:
    await repository.seen(session, published.patient_key, published.hub, published.published_at)


async def _serve_adds(runtime: Runtime, hub_of: Callable[[str], Awaitable[str | None]]) -> None:
    """hie.rpc.registry.locate-add.<hub>: the publishing hub's word, before it answers ITI-65, that it
    now holds documents for a patient; the same upsert as the DocumentPublished event that follows,
    so either may come first."""

    async def add(published: DocumentPublished) -> LocateReply:
        async with runtime.db.transaction() as session:
            await _seen(session, published)  # an upsert: the event may have inserted it meanwhile
        return LocateReply(hubs=[published.hub])

    async def verify_add(asker: str | None, published: DocumentPublished) -> None:
        # As the event consumer checks a fact: the asking hub is the hub it names and the hub of the
        # author institution (a hub's NATS user can set the subject's last token only to its own slug).
        try:
            validate_patient_key(published.patient_key)
        except InvalidIdentifierError as exc:
            raise RefusedMessage("invalid", "not a patient key") from exc
        if asker is None or published.hub != asker or await hub_of(published.author_institution) != asker:
            raise RefusedMessage("sender-mismatch", "a locator entry declared by a hub not the author's")

    adds = contract.RPCS[contract.Operation.REGISTRY_LOCATE_ADD].pattern()
    await runtime.bus.serve(adds, "registry", DocumentPublished, add, verify=verify_add)


async def start(runtime: Runtime, directory: DirectoryIndex) -> None:
    async def on_event(incoming: Incoming) -> None:
        # Chosen by subject; the Bus checked that the publishing hub is the hub the fact names.
        async with runtime.db.transaction() as session:
            if not await first_time(session, PLATFORM.processed, CONSUMER, incoming.envelope.id):
                return
            match incoming.payload:
                case DocumentPublished() as published:
                    await repository.seen(
                        session, published.patient_key, published.hub, published.published_at
                    )
                case ExchangeSent() as sent:
                    await repository.seen(session, sent.patient_key, sent.to_hub, sent.sent_at)
                    await repository.count_exchange(session, sent.sent_at, sent.kind.value)

    async def locate(request: LocateRequest) -> LocateReply:
        try:
            key = validate_patient_key(request.patient_key)
        except InvalidIdentifierError:
            return LocateReply(hubs=[])
        async with runtime.db.read_sessions() as session:
            hubs = await repository.hubs_for(session, key)
        return LocateReply(hubs=hubs, behind=not await caught_up())

    async def caught_up() -> bool:
        """Whether the locator's consumer has taken in every fact in the stream (else: say so)."""
        try:
            info = await runtime.bus.js.consumer_info(consumer.stream.name, consumer.name())
        except Exception:  # unknown is reported as behind, never as complete
            return False
        return not (info.num_pending or info.num_ack_pending)

    async def hub_of(code: str) -> str | None:
        """The registry is the directory: it answers from its own snapshot of it (every institution,
        whatever its state; rebuilt after each change it commits), not over HTTP, nor with a query
        for each fact a hub sends."""
        entry = (await directory.snapshot()).by_code.get(code)
        return entry.hub if entry is not None else None

    consumer = contract.durable(contract.Role.REGISTRY, streams.EXCHANGE)
    runtime.bus.consume_kinds(
        consumer.name(),
        consumer,
        consumer.filter(),
        dict.fromkeys(consumer.kinds, on_event),
        hub_of,
        one_transaction=runtime.db,  # the locator's facts write only to the database
    )
    await runtime.bus.serve(subjects.REGISTRY_LOCATE, "registry", LocateRequest, locate)
    await _serve_adds(runtime, hub_of)
