"""Issue 12 point 5, for the patient's access history: what the consent service records there is bound
to the hub that sent it. An audit record is kept only from the hub its subject names and that wrote
it (AuditRecorded.hub), for an access by that hub's institutions (or one it answered for another
hub); an emergency decision is answered, and its permit recorded, only for the data holder's hub
(hie.rpc.consent.decide.<hub>). A hub's NATS user cannot use another hub's token at all
(tests/attacks/test_nats_subjects.py). The real consent service, registry, nats-server and database
(SQLite and PostgreSQL)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import nats
import pytest
from consent_helpers import (
    SEVERANCE_CLINIC,
    SEVERANCE_HUB,
    SNUBH_HUB,
    ConsentService,
    eventually,
    flow,
    new_rrn,
)

from hie_platform.bus import Bus
from hie_platform.errors import RpcError
from hie_schemas import subjects
from hie_schemas.contract import Kind, subject
from hie_schemas.envelope import Envelope, Source
from hie_schemas.events import AuditRecorded, DecisionReply, DecisionRequest

SNUBH = Source(service="hub-node", node="test-snubh")
WHY = "의식 없는 응급환자, 보호자 없음 (unconscious, no guardian)"


def record(key: str, *, hub: str | None, actor: str, action: str = "document.retrieve") -> AuditRecorded:
    return AuditRecorded(
        node="test-snubh",
        hub=hub,
        sequence=1,
        hash=uuid.uuid4().hex * 2,
        action=action,
        actor_institution=actor,
        patient_key=key,
        document_ids=[f"doc-{uuid.uuid4().hex[:8]}"],
        purpose="treatment",
        outcome="success",
        rule="permit-consent",
        consent_version=1,
        recorded_at=datetime.now(UTC),
    )


async def refused(service: ConsentService) -> float:
    """hie_bus_refused_messages_total of audit records refused for their sender, at the service."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{service.url}/metrics")).text
    wanted = 'hie_bus_refused_messages_total{kind="audit-recorded",reason="sender-mismatch"} '
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(wanted))


async def accesses(service: ConsentService, key: str) -> list[dict[str, Any]]:
    return [r for r in await service.rows("access_history") if r["patient_key"] == key]


async def test_an_audit_record_is_kept_only_from_the_hub_that_wrote_it(
    consent_service: ConsentService,
) -> None:
    service = consent_service
    key = service.patient_key(new_rrn())
    on_snubh = subject(Kind.AUDIT_RECORDED, sender="snubh")
    forged = {
        # snubh's subject, claiming severance wrote it (its chain, its node)
        "another hub's record": record(key, hub="severance", actor=SNUBH_HUB),
        # snubh's own record, of a read by severance's institution at snubh
        "another hub's institution": record(key, hub="snubh", actor=SEVERANCE_CLINIC),
        # a record that names no writer (as published before records were bound to their sender)
        "no writer": record(key, hub=None, actor=SNUBH_HUB),
    }
    genuine = [
        record(key, hub="snubh", actor=SNUBH_HUB),
        # snubh answered severance's federated retrieve: the asker is severance's institution
        record(key, hub="snubh", actor=SEVERANCE_CLINIC, action="federated.retrieve"),
    ]
    refused_before = await refused(service)
    bus = await Bus.connect(service.nats_url, name="test-audit-senders")
    try:
        for event in [*forged.values(), *genuine]:
            await bus.publish(on_snubh, Envelope.wrap(event, SNUBH))
    finally:
        await bus.close()

    wanted = {tuple(r.document_ids) for r in genuine}

    async def kept() -> list[dict[str, Any]] | None:
        rows = await accesses(service, key)
        return rows if {tuple(r["document_ids"]) for r in rows} >= wanted else None

    # The genuine ones were published after the forged ones, on the same subject (in order).
    rows = await eventually(kept, "snubh's genuine audit records in the history")
    assert sorted(tuple(r["document_ids"]) for r in rows) == sorted(wanted)

    async def all_refused() -> bool:
        return await refused(service) - refused_before >= len(forged)

    # The consumer reads in order, so the forged ones were handled first: refused (counted; the
    # stream may also replay earlier tests' forgeries to this test's new durable), never kept.
    await eventually(all_refused, "the forged audit records refused")


async def test_an_emergency_decision_is_answered_only_to_the_holders_hub(
    consent_service: ConsentService,
) -> None:
    service = consent_service
    key = service.patient_key(new_rrn())  # no consent on record: only an emergency permits
    query = flow(key, SEVERANCE_HUB, SNUBH_HUB, purpose="emergency", justification=WHY)
    nc = await nats.connect(service.nats_url)
    try:
        bus = Bus(nc)
        # snubh asks about severance's records, as if severance disclosed them: refused.
        with pytest.raises(RpcError):
            await bus.request(subjects.consent_decide("snubh"), DecisionRequest(query=query), DecisionReply)
        # The holder's hub asks: permitted, and shown to the patient.
        reply = await bus.request(
            subjects.consent_decide("severance"), DecisionRequest(query=query), DecisionReply, timeout=5
        )
    finally:
        await nc.close()
    assert (reply.decision.permit, reply.decision.rule) == (True, "permit-emergency")

    async def permitted() -> list[dict[str, Any]] | None:
        rows = [r for r in await accesses(service, key) if r["action"] == "emergency-access-permitted"]
        return rows or None

    # The permit of the holder's request came after the refusal: one entry, the holder's.
    [entry] = await eventually(permitted, "the emergency permit in the patient's history")
    assert (entry["institution"], entry["flagged"], entry["justification"]) == (SNUBH_HUB, True, WHY)
    decides = [
        r["record"]
        for r in await service.rows("audit_log")
        if r["record"]["action"] == "decide" and r["record"]["patient_key"] == key
    ]
    assert len(decides) == 1  # the refused request was not decided
