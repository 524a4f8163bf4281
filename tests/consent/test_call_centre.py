"""The call centre: an agent takes the patient's request by phone; the patient completes it by code."""

from __future__ import annotations

from typing import Any

import httpx
from consent_helpers import (
    AGENCY,
    PHONE,
    SEVERANCE_CLINIC,
    SNUBH_HUB,
    ConsentService,
    expire,
    new_rrn,
    open_challenge,
    wrong,
)

from hie_schemas.identifiers import PATIENT_KEY_SYSTEM


async def open_request(
    service: ConsentService, body: dict[str, Any], client_id: str | None = AGENCY
) -> httpx.Response:
    headers = await service.headers(client_id) if client_id else {}
    async with httpx.AsyncClient(base_url=service.url) as http:
        return await http.post("/call-centre/requests", json=body, headers=headers)


async def complete(service: ConsentService, request_id: str, code: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=service.url) as http:
        return await http.post(f"/call-centre/requests/{request_id}/complete", json={"code": code})


async def test_agent_opens_a_request_and_the_patient_completes_it(consent_service: ConsentService) -> None:
    rrn = new_rrn()
    key = consent_service.patient_key(rrn)
    signer = {"relationship": "legal-representative", "name": "김보호", "contact": "010-9876-5432"}
    opened = await open_request(
        consent_service, {"rrn": rrn, "phone": PHONE, "policy": "ENTIRE_CONSENT", "signer": signer}
    )
    assert opened.status_code == 201, opened.text
    request = opened.json()
    # Nothing is in force until the patient answers the text message.
    assert [r for r in await consent_service.rows("consent_versions") if r["patient_key"] == key] == []
    assert (
        await complete(consent_service, request["challenge_id"], wrong(request["dev_code"]))
    ).status_code == 422
    done = await complete(consent_service, request["challenge_id"], request["dev_code"])
    assert done.status_code == 201, done.text
    version = done.json()
    assert (version["version"], version["policy"], version["channel"]) == (1, "ENTIRE_CONSENT", "phone")
    assert version["recorded_by"] == "99000001"  # the agent's institution: the operating agency
    assert version["signer"] == signer
    assert (await complete(consent_service, request["challenge_id"], request["dev_code"])).status_code == 409

    # A partial withdrawal by phone, with the patient's reasons.
    withdraw = await open_request(
        consent_service,
        {
            "rrn": rrn,
            "phone": PHONE,
            "policy": "PARTIAL_WITHDRAWAL",
            "exclusions": [{"institution": SNUBH_HUB, "reason": "이사"}],
        },
    )
    assert withdraw.status_code == 201, withdraw.text
    partial = await complete(consent_service, withdraw.json()["challenge_id"], withdraw.json()["dev_code"])
    assert partial.status_code == 201, partial.text
    assert partial.json()["exclusions"] == [{"kind": "institution", "code": SNUBH_HUB, "reason": "이사"}]
    async with httpx.AsyncClient(base_url=consent_service.url) as http:
        records = await http.get(
            "/consent-records",
            params={"patient.identifier": f"{PATIENT_KEY_SYSTEM}|{key}"},
            headers=await consent_service.headers(AGENCY),
        )
    assert [(r["version"], r["channel"]) for r in records.json()] == [(2, "phone"), (1, "phone")]
    rows = [r for r in await consent_service.rows("consent_versions") if r["patient_key"] == key]
    assert (rows[0]["signer_name"], rows[0]["signer_contact"]) == ("김보호", "010-9876-5432")


async def test_only_the_agency_opens_requests(consent_service: ConsentService) -> None:
    body = {"rrn": new_rrn(), "phone": PHONE, "policy": "ENTIRE_CONSENT"}
    assert (await open_request(consent_service, body, client_id=SEVERANCE_CLINIC)).status_code == 403
    assert (await open_request(consent_service, body, client_id=None)).status_code == 401
    assert await consent_service.rows("identity_challenges") == []


async def test_a_request_is_checked_while_the_patient_is_on_the_phone(
    consent_service: ConsentService,
) -> None:
    rrn = new_rrn()
    cases: dict[str, tuple[dict[str, Any], int]] = {
        "withdrawal without consent": ({"policy": "ENTIRE_WITHDRAWAL"}, 409),
        "unknown institution": (
            {"policy": "PARTIAL_CONSENT", "exclusions": [{"institution": "12345678", "reason": "x"}]},
            422,
        ),
        "someone else signs, unnamed": (
            {"policy": "ENTIRE_CONSENT", "signer": {"relationship": "other"}},
            400,
        ),
        "malformed rrn": ({"policy": "ENTIRE_CONSENT", "rrn": "12-34"}, 400),
    }
    for what, (extra, status) in cases.items():
        response = await open_request(consent_service, {"rrn": rrn, "phone": PHONE, **extra})
        assert response.status_code == status, (what, response.text)
        assert rrn not in response.text
    assert await consent_service.rows("identity_challenges") == []
    assert await consent_service.rows("consent_versions") == []


async def test_an_expired_request_records_nothing(consent_service: ConsentService) -> None:
    rrn = new_rrn()
    opened = (
        await open_request(consent_service, {"rrn": rrn, "phone": PHONE, "policy": "ENTIRE_CONSENT"})
    ).json()
    await expire(consent_service, opened["challenge_id"])
    assert (await complete(consent_service, opened["challenge_id"], opened["dev_code"])).status_code == 410
    assert await consent_service.rows("consent_versions") == []


async def test_wrong_codes_by_text_lock_the_portal_too(consent_service: ConsentService) -> None:
    rrn = new_rrn()
    opened = (
        await open_request(consent_service, {"rrn": rrn, "phone": PHONE, "policy": "ENTIRE_CONSENT"})
    ).json()
    statuses = [
        (await complete(consent_service, opened["challenge_id"], wrong(opened["dev_code"]))).status_code
        for _ in range(5)
    ]
    assert statuses == [422, 422, 422, 422, 429]
    # Each refusal is raised after its counted attempt (and at the fifth, the lockout) committed.
    (row,) = [
        r for r in await consent_service.rows("identity_challenges") if r["id"] == opened["challenge_id"]
    ]
    assert (row["attempts"], row["verified_at"]) == (5, None)
    assert row["locked_until"] is not None
    assert (await open_challenge(consent_service, rrn)).status_code == 429
    assert await consent_service.rows("consent_versions") == []
