"""Bearer-token attacks against every service: each forged, expired, confused or replayed token is
refused with 401 and an OperationOutcome, and the refusal is logged with its reason (docs/security.md)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from attacks_support import (
    SEVERANCE_CLINIC,
    SEVERANCE_CLINIC_3,
    SEVERANCE_HUB,
    SNUBH_HUB,
    AttackFederation,
    LogTap,
    claims_like,
    correlation,
    es256,
    hs256,
    refused,
    unsigned,
    unverified,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

# One authenticated route per service, which a severance clinic's real token may call: the answer to
# the real token is the control (anything but 401), the forged ones must get 401.
ROUTES: dict[str, str] = {
    "registry": f"/institutions/{SEVERANCE_CLINIC}/history",
    "consent": f"/fhir/Consent/{uuid.uuid4()}",
    SEVERANCE_HUB: "/fhir/Subscription",
    "imaging": "/studies/1.2.826.0.1.3680043.8.498.1",
}

Forge = Callable[[AttackFederation, str], str]


def _expired(fed: AttackFederation, real: str) -> str:
    """The same token as the registry issued it, replayed ten minutes after it expired (re-signed
    with the registry's own key: only the times differ)."""
    header, _ = unverified(real)
    now = int(time.time())
    return es256(
        claims_like(real, iat=now - 900, exp=now - 600), fed.signing_key(header["kid"]), header["kid"]
    )


def _wrong_key_same_kid(fed: AttackFederation, real: str) -> str:
    header, _ = unverified(real)
    return es256(claims_like(real), ec.generate_private_key(ec.SECP256R1()), header["kid"])


def _wrong_key_unknown_kid(fed: AttackFederation, real: str) -> str:
    return es256(claims_like(real), ec.generate_private_key(ec.SECP256R1()), uuid.uuid4().hex[:16])


def _alg_none(fed: AttackFederation, real: str) -> str:
    header, _ = unverified(real)
    return unsigned(claims_like(real), header["kid"])


def _alg_none_no_signature_part(fed: AttackFederation, real: str) -> str:
    return _alg_none(fed, real).rstrip(".")


def _public_jwk(fed: AttackFederation, kid: str) -> dict[str, Any]:
    (jwk,) = [k for k in fed.jwks()["keys"] if k["kid"] == kid]
    return jwk


def _hs256_public_pem(fed: AttackFederation, real: str) -> str:
    """The classic key confusion: HMAC keyed with the registry's public key (PEM), which anyone has."""
    header, _ = unverified(real)
    import jwt

    public = jwt.algorithms.ECAlgorithm.from_jwk(json.dumps(_public_jwk(fed, header["kid"])))
    assert isinstance(public, ec.EllipticCurvePublicKey)
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hs256({"alg": "HS256", "typ": "JWT", "kid": header["kid"]}, claims_like(real), pem)


def _hs256_public_jwk(fed: AttackFederation, real: str) -> str:
    header, _ = unverified(real)
    secret = json.dumps(_public_jwk(fed, header["kid"])).encode()
    return hs256({"alg": "HS256", "typ": "JWT", "kid": header["kid"]}, claims_like(real), secret)


def _tampered(fed: AttackFederation, real: str) -> str:
    """A real signature over claims the attacker changed (another institution, the agency's scope)."""
    head, _, signature = real.split(".")
    import base64

    body = claims_like(real, inst="31100002", scope="exchange agency")
    payload = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    return f"{head}.{payload}.{signature}"


def _other_audience(fed: AttackFederation, real: str) -> str:
    """Replay of a token minted for another audience (correctly signed by the registry's key)."""
    header, _ = unverified(real)
    return es256(claims_like(real, aud="another-federation"), fed.signing_key(header["kid"]), header["kid"])


def _other_issuer(fed: AttackFederation, real: str) -> str:
    header, _ = unverified(real)
    claims = claims_like(real, iss="https://registry.example.invalid")
    return es256(claims, fed.signing_key(header["kid"]), header["kid"])


def _no_jti(fed: AttackFederation, real: str) -> str:
    header, _ = unverified(real)
    return es256(claims_like(real, jti=None), fed.signing_key(header["kid"]), header["kid"])


def _malformed(fed: AttackFederation, real: str) -> str:
    return "not-a.jwt"


FORGED: dict[str, tuple[Forge, str]] = {
    "expired (replayed after its lifetime)": (_expired, "expired"),
    "signed with a wrong key under the registry's kid": (_wrong_key_same_kid, "rejected"),
    "signed with a wrong key under a new kid": (_wrong_key_unknown_kid, "unknown key"),
    "alg none": (_alg_none, "algorithm"),
    "alg none without a signature part": (_alg_none_no_signature_part, "malformed"),
    "HS256 keyed with the registry's public key (PEM)": (_hs256_public_pem, "algorithm"),
    "HS256 keyed with the registry's public key (JWK)": (_hs256_public_jwk, "algorithm"),
    "real signature over changed claims": (_tampered, "rejected"),
    "replayed to another audience": (_other_audience, "rejected"),
    "replayed from another issuer": (_other_issuer, "rejected"),
    "without a jti": (_no_jti, "rejected"),
    "malformed": (_malformed, "malformed"),
}


def _get(fed: AttackFederation, service: str, token: str | None) -> tuple[httpx.Response, str]:
    cid = correlation()
    headers = {"X-Correlation-ID": cid}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    with fed.http(service) as http:
        return http.get(ROUTES[service], headers=headers), cid


@pytest.mark.parametrize("service", list(ROUTES))
def test_a_real_token_is_accepted_and_no_token_is_refused(
    attack_federation: AttackFederation, log_tap: LogTap, service: str
) -> None:
    real = attack_federation.token(SEVERANCE_CLINIC)
    response, _ = _get(attack_federation, service, real)
    assert response.status_code in (200, 404), response.text  # the control: the route itself works
    response, cid = _get(attack_federation, service, None)
    assert "bearer token is required" in refused(response, 401)
    assert response.headers["www-authenticate"].startswith("Bearer")
    line = log_tap.refusal(cid, 401)
    assert line["level"] == "warning"
    assert "bearer token is required" in line["reason"]


@pytest.mark.parametrize("service", list(ROUTES))
@pytest.mark.parametrize("attack", list(FORGED))
def test_a_forged_or_replayed_token_is_refused_and_logged(
    attack_federation: AttackFederation, log_tap: LogTap, service: str, attack: str
) -> None:
    forge, reason = FORGED[attack]
    token = forge(attack_federation, attack_federation.token(SEVERANCE_CLINIC))
    response, cid = _get(attack_federation, service, token)
    diagnostics = refused(response, 401)
    assert reason in diagnostics, diagnostics
    assert response.headers["www-authenticate"].startswith("Bearer")
    line = log_tap.refusal(cid, 401)
    assert line["level"] == "warning"
    assert line["code"] == "login"
    assert reason in line["reason"]
    assert token not in json.dumps(line)  # the token itself is never logged


def test_a_hub_refuses_a_token_of_another_hubs_institution(
    attack_federation: AttackFederation, log_tap: LogTap
) -> None:
    """A severance clinic's (valid) token replayed at the snubh hub: 403, the node serves its own hub."""
    cid = correlation()
    token = attack_federation.token(SEVERANCE_CLINIC)
    with attack_federation.http(SNUBH_HUB) as http:
        response = http.get(
            "/fhir/Subscription", headers={"Authorization": f"Bearer {token}", "X-Correlation-ID": cid}
        )
    assert "this node serves hub snubh" in refused(response, 403)
    line = log_tap.refusal(cid, 403)
    assert line["inst"] == SEVERANCE_CLINIC
    assert line["level"] == "warning"


def test_a_suspended_institutions_unexpired_token_is_refused_everywhere(
    attack_federation: AttackFederation, log_tap: LogTap
) -> None:
    """Replay of a token its institution held before the agency suspended it: the signature and the
    lifetime are still good, so the refusal is 403 (no right any more), at once and with no restart;
    reinstated, the same token works again."""
    fed = attack_federation
    token = fed.token(SEVERANCE_CLINIC_3, fresh=True)
    agency = {"Authorization": f"Bearer {fed.token('agency')}"}
    routes = {
        "registry": f"/institutions/{SEVERANCE_CLINIC_3}/history",
        "consent": f"/fhir/Consent/{uuid.uuid4()}",
        SEVERANCE_HUB: "/fhir/Subscription",
        "imaging": "/studies/1.2.826.0.1.3680043.8.498.1",
    }

    def status(service: str) -> tuple[int, str]:
        cid = correlation()
        with fed.http(service) as http:
            response = http.get(
                routes[service], headers={"Authorization": f"Bearer {token}", "X-Correlation-ID": cid}
            )
        return response.status_code, cid

    for service in routes:
        assert status(service)[0] in (200, 404)
    with fed.http("registry") as http:
        step = http.post(
            f"/institutions/{SEVERANCE_CLINIC_3}/suspend", json={"reason": "attack test"}, headers=agency
        )
        assert step.status_code == 200, step.text
    try:
        for service in routes:
            deadline = time.monotonic() + 30
            while (result := status(service))[0] != 403:
                assert time.monotonic() < deadline, f"{service} still accepts the suspended clinic's token"
                time.sleep(0.1)
            line = log_tap.refusal(result[1], 403)
            assert "good standing" in line["reason"]
    finally:
        with fed.http("registry") as http:
            step = http.post(
                f"/institutions/{SEVERANCE_CLINIC_3}/reinstate",
                json={"reason": "attack test done"},
                headers=agency,
            )
            assert step.status_code == 200, step.text
    for service in routes:
        deadline = time.monotonic() + 30
        while status(service)[0] == 403:
            assert time.monotonic() < deadline, f"{service} still refuses the reinstated clinic"
            time.sleep(0.1)


def test_a_federation_token_is_not_a_patient_session(
    attack_federation: AttackFederation, log_tap: LogTap
) -> None:
    """The patient portal's sessions are HS256 under the consent service's own secret: neither a
    registry token nor an HS256 token keyed with the registry's public key opens a patient's records."""
    real = attack_federation.token(SEVERANCE_CLINIC)
    confused = _hs256_public_pem(attack_federation, real)
    for token, reason in ((real, "not a patient session token"), (confused, "session token rejected")):
        cid = correlation()
        with attack_federation.http("consent") as http:
            response = http.get(
                "/portal/me/consents", headers={"Authorization": f"Bearer {token}", "X-Correlation-ID": cid}
            )
        assert reason in refused(response, 401)
        assert reason in log_tap.refusal(cid, 401)["reason"]
