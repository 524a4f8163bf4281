"""Issue 12 point 5: the hub believes neither an envelope's type nor its claimed sender.

The handler is chosen by the subject's kind; an envelope of another type is refused; the subject's
last token names the sending hub, which must be the hub of the institution the message claims. Each
refusal is terminated (no redelivery) and counted in hie_bus_refused_messages_total{kind,reason}.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest
from hub_support import SEVERANCE_CLINIC, SNUBH, Federation
from test_exchange import refer

from hie_platform.bus import BUS_METRICS, Bus
from hie_platform.errors import RpcError
from hie_schemas.contract import RPCS, Kind, Operation, subject
from hie_schemas.envelope import Envelope, Source
from hie_schemas.events import DocumentStatusNotice, HubSearchReply, HubSearchRequest

ATTACKER = Source(service="hub-node", node="hub-cnuh-forger")


def refusals(kind: Kind, reason: str) -> float:
    return refusals_of(kind.value, reason)


async def refused(kind: Kind, reason: str, before: float) -> None:
    """Wait until the consumer has refused one more ``kind`` for ``reason`` (a deadline, no sleep)."""
    deadline = asyncio.get_running_loop().time() + 20
    while refusals(kind, reason) <= before:
        assert asyncio.get_running_loop().time() < deadline, f"no {kind.value} refused for {reason}"
        await asyncio.sleep(0.05)


async def status_at(fed: Federation, hub: str, doc_id: str) -> str:
    [row] = [r for r in await fed.hubs[hub].rows("documents") if r["document_id"] == doc_id]
    return str(row["status"])


def forged_notice(doc_id: str, key: str) -> Envelope:
    notice = DocumentStatusNotice(
        document_ids=[doc_id],
        status="entered-in-error",
        by_institution=SEVERANCE_CLINIC,  # the real author: the notice claims to come from it
        patient_key=key,
        changed_at=datetime.now(UTC),
    )
    return Envelope.wrap(notice, ATTACKER, event_id=str(uuid.uuid4()))


async def test_a_forged_document_status_notice_is_refused_and_counted(
    federation: Federation, rrn: str
) -> None:
    fed = federation
    fed.desk.grant(rrn)
    key = fed.desk.key(rrn)
    _, doc_id, task_id = await refer(fed, rrn)
    await fed.task_arrives("snubh", SNUBH, task_id, "received")
    assert await status_at(fed, "snubh", doc_id) == "current"

    bus = await Bus.connect(fed.hubs["snubh"].settings.nats_url, name="test-forger")
    try:
        # Another hub (cnuh) speaks for severance's clinic: the subject names cnuh as the sender.
        before = refusals(Kind.DOCUMENT_STATUS, "sender-mismatch")
        forged = subject(Kind.DOCUMENT_STATUS, to="snubh", sender="cnuh")
        await bus.publish(forged, forged_notice(doc_id, key))
        await refused(Kind.DOCUMENT_STATUS, "sender-mismatch", before)
        # The attack shown live: the notice on the delivery subject, which the hub once dispatched
        # on the envelope's type. Now a delivery subject takes deliveries only.
        before = refusals(Kind.DELIVERY, "type-mismatch")
        await bus.publish(subject(Kind.DELIVERY, to="snubh", sender="severance"), forged_notice(doc_id, key))
        await refused(Kind.DELIVERY, "type-mismatch", before)
    finally:
        await bus.close()
    assert await status_at(fed, "snubh", doc_id) == "current"
    logged = [line for line in fed.log.lines if "message refused" in line]
    assert logged, "a refusal is logged"
    assert not any(key in line for line in logged), "a refusal's log line carries no patient key"


async def test_a_federated_search_for_another_hubs_institution_is_refused(
    federation: Federation, rrn: str
) -> None:
    """A hub asks only for its own institutions: severance asking snubh's holder as snubh's own
    hospital (to read what snubh addressed to it) is refused before anything is read."""
    fed = federation
    fed.desk.grant(rrn)
    key = fed.desk.key(rrn)
    search = RPCS[Operation.HUB_SEARCH]
    bus = await Bus.connect(fed.hubs["snubh"].settings.nats_url, name="test-asker")
    try:
        honest = HubSearchRequest(patient_key=key, requester=SEVERANCE_CLINIC, requester_hub="severance")
        reply = await bus.request(search.subject(to="snubh", sender="severance"), honest, HubSearchReply)
        assert reply.outcome == "ok"
        before = refusals_of(Operation.HUB_SEARCH.value, "sender-mismatch")
        forged = HubSearchRequest(patient_key=key, requester=SNUBH, requester_hub="severance")
        with pytest.raises(RpcError, match="refused: sender-mismatch"):
            await bus.request(search.subject(to="snubh", sender="severance"), forged, HubSearchReply)
        spoofed = honest.model_copy(update={"requester_hub": "snubh"})  # the subject still says severance
        with pytest.raises(RpcError, match="refused: sender-mismatch"):
            await bus.request(search.subject(to="snubh", sender="severance"), spoofed, HubSearchReply)
        assert refusals_of(Operation.HUB_SEARCH.value, "sender-mismatch") == before + 2
    finally:
        await bus.close()


def refusals_of(kind: str, reason: str) -> float:
    value = BUS_METRICS.get_sample_value("hie_bus_refused_messages_total", {"kind": kind, "reason": reason})
    return value or 0.0
