"""Referral and return between two real hubs (severance, snubh) over a real nats-server, with consent."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from hub_support import (
    SEVERANCE,
    SEVERANCE_CLINIC,
    SNUBH,
    Federation,
    eventually,
    new_rrn,
    pseudonymised,
    rrn_forms,
)

from hie_hub.core.bundles import created_tasks
from hie_platform.bus import Bus
from hie_schemas.codes import DocumentType
from hie_schemas.contract import Kind, subject
from hie_schemas.documents.builders import build_document, build_submission
from hie_schemas.fhir import parse_resource

NAMES = {SEVERANCE_CLINIC: "서울 연세가정의학과의원", SNUBH: "분당서울대학교병원", SEVERANCE: "세브란스병원"}


def document(kind: DocumentType, author: str, rrn: str, recipient: str | None) -> dict[str, Any]:
    return build_document(
        kind, author_code=author, author_name=NAMES[author], patient_rrn=rrn, recipient_code=recipient
    )


def submission(docs: list[dict[str, Any]], author: str, rrn: str, recipients: list[str]) -> dict[str, Any]:
    return build_submission(docs, author_code=author, patient_rrn=rrn, recipients=recipients)


def locations(response_body: dict[str, Any], resource_type: str) -> list[str]:
    if resource_type == "Task":  # named on the DocumentReference's entry (one entry per request entry)
        return created_tasks(response_body)
    found = [e["response"]["location"] for e in response_body["entry"]]
    return [loc.split("/")[1] for loc in found if loc.startswith(f"{resource_type}/")]


async def refer(fed: Federation, rrn: str) -> tuple[dict[str, Any], str, str]:
    """Clinic 11301001 (severance) refers the patient to SNUBH; returns (referral, document id, task id)."""
    referral = document(DocumentType.REFERRAL, SEVERANCE_CLINIC, rrn, SNUBH)
    response = await fed.publish(
        "severance", SEVERANCE_CLINIC, submission([referral], SEVERANCE_CLINIC, rrn, [SNUBH])
    )
    assert response.status_code == 200, response.text
    body = response.json()
    [doc_id], [task_id] = locations(body, "DocumentReference"), locations(body, "Task")
    return referral, doc_id, task_id


async def test_referral_is_delivered_accepted_and_returned(federation: Federation, rrn: str) -> None:
    fed = federation
    fed.desk.grant(rrn)
    key = fed.desk.key(rrn)

    referral = document(DocumentType.REFERRAL, SEVERANCE_CLINIC, rrn, SNUBH)
    published = await fed.publish(
        "severance", SEVERANCE_CLINIC, submission([referral], SEVERANCE_CLINIC, rrn, [SNUBH])
    )
    assert published.status_code == 200, published.text
    assert published.headers["content-type"].startswith("application/fhir+json")
    body = published.json()
    assert body["type"] == "transaction-response"
    assert {e["response"]["status"] for e in body["entry"]} == {"201 Created"}
    [doc_id], [task_id] = locations(body, "DocumentReference"), locations(body, "Task")
    assert locations(body, "Bundle") == [doc_id]

    # The holder asked the decision point about this very flow before sending.
    [asked] = [q for q in fed.desk.asked if q.patient_key == key]
    assert (asked.holder, asked.holder_department, asked.recipient, asked.purpose.value) == (
        SEVERANCE_CLINIC,
        "0100",
        SNUBH,
        "treatment",
    )
    assert asked.document_created_at.isoformat() == referral["entry"][0]["resource"]["date"]

    # The Task shows in SNUBH's inbox for 31100002 as received.
    task = await fed.task_arrives("snubh", SNUBH, task_id, "received")
    parse_resource(task, "Task")
    assert task["intent"] == "order"
    assert task["code"]["coding"][0]["code"] == "referral"
    assert task["requester"]["identifier"]["value"] == SEVERANCE_CLINIC
    assert task["owner"]["identifier"]["value"] == SNUBH
    assert task["focus"]["reference"] == f"DocumentReference/{doc_id}"
    assert task["for"]["identifier"]["value"] == key
    # ... and the requester's copy at severance hears that it was received.
    await fed.task_status("severance", SEVERANCE_CLINIC, task_id, "received")

    # SNUBH finds the referral by the patient's RRN and retrieves the document as it was sent.
    found = await fed.search("snubh", SNUBH, rrn)
    assert found.status_code == 200, found.text
    assert found.headers["content-type"].startswith("application/fhir+json")
    bundle = found.json()
    assert bundle["type"] == "searchset"
    assert [e["resource"]["id"] for e in bundle["entry"]] == [doc_id]
    reference = bundle["entry"][0]["resource"]
    parse_resource(reference, "DocumentReference")
    assert reference["subject"]["identifier"]["value"] == key
    assert reference["content"][0]["attachment"]["url"] == f"Bundle/{doc_id}"
    retrieved = await fed.call("GET", "snubh", f"/Bundle/{doc_id}", as_=SNUBH)
    assert retrieved.status_code == 200, retrieved.text
    served = retrieved.json()
    assert served.pop("meta")["versionId"] == "1"  # the document's first and only version
    assert served == pseudonymised(referral, key)
    one = await fed.call("GET", "snubh", f"/DocumentReference/{doc_id}", as_=SNUBH)
    assert one.status_code == 200
    assert one.json() == reference

    # SNUBH accepts, treats, returns a note to the clinic and completes the Task with it.
    accepted = await fed.call(
        "PUT", "snubh", f"/Task/{task_id}", as_=SNUBH, json={**task, "status": "accepted"}
    )
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["status"] == "accepted"
    note = document(DocumentType.RETURN, SNUBH, rrn, SEVERANCE_CLINIC)
    returned = await fed.publish("snubh", SNUBH, submission([note], SNUBH, rrn, [SEVERANCE_CLINIC]))
    assert returned.status_code == 200, returned.text
    [note_id], [return_task_id] = (
        locations(returned.json(), "DocumentReference"),
        locations(returned.json(), "Task"),
    )
    completed = await fed.call(
        "PUT",
        "snubh",
        f"/Task/{task_id}",
        as_=SNUBH,
        json={
            **accepted.json(),
            "status": "completed",
            "output": [
                {
                    "type": {"text": "return note"},
                    "valueReference": {"reference": f"DocumentReference/{note_id}"},
                }
            ],
        },
    )
    assert completed.status_code == 200, completed.text

    # The return arrives at severance for the clinic, and severance's copy of the referral is completed.
    return_task = await fed.task_arrives("severance", SEVERANCE_CLINIC, return_task_id, "received")
    assert return_task["code"]["coding"][0]["code"] == "return"
    original = await fed.task_status("severance", SEVERANCE_CLINIC, task_id, "completed")
    assert original["output"][0]["valueReference"]["reference"] == f"DocumentReference/{note_id}"
    at_clinic = await fed.search("severance", SEVERANCE_CLINIC, rrn)
    assert {e["resource"]["id"] for e in at_clinic.json()["entry"]} == {doc_id, note_id}
    note_bundle = await fed.call("GET", "severance", f"/Bundle/{note_id}", as_=SEVERANCE_CLINIC)
    assert {k: v for k, v in note_bundle.json().items() if k != "meta"} == pseudonymised(note, key)

    # The facts went out: sent (referral, return) and Task updates, and every read was audited.
    outbox = await fed.hubs["snubh"].rows("outbox")
    assert {r["subject"] for r in outbox} >= {
        subject(Kind.EXCHANGE_SENT, sender="snubh"),
        subject(Kind.TASK_UPDATED, sender="snubh"),
        subject(Kind.TASK_STATUS, to="severance", sender="snubh"),
        subject(Kind.DELIVERY, to="severance", sender="snubh"),
    }
    audit = [
        r["record"] for r in await fed.hubs["snubh"].rows("audit_log") if r["record"]["patient_key"] == key
    ]
    assert {
        "exchange.receive",
        "document.search",
        "document.retrieve",
        "document.read",
        "task.update",
        "document.publish",
    } <= {a["action"] for a in audit}
    search_audit = next(a for a in audit if a["action"] == "document.search")
    assert search_audit["document_ids"] == [doc_id]
    assert search_audit["actor_institution"] == SNUBH


async def test_without_consent_nothing_is_stored_or_delivered(federation: Federation, rrn: str) -> None:
    fed = federation
    key = fed.desk.key(rrn)
    refused = await fed.publish(
        "severance",
        SEVERANCE_CLINIC,
        submission(
            [document(DocumentType.REFERRAL, SEVERANCE_CLINIC, rrn, SNUBH)], SEVERANCE_CLINIC, rrn, [SNUBH]
        ),
    )
    assert refused.status_code == 403
    outcome = refused.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "deny-no-consent" in outcome["issue"][0]["diagnostics"]

    # A later, permitted referral of another patient arrives: anything sent before it would have, too.
    other = new_rrn()
    fed.desk.grant(other)
    _, _, barrier_task = await refer(fed, other)
    await fed.task_arrives("snubh", SNUBH, barrier_task, "received")

    for hub, reader in (("severance", SEVERANCE_CLINIC), ("snubh", SNUBH)):
        assert await fed.patient_rows(hub, key) == []
        assert (await fed.search(hub, reader, rrn)).json()["total"] == 0
        deliveries = [r for r in await fed.hubs[hub].rows("outbox") if r["subject"].endswith(".delivery")]
        assert not [r for r in deliveries if key.encode() in r["payload"]]
    # The refusal itself is recorded: an audit record and the ExchangeDenied fact.
    audit = [r["record"] for r in await fed.hubs["severance"].rows("audit_log")]
    denial = next(a for a in audit if a["patient_key"] == key and a["action"] == "exchange.deny")
    assert (denial["outcome"], denial["rule"], denial["actor_institution"]) == (
        "denied",
        "deny-no-consent",
        SEVERANCE_CLINIC,
    )
    denied = [
        r
        for r in await fed.hubs["severance"].rows("outbox")
        if r["subject"] == subject(Kind.EXCHANGE_DENIED, sender="severance")
    ]
    assert [r for r in denied if key.encode() in r["payload"]]


async def test_republishing_the_same_document_stores_one_copy(federation: Federation, rrn: str) -> None:
    fed = federation
    fed.desk.grant(rrn)
    key = fed.desk.key(rrn)
    body = submission(
        [document(DocumentType.REFERRAL, SEVERANCE_CLINIC, rrn, SNUBH)], SEVERANCE_CLINIC, rrn, [SNUBH]
    )
    first = await fed.publish("severance", SEVERANCE_CLINIC, body)
    again = await fed.publish("severance", SEVERANCE_CLINIC, body)
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    [task_id] = locations(first.json(), "Task")
    await fed.task_arrives("snubh", SNUBH, task_id, "received")

    rows = await fed.hubs["severance"].rows("documents")
    assert len([r for r in rows if r["patient_key"] == key]) == 1
    assert len([r for r in await fed.hubs["severance"].rows("tasks") if r["patient_key"] == key]) == 1
    deliveries = [
        r
        for r in await fed.hubs["severance"].rows("outbox")
        if r["subject"] == subject(Kind.DELIVERY, to="snubh", sender="severance")
        and key.encode() in r["payload"]
    ]
    assert len(deliveries) == 1
    assert len(await fed.inbox("snubh", SNUBH)) == len({t["id"] for t in await fed.inbox("snubh", SNUBH)})


async def test_concurrent_republishing_still_stores_one_copy(federation: Federation, rrn: str) -> None:
    fed = federation
    fed.desk.grant(rrn)
    key = fed.desk.key(rrn)
    body = submission(
        [document(DocumentType.REFERRAL, SEVERANCE_CLINIC, rrn, SNUBH)], SEVERANCE_CLINIC, rrn, [SNUBH]
    )
    racing = await asyncio.gather(*(fed.publish("severance", SEVERANCE_CLINIC, body) for _ in range(3)))
    # The losers of a race are told to retry (409); their retry answers as the winner did.
    assert {r.status_code for r in racing} <= {200, 409}
    winner = next(r for r in racing if r.status_code == 200)
    retry = await fed.publish("severance", SEVERANCE_CLINIC, body)
    assert retry.json() == winner.json()
    assert len(await fed.patient_rows("severance", key)) == 2  # one document, one Task


async def test_a_redelivered_delivery_is_applied_once(federation: Federation, rrn: str) -> None:
    fed = federation
    fed.desk.grant(rrn)
    key = fed.desk.key(rrn)
    _, _, task_id = await refer(fed, rrn)
    await fed.task_arrives("snubh", SNUBH, task_id, "received")
    [sent] = [
        r
        for r in await fed.hubs["severance"].rows("outbox")
        if r["subject"] == subject(Kind.DELIVERY, to="snubh", sender="severance")
        and key.encode() in r["payload"]
    ]
    # The same event again, under a new Nats-Msg-Id so that JetStream does not drop it as a duplicate.
    bus = await Bus.connect(fed.hubs["snubh"].settings.nats_url, name="test-redelivery")
    try:
        await bus.publish_raw(sent["subject"], sent["payload"], str(uuid.uuid4()), None)
    finally:
        await bus.close()
    other = new_rrn()
    fed.desk.grant(other)
    _, _, barrier_task = await refer(fed, other)
    await fed.task_arrives("snubh", SNUBH, barrier_task, "received")

    assert len(await fed.patient_rows("snubh", key)) == 2  # one document, one Task
    audit = [r["record"] for r in await fed.hubs["snubh"].rows("audit_log")]
    assert len([a for a in audit if a["patient_key"] == key and a["action"] == "exchange.receive"]) == 1


async def test_withdrawn_consent_hides_delivered_documents(federation: Federation, rrn: str) -> None:
    fed = federation
    fed.desk.grant(rrn)
    _, doc_id, task_id = await refer(fed, rrn)
    await fed.task_arrives("snubh", SNUBH, task_id, "received")
    assert (await fed.search("snubh", SNUBH, rrn)).json()["total"] == 1

    fed.desk.withdraw(rrn)
    assert (await fed.search("snubh", SNUBH, rrn)).json()["total"] == 0
    refused = await fed.call("GET", "snubh", f"/Bundle/{doc_id}", as_=SNUBH)
    assert refused.status_code == 403
    assert "deny-withdrawn" in refused.json()["issue"][0]["diagnostics"]
    # The author still reads its own document.
    assert (await fed.search("severance", SEVERANCE_CLINIC, rrn)).json()["total"] == 1


async def test_unanswered_consent_fails_closed(federation: Federation, rrn: str) -> None:
    fed = federation
    fed.desk.grant(rrn)
    key = fed.desk.key(rrn)
    fed.desk.available = False
    try:
        response = await fed.publish(
            "severance",
            SEVERANCE_CLINIC,
            submission(
                [document(DocumentType.REFERRAL, SEVERANCE_CLINIC, rrn, SNUBH)],
                SEVERANCE_CLINIC,
                rrn,
                [SNUBH],
            ),
        )
    finally:
        fed.desk.available = True
    assert response.status_code == 503
    assert response.json()["resourceType"] == "OperationOutcome"
    assert await fed.patient_rows("severance", key) == []


async def test_no_rrn_in_any_row_response_or_log(federation: Federation, rrn: str) -> None:
    fed = federation
    fed.desk.grant(rrn)
    _, doc_id, task_id = await refer(fed, rrn)
    await fed.task_arrives("snubh", SNUBH, task_id, "received")
    await fed.search("snubh", SNUBH, rrn)
    await fed.call("GET", "snubh", f"/Bundle/{doc_id}", as_=SNUBH)
    await fed.call(
        "GET",
        "snubh",
        "/DocumentReference",
        as_=SNUBH,
        params={"patient.identifier": f"http://www.hl7korea.or.kr/Identifier/mois-rrn|{rrn}x"},
    )
    await fed.call(
        "GET",
        "snubh",
        "/DocumentReference",
        as_=SNUBH,
        headers={"Prefer": "handling=strict"},
        params={"patient.identifier": f"{rrn}|{rrn}", rrn: "1"},
    )

    async def all_stored() -> bool:
        return bool(await fed.hubs["snubh"].rows("documents")) and bool(
            await fed.hubs["severance"].rows("tasks")
        )

    await eventually(all_stored, "rows at both hubs")
    dumps = [await hub.dump() for hub in fed.hubs.values()]
    assert fed.desk.key(rrn) in dumps[0]  # the patient is there, under the key
    for form in rrn_forms(rrn):
        for dump in dumps:
            assert form not in dump
        assert not [r for r in fed.responses if form in r]
        assert not [line for line in fed.log.lines if form in line]
