"""Issue 12, point 1, for images: a study delivered in a patient-requested or emergency exchange of a
record older than the consent is found and read by the recipient for the exchange's purpose (as the
exchanged documents are), and audited so. Real hub nodes, registry and nats-server (SQLite and
PostgreSQL); the gateway's StudyProgress is published on the hubs' nats-server as its outbox would."""

from __future__ import annotations

from typing import Any

import pytest
from hub_support import SEVERANCE_CLINIC, SNUBH, Federation, located, matches, submit
from test_exchange_purpose import WHY, consent_after_the_record, purpose
from test_imaging_studies import by_uid, find, findable, gateway, new_study, report

from hie_platform.bus import Bus
from hie_schemas.codes import DocumentType
from hie_schemas.contract import Kind, subject
from hie_schemas.envelope import Envelope
from hie_schemas.events import ExchangeSent

__all__ = ["gateway"]  # the fixture, used by name


async def audit_of(fed: Federation, rrn: str, study_id: str) -> list[dict[str, Any]]:
    key = fed.desk.key(rrn)
    return [
        r["record"]
        for r in await fed.hubs["snubh"].rows("audit_log")
        if r["record"]["patient_key"] == key
        and r["record"]["action"].startswith("imaging.")
        and study_id in r["record"]["detail"].get("imaging_studies", [])
    ]


@pytest.mark.parametrize(("code", "justification"), [("patient-request", None), ("emergency", WHY)])
async def test_the_recipient_opens_a_study_of_an_exchange_for_its_purpose(
    federation: Federation, gateway: Bus, rrn: str, code: str, justification: str | None
) -> None:
    fed = federation
    created = consent_after_the_record(fed, rrn)
    ct = new_study("CT-PURPOSE-1")
    body = submit(
        DocumentType.REFERRAL,
        SEVERANCE_CLINIC,
        rrn,
        [SNUBH],
        created_at=created,
        studies=(ct,),
        extensions=purpose(code, justification),
    )
    published = await fed.publish("severance", SEVERANCE_CLINIC, body)
    [task_id] = located(published, "Task")
    task = await fed.task_arrives("snubh", SNUBH, task_id, "received")
    exchange_id = str(task["identifier"][0]["value"]).removeprefix("urn:uuid:")

    await report(gateway, "snubh", ct, exchange_id, 3)
    # Before: decided as treatment, deny-not-covered-at-creation, never found.
    study = await findable(fed, "snubh", SNUBH, rrn, ct, 3)
    read = await fed.call("GET", "snubh", f"/ImagingStudy/{study['id']}", as_=SNUBH)
    assert read.status_code == 200, read.text
    assert [s["id"] for s in matches(await find(fed, "snubh", SNUBH, rrn, **by_uid(ct)))] == [study["id"]]

    records = await audit_of(fed, rrn, study["id"])
    assert {r["action"] for r in records} == {"imaging.search", "imaging.read"}
    assert {r["purpose"] for r in records} == {code}
    [reading] = [r for r in records if r["action"] == "imaging.read"]
    assert (reading["outcome"], reading["rule"]) == ("success", f"permit-{code}")
    if justification is not None:
        assert all(r["detail"]["flagged"] and r["detail"]["justification"] == WHY for r in records)
    else:
        assert not any("flagged" in r["detail"] for r in records)

    # The holder's hub told the gateways the exchange's purpose and justification (ExchangeSent).
    sent = [
        Envelope.from_bytes(r["payload"]).payload(ExchangeSent)
        for r in await fed.hubs["severance"].rows("outbox")
        if r["subject"] == subject(Kind.EXCHANGE_SENT, sender="severance")
    ]
    [exchange] = [e for e in sent if e.exchange_id == exchange_id]
    assert (exchange.purpose.value, exchange.justification) == (code, justification)
