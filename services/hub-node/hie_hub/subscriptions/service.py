"""Telling institutions that a Task changed: webhook deliveries written in the Task's transaction
(outbox-like, sent by hie_hub.subscriptions.webhooks) and a wake-up for long polls, both after commit.

Notifications follow the FHIR R4 Subscriptions Backport: a ``history`` Bundle whose first entry is
the SubscriptionStatus (a Parameters resource in R4) and whose second is the Task (full-resource) or
only its reference (id-only).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from hie_hub.models import Subscription, Task, WebhookDelivery
from hie_hub.node import HubNode
from hie_hub.subscriptions import repository
from hie_hub.subscriptions.repository import PENDING

TOPIC = "https://hie-federation.kr/fhir/SubscriptionTopic/task-inbox"
BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
STATUS_PROFILE = f"{BACKPORT}/backport-subscription-status-r4"
ACTIVE, ERROR, OFF = "active", "error", "off"


def after_commit(session: AsyncSession, callback: Any) -> None:
    """Run ``callback()`` once the session's transaction has committed (never on rollback)."""
    key = ("hie-after-commit", id(callback))
    if session.info.get(key):
        return
    session.info[key] = True

    def fire(_session: Session) -> None:
        session.info.pop(key, None)
        callback()

    event.listen(session.sync_session, "after_commit", fire, once=True)


async def task_changed(node: HubNode, session: AsyncSession, task: Task) -> None:
    """A Task was created or moved at this hub: queue a notification for each institution that
    subscribed to it (as owner or as requester), and wake long polls once committed."""
    after_commit(session, node.tasks_changed.notify)
    subscriptions = await repository.subscribed(session, (ACTIVE, ERROR), [task.owner, task.requester])
    now = datetime.now(UTC)
    for subscription in subscriptions:
        party = task.owner if subscription.role == "owner" else task.requester
        if party != subscription.institution:
            continue
        number = await repository.next_event_number(session, subscription.id)
        session.add(
            WebhookDelivery(
                subscription_id=subscription.id,
                event_number=number,
                payload=notification(node.settings.fhir_base, subscription, task.task, number, now),
                created_at=now,
                next_attempt_at=now,
                attempts=0,
                state=PENDING,
            )
        )
        after_commit(session, node.webhooks_due.notify)


def status_parameters(
    base: str, subscription: Subscription, kind: str, events: int, notification_events: list[Any]
) -> dict[str, Any]:
    """The SubscriptionStatus of the backport (R4: Parameters with the backport profile)."""
    parameters: list[dict[str, Any]] = [
        {"name": "subscription", "valueReference": {"reference": f"{base}/Subscription/{subscription.id}"}},
        {"name": "topic", "valueCanonical": TOPIC},
        {"name": "status", "valueCode": subscription.status},
        {"name": "type", "valueCode": kind},
        {"name": "events-since-subscription-start", "valueString": str(events)},
    ]
    parameters += [{"name": "notification-event", "part": part} for part in notification_events]
    return {
        "resourceType": "Parameters",
        "id": str(uuid.uuid4()),
        "meta": {"profile": [STATUS_PROFILE]},
        "parameter": parameters,
    }


def notification(
    base: str, subscription: Subscription, task: dict[str, Any], number: int, at: datetime
) -> dict[str, Any]:
    """The notification Bundle (type history) for one Task change."""
    focus = f"{base}/Task/{task['id']}"
    event_part = [
        {"name": "event-number", "valueString": str(number)},
        {"name": "timestamp", "valueInstant": at.isoformat()},
        {"name": "focus", "valueReference": {"reference": focus}},
    ]
    status = status_parameters(base, subscription, "event-notification", number, [event_part])
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": f"urn:uuid:{status['id']}",
            "resource": status,
            "request": {"method": "GET", "url": f"{base}/Subscription/{subscription.id}/$status"},
            "response": {"status": "200"},
        }
    ]
    if subscription.content != "empty":
        entry = {
            "fullUrl": focus,
            "request": {"method": "PUT", "url": f"Task/{task['id']}"},
            "response": {"status": "200"},
        }
        entries.append(entry | ({"resource": task} if subscription.content == "full-resource" else {}))
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "history",
        "timestamp": at.isoformat(),
        "entry": entries,
    }
