"""The desk channel: the signature image, exclusion reasons, the signer, and who may record at all."""

from __future__ import annotations

import random
from typing import Any

import httpx
import pytest
from consent_helpers import (
    AGENCY,
    SEVERANCE_CLINIC,
    SEVERANCE_CLINIC_2,
    SEVERANCE_HUB,
    SIGNATURE,
    SNUBH_HUB,
    ConsentService,
    attachment,
    consent_json,
    eventually,
    new_rrn,
)

from hie_consent.provisions import EXCLUSION_REASON_EXTENSION
from hie_schemas.identifiers import RRN_SYSTEM

JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xd9"


async def test_the_signature_is_kept_beside_the_resource(consent_service: ConsentService) -> None:
    body = consent_json((RRN_SYSTEM, new_rrn()), "ENTIRE_CONSENT")
    created = await consent_service.record(body)
    assert created.status_code == 201, created.text
    source = created.json()["sourceAttachment"]
    assert "data" not in source  # by reference: every version read does not carry the image
    assert (source["contentType"], source["size"]) == ("image/png", len(SIGNATURE))
    assert source["url"].endswith(f"/fhir/Consent/{created.json()['id']}/_history/1/signature")
    path = source["url"].split("/fhir/", 1)[1]
    async with httpx.AsyncClient(base_url=f"{consent_service.url}/fhir") as http:
        mine = await http.get(path, headers=await consent_service.headers(SEVERANCE_CLINIC))
        agency = await http.get(path, headers=await consent_service.headers(AGENCY))
        other = await http.get(path, headers=await consent_service.headers(SEVERANCE_CLINIC_2))
    assert mine.status_code == 200
    assert mine.content == SIGNATURE
    assert mine.headers["content-type"] == "image/png"
    assert agency.content == SIGNATURE
    # Another clinic gets the 404 of a version without an image: it cannot tell one exists (issue 12,
    # point 4; it was a 403).
    assert other.status_code == 404
    (row,) = await consent_service.rows("consent_signatures")
    assert row["data"] == SIGNATURE


async def test_a_jpeg_signature_is_accepted(consent_service: ConsentService) -> None:
    body = consent_json((RRN_SYSTEM, new_rrn()), "ENTIRE_CONSENT")
    body["sourceAttachment"] = attachment(JPEG, "image/jpeg")
    assert (await consent_service.record(body)).status_code == 201


@pytest.mark.parametrize(
    ("source", "status"),
    [
        (None, 422),
        (attachment(b"%PDF-1.4 not an image", "image/png"), 422),
        (attachment(JPEG, "image/png"), 422),
        (attachment(SIGNATURE, "image/jpeg"), 422),
        (attachment(SIGNATURE, "text/plain"), 422),
        ({"contentType": "image/png", "url": "https://example.org/sig.png"}, 422),
        (attachment(SIGNATURE + bytes(300 * 1024)), 413),
    ],
    ids=["missing", "pdf-as-png", "jpeg-as-png", "png-as-jpeg", "text", "by-url", "too-large"],
)
async def test_a_signature_that_is_not_an_image_is_refused(
    consent_service: ConsentService, source: dict[str, Any] | None, status: int
) -> None:
    body = consent_json((RRN_SYSTEM, new_rrn()), "ENTIRE_CONSENT")
    if source is None:
        del body["sourceAttachment"]
    else:
        body["sourceAttachment"] = source
    response = await consent_service.record(body)
    assert response.status_code == status, response.text
    if status == 422 and source is not None:
        assert "signature is not an image" in response.json()["issue"][0]["diagnostics"]
    assert await consent_service.rows("consent_versions") == []
    assert await consent_service.rows("consent_signatures") == []


async def test_each_exclusion_needs_a_reason_and_reasons_are_rows(consent_service: ConsentService) -> None:
    rrn = new_rrn()
    await consent_service.consent(rrn)
    missing = consent_json((RRN_SYSTEM, rrn), "PARTIAL_WITHDRAWAL", exclude_institutions=(SNUBH_HUB,))
    del missing["provision"]["provision"][0]["extension"]
    both = consent_json((RRN_SYSTEM, rrn), "PARTIAL_WITHDRAWAL", exclude_institutions=(SNUBH_HUB,))
    both["provision"]["provision"][0]["code"] = [
        {"coding": [{"system": "http://www.hl7korea.or.kr/CodeSystem/hira-department", "code": "0300"}]}
    ]
    assert (await consent_service.record(missing)).status_code == 422
    assert (await consent_service.record(both)).status_code == 422
    recorded = consent_json(
        (RRN_SYSTEM, rrn),
        "PARTIAL_WITHDRAWAL",
        exclude_institutions=(SNUBH_HUB, SEVERANCE_HUB),
        exclude_departments=("0300",),
        reason="진료 기록 비공개 희망",
    )
    recorded["provision"]["provision"][1]["extension"] = [
        {"url": EXCLUSION_REASON_EXTENSION, "valueString": "다른 사유"}
    ]
    assert (await consent_service.record(recorded)).status_code == 201
    key = consent_service.patient_key(rrn)
    rows = sorted(
        (r["version"], r["kind"], r["code"], r["reason"])
        for r in await consent_service.rows("consent_exclusions")
        if r["patient_key"] == key
    )
    assert rows == [
        (2, "department", "0300", "진료 기록 비공개 희망"),
        (2, "institution", SEVERANCE_HUB, "다른 사유"),
        (2, "institution", SNUBH_HUB, "진료 기록 비공개 희망"),
    ]


async def test_a_signer_other_than_the_patient_is_named(consent_service: ConsentService) -> None:
    body = consent_json((RRN_SYSTEM, new_rrn()), "ENTIRE_CONSENT")
    body["performer"] = [{"reference": "#signer"}]
    body["contained"] = [{"resourceType": "RelatedPerson", "id": "signer", "patient": body["patient"]}]
    unnamed = await consent_service.record(body)
    assert unnamed.status_code == 422
    assert "name and a contact" in unnamed.json()["issue"][0]["diagnostics"]
    body["contained"][0]["name"] = [{"family": "김", "given": ["보호"]}]
    body["contained"][0]["telecom"] = [{"system": "phone", "value": "010-5555-6666"}]
    named = await consent_service.record(body)
    assert named.status_code == 201, named.text
    (row,) = await consent_service.rows("consent_versions")
    assert (row["signer_relationship"], row["signer_name"], row["signer_contact"]) == (
        "other",
        "김 보호",
        "010-5555-6666",
    )


async def test_a_non_participant_cannot_record_consent(consent_service: ConsentService) -> None:
    """An institution suspended by the agency is refused at once, with the token it already holds."""
    registry = consent_service.registry
    code = f"7{random.randint(0, 9999999):07d}"
    agency = {"Authorization": f"Bearer {await registry.token(AGENCY)}"}
    hub = {"Authorization": f"Bearer {await registry.token(SEVERANCE_HUB)}"}
    async with httpx.AsyncClient(base_url=registry.url, timeout=15.0) as http:
        application = {
            "code": code,
            "name": "새내기의원",
            "kind": "clinic",
            "region": "서울",
            "hub": "severance",
            "departments": ["2300"],
        }
        assert (await http.post("/institutions", json=application, headers=agency)).status_code == 201
        for action, who in (("review", agency), ("sign-agreement", hub), ("approve", agency)):
            step = await http.post(f"/institutions/{code}/{action}", json={"reason": "test"}, headers=who)
            assert step.status_code == 200, step.text
        credentials = step.json()["credentials"]
        activated = await http.post(
            f"/institutions/{code}/activate", json={"reason": "go live"}, headers=agency
        )
        assert activated.status_code == 200
        issued = await http.post(
            "/oauth2/token",
            data={
                "grant_type": "client_credentials",
                "client_id": credentials["client_id"],
                "client_secret": credentials["client_secret"],
            },
        )
        clinic = {
            "Authorization": f"Bearer {issued.json()['access_token']}",
            "Content-Type": "application/fhir+json",
        }
        suspended = await http.post(f"/institutions/{code}/suspend", json={"reason": "test"}, headers=agency)
        assert suspended.status_code == 200
    body = consent_json((RRN_SYSTEM, new_rrn()), "ENTIRE_CONSENT", organization=code)

    # The consent service learns of the suspension from the registry's event; wait for it with a
    # request that writes nothing (polling with POSTs would record consents until it arrives).
    async def suspension_known() -> httpx.Response | None:
        async with httpx.AsyncClient(base_url=consent_service.url) as http:
            response = await http.get("/fhir/Consent", params={"_count": "1"}, headers=clinic)
        return response if response.status_code == 403 else None

    await eventually(suspension_known, "the suspension known to the consent service")
    async with httpx.AsyncClient(base_url=consent_service.url) as http:
        refused = await http.post("/fhir/Consent", json=body, headers=clinic)
    assert refused.status_code == 403, refused.text
    async with httpx.AsyncClient(base_url=consent_service.url) as http:
        by_agency = await http.post(
            "/fhir/Consent",
            json=consent_json((RRN_SYSTEM, new_rrn()), "ENTIRE_CONSENT", organization="99000001"),
            headers={**agency, "Content-Type": "application/fhir+json"},
        )
    assert by_agency.status_code == 403  # the agency records by portal and phone, not at a desk
    assert await consent_service.rows("consent_versions") == []
