"""The agency console in a real browser: sign-in, a clinic through review, agreement, approval and
activation (then it gets a token), refusals that change nothing, directory, statistics."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import httpx
import nats
from web_flows import agency, apply_clinic, console_sign_in, history
from web_helpers import SEVERANCE_CLINIC, Browser, eventually, new_code

from hie_platform.bus import Bus
from hie_schemas.codes import DocumentType
from hie_schemas.contract import Kind, subject
from hie_schemas.envelope import Envelope, Source
from hie_schemas.events import ExchangeKind, ExchangeSent


async def step(browser: Browser, action: str, reason: str) -> None:
    await browser.fill(f"reason-{action}", reason)
    await browser.submit(f"#do-{action}")


async def test_the_agency_approves_a_waiting_clinic_which_then_gets_a_token(
    browser: Browser, registry: Any
) -> None:
    code = new_code()
    await apply_clinic(registry, code)
    await console_sign_in(browser, registry)
    rows = await browser.texts("table tbody tr")
    mine = next(r for r in rows if code in r)
    assert "신청" in mine
    assert "검토 전" in mine
    await browser.shot("applications")

    await browser.open(f"{registry.url}/console/institutions/{code}")
    assert await browser.text("#state") == "신청"
    await step(browser, "review", "표본 문서와 DICOM 확인")
    assert browser.status == 200
    assert "적합성 검토를 마쳤습니다" in await browser.text("[role=status]")
    evidence = await browser.text("section[aria-labelledby='evidence-title']")
    assert "통과" in evidence
    assert "표본 1 (care-record-summary)" in evidence
    await browser.shot("reviewed-with-evidence")

    await step(browser, "sign-agreement", "거점과 협약서 서면 체결")
    assert await browser.text("#state") == "협약 체결"
    await step(browser, "approve", "적합성 검토 통과")
    assert await browser.text("#state") == "승인 (운영 전)"
    client_id = await browser.text("#issued-client-id")
    secret = await browser.text("#issued-client-secret")
    assert client_id == code
    assert len(secret) >= 40
    await browser.shot("approved-credentials-once")
    await browser.open(f"{registry.url}/console/institutions/{code}")
    assert secret not in await browser.text()  # shown once, on the approval's answer only

    form = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}
    async with httpx.AsyncClient() as http:
        before = await http.post(f"{registry.url}/oauth2/token", data=form)
        assert before.status_code == 401  # approved is not yet operating
        await step(browser, "activate", "운영 개시")
        assert await browser.text("#state") == "운영 중"
        token = await http.post(f"{registry.url}/oauth2/token", data=form)
    assert token.status_code == 200, token.text
    assert token.json()["token_type"] == "Bearer"
    await browser.shot("active")

    steps = await history(registry, code)
    assert [(h["action"], h["actor"], h["reason"]) for h in steps[1:]] == [
        ("review", "agency", "표본 문서와 DICOM 확인"),
        ("sign-agreement", "agency", "거점과 협약서 서면 체결"),
        ("approve", "agency", "적합성 검토 통과"),
        ("activate", "agency", "운영 개시"),
    ]


async def test_a_step_without_a_reason_is_refused_and_changes_nothing(
    browser: Browser, registry: Any
) -> None:
    code = new_code()
    await apply_clinic(registry, code, with_sample=False)
    await console_sign_in(browser, registry)
    await browser.open(f"{registry.url}/console/institutions/{code}")
    # The browser's own check would stop an empty reason; a reason of blanks gets past it.
    await step(browser, "review", "   ")
    assert browser.status == 400
    alert = await browser.text("[role=alert]")
    assert "입력한 내용을 확인해 주세요 (400)" in alert
    assert "reason" in alert
    assert "아무것도 변경되지 않았습니다" in alert
    assert await browser.text("#state") == "신청"
    await browser.shot("missing-reason")
    await browser.script("document.getElementById('reason-reject').removeAttribute('required')")
    await browser.submit("#do-reject")
    assert browser.status == 400
    assert [h["action"] for h in await history(registry, code)] == ["apply"]


async def test_a_double_submitted_step_changes_nothing_the_second_time(
    browser: Browser, registry: Any
) -> None:
    code = new_code()
    await apply_clinic(registry, code, with_sample=False)
    await console_sign_in(browser, registry)
    await browser.open(f"{registry.url}/console/institutions/{code}")
    await browser.fill("reason-review", "검토 시작")
    form = await browser.form_html("#do-review")
    await browser.submit("#do-review")
    assert browser.status == 200
    await browser.replay_form(form, "#do-review")
    assert browser.status == 409
    assert "이미 제출" in await browser.text("[role=alert]") or "already submitted" in await browser.text(
        "[role=alert]"
    )
    await browser.shot("double-submit")
    assert [h["action"] for h in await history(registry, code)] == ["apply", "review"]


async def test_sign_in_refuses_a_wrong_secret_and_a_clinic(browser: Browser, registry: Any) -> None:
    await browser.open(f"{registry.url}/console/sign-in")
    await browser.fill("client_id", "agency")
    await browser.fill("client_secret", "not-the-secret")
    await browser.submit("form[action='/console/sign-in'] button")
    assert browser.status == 401
    assert "로그인이 필요합니다" in await browser.text("[role=alert]")
    assert "hie_console_session" not in await browser.cookies()
    await browser.fill("client_id", SEVERANCE_CLINIC)
    await browser.fill("client_secret", registry.credentials[SEVERANCE_CLINIC])
    await browser.submit("form[action='/console/sign-in'] button")
    assert browser.status == 403
    assert "hie_console_session" not in await browser.cookies()
    await browser.open(f"{registry.url}/console/directory")
    assert browser.status == 401


async def test_the_directory_searches_and_pages(browser: Browser, registry: Any) -> None:
    await console_sign_in(browser, registry)
    await browser.open(f"{registry.url}/console/directory")
    await browser.fill("f-hub", "severance")
    await browser.fill("f-kind", "clinic")
    await browser.submit(".filters button")
    rows = await browser.texts("table tbody tr")
    # The three seeded clinics of Severance, and any that other tests of this session admitted there.
    assert {"11301001", "11301002", "11301003"} <= {re.search(r"\b\d{8}\b", r)[0] for r in rows}
    assert all("협력의료기관" in r and "severance" in r for r in rows)
    await browser.shot("directory-filtered")
    await browser.open(f"{registry.url}/console/directory")
    assert "1–20번째" in await browser.text("#summary")  # 25 demo institutions and more: two pages
    await browser.open(str(await browser.attribute("a[rel=next]", "href")))
    assert "21–" in await browser.text("#summary")
    await browser.open(f"{registry.url}/console/directory?page=zero")
    assert browser.status == 400


async def test_statistics_chart_and_audit_status(browser: Browser, registry: Any, nats_url: str) -> None:
    sent = ExchangeSent(
        exchange_id=f"ex-{new_code()}",
        kind=ExchangeKind.REFERRAL,
        from_institution="11100001",
        from_hub="severance",
        to_institution="31100002",
        to_hub="snubh",
        patient_key="a" * 64,
        document_ids=["doc-stat"],
        document_types=[DocumentType.REFERRAL],
        document_created_at=datetime.now(UTC),
        sent_at=datetime.now(UTC),
    )
    nc = await nats.connect(nats_url)
    try:
        await Bus(nc).publish(
            subject(Kind.EXCHANGE_SENT, sender=sent.from_hub),
            Envelope.wrap(sent, Source(service="hub", node="web")),
        )
    finally:
        await nc.close()

    async def counted() -> bool | None:
        async with httpx.AsyncClient() as http:
            stats = (await http.get(f"{registry.url}/statistics", headers=await agency(registry))).json()
        return True if stats["exchanges_per_month"] else None

    await eventually(counted, "the exchange in the registry's statistics")
    await console_sign_in(browser, registry)
    await browser.open(f"{registry.url}/console/statistics")
    assert browser.status == 200
    assert await browser.attribute("svg.chart", "role") == "img"
    bars = await browser.script("return document.querySelectorAll('svg.chart rect').length")
    assert bars >= 2  # a bar and the legend's swatch
    month = datetime.now(UTC).strftime("%Y-%m")
    assert month in await browser.text("section[aria-labelledby='exchanges-title'] table")
    statuses = await browser.texts("td.audit-status")
    assert len(statuses) >= 6
    assert set(statuses) == {"보고되지 않음"}
    await browser.shot("statistics")
