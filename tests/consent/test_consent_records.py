"""Recording FHIR Consent versions: shape, rules, refusals, privacy of the RRN, the outbox event."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import httpx
import nats
from consent_helpers import (
    SEVERANCE_CLINIC,
    SEVERANCE_CLINIC_2,
    SNUBH_HUB,
    ConsentService,
    consent_json,
    new_rrn,
)

from hie_consent.fhir import CHANNEL_EXTENSION, SIGNER_EXTENSION
from hie_schemas import streams, subjects
from hie_schemas.envelope import Envelope
from hie_schemas.events import ConsentRecorded
from hie_schemas.identifiers import PATIENT_KEY_SYSTEM, RRN_SYSTEM


async def test_consent_is_stored_as_version_one_with_the_patient_key(consent_service: ConsentService) -> None:
    rrn = new_rrn()
    response = await consent_service.record(consent_json((RRN_SYSTEM, rrn), "ENTIRE_CONSENT"))
    body = response.json()
    assert response.status_code == 201
    assert response.headers["content-type"].startswith("application/fhir+json")
    assert body["resourceType"] == "Consent"
    assert body["id"]
    assert body["meta"]["versionId"] == "1"
    assert body["patient"] == {
        "identifier": {"system": PATIENT_KEY_SYSTEM, "value": consent_service.patient_key(rrn)}
    }
    assert body["dateTime"]  # effective time defaults to now and is always returned
    assert response.headers["location"].endswith(f"/fhir/Consent/{body['id']}/_history/1")
    async with httpx.AsyncClient(base_url=consent_service.url) as http:
        headers = await consent_service.headers()
        read = await http.get(f"/fhir/Consent/{body['id']}", headers=headers)
        version = await http.get(f"/fhir/Consent/{body['id']}/_history/1", headers=headers)
        missing = await http.get(f"/fhir/Consent/{body['id']}/_history/9", headers=headers)
    assert read.status_code == 200
    assert read.json() == body
    assert version.json() == body
    assert missing.status_code == 404


async def test_search_lists_versions_newest_first(consent_service: ConsentService) -> None:
    rrn = new_rrn()
    first = await consent_service.consent(rrn)
    second = await consent_service.consent(rrn, "PARTIAL_WITHDRAWAL", exclude_institutions=(SNUBH_HUB,))
    key = consent_service.patient_key(rrn)
    async with httpx.AsyncClient(base_url=consent_service.url) as http:
        headers = await consent_service.headers()
        by_rrn = await http.get(
            "/fhir/Consent", params={"patient.identifier": f"{RRN_SYSTEM}|{rrn}"}, headers=headers
        )
        by_key = await http.get(
            "/fhir/Consent", params={"patient.identifier": f"{PATIENT_KEY_SYSTEM}|{key}"}, headers=headers
        )
    bundle = by_rrn.json()
    assert by_rrn.status_code == 200
    assert bundle["type"] == "searchset"
    assert bundle["total"] == 2
    assert [e["resource"]["meta"]["versionId"] for e in bundle["entry"]] == ["2", "1"]
    assert second["id"] == first["id"]  # one logical Consent per patient, versioned
    assert by_key.json()["entry"] == bundle["entry"]
    assert rrn not in by_rrn.text
    assert rrn.replace("-", "") not in by_rrn.text


async def test_withdrawal_without_consent_is_a_conflict_and_stores_nothing(
    consent_service: ConsentService,
) -> None:
    rrn = new_rrn()
    entire = await consent_service.record(consent_json((RRN_SYSTEM, rrn), "ENTIRE_WITHDRAWAL"))
    partial = await consent_service.record(
        consent_json((RRN_SYSTEM, rrn), "PARTIAL_WITHDRAWAL", exclude_institutions=(SNUBH_HUB,))
    )
    assert entire.status_code == 409
    assert entire.json()["resourceType"] == "OperationOutcome"
    assert partial.status_code == 409
    assert rrn not in entire.text
    assert rrn not in partial.text
    key = consent_service.patient_key(rrn)
    assert [r for r in await consent_service.rows("consent_versions") if r["patient_key"] == key] == []


async def test_withdrawal_after_an_entire_withdrawal_is_a_conflict(consent_service: ConsentService) -> None:
    rrn = new_rrn()
    await consent_service.consent(rrn)
    await consent_service.consent(rrn, "ENTIRE_WITHDRAWAL")
    again = await consent_service.record(consent_json((RRN_SYSTEM, rrn), "ENTIRE_WITHDRAWAL"))
    renewed = await consent_service.consent(rrn)
    assert again.status_code == 409
    assert renewed["meta"]["versionId"] == "3"


async def test_unknown_excluded_institution_is_refused(consent_service: ConsentService) -> None:
    rrn = new_rrn()
    await consent_service.consent(rrn)
    unknown = await consent_service.record(
        consent_json((RRN_SYSTEM, rrn), "PARTIAL_WITHDRAWAL", exclude_institutions=("12345678",))
    )
    malformed = await consent_service.record(
        consent_json((RRN_SYSTEM, rrn), "PARTIAL_WITHDRAWAL", exclude_institutions=("1234",))
    )
    bad_department = await consent_service.record(
        consent_json((RRN_SYSTEM, rrn), "PARTIAL_WITHDRAWAL", exclude_departments=("9999",))
    )
    assert unknown.status_code == 422
    assert "12345678" in unknown.json()["issue"][0]["diagnostics"]
    assert malformed.status_code == 400
    assert bad_department.status_code == 422
    key = consent_service.patient_key(rrn)
    assert len([r for r in await consent_service.rows("consent_versions") if r["patient_key"] == key]) == 1


async def test_consent_for_another_institution_is_forbidden(consent_service: ConsentService) -> None:
    response = await consent_service.record(
        consent_json((RRN_SYSTEM, new_rrn()), "ENTIRE_CONSENT", organization=SEVERANCE_CLINIC_2),
        client_id=SEVERANCE_CLINIC,
    )
    assert response.status_code == 403
    assert response.json()["issue"][0]["code"] == "forbidden"


async def test_future_dated_consent_is_refused(consent_service: ConsentService) -> None:
    soon = datetime.now(UTC) + timedelta(minutes=2)
    later = datetime.now(UTC) + timedelta(hours=1)
    accepted = await consent_service.record(
        consent_json((RRN_SYSTEM, new_rrn()), "ENTIRE_CONSENT", date_time=soon)
    )
    refused = await consent_service.record(
        consent_json((RRN_SYSTEM, new_rrn()), "ENTIRE_CONSENT", date_time=later)
    )
    assert accepted.status_code == 201  # within the clock skew allowed to a desk PC
    assert refused.status_code == 422


async def test_requests_without_a_token_are_unauthorized(consent_service: ConsentService) -> None:
    rrn = new_rrn()
    async with httpx.AsyncClient(base_url=consent_service.url) as http:
        post = await http.post("/fhir/Consent", json=consent_json((RRN_SYSTEM, rrn), "ENTIRE_CONSENT"))
        search = await http.get("/fhir/Consent", params={"patient.identifier": f"{RRN_SYSTEM}|{rrn}"})
        decide = await http.post("/decisions", json={})
        history = await http.get("/exchange-history", params={"patient.identifier": f"{RRN_SYSTEM}|{rrn}"})
    for response in (post, search, decide, history):
        assert response.status_code == 401
        assert response.json()["resourceType"] == "OperationOutcome"
        assert rrn not in response.text
    assert await consent_service.rows("consent_versions") == []


async def test_rrn_is_never_stored_nor_echoed(consent_service: ConsentService) -> None:
    rrn = new_rrn()
    forms = (rrn, rrn.replace("-", ""))
    stored = await consent_service.record(consent_json((RRN_SYSTEM, rrn), "ENTIRE_CONSENT"))
    invalid = consent_json((RRN_SYSTEM, rrn), "ENTIRE_CONSENT")
    invalid["patient"]["identifier"]["bogus"] = rrn  # an R4 validation error that quotes the input
    rejected = await consent_service.record(invalid)
    leaked = consent_json((RRN_SYSTEM, rrn), "ENTIRE_CONSENT")
    leaked["extension"].append({"url": "https://example.org/note", "valueString": f"RRN {rrn}"})
    refused_leak = await consent_service.record(leaked)
    assert stored.status_code == 201
    assert rejected.status_code == 400
    assert refused_leak.status_code == 400
    for response in (stored, rejected, refused_leak):
        assert not any(f in response.text for f in forms)
    tables = ("consent_versions", "outbox", "audit_log", "processed_events", "exchange_history")
    for table in tables:
        for row in await consent_service.rows(table):
            dump = json.dumps(
                {k: v.decode() if isinstance(v, bytes) else v for k, v in row.items()},
                default=str,
            )
            assert not any(f in dump for f in forms), f"the RRN is in {table}"
    (row,) = await consent_service.rows("consent_versions")
    assert row["patient_key"] == consent_service.patient_key(rrn)
    assert row["channel"] == "sign-pad"
    assert row["signer_relationship"] == "self"
    assert row["recorded_by"] == SEVERANCE_CLINIC


async def test_consent_recorded_event_lands_on_the_consent_stream(consent_service: ConsentService) -> None:
    rrn = new_rrn()
    await consent_service.consent(rrn, "PARTIAL_CONSENT", exclude_departments=("0300",))
    key = consent_service.patient_key(rrn)
    nc = await nats.connect(consent_service.nats_url)
    try:
        sub = await nc.jetstream().pull_subscribe(subjects.CONSENT_RECORDED, stream=streams.CONSENT.name)
        deadline = asyncio.get_running_loop().time() + 15
        found: ConsentRecorded | None = None
        while found is None and asyncio.get_running_loop().time() < deadline:
            try:
                messages = await sub.fetch(100, timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            for msg in messages:
                event = Envelope.from_bytes(msg.data).payload(ConsentRecorded)
                if event.patient_key == key:
                    found = event
                    assert msg.headers is not None
                    assert msg.headers["Nats-Msg-Id"]
        await sub.unsubscribe()
    finally:
        await nc.close()
    assert found is not None, "no ConsentRecorded event for the patient"
    assert found.version == 1
    assert found.policy == "PARTIAL_CONSENT"
    assert found.excluded_departments == ["0300"]
    assert found.recorded_by == SEVERANCE_CLINIC


async def test_a_version_cannot_take_effect_before_the_one_in_force(consent_service: ConsentService) -> None:
    rrn = new_rrn()
    await consent_service.consent(rrn)
    backdated = await consent_service.record(
        consent_json((RRN_SYSTEM, rrn), "ENTIRE_WITHDRAWAL", date_time=datetime.now(UTC) - timedelta(days=1))
    )
    assert backdated.status_code == 409
    assert backdated.json()["issue"][0]["expression"] == ["Consent.dateTime"]


async def test_channel_and_signer_are_recorded_and_portal_is_not_a_desk_channel(
    consent_service: ConsentService,
) -> None:
    by_parent = consent_json((RRN_SYSTEM, new_rrn()), "ENTIRE_CONSENT")
    by_parent["extension"] = [
        {"url": CHANNEL_EXTENSION, "valueCode": "mobile"},
        {"url": SIGNER_EXTENSION, "valueCode": "legal-representative"},
    ]
    by_parent["contained"] = [
        {
            "resourceType": "RelatedPerson",
            "id": "signer",
            "patient": by_parent["patient"],
            "name": [{"text": "김보호"}],
            "telecom": [{"system": "phone", "value": "010-2345-6789"}],
        }
    ]
    by_parent["performer"] = [{"reference": "#signer"}]
    portal = consent_json((RRN_SYSTEM, new_rrn()), "ENTIRE_CONSENT")
    portal["extension"] = [{"url": CHANNEL_EXTENSION, "valueCode": "portal"}]
    recorded = await consent_service.record(by_parent)
    refused = await consent_service.record(portal)
    assert recorded.status_code == 201
    assert refused.status_code == 422
    (row,) = await consent_service.rows("consent_versions")
    assert (row["channel"], row["signer_relationship"]) == ("mobile", "legal-representative")
    assert (row["signer_name"], row["signer_contact"]) == ("김보호", "010-2345-6789")
