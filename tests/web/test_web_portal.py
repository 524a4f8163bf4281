"""The patient portal in a real browser: sign-in with a one-time code, consent and partial withdrawal
(then a flow to the excluded institution is refused), the exchange history, and refusals."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import nats
from web_flows import ConsentWeb, open_code_page, portal_sign_in
from web_helpers import SEVERANCE_CLINIC, SEVERANCE_HUB, SNUBH_HUB, Browser, eventually, new_rrn

from hie_consent.models import IdentityChallenge
from hie_platform.bus import Bus
from hie_platform.db import Database
from hie_platform.web import korean_time
from hie_schemas.codes import DocumentType
from hie_schemas.consent import FlowQuery
from hie_schemas.contract import Kind, subject
from hie_schemas.envelope import Envelope, Source
from hie_schemas.events import (
    EmergencyAccessPermitted,
    ExchangeKind,
    ExchangeSent,
)

HUB = Source(service="hub-node", node="web-test")


async def decide(consent: ConsentWeb, rrn: str, recipient: str) -> dict[str, Any]:
    """The central decision point, as a hub asks it before sending a referral."""
    now = datetime.now(UTC)
    query = FlowQuery(
        patient_key=consent.patient_key(rrn),
        holder=SEVERANCE_HUB,
        recipient=recipient,
        document_created_at=now,
        at=now,
    )
    async with httpx.AsyncClient(base_url=consent.url) as http:
        response = await http.post(
            "/decisions",
            content=f'{{"query": {query.model_dump_json()}}}',
            headers={**await consent.bearer(SEVERANCE_HUB), "Content-Type": "application/json"},
        )
    assert response.status_code == 200, response.text
    decision: dict[str, Any] = response.json()["decision"]
    return decision


async def test_a_patient_withdraws_consent_for_one_institution_and_a_referral_to_it_is_refused(
    browser: Browser, consent_web: ConsentWeb
) -> None:
    rrn = new_rrn()
    await portal_sign_in(browser, consent_web, rrn)
    assert "아직 동의한 적이 없습니다" in await browser.text("#consent-state")
    await browser.shot("no-consent-yet")
    await browser.submit("#give-consent")
    assert browser.status == 200
    assert "동의가 저장되었습니다" in await browser.text("[role=status]")
    assert "동의 중" in await browser.text("#consent-state")

    await browser.fill("inst_code_0", SNUBH_HUB)
    await browser.fill("inst_reason_0", "다른 병원에 기록을 보내고 싶지 않음")
    await browser.shot("partial-withdrawal-filled")
    await browser.submit("#save-exclusions")
    assert browser.status == 200, await browser.text()
    state = await browser.text("section[aria-labelledby='current-title']")
    assert "부분 철회" in state
    assert "분당서울대학교병원" in state
    assert "다른 병원에 기록을 보내고 싶지 않음" in state
    await browser.shot("partial-withdrawal-saved")

    refused = await decide(consent_web, rrn, SNUBH_HUB)
    assert (refused["permit"], refused["rule"]) == (False, "deny-recipient-excluded")
    allowed = await decide(consent_web, rrn, SEVERANCE_CLINIC)
    assert (allowed["permit"], allowed["rule"]) == (True, "permit-consent")
    versions = await consent_web.versions(rrn)
    assert [(v["policy"], v["channel"]) for v in versions] == [
        ("PARTIAL_WITHDRAWAL", "portal"),
        ("ENTIRE_CONSENT", "portal"),
    ]
    assert versions[0]["exclusions"] == [
        {"kind": "institution", "code": SNUBH_HUB, "reason": "다른 병원에 기록을 보내고 싶지 않음"}
    ]


async def publish(nats_url: str, *events: tuple[str, Any]) -> None:
    nc = await nats.connect(nats_url)
    try:
        bus = Bus(nc)
        for subject, payload in events:
            await bus.publish(subject, Envelope.wrap(payload, HUB))
    finally:
        await nc.close()


def referral(patient_key: str) -> ExchangeSent:
    at = datetime.now(UTC) - timedelta(minutes=3)
    return ExchangeSent(
        exchange_id=f"ex-{uuid.uuid4().hex[:12]}",
        kind=ExchangeKind.REFERRAL,
        task_id="task-web",
        from_institution=SEVERANCE_HUB,
        from_hub="severance",
        to_institution=SNUBH_HUB,
        to_hub="snubh",
        patient_key=patient_key,
        document_ids=[f"doc-{uuid.uuid4().hex[:8]}"],
        document_types=[DocumentType.REFERRAL, DocumentType.CARE_RECORD_SUMMARY],
        document_created_at=at,
        sent_at=at,
    )


async def test_a_patient_sees_a_referral_and_an_emergency_access_in_the_history(
    browser: Browser, consent_web: ConsentWeb
) -> None:
    rrn = new_rrn()
    key = consent_web.patient_key(rrn)
    sent = referral(key)
    emergency = EmergencyAccessPermitted(
        patient_key=key,
        holder=SEVERANCE_HUB,
        recipient=SNUBH_HUB,
        justification="의식 없는 응급환자, 보호자 없음",
        decided_by="hub-snubh",
        decided_at=datetime.now(UTC),
    )
    await publish(
        consent_web.nats_url,
        (subject(Kind.EXCHANGE_SENT, sender=sent.from_hub), sent),
        (subject(Kind.EMERGENCY_PERMITTED, sender="snubh"), emergency),
    )
    await portal_sign_in(browser, consent_web, rrn)

    async def shown() -> str | None:
        await browser.open(f"{consent_web.url}/portal/history")
        body = await browser.text("main")
        return body if "응급 열람" in body and "진료의뢰서" in body else None

    body = await eventually(shown, "the referral and the emergency access on the history page")
    assert browser.status == 200
    exchange = (await browser.texts("#exchanges tbody tr"))[0]
    for fragment in ("진료의뢰", "세브란스병원", "분당서울대학교병원", "진료의뢰서, 진료기록요약지", "보냄"):
        assert fragment in exchange
    assert korean_time(sent.sent_at) in exchange
    flagged = await browser.texts("#accesses tr.emergency")
    assert len(flagged) == 1
    assert "의식 없는 응급환자, 보호자 없음" in flagged[0]
    assert "응급 열람" in body
    await browser.shot("history")
    await browser.open(f"{consent_web.url}/portal/history/{sent.exchange_id}")
    assert browser.status == 200
    assert "분당서울대학교병원" in await browser.text("main table")
    await browser.open(f"{consent_web.url}/portal/history?lang=en")
    assert await browser.attribute("html", "lang") == "en"
    assert "Severance Hospital" in await browser.text("#exchanges")
    await browser.shot("history-en")


async def test_another_patients_history_is_out_of_reach(browser: Browser, consent_web: ConsentWeb) -> None:
    victim, intruder = new_rrn(), new_rrn()
    sent = referral(consent_web.patient_key(victim))
    await publish(consent_web.nats_url, (subject(Kind.EXCHANGE_SENT, sender=sent.from_hub), sent))
    await portal_sign_in(browser, consent_web, intruder)
    await browser.open(f"{consent_web.url}/portal/history/{sent.exchange_id}")
    assert browser.status == 404
    assert "찾을 수 없습니다" in await browser.text("[role=alert]")
    await browser.shot("other-patients-exchange")
    key = consent_web.patient_key(victim)
    await browser.open(f"{consent_web.url}/portal/history?patient.identifier={key}")
    assert browser.status == 403
    alert = await browser.text("[role=alert]")
    assert "only your own records" in alert
    await browser.open(f"{consent_web.url}/portal/history")
    assert sent.exchange_id not in await browser.text()
    assert "전송된 기록이 없습니다" in await browser.text()


async def test_wrong_and_expired_codes_sign_no_one_in(browser: Browser, consent_web: ConsentWeb) -> None:
    rrn = new_rrn()
    code = await open_code_page(browser, consent_web, rrn)
    await browser.fill("code", f"{(int(code) + 1) % 10**6:06d}")
    await browser.submit("form[action='/portal/sign-in/verify'] button")
    assert browser.status == 422
    alert = await browser.text("[role=alert]")
    assert "처리할 수 없는 내용입니다 (422)" in alert
    assert "4 attempt(s) left" in alert
    assert "남은 입력 횟수: 4" in await browser.text()
    assert "hie_portal_session" not in await browser.cookies()
    await browser.shot("wrong-code")

    challenge = await browser.attribute("input[name=challenge_id]", "value")
    db = Database(consent_web.settings.database_url)
    try:
        async with db.transaction() as session:
            row = await session.get(IdentityChallenge, challenge)
            assert row is not None
            row.expires_at = datetime.now(UTC) - timedelta(seconds=1)
    finally:
        await db.dispose()
    await browser.fill("code", code)
    await browser.submit("form[action='/portal/sign-in/verify'] button")
    assert browser.status == 410
    assert "인증번호가 만료되었습니다" in await browser.text("[role=alert]")
    assert "hie_portal_session" not in await browser.cookies()
    await browser.shot("expired-code")
    await browser.open(f"{consent_web.url}/portal/consent")
    assert browser.status == 401
    assert await consent_web.versions(rrn) == []


async def test_a_double_submitted_consent_form_changes_nothing_the_second_time(
    browser: Browser, consent_web: ConsentWeb
) -> None:
    rrn = new_rrn()
    await portal_sign_in(browser, consent_web, rrn)
    await browser.submit("#give-consent")
    await browser.fill("inst_code_0", SNUBH_HUB)
    await browser.fill("inst_reason_0", "개인 사정")
    form = await browser.form_html("#save-exclusions")
    await browser.submit("#save-exclusions")
    assert browser.status == 200
    await browser.replay_form(form, "#save-exclusions")
    assert browser.status == 409
    assert "already submitted" in await browser.text("[role=alert]")
    await browser.shot("double-submit")
    assert [v["policy"] for v in await consent_web.versions(rrn)] == ["PARTIAL_WITHDRAWAL", "ENTIRE_CONSENT"]


async def test_an_exclusion_without_a_reason_or_to_an_unknown_institution_changes_nothing(
    browser: Browser, consent_web: ConsentWeb
) -> None:
    rrn = new_rrn()
    await portal_sign_in(browser, consent_web, rrn)
    await browser.submit("#give-consent")
    await browser.fill("dept_code_0", "0300")
    await browser.submit("#save-exclusions")
    assert browser.status == 400
    assert "reason" in await browser.text("[role=alert]")
    assert "동의 내용은 바뀌지 않았습니다" in await browser.text("[role=alert]")
    await browser.shot("missing-reason")
    await browser.fill("dept_code_0", "")
    await browser.fill("inst_code_0", "99999998")
    await browser.fill("inst_reason_0", "모르는 기관")
    await browser.submit("#save-exclusions")
    assert browser.status == 422
    assert "not in the registry" in await browser.text("[role=alert]")
    assert [v["policy"] for v in await consent_web.versions(rrn)] == ["ENTIRE_CONSENT"]


async def test_the_institution_finder_reads_the_registry_directory(
    browser: Browser, consent_web: ConsentWeb
) -> None:
    rrn = new_rrn()
    await portal_sign_in(browser, consent_web, rrn)
    await browser.open(f"{consent_web.url}/portal/institutions")
    await browser.fill("f-name", "튼튼내과")
    await browser.submit(".filters button")
    rows = await browser.texts("table tbody tr")
    assert len(rows) == 6
    assert all("튼튼내과의원" in r for r in rows)
    await browser.shot("finder")
    await browser.open(str(await browser.attribute("table tbody tr a", "href")))
    assert (await browser.attribute("#inst_code_0", "value") or "").isdigit()
