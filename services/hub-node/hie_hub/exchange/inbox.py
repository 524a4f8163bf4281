"""This hub's inbox (hie.hub.<hub>.inbox.<kind>.<sending hub>): deliveries of referrals/returns, Task
and document status notices.

The handler is chosen by the subject's kind (hie_schemas.contract), never by the envelope's word; the
Bus refuses an envelope of another type and a sender that is not the hub of the institution the
message claims (counted in hie_bus_refused_messages_total). The durable consumer is idempotent: each
event is applied once (processed_events in the same transaction), and whatever it emits goes through
the outbox of that transaction.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from hie_hub.documents import lifecycle
from hie_hub.documents import repository as documents_repo
from hie_hub.documents.schemas import read_metadata, scrub_rrn
from hie_hub.exchange import repository
from hie_hub.models import DocumentStatus, Origin, Task
from hie_hub.node import HubNode
from hie_hub.subscriptions.service import task_changed
from hie_hub.tasks import repository as tasks_repo
from hie_hub.tasks import service as tasks
from hie_hub.tasks.schemas import TaskStatus, with_status
from hie_platform.bus import Incoming, PermanentEventError, RefusedMessage, first_time
from hie_platform.logging import get_logger
from hie_schemas import contract, streams
from hie_schemas.contract import Kind, subject
from hie_schemas.events import Delivery, DocumentStatusNotice, ExchangeSent, TaskStatusNotice, TaskUpdated

log = get_logger(__name__)


class Inbox:
    """Consumes what other hubs (and this one) address to this hub."""

    def __init__(self, node: HubNode) -> None:
        self.node = node
        self.consumer = contract.durable(contract.Role.HUB, streams.HUB_INBOX)
        self.durable = self.consumer.name(node.hub)

    def start(self) -> None:
        runtime = self.node.runtime
        runtime.bus.consume_kinds(
            self.durable,
            self.consumer,
            self.consumer.filter(self.node.hub),
            {Kind.DELIVERY: self.handle, Kind.TASK_STATUS: self.handle, Kind.DOCUMENT_STATUS: self.handle},
            runtime.registry.hub_of,
            # Every effect of a message is in its transaction (long polls and webhooks are woken
            # after the commit): what one fetch brings is stored in one transaction.
            one_transaction=runtime.db,
        )

    async def handle(self, incoming: Incoming) -> None:
        runtime = self.node.runtime
        if incoming.address.to != self.node.hub:
            raise RefusedMessage("wrong-hub", "addressed to another hub")
        async with runtime.db.transaction() as session:
            if not await first_time(session, runtime.tables.processed, self.durable, incoming.envelope.id):
                return
            match incoming.payload:
                case Delivery():
                    await self._delivery(session, incoming.payload)
                case TaskStatusNotice():
                    sender = incoming.address.sender or ""
                    await tasks.apply_notice(self.node, session, incoming.payload.update, sender)
                case DocumentStatusNotice():
                    await lifecycle.apply_notice(session, incoming.payload)
                case _:
                    raise PermanentEventError(f"the hub inbox does not take {incoming.envelope.type!r}")

    async def _delivery(self, session: AsyncSession, delivery: Delivery) -> None:
        """Store the delivered documents and the Task (received), and tell the requester's hub."""
        sent = delivery.exchange
        if sent.to_hub != self.node.hub:
            raise PermanentEventError(f"delivery for hub {sent.to_hub} reached hub {self.node.hub}")
        if len(delivery.documents) != len(sent.document_ids) or sent.task_id is None:
            raise PermanentEventError("delivery does not match its exchange")
        now = datetime.now(UTC)
        await self._tell_requester(session, sent, now)
        new_task = await self._received_task(session, delivery, sent.task_id, now)
        documents = await _new_documents(session, delivery, now)
        # Like the publish path (issue 13 point 6): one INSERT per table, the events at commit.
        await repository.insert_publication(session, documents, None, [new_task] if new_task else [])
        if new_task is not None:
            await task_changed(self.node, session, Task(**new_task))
        await self.node.audit.record(
            session,
            action="exchange.receive",
            actor=None,
            outcome="success",
            patient_key=sent.patient_key,
            document_ids=list(sent.document_ids),
            purpose=sent.purpose.value,
            consent_version=sent.consent_version,
            detail={
                "exchange_id": sent.exchange_id,
                "task_id": sent.task_id,
                "from_institution": sent.from_institution,
                "from_hub": sent.from_hub,
                "to_institution": sent.to_institution,
            },
        )
        log.info("delivery stored", exchange_id=sent.exchange_id, documents=len(sent.document_ids))

    async def _received_task(
        self, session: AsyncSession, delivery: Delivery, task_id: str, now: datetime
    ) -> dict[str, Any] | None:
        """The owner's copy of the Task (received) as a row to insert; None when this hub holds it
        already (the requester's own copy when the recipient belongs to this hub too: moved on)."""
        sent = delivery.exchange
        task = await tasks_repo.task(session, task_id)
        if task is None:
            return {
                "id": task_id,
                "exchange_id": sent.exchange_id,
                "status": TaskStatus.RECEIVED.value,
                "requester": sent.from_institution,
                "requester_hub": sent.from_hub,
                "owner": sent.to_institution,
                "owner_hub": sent.to_hub,
                "patient_key": sent.patient_key,
                "focus": list(sent.document_ids),
                "task": with_status(delivery.task, TaskStatus.RECEIVED, [], now),
                "updated_at": now,
                "version": 1,
            }
        if TaskStatus(task.status).rank < TaskStatus.RECEIVED.rank:
            task.status, task.updated_at = TaskStatus.RECEIVED.value, now
            task.task = with_status(task.task, TaskStatus.RECEIVED, [], now)
            await task_changed(self.node, session, task)
        return None

    async def _tell_requester(self, session: AsyncSession, sent: ExchangeSent, now: datetime) -> None:
        """TaskStatusNotice to the requester's hub and TaskUpdated for this hub (written at commit)."""
        update = TaskUpdated(
            task_id=str(sent.task_id),
            exchange_id=sent.exchange_id,
            status=TaskStatus.RECEIVED.value,
            by_institution=sent.to_institution,
            patient_key=sent.patient_key,
            updated_at=now,
        )
        outbox = self.node.outbox
        notice = subject(Kind.TASK_STATUS, to=sent.from_hub, sender=self.node.hub)
        await outbox.add(session, notice, TaskStatusNotice(update=update), defer=True)
        await outbox.add(session, subject(Kind.TASK_UPDATED, sender=self.node.hub), update, defer=True)


async def _new_documents(session: AsyncSession, delivery: Delivery, now: datetime) -> list[dict[str, Any]]:
    """Rows of the delivered documents this hub does not hold yet; one already here (sent before, or
    published at this very hub) is only addressed anew."""
    sent = delivery.exchange
    held = await documents_repo.documents_by_id(session, sent.document_ids)
    rows: list[dict[str, Any]] = []
    for doc_id, doc_type, delivered in zip(
        sent.document_ids, sent.document_types, delivery.documents, strict=True
    ):
        if doc_id in held:
            documents_repo.add_recipients(held[doc_id], [sent.to_institution])
            continue
        department, created_at = read_metadata(delivered.document_reference)
        rows.append(
            {
                "document_id": doc_id,
                "author_institution": sent.from_institution,
                "author_department": department,
                "patient_key": sent.patient_key,
                "document_type": doc_type.value,
                "created_at": created_at or sent.document_created_at,
                "status": DocumentStatus.CURRENT.value,
                "docref": scrub_rrn(delivered.document_reference, sent.patient_key),
                "bundle": scrub_rrn(delivered.document, sent.patient_key),
                "recipients": [sent.to_institution],
                "origin": Origin.DELIVERED.value,
                "exchange_id": sent.exchange_id,
                "published_at": now,
                "version": 1,
            }
        )
    return rows
