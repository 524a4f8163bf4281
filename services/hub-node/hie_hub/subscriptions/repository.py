"""The SQL of Subscriptions and their webhook deliveries (the outbox-like queue the sender works on)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from hie_hub.models import Subscription, WebhookDelivery

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


def _unclaimed(now: datetime) -> Any:
    return or_(WebhookDelivery.claimed_until.is_(None), WebhookDelivery.claimed_until < now)


# Built once: every Task created or moved asks it (subscriptions.service.task_changed), and building
# it per call was half its cost (157 vs 85 µs of CPU on SQLite) and 3-6 % of a hub's samples while it
# took referrals (py-spy).
_SUBSCRIBED = select(Subscription).where(
    Subscription.status.in_(bindparam("statuses", expanding=True)),
    Subscription.institution.in_(bindparam("institutions", expanding=True)),
)


async def subscribed(
    session: AsyncSession, statuses: Collection[str], institutions: Sequence[str]
) -> list[Subscription]:
    """The Subscriptions in ``statuses`` of any of ``institutions``."""
    params = {"statuses": list(statuses), "institutions": list(institutions)}
    return list((await session.scalars(_SUBSCRIBED, params)).all())


async def next_event_number(session: AsyncSession, subscription_id: str) -> int:
    """Count one more event of the Subscription (its eventsSinceSubscriptionStart) and return it."""
    number = await session.scalar(
        update(Subscription)
        .where(Subscription.id == subscription_id)
        .values(events=Subscription.events + 1)
        .returning(Subscription.events)
    )
    return int(number or 0)


async def set_status(session: AsyncSession, subscription_id: str, status: str) -> None:
    await session.execute(
        update(Subscription).where(Subscription.id == subscription_id).values(status=status)
    )


async def delivery(session: AsyncSession, delivery_id: int) -> WebhookDelivery | None:
    return await session.get(WebhookDelivery, delivery_id)


async def due_deliveries(session: AsyncSession, now: datetime, limit: int) -> list[int]:
    """Pending deliveries due now and claimed by no sender, oldest due first."""
    rows = await session.scalars(
        select(WebhookDelivery.id)
        .where(WebhookDelivery.state == PENDING, WebhookDelivery.next_attempt_at <= now, _unclaimed(now))
        .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
        .limit(limit)
    )
    return list(rows.all())


async def claim_delivery(session: AsyncSession, delivery_id: int, now: datetime, until: datetime) -> bool:
    """Claim a pending delivery until ``until``; False if another sender holds it or it is done."""
    result = await session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.state == PENDING, _unclaimed(now))
        .values(claimed_until=until)
    )
    return bool(getattr(result, "rowcount", 0))


async def release_claims(session: AsyncSession, delivery_ids: Collection[int]) -> None:
    """Give back the claims of pending deliveries (a sender stopped before it sent them)."""
    await session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id.in_(list(delivery_ids)), WebhookDelivery.state == PENDING)
        .values(claimed_until=None)
    )


async def record_attempt(session: AsyncSession, delivery_id: int, values: dict[str, Any]) -> None:
    """The outcome of one attempt (state, attempts, next attempt, error); the claim is released."""
    await session.execute(
        update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(claimed_until=None, **values)
    )


async def purge_deliveries(session: AsyncSession, before: datetime) -> int:
    """Forget deliveries delivered or given up before ``before``; how many were removed."""
    result = await session.execute(
        delete(WebhookDelivery).where(
            WebhookDelivery.state.in_([DELIVERED, FAILED]), WebhookDelivery.created_at < before
        )
    )
    return int(getattr(result, "rowcount", 0) or 0)


async def subscription(session: AsyncSession, subscription_id: str) -> Subscription | None:
    return await session.get(Subscription, subscription_id)


async def subscriptions_of(session: AsyncSession, institution: str) -> list[Subscription]:
    rows = await session.scalars(
        select(Subscription).where(Subscription.institution == institution).order_by(Subscription.created_at)
    )
    return list(rows.all())
