"""A patient portal session opens nothing after sign-out, at any consent replica (issue 12, point 14;
docs/security.md, docs/consent.md "Signing out").

The patient signs in through the real identity flow (the pages, or the API), a copy of the cookie or
token is taken (a shared PC, a stolen cookie), the patient signs out; the copy is then refused on
every portal route by the consent service and by a second consent replica sharing its database (as
deploy/k8s runs two), while another open session of the same patient keeps working at both.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

import httpx
import pytest
from attacks_support import (
    START_TIMEOUT,
    AttackFederation,
    correlation,
    new_rrn,
    refused,
    root_conftest,
    unverified,
)
from sqlalchemy import select

from hie_consent.app import create_app as create_consent
from hie_consent.config import ConsentSettings
from hie_consent.models import EndedPortalSession
from hie_consent.repository import as_utc
from hie_platform.db import Database
from hie_platform.natsd import free_port

PHONE = "010-1234-5678"
COOKIE = "hie_portal_session"
# The API's portal routes, each with what an accepted call sends (the session names the patient).
API_ROUTES: list[tuple[str, str, dict[str, str] | None]] = [
    ("GET", "/portal/me/consents", None),
    ("GET", "/portal/me/history", None),
    ("POST", "/portal/me/consents", {"policy": "ENTIRE_CONSENT"}),
    ("DELETE", "/portal/session", None),
]
# The pages that need a session: each answers 401 with the sign-in form when there is none.
PAGES = ["/portal/consent", "/portal/history", f"/portal/history/{uuid.uuid4()}"]


class Registry(Protocol):
    """The registry fixture of tests/conftest.py, as far as this module uses it."""

    url: str


@dataclass(frozen=True)
class Replicas:
    """The federation's consent service and a second replica on the same database."""

    urls: tuple[str, str]


@pytest.fixture(scope="module")
def replicas(attack_federation: AttackFederation, pytestconfig: pytest.Config) -> Iterator[Replicas]:
    fed = attack_federation
    first: ConsentSettings = fed.services["consent"].settings
    # One public URL (the issuer of the portal's tokens), one database, one session secret: a replica.
    settings = first.model_copy(
        update={"port": free_port(), "public_url": first.base_url, "node": "attack-consent-2"}
    )
    app = root_conftest(pytestconfig).RunningApp(create_consent(settings), settings.port)
    running = fed.run(app.start(timeout=START_TIMEOUT), timeout=START_TIMEOUT + 30)
    yield Replicas((fed.url("consent"), running.url))
    fed.run(running.stop(), timeout=60)


def _form_token(html: str, action: str) -> str:
    start = html.index(f'action="{action}"')
    found = re.search(r'name="form_token" value="([^"]+)"', html[start:])
    assert found is not None, action
    return found.group(1)


def _hidden(html: str, name: str) -> str:
    found = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert found is not None, name
    return found.group(1)


def _web_sign_in(http: httpx.Client, rrn: str) -> str:
    """RRN + mobile on the sign-in page, the (development) code on the code page: the consent page."""
    page = http.get("/portal/sign-in")
    assert page.status_code == 200, page.text
    started = http.post(
        "/portal/sign-in",
        data={"form_token": _form_token(page.text, "/portal/sign-in"), "rrn": rrn, "phone": PHONE},
    )
    assert started.status_code == 200, started.text
    shown = re.search(r'id="dev-code">[^<]*?(\d{6})', started.text)
    assert shown is not None, started.text
    verified = http.post(
        "/portal/sign-in/verify",
        data={
            "form_token": _form_token(started.text, "/portal/sign-in/verify"),
            "challenge_id": _hidden(started.text, "challenge_id"),
            "attempts_left": _hidden(started.text, "attempts_left"),
            "code": shown.group(1),
        },
    )
    assert verified.status_code == 303, verified.text
    consent = http.get("/portal/consent")
    assert consent.status_code == 200, consent.text
    assert 'action="/portal/sign-out"' in consent.text
    return consent.text


def _api_sign_in(url: str, rrn: str) -> str:
    """The portal API's sign-in: a challenge, the (development) code, the session token."""
    with httpx.Client(base_url=url, timeout=60) as http:
        opened = http.post("/portal/identity/challenges", json={"rrn": rrn, "phone": PHONE})
        assert opened.status_code == 201, opened.text
        challenge = opened.json()
        verified = http.post(
            f"/portal/identity/challenges/{challenge['challenge_id']}/verify",
            json={"code": challenge["dev_code"]},
        )
    assert verified.status_code == 200, verified.text
    token: str = verified.json()["access_token"]
    return token


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "X-Correlation-ID": correlation()}


def _consents(url: str, token: str) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=60) as http:
        return http.get("/portal/me/consents", headers=_bearer(token))


def _assert_api_refuses(url: str, token: str) -> None:
    with httpx.Client(base_url=url, timeout=60) as http:
        for method, path, body in API_ROUTES:
            response = http.request(method, path, json=body, headers=_bearer(token))
            assert "signed out" in refused(response, 401), f"{url} {method} {path}"


def _assert_pages_refuse(url: str, cookies: dict[str, str], consent_form: str) -> None:
    """The pages with the copied cookies: the home page sends to sign-in, the others show the sign-in
    form (401) and nothing signed-in; a consent form filled in before sign-out changes nothing."""
    with httpx.Client(base_url=url, cookies=cookies, timeout=60) as replay:
        home = replay.get("/portal/")
        assert home.status_code == 303, f"{url}: {home.status_code}"
        assert home.headers["location"].endswith("/portal/sign-in")
        sign_in = replay.get("/portal/sign-in")
        assert sign_in.status_code == 200, f"{url}: {sign_in.status_code}"
        assert 'action="/portal/sign-in"' in sign_in.text
        for page in PAGES:
            response = replay.get(page)
            assert response.status_code == 401, f"{url}{page}: {response.status_code}"
            assert 'action="/portal/sign-out"' not in response.text
            assert 'action="/portal/sign-in"' in response.text
        form = {"form_token": consent_form, "policy": "ENTIRE_CONSENT"}
        changed = replay.post("/portal/consent", data=form)
        assert changed.status_code == 401, f"{url}: {changed.status_code}"
        assert 'action="/portal/sign-in"' in changed.text


def test_a_portal_cookie_opens_nothing_after_sign_out(
    attack_federation: AttackFederation, replicas: Replicas
) -> None:
    """The patient signs out on the page; the copied cookie (and its token on the API) is refused by
    both replicas on every portal route; the patient's other session still works at both."""
    rrn = new_rrn()
    other = _api_sign_in(replicas.urls[0], rrn)
    with httpx.Client(base_url=replicas.urls[0], timeout=60) as http:
        consent_page = _web_sign_in(http, rrn)
        copied = {cookie.name: cookie.value for cookie in http.cookies.jar}
        token = copied[COOKIE]
        for url in replicas.urls:  # the control: the copy opens everything before sign-out
            assert _consents(url, token).status_code == 200, url
            with httpx.Client(base_url=url, cookies=copied, timeout=60) as before:
                assert before.get("/portal/history").status_code == 200, url
        out = http.post(
            "/portal/sign-out", data={"form_token": _form_token(consent_page, "/portal/sign-out")}
        )
        assert out.status_code == 303, out.text
        assert out.headers["location"].endswith("/portal/sign-in")
    consent_form = _form_token(consent_page, "/portal/consent")
    for url in replicas.urls:
        _assert_pages_refuse(url, copied, consent_form)
        _assert_api_refuses(url, token)
        mine = _consents(url, other)
        assert mine.status_code == 200, f"{url}: {mine.text}"
        assert mine.json() == []  # the replayed consent forms and POSTs recorded nothing


def test_a_portal_token_opens_nothing_after_api_sign_out(
    attack_federation: AttackFederation, replicas: Replicas
) -> None:
    """`DELETE /portal/session` (204) at one replica: the token is refused by both on every API
    route and as the pages' cookie; the patient's other session still consents at the other one."""
    rrn = new_rrn()
    token, other = _api_sign_in(replicas.urls[0], rrn), _api_sign_in(replicas.urls[1], rrn)
    for url in replicas.urls:
        assert _consents(url, token).status_code == 200, url
    with httpx.Client(base_url=replicas.urls[1], timeout=60) as http:
        out = http.delete("/portal/session", headers=_bearer(token))
        assert out.status_code == 204, out.text
        assert out.content == b""
    with httpx.Client(base_url=replicas.urls[0], timeout=60) as http:
        blank = http.get("/portal/sign-in")
        consent_form = _form_token(blank.text, "/portal/sign-in")  # any form token of this browser
        cookies = dict(http.cookies.items()) | {COOKIE: token}
    for url in replicas.urls:
        _assert_api_refuses(url, token)
        _assert_pages_refuse(url, cookies, consent_form)
    with httpx.Client(base_url=replicas.urls[1], timeout=60) as http:
        given = http.post("/portal/me/consents", json={"policy": "ENTIRE_CONSENT"}, headers=_bearer(other))
    assert given.status_code == 201, given.text
    for url in replicas.urls:
        assert [v["policy"] for v in _consents(url, other).json()] == ["ENTIRE_CONSENT"], url


async def _ended_sessions(url: str, add: EndedPortalSession | None = None) -> dict[str, datetime]:
    """The consent database's ended sessions (jti -> kept until), after adding ``add``."""
    db = Database(url)
    try:
        async with db.transaction() as session:
            if add is not None:
                session.add(add)
            rows = (await session.scalars(select(EndedPortalSession))).all()
            return {row.jti: as_utc(row.expires_at) for row in rows}
    finally:
        await db.dispose()


def test_an_ended_session_is_kept_until_its_token_expires_then_pruned(
    attack_federation: AttackFederation,
) -> None:
    """A sign-out records the session's jti until after its token's exp (plus the verifier's leeway),
    and removes the rows of sessions whose tokens have expired."""
    fed = attack_federation
    url = fed.services["consent"].settings.database_url
    now = datetime.now(UTC)
    stale = EndedPortalSession(jti=uuid.uuid4().hex, expires_at=now - timedelta(seconds=1), ended_at=now)
    assert stale.jti in fed.run(_ended_sessions(url, stale))
    token = _api_sign_in(fed.url("consent"), new_rrn())
    with fed.http("consent") as http:
        assert http.delete("/portal/session", headers=_bearer(token)).status_code == 204
    ended = fed.run(_ended_sessions(url))
    assert stale.jti not in ended
    _, claims = unverified(token)
    assert ended[claims["jti"]] > datetime.fromtimestamp(claims["exp"] + 5, UTC)


async def test_a_sign_out_holds_at_every_replica_on_sqlite_and_postgresql(
    pytestconfig: pytest.Config,
    nats_url: str,
    registry: Registry,
    database: tuple[str, str | None],
    unique: str,
) -> None:
    """Two consent replicas on one database (a SQLite file, or PostgreSQL as deploy/k8s runs them):
    signed out at one, the token is refused at both; the patient's other session works at both."""
    url, schema = database
    first = ConsentSettings(
        database_url=url,
        database_schema=schema,
        nats_url=nats_url,
        registry_url=registry.url,
        port=free_port(),
        node=f"consent-{unique}-1",
        history_consumer=f"consent-history-{unique}",
        access_consumer=f"consent-access-{unique}",
    )
    second = first.model_copy(
        update={"port": free_port(), "public_url": first.base_url, "node": f"consent-{unique}-2"}
    )
    running = root_conftest(pytestconfig).RunningApp
    apps = [await running(create_consent(s), s.port).start() for s in (first, second)]
    try:
        urls = [app.url for app in apps]
        rrn = new_rrn()
        # The helpers are synchronous: in a thread, so that this loop keeps serving both replicas.
        token = await asyncio.to_thread(_api_sign_in, urls[0], rrn)
        other = await asyncio.to_thread(_api_sign_in, urls[1], rrn)
        for where in urls:
            assert (await asyncio.to_thread(_consents, where, token)).status_code == 200, where
        async with httpx.AsyncClient(base_url=urls[0], timeout=60) as http:
            assert (await http.delete("/portal/session", headers=_bearer(token))).status_code == 204
        for where in urls:
            await asyncio.to_thread(_assert_api_refuses, where, token)
            assert (await asyncio.to_thread(_consents, where, other)).status_code == 200, where
    finally:
        for app in reversed(apps):
            await app.stop()
