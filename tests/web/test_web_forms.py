"""Form and session security at the HTTP level (no browser needed): CSRF tokens, forged origins,
cookie attributes, the development code only in development, and the console's secret setting."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from web_flows import ConsentWeb, apply_clinic, history, start_consent
from web_helpers import PHONE, new_code, new_rrn

from hie_consent.models import IdentityChallenge
from hie_platform.db import Database
from hie_platform.settings import ConfigError, Environment
from hie_registry.config import RegistrySettings
from hie_registry.console.settings import ConsoleSettings


def token_of(html: str, action: str) -> str:
    """The form token of the form that posts to ``action``."""
    start = html.index(f'action="{action}"')
    found = re.search(r'name="form_token" value="([^"]+)"', html[start:])
    assert found is not None
    return found.group(1)


async def console_session(http: httpx.AsyncClient, registry: Any) -> httpx.Response:
    page = await http.get("/console/sign-in")
    return await http.post(
        "/console/sign-in",
        data={
            "form_token": token_of(page.text, "/console/sign-in"),
            "client_id": "agency",
            "client_secret": registry.credentials["agency"],
        },
    )


async def test_console_session_cookie_is_httponly_strict_and_secure_over_https(registry: Any) -> None:
    async with httpx.AsyncClient(base_url=registry.url) as http:
        signed = await console_session(http, registry)
        assert signed.status_code == 303
        cookie = next(
            c for c in signed.headers.get_list("set-cookie") if c.startswith("hie_console_session=")
        )
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie
        assert "Path=/console" in cookie
        assert "Secure" not in cookie  # plain HTTP on loopback
        page = await http.get("/console/sign-in", headers={"X-Forwarded-Proto": "https"})
        assert page.status_code == 303  # already signed in
    async with httpx.AsyncClient(base_url=registry.url, headers={"X-Forwarded-Proto": "https"}) as http:
        page = await http.get("/console/sign-in")
        browser_cookie = page.headers["set-cookie"]
        assert "Secure" in browser_cookie
        assert page.headers["content-security-policy"].startswith("default-src 'none'")
        assert page.headers["cache-control"] == "no-store"


async def test_a_step_without_a_valid_token_or_from_another_site_is_refused(registry: Any) -> None:
    code = new_code()
    await apply_clinic(registry, code, with_sample=False)
    async with httpx.AsyncClient(base_url=registry.url) as http:
        await console_session(http, registry)
        page = await http.get(f"/console/institutions/{code}")
        action = f"/console/institutions/{code}/review"
        token = token_of(page.text, action)
        no_token = await http.post(action, data={"reason": "검토 시작"})
        assert no_token.status_code == 403
        assert "security token" in no_token.text
        wrong_form = await http.post(
            f"/console/institutions/{code}/reject", data={"reason": "반려", "form_token": token}
        )
        assert wrong_form.status_code == 403
        forged = await http.post(
            action,
            data={"reason": "검토 시작", "form_token": token},
            headers={"Origin": "https://evil.example"},
        )
        assert forged.status_code == 403
        assert "another site" in forged.text
    async with httpx.AsyncClient(base_url=registry.url) as other_browser:
        await console_session(other_browser, registry)
        stolen = await other_browser.post(action, data={"reason": "검토 시작", "form_token": token})
        assert stolen.status_code == 403
    assert [h["action"] for h in await history(registry, code)] == ["apply"]


async def _open_sign_in(http: httpx.AsyncClient) -> tuple[httpx.Response, str, str]:
    """Open a sign-in from the page: the code page, the texted code (the demo SMS shows it) and the
    challenge id."""
    page = await http.get("/portal/sign-in")
    opened = await http.post(
        "/portal/sign-in",
        data={"form_token": token_of(page.text, "/portal/sign-in"), "rrn": new_rrn(), "phone": PHONE},
    )
    assert opened.status_code == 200
    code = re.search(r"인증번호는 (\d{6})", opened.text)
    assert code is not None
    challenge = re.search(r'name="challenge_id" value="([^"]+)"', opened.text)
    assert challenge is not None
    return opened, code.group(1), challenge.group(1)


async def test_the_portal_session_cookie_is_the_short_lived_patient_session(consent_web: ConsentWeb) -> None:
    async with httpx.AsyncClient(base_url=consent_web.url) as http:
        opened, code, challenge_id = await _open_sign_in(http)
        verified = await http.post(
            "/portal/sign-in/verify",
            data={
                "form_token": token_of(opened.text, "/portal/sign-in/verify"),
                "challenge_id": challenge_id,
                "code": code,
            },
        )
        assert verified.status_code == 303
        cookie = verified.headers["set-cookie"]
        assert cookie.startswith("hie_portal_session=")
        for attribute in ("HttpOnly", "SameSite=strict", "Path=/portal", "Max-Age=600"):
            assert attribute in cookie
        token = cookie.split(";")[0].split("=", 1)[1]
        # The page session is the API's patient session: the JSON API accepts it as a bearer token.
        mine = await http.get("/portal/me/consents", headers={"Authorization": f"Bearer {token}"})
        assert mine.status_code == 200
        assert mine.json() == []


async def test_wrong_codes_on_the_sign_in_page_are_counted_and_lock(consent_web: ConsentWeb) -> None:
    """Each wrong code is refused (raised) after its attempt is committed: four show the code page
    again with the attempts left, the fifth locks the challenge (429, back to the sign-in page, no
    session), and the database holds the five attempts and the lockout; another patient can still
    start a sign-in. (That the right code is then refused too is tests/consent/test_portal.py's.)"""
    async with httpx.AsyncClient(base_url=consent_web.url) as http:
        opened, code, challenge_id = await _open_sign_in(http)
        wrong = f"{(int(code) + 1) % 10**6:06d}"
        shown = opened

        async def verify(answer: str) -> httpx.Response:
            return await http.post(
                "/portal/sign-in/verify",
                data={
                    "form_token": token_of(shown.text, "/portal/sign-in/verify"),
                    "challenge_id": challenge_id,
                    "code": answer,
                },
            )

        for left in (4, 3, 2, 1):
            shown = await verify(wrong)
            assert shown.status_code == 422, shown.text
            assert f'name="attempts_left" value="{left}"' in shown.text
        locked = await verify(wrong)
        assert locked.status_code == 429, locked.text
        assert 'action="/portal/sign-in/verify"' not in locked.text
        assert "hie_portal_session" not in http.cookies
        page = await http.get("/portal/sign-in")
        again = await http.post(
            "/portal/sign-in",
            data={"form_token": token_of(page.text, "/portal/sign-in"), "rrn": new_rrn(), "phone": PHONE},
        )
        assert again.status_code == 200  # another patient is not locked
    db = Database(consent_web.settings.database_url)
    try:
        async with db.read_sessions() as session:
            row = await session.get(IdentityChallenge, challenge_id)
    finally:
        await db.dispose()
    assert row is not None
    assert (row.attempts, row.verified_at) == (5, None)
    assert row.locked_until is not None


async def test_the_development_code_is_shown_only_in_development(
    consent_web: ConsentWeb, nats_url: str, tmp_path: Any
) -> None:
    running, _settings = await start_consent(
        nats_url,
        consent_web.registry,
        tmp_path,
        f"consent-test-env-{new_code()}",
        environment=Environment.TEST,
    )
    try:
        async with httpx.AsyncClient(base_url=running.url) as http:
            page = await http.get("/portal/sign-in")
            opened = await http.post(
                "/portal/sign-in",
                data={"form_token": token_of(page.text, "/portal/sign-in"), "rrn": new_rrn(), "phone": PHONE},
            )
        assert opened.status_code == 200
        assert 'name="code"' in opened.text
        assert "dev-code" not in opened.text
        assert re.search(r"\b\d{6}\b", opened.text) is None
    finally:
        await running.stop()


def test_the_console_refuses_a_placeholder_secret_in_production() -> None:
    production = RegistrySettings(environment=Environment.PRODUCTION)
    with pytest.raises(ConfigError):
        ConsoleSettings().checked(production)
    real = ConsoleSettings(session_secret="a9f3c1e07b5d4e2f8a6b0c9d1e3f5a7b")
    assert real.checked(production) is real
    assert ConsoleSettings().checked(RegistrySettings()) is not None  # development: the placeholder is fine
