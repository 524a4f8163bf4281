"""The record locator and statistics, fed by hub events over real JetStream."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from hie_platform.bus import BUS_METRICS, Bus
from hie_platform.errors import RpcError
from hie_schemas import subjects
from hie_schemas.contract import Kind, Operation, rpc_subject, subject
from hie_schemas.envelope import Envelope, Source
from hie_schemas.events import DocumentPublished, ExchangeKind, ExchangeSent, LocateReply, LocateRequest

HUB = Source(service="hub", node="test")


async def publish(bus: Bus, subject: str, env: Envelope, msg_id: str | None = None) -> None:
    await bus.js.publish(subject, env.to_bytes(), headers={"Nats-Msg-Id": msg_id or env.id})


async def test_locator_learns_hubs_from_events_and_counts_exchanges_once(
    registry: Any, nats_url: str, unique: str
) -> None:
    key = hashlib.sha256(unique.encode()).hexdigest()
    now = datetime.now(UTC)
    bus = await Bus.connect(nats_url, "locator-test")
    try:
        published = Envelope.wrap(
            DocumentPublished(
                hub="severance",
                patient_key=key,
                author_institution="11301001",
                document_ids=["d1"],
                document_types=["care-record-summary"],
                published_at=now,
            ),
            HUB,
        )
        sent = Envelope.wrap(
            ExchangeSent(
                exchange_id=unique,
                kind=ExchangeKind.REFERRAL,
                from_institution="11301001",
                from_hub="severance",
                to_institution="31100002",
                to_hub="snubh",
                patient_key=key,
                document_ids=["d2"],
                document_types=["referral"],
                document_created_at=now,
                sent_at=now,
            ),
            HUB,
        )
        agency = {"Authorization": f"Bearer {await registry.token('agency')}"}
        clinic = {"Authorization": f"Bearer {await registry.token('11301001')}"}
        async with httpx.AsyncClient() as http:
            before = (await http.get(f"{registry.url}/statistics", headers=agency)).json()
            await publish(bus, subject(Kind.DOCUMENT_PUBLISHED, sender="severance"), published)
            await publish(bus, subject(Kind.EXCHANGE_SENT, sender="severance"), sent)
            again = sent.id + "-again"  # a redelivered copy
            await publish(bus, subject(Kind.EXCHANGE_SENT, sender="severance"), sent, msg_id=again)

            deadline = asyncio.get_running_loop().time() + 10
            while True:
                found = (
                    await http.get(f"{registry.url}/locator", params={"patient_key": key}, headers=clinic)
                ).json()
                if found["hubs"] == ["severance", "snubh"]:
                    break
                assert asyncio.get_running_loop().time() < deadline, found
                await asyncio.sleep(0.05)
            # Let the consumer drain (the redelivered copy included) before reading the counts.
            while True:
                info = await bus.js.consumer_info("HIE_EXCHANGE", "registry-locator")
                if info.num_pending == 0 and info.num_ack_pending == 0:
                    break
                assert asyncio.get_running_loop().time() < deadline, info
                await asyncio.sleep(0.05)
            after = (await http.get(f"{registry.url}/statistics", headers=agency)).json()
            bad = await http.get(
                f"{registry.url}/locator", params={"patient_key": "9001011234567"}, headers=clinic
            )
            anonymous = await http.get(f"{registry.url}/locator", params={"patient_key": key})
            refused_stats = await http.get(f"{registry.url}/statistics", headers=clinic)
        reply = await bus.request(subjects.REGISTRY_LOCATE, LocateRequest(patient_key=key), LocateReply)
    finally:
        await bus.close()

    def referrals(stats: dict[str, Any]) -> int:
        month = now.strftime("%Y-%m")
        return sum(
            e["count"]
            for e in stats["exchanges_per_month"]
            if e["month"] == month and e["kind"] == "referral"
        )

    assert referrals(after) == referrals(before) + 1
    assert after["institutions"]["by_kind"]["hub"] >= 6
    assert reply.hubs == ["severance", "snubh"]
    assert bad.status_code == 400
    assert "9001011234567" not in bad.text
    assert anonymous.status_code == 401
    assert refused_stats.status_code == 403


async def test_the_locator_refuses_facts_a_hub_publishes_for_another_hubs_institution(
    registry: Any, nats_url: str, unique: str
) -> None:
    """Issue 12 point 5: the sending hub is the subject's last token; a fact naming an institution
    of another hub (or another hub in its own fields) is refused, counted, and never located."""
    key = hashlib.sha256(f"forged-{unique}".encode()).hexdigest()
    now = datetime.now(UTC)

    def published(hub: str, author: str) -> Envelope:
        return Envelope.wrap(
            DocumentPublished(
                hub=hub,
                patient_key=key,
                author_institution=author,
                document_ids=["d1"],
                document_types=["care-record-summary"],
                published_at=now,
            ),
            HUB,
        )

    before = BUS_METRICS.get_sample_value(
        "hie_bus_refused_messages_total", {"kind": "document-published", "reason": "sender-mismatch"}
    )
    bus = await Bus.connect(nats_url, "locator-forger")
    clinic = {"Authorization": f"Bearer {await registry.token('11301001')}"}
    try:
        # cnuh claims a document by a severance clinic; then claims to be severance in the payload.
        await publish(bus, subject(Kind.DOCUMENT_PUBLISHED, sender="cnuh"), published("cnuh", "11301001"))
        await publish(
            bus, subject(Kind.DOCUMENT_PUBLISHED, sender="cnuh"), published("severance", "11301001")
        )
        # The honest fact, behind them on the stream: once it is located, the forged ones were handled.
        await publish(
            bus, subject(Kind.DOCUMENT_PUBLISHED, sender="severance"), published("severance", "11301001")
        )
        deadline = asyncio.get_running_loop().time() + 10
        async with httpx.AsyncClient() as http:
            while True:
                found = (
                    await http.get(f"{registry.url}/locator", params={"patient_key": key}, headers=clinic)
                ).json()
                if found["hubs"]:
                    break
                assert asyncio.get_running_loop().time() < deadline, found
                await asyncio.sleep(0.05)
    finally:
        await bus.close()
    assert found["hubs"] == ["severance"]
    after = BUS_METRICS.get_sample_value(
        "hie_bus_refused_messages_total", {"kind": "document-published", "reason": "sender-mismatch"}
    )
    assert (after or 0) - (before or 0) == 2


async def test_locate_add_takes_the_authors_hub_at_once_and_refuses_any_other(
    registry: Any, nats_url: str, unique: str
) -> None:
    """Issue 14 point 7: hie.rpc.registry.locate-add.<hub> (asked by a publishing hub before it answers
    ITI-65) is located at once, with the event consumer's check: the asking hub (the subject's last
    token) must be the hub the fact names and the hub of the author institution."""
    key = hashlib.sha256(f"locate-add-{unique}".encode()).hexdigest()

    def fact(hub: str, author: str) -> DocumentPublished:
        return DocumentPublished(
            hub=hub,
            patient_key=key,
            author_institution=author,
            document_ids=["d1"],
            document_types=["care-record-summary"],
            published_at=datetime.now(UTC),
        )

    def add(asker: str) -> str:
        return rpc_subject(Operation.REGISTRY_LOCATE_ADD, sender=asker)

    bus = await Bus.connect(nats_url, "locate-add-test")
    try:
        forged = [
            (add("cnuh"), fact("cnuh", "11301001")),  # a severance clinic's document, told by cnuh
            (add("cnuh"), fact("severance", "11301001")),  # cnuh names severance in the payload
            (add("severance"), fact("severance", "not-a-code")),
        ]
        for subject_, body in forged:
            with pytest.raises(RpcError, match="refused"):
                await bus.request(subject_, body, LocateReply)
        nobody = await bus.request(subjects.REGISTRY_LOCATE, LocateRequest(patient_key=key), LocateReply)
        told = await bus.request(add("severance"), fact("severance", "11301001"), LocateReply)
        again = await bus.request(add("severance"), fact("severance", "11301001"), LocateReply)  # idempotent
        located = await bus.request(subjects.REGISTRY_LOCATE, LocateRequest(patient_key=key), LocateReply)
    finally:
        await bus.close()
    assert nobody.hubs == []
    assert told.hubs == again.hubs == ["severance"]
    assert located.hubs == ["severance"]  # no wait: the answer came after the upsert committed
