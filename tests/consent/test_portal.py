"""The patient portal: identity by a one-time code, a short-lived session, consent changes, own history."""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest
from consent_helpers import (
    AGENCY,
    SEVERANCE_CLINIC,
    SEVERANCE_HUB,
    SNUBH_HUB,
    ConsentService,
    LogTap,
    RunningApp,
    TokenSource,
    answer,
    eventually,
    flow,
    new_rrn,
    open_challenge,
    portal_consent,
    portal_get,
    sign_in,
)
from pydantic import ValidationError

from hie_consent.app import create_app
from hie_consent.config import ConsentSettings
from hie_platform.bus import Bus
from hie_platform.natsd import free_port
from hie_platform.settings import Environment
from hie_schemas.codes import DocumentType
from hie_schemas.contract import Kind, subject
from hie_schemas.envelope import Envelope, Source
from hie_schemas.events import AuditRecorded, DocumentPublished, ExchangeKind, ExchangeSent
from hie_schemas.identifiers import PATIENT_KEY_SYSTEM

HUB = Source(service="hub-node", node="test-severance")


async def test_patient_signs_in_and_consents_withdraws_and_consents_again(
    consent_service: ConsentService,
) -> None:
    service = consent_service
    rrn = new_rrn()
    opened = await open_challenge(service, rrn)
    assert opened.status_code == 201, opened.text
    challenge = opened.json()
    assert challenge["attempts_left"] == 5
    assert len(challenge["dev_code"]) == 6
    assert challenge["dev_code"].isdigit()
    verified = await answer(service, challenge["challenge_id"], challenge["dev_code"])
    assert verified.status_code == 200, verified.text
    token = verified.json()
    assert (token["token_type"], token["expires_in"]) == ("Bearer", 600)
    session = {"Authorization": f"Bearer {token['access_token']}"}
    assert (await portal_get(service, session, "/portal/me/consents")).json() == []

    given = await portal_consent(service, session, "ENTIRE_CONSENT")
    assert given.status_code == 201, given.text
    assert given.json()["channel"] == "portal"
    assert given.json()["recorded_by"] == service.settings.agency_institution
    assert given.json()["signer"] == {"relationship": "self", "name": None, "contact": None}
    created_while_consented = datetime.now(UTC)

    partial = await portal_consent(
        service,
        session,
        "PARTIAL_WITHDRAWAL",
        [
            {"institution": SNUBH_HUB, "reason": "다른 병원으로 옮김"},
            {"department": "0300", "reason": "정신건강 기록은 공유하지 않음"},
        ],
    )
    assert partial.status_code == 201, partial.text
    assert partial.json()["version"] == 2
    assert partial.json()["exclusions"] == [
        {"kind": "institution", "code": SNUBH_HUB, "reason": "다른 병원으로 옮김"},
        {"kind": "department", "code": "0300", "reason": "정신건강 기록은 공유하지 않음"},
    ]
    key = service.patient_key(rrn)
    # The reasons are rows of their own, queryable by institution or department.
    reasons = {
        (r["kind"], r["code"]): r["reason"]
        for r in await service.rows("consent_exclusions")
        if r["patient_key"] == key
    }
    assert reasons == {
        ("institution", SNUBH_HUB): "다른 병원으로 옮김",
        ("department", "0300"): "정신건강 기록은 공유하지 않음",
    }
    excluded = await service.decide_http(flow(key, SEVERANCE_HUB, SNUBH_HUB, created=created_while_consented))
    assert excluded["rule"] == "deny-recipient-excluded"

    withdrawn = await portal_consent(service, session, "ENTIRE_WITHDRAWAL")
    assert withdrawn.status_code == 201, withdrawn.text
    created_while_withdrawn = datetime.now(UTC)
    again = await portal_consent(service, session, "ENTIRE_CONSENT")
    assert again.status_code == 201, again.text
    assert again.json()["version"] == 4

    listed = (await portal_get(service, session, "/portal/me/consents")).json()
    assert [(v["version"], v["policy"]) for v in listed] == [
        (4, "ENTIRE_CONSENT"),
        (3, "ENTIRE_WITHDRAWAL"),
        (2, "PARTIAL_WITHDRAWAL"),
        (1, "ENTIRE_CONSENT"),
    ]
    gap = await service.decide_http(flow(key, SEVERANCE_HUB, SNUBH_HUB, created=created_while_withdrawn))
    fresh = await service.decide_http(flow(key, SEVERANCE_HUB, SNUBH_HUB))
    assert (gap["rule"], gap["consent_version"]) == ("deny-not-covered-at-creation", 4)
    assert (fresh["rule"], fresh["consent_version"]) == ("permit-consent", 4)
    # The agency reads the portal's versions as FHIR Consent; an institution, which recorded none of
    # them, finds nothing (issue 12, point 4: it used to read them all, reasons included).
    async with httpx.AsyncClient(base_url=service.url) as http:
        search = {"patient.identifier": f"{PATIENT_KEY_SYSTEM}|{key}"}
        bundle = (
            await http.get("/fhir/Consent", params=search, headers=await service.headers(AGENCY))
        ).json()
        institution = await http.get("/fhir/Consent", params=search, headers=await service.headers())
    assert institution.status_code == 200
    assert institution.json()["total"] == 0
    assert not institution.json().get("entry")
    second = next(e["resource"] for e in bundle["entry"] if e["resource"]["meta"]["versionId"] == "2")
    assert [x["valueCode"] for x in second["extension"]] == ["portal", "self"]
    assert len(second["provision"]["provision"]) == 2
    assert rrn not in json.dumps(bundle)


async def test_session_tokens_and_institution_tokens_never_cross(consent_service: ConsentService) -> None:
    rrn = new_rrn()
    session = await sign_in(consent_service, rrn)
    key = consent_service.patient_key(rrn)
    institution = await consent_service.headers()
    async with httpx.AsyncClient(base_url=consent_service.url) as http:
        # A patient token opens no institution or agency endpoint...
        for method, path, kwargs in (
            ("GET", "/fhir/Consent", {"params": {"patient.identifier": f"{PATIENT_KEY_SYSTEM}|{key}"}}),
            (
                "POST",
                "/decisions",
                {"json": {"query": json.loads(flow(key, SEVERANCE_HUB, SNUBH_HUB).model_dump_json())}},
            ),
            ("GET", "/exchange-history", {"params": {"patient.identifier": f"{PATIENT_KEY_SYSTEM}|{key}"}}),
            (
                "POST",
                "/call-centre/requests",
                {"json": {"rrn": rrn, "phone": "010-1234-5678", "policy": "ENTIRE_CONSENT"}},
            ),
        ):
            response = await http.request(method, path, headers=session, **kwargs)
            assert response.status_code == 401, (path, response.text)
        # ...and an institution token opens no patient endpoint.
        for path in ("/portal/me/consents", "/portal/me/history"):
            assert (await http.get(path, headers=institution)).status_code == 401
    claims = jwt.decode(session["Authorization"].split()[1], options={"verify_signature": False})
    assert claims["aud"] == "hie-patient-portal"
    assert claims["sub"] == key
    forged = jwt.encode(
        {**claims, "sub": consent_service.patient_key(new_rrn())}, "x" * 32, algorithm="HS256"
    )
    expired = jwt.encode(
        {**claims, "exp": int(time.time()) - 60},
        consent_service.settings.session_key,
        algorithm="HS256",
    )
    unsigned = jwt.encode(claims, None, algorithm="none")  # type: ignore[arg-type]  # alg none: no key
    for token in (forged, expired, unsigned, "not-a-token"):
        response = await portal_get(
            consent_service, {"Authorization": f"Bearer {token}"}, "/portal/me/history"
        )
        assert response.status_code == 401


async def test_patient_sees_only_their_own_exchanges_and_accesses(consent_service: ConsentService) -> None:
    service = consent_service
    alice, bob = new_rrn(), new_rrn()
    keys = {who: service.patient_key(who) for who in (alice, bob)}
    now = datetime.now(UTC)
    bus = await Bus.connect(service.nats_url, name="test-hub")
    try:
        for key in keys.values():
            doc = f"doc-{uuid.uuid4().hex[:12]}"
            await bus.publish(
                subject(Kind.DOCUMENT_PUBLISHED, sender="severance"),
                Envelope.wrap(
                    DocumentPublished(
                        hub="severance",
                        patient_key=key,
                        author_institution=SEVERANCE_CLINIC,
                        document_ids=[doc],
                        document_types=[DocumentType.REFERRAL],
                        published_at=now,
                    ),
                    HUB,
                ),
            )
            await bus.publish(
                subject(Kind.EXCHANGE_SENT, sender="severance"),
                Envelope.wrap(
                    ExchangeSent(
                        exchange_id=f"ex-{uuid.uuid4().hex[:12]}",
                        kind=ExchangeKind.REFERRAL,
                        from_institution=SEVERANCE_CLINIC,
                        from_hub="severance",
                        to_institution=SNUBH_HUB,
                        to_hub="snubh",
                        patient_key=key,
                        document_ids=[doc],
                        document_types=[DocumentType.REFERRAL],
                        document_created_at=now,
                        sent_at=now,
                    ),
                    HUB,
                ),
            )
            await bus.publish(
                subject(Kind.AUDIT_RECORDED, sender="snubh"),
                Envelope.wrap(
                    AuditRecorded(
                        node="test-snubh",
                        hub="snubh",
                        sequence=1,
                        hash="0" * 64,
                        action="document.retrieve",
                        actor_institution=SNUBH_HUB,
                        patient_key=key,
                        document_ids=[doc],
                        purpose="treatment",
                        outcome="success",
                        rule="permit-consent",
                        consent_version=1,
                        recorded_at=now + timedelta(seconds=1),
                    ),
                    HUB,
                ),
            )
    finally:
        await bus.close()
    # A break-the-glass read of Alice's records, decided centrally with its justification.
    emergency = await service.decide_http(
        flow(
            keys[alice], SEVERANCE_HUB, SNUBH_HUB, purpose="emergency", justification="의식 없음, 보호자 없음"
        )
    )
    assert emergency["permit"] is True

    async def history_of(rrn: str) -> dict[str, Any] | None:
        body: dict[str, Any] = (
            await portal_get(service, await sign_in(service, rrn), "/portal/me/history")
        ).json()
        ready = body["exchanges"] and any(a["action"] == "document.retrieve" for a in body["accesses"])
        if rrn == alice:
            ready = ready and any(a["flagged"] for a in body["accesses"])
        return body if ready else None

    mine = await eventually(lambda: history_of(alice), "Alice's history")
    theirs = await eventually(lambda: history_of(bob), "Bob's history")
    assert len(mine["exchanges"]) == 1
    assert mine["exchanges"][0]["purpose"] == "treatment"
    (read,) = [a for a in mine["accesses"] if a["action"] == "document.retrieve"]
    assert (read["institution"], read["document_types"], read["purpose"], read["flagged"]) == (
        SNUBH_HUB,
        ["referral"],
        "treatment",
        False,
    )
    (flagged,) = [a for a in mine["accesses"] if a["flagged"]]
    assert flagged["justification"] == "의식 없음, 보호자 없음"
    assert flagged["purpose"] == "emergency"
    assert not any(a["flagged"] for a in theirs["accesses"])
    mine_ids = {e["exchange_id"] for e in mine["exchanges"]} | {
        d for a in mine["accesses"] for d in a["document_ids"]
    }
    theirs_ids = {e["exchange_id"] for e in theirs["exchanges"]} | {
        d for a in theirs["accesses"] for d in a["document_ids"]
    }
    assert not mine_ids & theirs_ids


async def test_bad_portal_changes_are_refused_and_store_nothing(consent_service: ConsentService) -> None:
    rrn = new_rrn()
    session = await sign_in(consent_service, rrn)
    key = consent_service.patient_key(rrn)

    async def versions() -> int:
        return len([r for r in await consent_service.rows("consent_versions") if r["patient_key"] == key])

    assert (await portal_consent(consent_service, session, "ENTIRE_WITHDRAWAL")).status_code == 409
    assert await versions() == 0
    assert (await portal_consent(consent_service, session, "ENTIRE_CONSENT")).status_code == 201
    refusals = {
        "unknown institution": (
            "PARTIAL_WITHDRAWAL",
            [{"institution": "12345678", "reason": "모름"}],
            422,
        ),
        "unknown department": ("PARTIAL_WITHDRAWAL", [{"department": "9999", "reason": "모름"}], 422),
        "partial without exclusion": ("PARTIAL_WITHDRAWAL", [], 422),
        "exclusions on an entire policy": (
            "ENTIRE_CONSENT",
            [{"institution": SNUBH_HUB, "reason": "x"}],
            422,
        ),
        "no reason": ("PARTIAL_WITHDRAWAL", [{"institution": SNUBH_HUB, "reason": " "}], 400),
        "both targets": (
            "PARTIAL_WITHDRAWAL",
            [{"institution": SNUBH_HUB, "department": "0300", "reason": "x"}],
            400,
        ),
        "twice": (
            "PARTIAL_WITHDRAWAL",
            [{"institution": SNUBH_HUB, "reason": "x"}, {"institution": SNUBH_HUB, "reason": "y"}],
            400,
        ),
    }
    for what, (policy, exclusions, status) in refusals.items():
        response = await portal_consent(consent_service, session, policy, exclusions)
        assert response.status_code == status, (what, response.text)
        assert response.json()["resourceType"] == "OperationOutcome"
    assert await versions() == 1
    assert [r for r in await consent_service.rows("consent_exclusions") if r["patient_key"] == key] == []


@pytest.fixture(params=[Environment.TEST, Environment.PRODUCTION])
async def undeveloped(
    request: pytest.FixtureRequest, nats_url: str, registry: TokenSource, tmp_path: Any, unique: str
) -> AsyncIterator[ConsentService]:
    """A consent service outside development (real secrets, as production requires)."""
    port = free_port()
    settings = ConsentSettings(
        environment=request.param,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'consent.db'}",
        nats_url=nats_url,
        registry_url=registry.url,
        port=port,
        node=f"consent-{unique}",
        history_consumer=f"consent-history-{unique}",
        access_consumer=f"consent-access-{unique}",
        patient_key_secret=secrets.token_urlsafe(32),
        portal_session_secret=secrets.token_urlsafe(32),
    )
    running = await RunningApp(create_app(settings), port).start()
    yield ConsentService(running.url, settings, registry, nats_url)
    await running.stop()


async def test_development_codes_are_shown_only_in_development(
    consent_service: ConsentService, undeveloped: ConsentService
) -> None:
    with LogTap() as tap:
        shown = (await open_challenge(consent_service, new_rrn())).json()
        hidden = await open_challenge(undeveloped, new_rrn())
    assert any(shown["dev_code"] in line for line in tap.lines)
    assert hidden.status_code == 201
    assert "dev_code" not in hidden.json()
    # One development line (the development service's); none from the service outside development.
    assert len([line for line in tap.lines if "dev_code" in line]) == 1


def test_production_refuses_a_placeholder_session_secret() -> None:
    with pytest.raises(ValidationError, match="portal_session_secret"):
        ConsentSettings(environment=Environment.PRODUCTION, patient_key_secret=secrets.token_urlsafe(32))
    with pytest.raises(ValidationError, match="portal_session_secret"):
        ConsentSettings(
            environment=Environment.PRODUCTION,
            patient_key_secret=secrets.token_urlsafe(32),
            portal_session_secret="changeme",
        )
    ConsentSettings(
        environment=Environment.PRODUCTION,
        patient_key_secret=secrets.token_urlsafe(32),
        portal_session_secret=secrets.token_urlsafe(32),
    )
