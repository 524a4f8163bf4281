"""A leaked signing key is retired at once, a token that lives too long is refused, and a console
cookie opens nothing after sign-out (issue 12, points 12 and 14; docs/security.md).

Retiring keys changes the federation under every other test's feet, so this module runs a federation
of its own (real registry, consent, two hubs and an imaging gateway on their own nats-server).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from attacks_support import (
    AGENCY,
    SEVERANCE_CLINIC,
    SEVERANCE_HUB,
    AttackFederation,
    correlation,
    es256,
    fresh_claims,
    refused,
    unverified,
)

# One authenticated route per service that a severance clinic's token may call (as test_tokens.py).
ROUTES: dict[str, str] = {
    "registry": f"/institutions/{SEVERANCE_CLINIC}/history",
    "consent": f"/fhir/Consent/{uuid.uuid4()}",
    SEVERANCE_HUB: "/fhir/Subscription",
    "imaging": "/studies/1.2.826.0.1.3680043.8.498.1",
}
# Well under the verifiers' 60-second JWKS maximum age: a refusal within it is the event's doing.
EVENT_DEADLINE = 20.0
TEN_YEARS = 10 * 365 * 24 * 3600


@pytest.fixture(scope="module")
def keys_federation(
    pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AttackFederation]:
    federation = AttackFederation(tmp_path_factory.mktemp("keys"), pytestconfig).start()
    yield federation
    federation.stop()


def _get(fed: AttackFederation, service: str, token: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}", "X-Correlation-ID": correlation()}
    with fed.http(service) as http:
        return http.get(ROUTES[service], headers=headers)


def _accepted(response: httpx.Response) -> bool:
    return response.status_code in (200, 404)  # the route answered: the token passed


def _wait_refused(fed: AttackFederation, service: str, token: str, deadline: float) -> str:
    """Poll until ``service`` refuses ``token`` with 401; its diagnostics."""
    while _accepted(response := _get(fed, service, token)):
        assert time.monotonic() < deadline, f"{service} still accepts a token of the retired key"
        time.sleep(0.05)
    return refused(response, 401)


def _wait_accepted(fed: AttackFederation, service: str, token: str, deadline: float) -> None:
    while not _accepted(response := _get(fed, service, token)):
        assert time.monotonic() < deadline, f"{service}: {response.status_code} {response.text[:300]}"
        time.sleep(0.05)


def _agency(fed: AttackFederation) -> dict[str, str]:
    return {"Authorization": f"Bearer {fed.token(AGENCY, fresh=True)}"}


def _kid(token: str) -> str:
    header, _ = unverified(token)
    kid: str = header["kid"]
    return kid


def _assert_retired_everywhere(fed: AttackFederation, kid: str, tokens: list[str]) -> None:
    """Every service refuses every token of ``kid`` (told by the registry's event), the JWKS no longer
    lists it, and a token from the registry's new key passes everywhere."""
    assert kid not in {k["kid"] for k in fed.jwks()["keys"]}
    deadline = time.monotonic() + EVENT_DEADLINE
    for service in ROUTES:
        for token in tokens:
            assert "retired key" in _wait_refused(fed, service, token, deadline), service
    new = fed.token(SEVERANCE_CLINIC, fresh=True)
    assert _kid(new) != kid
    for service in ROUTES:
        _wait_accepted(fed, service, new, time.monotonic() + EVENT_DEADLINE)


def test_a_retired_key_is_refused_by_every_service_at_once(keys_federation: AttackFederation) -> None:
    """The agency retires the signing key (leaked): the registry's real token and a token the attacker
    forged with the leaked private key pass at all four services before, and are refused with 401 at
    all four right after the call returns; the new key's tokens pass."""
    fed = keys_federation
    real = fed.token(SEVERANCE_CLINIC, fresh=True)
    kid = _kid(real)
    forged = es256(fresh_claims(SEVERANCE_CLINIC, SEVERANCE_HUB, fed.issuer), fed.signing_key(kid), kid)
    for service in ROUTES:
        for token in (real, forged):
            assert _accepted(_get(fed, service, token)), service  # the control
    with fed.http("registry") as http:
        clinic = http.post(
            f"/keys/{kid}/retire",
            json={"reason": "attack test"},
            headers={"Authorization": f"Bearer {real}"},
        )
        assert "agency" in refused(clinic, 403)  # an institution cannot retire keys
        retired = http.post(f"/keys/{kid}/retire", json={"reason": "leaked"}, headers=_agency(fed))
    assert retired.status_code == 200, retired.text
    assert retired.json()["retired"] == [kid]
    assert retired.json()["kid"] != kid
    _assert_retired_everywhere(fed, kid, [real, forged])
    with fed.http("registry") as http:
        again = http.post(f"/keys/{kid}/retire", json={"reason": "leaked"}, headers=_agency(fed))
    assert "no signing key" in refused(again, 404)


def _hie(fed: AttackFederation, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIE_")}
    env |= {"HIE_AGENCY_CLIENT_ID": AGENCY, "HIE_AGENCY_CLIENT_SECRET": fed.credentials[AGENCY]}
    return subprocess.run(
        [sys.executable, "-m", "hie_cli.main", "registry", *args, "--registry-url", fed.url("registry")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_rotate_with_retire_now_refuses_the_old_key_everywhere(keys_federation: AttackFederation) -> None:
    """`hie registry keys rotate --retire-now`: a second immediate rotation no longer keeps the old
    kid (a plain rotation keeps it until its tokens expire)."""
    fed = keys_federation
    old = fed.token(SEVERANCE_CLINIC, fresh=True)
    rotated = _hie(fed, "keys", "rotate", "--reason", "scheduled")
    assert rotated.returncode == 0, rotated.stderr
    assert _kid(old) in {k["kid"] for k in fed.jwks()["keys"]}  # graceful: still verifies
    assert _accepted(_get(fed, SEVERANCE_HUB, old))
    leaked = _hie(fed, "keys", "rotate", "--retire-now", "--reason", "leaked")
    assert leaked.returncode == 0, leaked.stderr
    assert f"retired (refused by every service from now on): {_kid(old)}" in leaked.stdout
    _assert_retired_everywhere(fed, _kid(old), [old])
    listed = _hie(fed, "keys", "list")
    assert listed.returncode == 0, listed.stderr
    signing = [line.split()[0] for line in listed.stdout.splitlines() if line.rstrip().endswith("yes")]
    assert signing == [_kid(fed.token(SEVERANCE_CLINIC, fresh=True))]


@pytest.mark.parametrize(
    ("times", "reason"),
    [
        pytest.param({"exp": TEN_YEARS}, "lifetime", id="ten-year-exp"),
        pytest.param({"exp": 3600}, "lifetime", id="one-hour-exp"),
        pytest.param({"iat": 600, "exp": 900}, "issued in the future", id="iat-in-the-future"),
    ],
)
def test_a_token_living_too_long_is_refused_even_with_the_registrys_key(
    keys_federation: AttackFederation, times: dict[str, int], reason: str
) -> None:
    """Signed with the registry's real, current key (as a leaked key would sign): a lifetime beyond
    what the registry issues, or an iat in the future, is refused with 401 by all four services."""
    fed = keys_federation
    kid = _kid(fed.token(SEVERANCE_CLINIC, fresh=True))
    now = int(time.time())
    claims = fresh_claims(
        SEVERANCE_CLINIC, SEVERANCE_HUB, fed.issuer, **{k: now + v for k, v in times.items()}
    )
    token = es256(claims, fed.signing_key(kid), kid)
    for service in ROUTES:
        assert reason in refused(_get(fed, service, token), 401), service


def _token_of(html: str, action: str) -> str:
    start = html.index(f'action="{action}"')
    found = re.search(r'name="form_token" value="([^"]+)"', html[start:])
    assert found is not None
    return found.group(1)


def _console_sign_in(fed: AttackFederation, http: httpx.Client) -> httpx.Response:
    page = http.get("/console/sign-in")
    signed = http.post(
        "/console/sign-in",
        data={
            "form_token": _token_of(page.text, "/console/sign-in"),
            "client_id": AGENCY,
            "client_secret": fed.credentials[AGENCY],
        },
    )
    assert signed.status_code == 303, signed.text
    home = http.get("/console/")
    assert home.status_code == 200
    assert 'action="/console/sign-out"' in home.text
    return home


def test_a_console_cookie_opens_nothing_after_sign_out(keys_federation: AttackFederation) -> None:
    """The agency signs out; a copy of its cookies taken before (a shared PC, a stolen cookie) is sent
    to sign in again (303 to the sign-in page, 401 with the sign-in form on the other pages). Another
    signed-in session is untouched."""
    fed = keys_federation
    with fed.http("registry") as other:
        _console_sign_in(fed, other)
        with fed.http("registry") as http:
            home = _console_sign_in(fed, http)
            copied = {cookie.name: cookie.value for cookie in http.cookies.jar}
            assert "hie_console_session" in copied
            out = http.post(
                "/console/sign-out", data={"form_token": _token_of(home.text, "/console/sign-out")}
            )
            assert out.status_code == 303
        with httpx.Client(base_url=fed.url("registry"), cookies=copied, timeout=60) as replay:
            home_again = replay.get("/console/")
            assert home_again.status_code == 303
            assert home_again.headers["location"].endswith("/console/sign-in")
            for page in ("/console/directory", "/console/statistics"):
                response = replay.get(page)
                assert response.status_code == 401, f"{page}: {response.status_code}"
                assert 'action="/console/sign-out"' not in response.text
                assert 'action="/console/sign-in"' in response.text
        assert other.get("/console/directory").status_code == 200
