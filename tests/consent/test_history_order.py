"""An exchange's history does not depend on which of its events reaches the consent service first.

The ExchangeSent fact comes from the sending hub and the 'received' TaskUpdated from the receiving
hub; the exchange stream orders them only by arrival. Both orders must give the same history.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import nats
import pytest
from consent_helpers import SNUBH_HUB, ConsentService, eventually, new_rrn
from test_exchange_history import HUB, history, sent

from hie_platform.bus import Bus
from hie_schemas.contract import Kind, subject
from hie_schemas.envelope import Envelope
from hie_schemas.events import ExchangeKind, TaskUpdated
from hie_schemas.identifiers import PATIENT_KEY_SYSTEM


@pytest.mark.parametrize("first", ["sent", "received"])
async def test_a_status_line_names_its_exchange_whichever_event_came_first(
    consent_service: ConsentService, first: str
) -> None:
    key = consent_service.patient_key(new_rrn())
    at = datetime.now(UTC) - timedelta(minutes=5)
    exchange = sent(key, at).model_copy(update={"kind": ExchangeKind.RETURN})
    received = TaskUpdated(
        task_id=exchange.task_id or "task-1",
        exchange_id=exchange.exchange_id,
        status="received",
        by_institution=SNUBH_HUB,
        patient_key=key,
        updated_at=at + timedelta(seconds=1),
    )
    events = [
        (subject(Kind.EXCHANGE_SENT, sender=exchange.from_hub), Envelope.wrap(exchange, HUB)),
        (subject(Kind.TASK_UPDATED, sender=exchange.to_hub), Envelope.wrap(received, HUB)),
    ]
    if first == "received":
        events.reverse()
    nc = await nats.connect(consent_service.nats_url)
    try:
        bus = Bus(nc)
        for where, envelope in events:
            await bus.publish(where, envelope)
    finally:
        await nc.close()

    async def both_shown() -> list[dict[str, Any]] | None:
        response = await history(consent_service, f"{PATIENT_KEY_SYSTEM}|{key}")
        entries: list[dict[str, Any]] = response.json()
        return entries if len(entries) == 2 else None

    entries = await eventually(both_shown, "both events in the patient's history")
    assert [e["status"] for e in entries] == ["received", "sent"]  # newest first
    for entry in entries:
        assert entry["exchange_id"] == exchange.exchange_id
        assert entry["kind"] == "return"
        assert entry["from_institution"] == exchange.from_institution
        assert entry["to_institution"] == exchange.to_institution
        assert entry["document_types"] == ["referral", "care-record-summary"]
        assert entry["purpose"] == "treatment"
