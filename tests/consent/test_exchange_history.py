"""The patient's exchange history, fed by the exchange stream through a durable, idempotent consumer."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import nats
from consent_helpers import (
    SEVERANCE_CLINIC,
    SEVERANCE_HUB,
    SNUBH_HUB,
    ConsentService,
    eventually,
    new_rrn,
)

from hie_platform.bus import Bus
from hie_schemas.codes import DocumentType
from hie_schemas.contract import Kind, subject
from hie_schemas.envelope import Envelope, Source
from hie_schemas.events import ExchangeKind, ExchangeSent, TaskUpdated
from hie_schemas.identifiers import PATIENT_KEY_SYSTEM, RRN_SYSTEM

HUB = Source(service="hub", node="test-severance")
SENT = subject(Kind.EXCHANGE_SENT, sender="severance")  # sent() is severance's


def sent(patient_key: str, at: datetime) -> ExchangeSent:
    return ExchangeSent(
        exchange_id=f"ex-{uuid.uuid4().hex[:12]}",
        kind=ExchangeKind.REFERRAL,
        task_id="task-1",
        from_institution=SEVERANCE_HUB,
        from_hub="severance",
        to_institution=SNUBH_HUB,
        to_hub="snubh",
        patient_key=patient_key,
        document_ids=["doc-1"],
        document_types=[DocumentType.REFERRAL, DocumentType.CARE_RECORD_SUMMARY],
        document_created_at=at,
        sent_at=at,
    )


async def history(service: ConsentService, identifier: str, client_id: str = "agency") -> httpx.Response:
    async with httpx.AsyncClient(base_url=service.url) as http:
        return await http.get(
            "/exchange-history",
            params={"patient.identifier": identifier},
            headers=await service.headers(client_id),
        )


async def test_sent_exchange_appears_in_the_patients_history(consent_service: ConsentService) -> None:
    rrn = new_rrn()
    key = consent_service.patient_key(rrn)
    event = sent(key, datetime.now(UTC))
    nc = await nats.connect(consent_service.nats_url)
    try:
        await Bus(nc).publish(SENT, Envelope.wrap(event, HUB))
    finally:
        await nc.close()

    async def shown() -> list[dict[str, Any]] | None:
        response = await history(consent_service, f"{RRN_SYSTEM}|{rrn}")
        assert response.status_code == 200
        entries: list[dict[str, Any]] = response.json()
        return entries or None

    entries = await eventually(shown, "the exchange in the patient's history")
    assert entries == [
        {
            "exchange_id": event.exchange_id,
            "kind": "referral",
            "from_institution": SEVERANCE_HUB,
            "to_institution": SNUBH_HUB,
            "document_types": ["referral", "care-record-summary"],
            "occurred_at": entries[0]["occurred_at"],
            "status": "sent",
            "purpose": "treatment",
        }
    ]
    assert datetime.fromisoformat(entries[0]["occurred_at"]) == event.sent_at
    assert rrn not in str(entries)
    refused = await history(consent_service, f"{PATIENT_KEY_SYSTEM}|{key}", client_id=SEVERANCE_CLINIC)
    assert refused.status_code == 403


async def test_a_redelivered_event_is_stored_once(consent_service: ConsentService) -> None:
    key = consent_service.patient_key(new_rrn())
    at = datetime.now(UTC) - timedelta(minutes=5)
    envelope = Envelope.wrap(sent(key, at), HUB)
    exchange_id = envelope.data["exchange_id"]
    accepted = TaskUpdated(
        task_id="task-1",
        exchange_id=exchange_id,
        status="accepted",
        by_institution=SNUBH_HUB,
        patient_key=key,
        updated_at=at + timedelta(minutes=1),
    )
    nc = await nats.connect(consent_service.nats_url)
    try:
        bus = Bus(nc)
        await bus.publish(SENT, envelope)
        await bus.publish(SENT, envelope)  # same Nats-Msg-Id: JetStream drops it
        # A publisher that lost its Nats-Msg-Id: only the consumer's own bookkeeping can catch this one.
        await bus.publish_raw(SENT, envelope.to_bytes(), f"{envelope.id}-retry", None)
        # The stream is consumed in order, so once the status line shows, both copies have been handled.
        await bus.publish(subject(Kind.TASK_UPDATED, sender="snubh"), Envelope.wrap(accepted, HUB))
    finally:
        await nc.close()

    async def status_shown() -> list[dict[str, Any]] | None:
        entries: list[dict[str, Any]] = (await history(consent_service, f"{PATIENT_KEY_SYSTEM}|{key}")).json()
        return entries if any(e["status"] == "accepted" for e in entries) else None

    entries = await eventually(status_shown, "the task status in the patient's history")
    assert [(e["exchange_id"], e["status"]) for e in entries] == [
        (exchange_id, "accepted"),
        (exchange_id, "sent"),
    ]
    assert entries[0]["kind"] == "referral"  # a status line repeats what the exchange was
    assert entries[0]["from_institution"] == SEVERANCE_HUB
    rows = [r for r in await consent_service.rows("exchange_history") if r["exchange_id"] == exchange_id]
    assert len(rows) == 2


async def test_an_exchange_another_hub_publishes_for_severance_is_not_in_the_history(
    consent_service: ConsentService,
) -> None:
    """Issue 12 point 5: the history believes the sending hub of the subject, not the payload."""
    rrn = new_rrn()
    key = consent_service.patient_key(rrn)
    now = datetime.now(UTC)
    forged, honest = sent(key, now), sent(key, now + timedelta(seconds=1))
    nc = await nats.connect(consent_service.nats_url)
    try:
        bus = Bus(nc)
        await bus.publish(subject(Kind.EXCHANGE_SENT, sender="cnuh"), Envelope.wrap(forged, HUB))
        await bus.publish(SENT, Envelope.wrap(honest, HUB))  # behind it on the stream
    finally:
        await nc.close()

    async def shown() -> list[dict[str, Any]] | None:
        response = await history(consent_service, f"{RRN_SYSTEM}|{rrn}")
        entries: list[dict[str, Any]] = response.json()
        return entries or None

    entries = await eventually(shown, "the honest exchange in the patient's history")
    assert [e["exchange_id"] for e in entries] == [honest.exchange_id]
