"""Issue 12, points 1 and 3: a delivered exchange is read for the purpose it was sent with (a
patient-requested transfer, an emergency with its justification) and audited so; a party not in good
standing is refused even then; an emergency without a justification is a malformed request (400)
wherever it is asserted. Real hubs, the real registry, one nats-server, SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from hub_support import (
    AGENCY_CLIENT,
    CNUH,
    SEVERANCE,
    SEVERANCE_CLINIC,
    SEVERANCE_CLINIC_2,
    SNUBH,
    Federation,
    eventually,
    located,
    matches,
    refused,
    submit,
)

from hie_schemas.codes import DocumentType
from hie_schemas.documents.profiles import (
    JUSTIFICATION_EXTENSION_URL,
    PURPOSE_EXTENSION_URL,
    PURPOSE_SYSTEM,
)
from hie_schemas.identifiers import RRN_SYSTEM

CRS = DocumentType.CARE_RECORD_SUMMARY
WHY = "의식 없는 응급환자, 보호자 없음 (unconscious, no guardian)"


def purpose(code: str, justification: str | None = None) -> list[dict[str, Any]]:
    extensions: list[dict[str, Any]] = [
        {"url": PURPOSE_EXTENSION_URL, "valueCoding": {"system": PURPOSE_SYSTEM, "code": code}}
    ]
    if justification is not None:
        extensions.append({"url": JUSTIFICATION_EXTENSION_URL, "valueString": justification})
    return extensions


def consent_after_the_record(fed: Federation, rrn: str) -> datetime:
    """ENTIRE_CONSENT effective a day ago; returns a Composition.date before it (not covered at creation)."""
    fed.desk.grant(rrn, at=datetime.now(UTC) - timedelta(days=1))
    return datetime.now(UTC) - timedelta(days=2)


async def send(fed: Federation, author: str, kind: DocumentType, rrn: str, **options: Any) -> tuple[str, str]:
    """Publish one document from a severance clinic to SNUBH; (document id, task id) once delivered."""
    published = await fed.publish("severance", author, submit(kind, author, rrn, [SNUBH], **options))
    [doc_id], [task_id] = located(published, "DocumentReference"), located(published, "Task")
    await fed.task_arrives("snubh", SNUBH, task_id, "received")
    return doc_id, task_id


async def reads(fed: Federation, hub: str, reader: str, doc_id: str) -> list[httpx.Response]:
    """ITI-68 and the DocumentReference read of one document."""
    return [
        await fed.call("GET", hub, f"/Bundle/{doc_id}", as_=reader),
        await fed.call("GET", hub, f"/DocumentReference/{doc_id}", as_=reader),
    ]


async def audit_of(fed: Federation, hub: str, rrn: str, doc_id: str) -> list[dict[str, Any]]:
    key = fed.desk.key(rrn)
    return [
        r["record"]
        for r in await fed.hubs[hub].rows("audit_log")
        if r["record"]["patient_key"] == key and doc_id in r["record"]["document_ids"]
    ]


async def test_recipient_opens_a_patient_requested_exchange(federation: Federation, rrn: str) -> None:
    fed = federation
    created = consent_after_the_record(fed, rrn)
    # To SNUBH (another hub: the delivered copy) and to Severance (the holder's hub: the same row).
    body = submit(
        CRS,
        SEVERANCE_CLINIC,
        rrn,
        [SNUBH, SEVERANCE],
        created_at=created,
        extensions=purpose("patient-request"),
    )
    published = await fed.publish("severance", SEVERANCE_CLINIC, body)
    [doc_id], tasks = located(published, "DocumentReference"), located(published, "Task")

    async def delivered(hub: str, owner: str) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            received = [t for t in await fed.inbox(hub, owner) if t["status"] == "received"]
            return next((t for t in received if t["id"] in tasks), None)

        return await eventually(check, f"the exchange received at {hub}")

    await delivered("snubh", SNUBH)
    await delivered("severance", SEVERANCE)
    for hub, reader in (("snubh", SNUBH), ("severance", SEVERANCE)):
        bundle, reference = await reads(fed, hub, reader, doc_id)
        assert bundle.status_code == 200, bundle.text
        assert bundle.json()["id"] == doc_id
        assert reference.status_code == 200, reference.text
        found = await fed.search(hub, reader, rrn)
        assert [r["id"] for r in matches(found)] == [doc_id]

        records = await audit_of(fed, hub, rrn, doc_id)
        read = [r for r in records if r["action"] in {"document.retrieve", "document.read"}]
        assert len(read) == 2
        assert {(r["purpose"], r["rule"], r["outcome"]) for r in read} == {
            ("patient-request", "permit-patient-request", "success")
        }
        assert all(r["detail"]["exchange_ids"] for r in read)
        searched = [r for r in records if r["action"] == "document.search"]
        assert [r["purpose"] for r in searched] == ["patient-request"]

    # Searching across hubs, each holder (SNUBH's own hub too) decides for the exchange's purpose.
    async def found_across_hubs() -> bool:
        params = {"patient.identifier": f"{RRN_SYSTEM}|{rrn}", "_federated": "true"}
        response = await fed.call("GET", "snubh", "/DocumentReference", as_=SNUBH, params=params)
        return doc_id in {r["id"] for r in matches(response)}

    await eventually(found_across_hubs, "the walk-in search to find the exchanged document")
    held = [r for r in await audit_of(fed, "snubh", rrn, doc_id) if r["action"] == "federated.search"]
    assert "patient-request" in {r["purpose"] for r in held}
    task = next(t for t in await fed.inbox("snubh", SNUBH) if t["id"] in tasks)
    # The Task tells both parties the purpose the exchange was sent for.
    assert {
        "url": PURPOSE_EXTENSION_URL,
        "valueCoding": {"system": PURPOSE_SYSTEM, "code": "patient-request"},
    } in task["extension"]


async def test_recipient_opens_an_emergency_exchange(federation: Federation, rrn: str) -> None:
    fed = federation
    created = consent_after_the_record(fed, rrn)
    doc_id, _ = await send(
        fed,
        SEVERANCE_CLINIC,
        DocumentType.REFERRAL,
        rrn,
        created_at=created,
        extensions=purpose("emergency", WHY),
    )
    bundle, reference = await reads(fed, "snubh", SNUBH, doc_id)
    assert bundle.status_code == 200, bundle.text
    assert reference.status_code == 200, reference.text
    assert [r["id"] for r in matches(await fed.search("snubh", SNUBH, rrn))] == [doc_id]

    records = await audit_of(fed, "snubh", rrn, doc_id)
    read = [r for r in records if r["action"] in {"document.retrieve", "document.read", "document.search"}]
    assert len(read) == 3
    # Audited as what it is: break-the-glass, flagged, with the justification the sender gave.
    assert all(r["purpose"] == "emergency" for r in read)
    assert all(r["detail"]["flagged"] and r["detail"]["justification"] == WHY for r in read)
    assert {r["rule"] for r in read if r["action"] != "document.search"} == {"permit-emergency"}


async def lifecycle(fed: Federation, code: str, action: str) -> None:
    agency = {"Authorization": f"Bearer {await fed.token(AGENCY_CLIENT)}"}
    step = await fed.http.post(
        f"{fed.registry.url}/institutions/{code}/{action}", headers=agency, json={"reason": f"test {action}"}
    )
    assert step.status_code == 200, step.text


async def walk_in_emergency(fed: Federation, rrn: str) -> httpx.Response:
    return await fed.call(
        "GET",
        "cnuh",
        "/DocumentReference",
        as_=CNUH,
        params={
            "patient.identifier": f"{RRN_SYSTEM}|{rrn}",
            "_federated": "true",
            "purpose": "emergency",
            "justification": WHY,
        },
    )


async def test_a_party_not_in_good_standing_is_refused_even_for_the_exceptions(
    federation: Federation, rrn: str
) -> None:
    fed = federation
    created = consent_after_the_record(fed, rrn)
    author = SEVERANCE_CLINIC_2
    requested, _ = await send(
        fed, author, CRS, rrn, created_at=created, extensions=purpose("patient-request")
    )
    urgent, _ = await send(
        fed, author, DocumentType.REFERRAL, rrn, created_at=created, extensions=purpose("emergency", WHY)
    )
    for doc_id in (requested, urgent):
        assert [r.status_code for r in await reads(fed, "snubh", SNUBH, doc_id)] == [200, 200]

    async def both_found() -> bool:
        return {requested, urgent} <= {r["id"] for r in matches(await walk_in_emergency(fed, rrn))}

    await eventually(both_found, "the emergency walk-in search to find the clinic's records")

    await lifecycle(fed, author, "suspend")
    try:

        async def refused_as_not_participant() -> bool:
            answers = [r for doc_id in (requested, urgent) for r in await reads(fed, "snubh", SNUBH, doc_id)]
            return all(
                r.status_code == 403 and "deny-not-participant" in r.json()["issue"][0]["diagnostics"]
                for r in answers
            )

        await eventually(refused_as_not_participant, "SNUBH's hub to hear of the suspension")
        assert matches(await fed.search("snubh", SNUBH, rrn)) == []
        # Nor does an emergency search across hubs disclose the suspended clinic's records.
        found = {r["id"] for r in matches(await walk_in_emergency(fed, rrn))}
        assert not found & {requested, urgent}
        refusals = [
            r
            for doc_id in (requested, urgent)
            for r in await audit_of(fed, "snubh", rrn, doc_id)
            if r["outcome"] == "denied"
        ]
        assert {(r["purpose"], r["rule"]) for r in refusals} == {
            ("patient-request", "deny-not-participant"),
            ("emergency", "deny-not-participant"),
        }
    finally:
        await lifecycle(fed, author, "reinstate")

    async def readable_again() -> bool:
        return [r.status_code for r in await reads(fed, "snubh", SNUBH, requested)] == [200, 200]

    await eventually(readable_again, "SNUBH's hub to hear of the reinstatement")


async def test_an_emergency_without_justification_is_a_bad_request_everywhere(
    federation: Federation, rrn: str
) -> None:
    fed = federation
    for justification in (None, "   "):
        body = submit(
            DocumentType.REFERRAL,
            SEVERANCE_CLINIC,
            rrn,
            [SNUBH],
            extensions=purpose("emergency", justification),
        )
        message = refused(await fed.publish("severance", SEVERANCE_CLINIC, body), 400)
        assert "justification" in message
        assert JUSTIFICATION_EXTENSION_URL in message

        params = {"patient.identifier": f"{RRN_SYSTEM}|{rrn}", "_federated": "true", "purpose": "emergency"}
        if justification is not None:
            params["justification"] = justification
        search = await fed.call("GET", "cnuh", "/DocumentReference", as_=CNUH, params=params)
        assert "justification" in refused(search, 400)

        crs = {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "patient", "valueIdentifier": {"system": RRN_SYSTEM, "value": rrn}},
                {"name": "purpose", "valueCode": "emergency"},
            ]
            + ([{"name": "justification", "valueString": justification}] if justification else []),
        }
        generated = await fed.call("POST", "severance", "/$generate-crs", as_=SEVERANCE, json=crs)
        assert "justification" in refused(generated, 400)
    # Nothing was stored or sent for the refused publishes.
    assert await fed.patient_rows("severance", fed.desk.key(rrn)) == []
