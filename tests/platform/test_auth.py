"""Token verification refuses forged, expired and confused tokens (ES256 only)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hie_platform import auth
from hie_platform.auth import TokenVerifier
from hie_platform.errors import Forbidden, Unauthorized
from hie_schemas.auth import AUDIENCE

ISSUER = "http://registry.test"


def keypair(kid: str) -> tuple[ec.EllipticCurvePrivateKey, dict[str, Any]]:
    private = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
    jwk.update(kid=kid, alg="ES256", use="sig")
    return private, jwk


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "iss": ISSUER,
        "sub": "11301001",
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
        "inst": "11301001",
        "kind": "clinic",
        "hub": "severance",
        "scope": "exchange",
    }
    base.update(overrides)
    return base


class Jwks:
    def __init__(self, *keys: dict[str, Any]) -> None:
        self.keys = list(keys)
        self.fetches = 0

    async def __call__(self) -> dict[str, Any]:
        self.fetches += 1
        return {"keys": list(self.keys)}


async def test_valid_token_and_key_rotation() -> None:
    old, old_jwk = keypair("old")
    new, new_jwk = keypair("new")
    jwks = Jwks(old_jwk)
    verifier = TokenVerifier(jwks, ISSUER, min_refresh_seconds=0)
    token = jwt.encode(claims(), old, algorithm="ES256", headers={"kid": "old"})
    assert (await verifier.verify(token)).inst == "11301001"
    jwks.keys.append(new_jwk)  # the registry rotates: an unknown kid triggers one JWKS refresh
    rotated = jwt.encode(claims(), new, algorithm="ES256", headers={"kid": "new"})
    assert (await verifier.verify(rotated)).hub == "severance"
    assert (await verifier.verify(token)).sub == "11301001"  # old key still honoured


def _b64(data: bytes) -> str:
    return jwt.utils.base64url_encode(data).decode()


GOOD, GOOD_JWK = keypair("k1")
OTHER, _ = keypair("k1")
PUBLIC_PEM = GOOD.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


def _unsigned() -> str:
    return f"{_b64(json.dumps({'alg': 'none', 'kid': 'k1'}).encode())}.{_b64(json.dumps(claims()).encode())}."


def _hs256_with_public_key() -> str:
    signing_input = (
        f"{_b64(json.dumps({'alg': 'HS256', 'kid': 'k1'}).encode())}.{_b64(json.dumps(claims()).encode())}"
    )
    signature = hmac.new(PUBLIC_PEM, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def _es256(key: ec.EllipticCurvePrivateKey, kid: str = "k1", **overrides: Any) -> str:
    body = {k: v for k, v in claims(**overrides).items() if v is not None}
    return jwt.encode(body, key, algorithm="ES256", headers={"kid": kid})


TEN_YEARS = 10 * 365 * 24 * 3600


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: _es256(OTHER), id="signed-by-another-key"),
        pytest.param(_unsigned, id="alg-none"),
        pytest.param(_hs256_with_public_key, id="hs256-with-public-key"),
        pytest.param(lambda: _es256(GOOD, exp=int(time.time()) - 60), id="expired"),
        pytest.param(lambda: _es256(GOOD, aud="other"), id="wrong-audience"),
        pytest.param(lambda: _es256(GOOD, iss="http://evil"), id="wrong-issuer"),
        pytest.param(lambda: _es256(GOOD, kid="unknown"), id="unknown-kid"),
        pytest.param(lambda: _es256(GOOD, exp=int(time.time()) + TEN_YEARS), id="ten-year-lifetime"),
        pytest.param(lambda: _es256(GOOD, exp=int(time.time()) + 601), id="lifetime-over-the-maximum"),
        pytest.param(
            lambda: _es256(GOOD, iat=int(time.time()) + 120, exp=int(time.time()) + 420),
            id="issued-in-the-future",
        ),
        pytest.param(lambda: _es256(GOOD, iat=None), id="without-iat"),
        pytest.param(lambda: "not.a.token", id="garbage"),
    ],
)
async def test_forged_and_invalid_tokens_are_refused(make: Any) -> None:
    verifier = TokenVerifier(Jwks(GOOD_JWK), ISSUER, min_refresh_seconds=0)
    assert (await verifier.verify(_es256(GOOD))).inst == "11301001"  # the same verifier accepts a good one
    with pytest.raises(Unauthorized):
        await verifier.verify(make())


async def test_unknown_kids_do_not_hammer_the_registry() -> None:
    jwks = Jwks(GOOD_JWK)
    verifier = TokenVerifier(jwks, ISSUER, min_refresh_seconds=60)
    await verifier.verify(_es256(GOOD))
    for _ in range(5):
        with pytest.raises(Unauthorized):
            await verifier.verify(_es256(GOOD, kid="unknown"))
    assert jwks.fetches == 1


async def test_the_maximum_lifetime_is_a_setting() -> None:
    """A token living exactly the maximum passes; one second more is refused with the reason."""
    verifier = TokenVerifier(Jwks(GOOD_JWK), ISSUER, min_refresh_seconds=0, max_lifetime_seconds=900)
    now = int(time.time())
    assert (await verifier.verify(_es256(GOOD, iat=now, exp=now + 900))).inst == "11301001"
    with pytest.raises(Unauthorized, match="lifetime"):
        await verifier.verify(_es256(GOOD, iat=now, exp=now + 901))


async def test_a_retired_key_is_refused_at_once_and_the_new_key_works() -> None:
    """The registry's notice drops the kid at once; the JWKS read after it confirms the retirement."""
    old, old_jwk = keypair("old")
    new, new_jwk = keypair("new")
    jwks = Jwks(old_jwk, new_jwk)
    verifier = TokenVerifier(jwks, ISSUER, min_refresh_seconds=0)
    leaked = jwt.encode(claims(), old, algorithm="ES256", headers={"kid": "old"})
    assert (await verifier.verify(leaked)).inst == "11301001"
    jwks.keys = [new_jwk]  # the registry serves the new key only, then says so
    await verifier.key_retired("old")
    with pytest.raises(Unauthorized, match="retired key"):
        await verifier.verify(leaked)
    assert (await verifier.verify(jwt.encode(claims(), new, algorithm="ES256", headers={"kid": "new"}))).inst


async def test_a_notice_the_registry_does_not_confirm_is_lifted() -> None:
    """A retirement notice for a key the registry still publishes when asked afterwards (not the
    registry's word) does not lock the federation out."""
    jwks = Jwks(GOOD_JWK)
    verifier = TokenVerifier(jwks, ISSUER, min_refresh_seconds=0)
    await verifier.key_retired("k1")
    assert (await verifier.verify(_es256(GOOD))).inst == "11301001"


async def test_a_kid_gone_from_a_fresh_jwks_is_refused_without_any_notice() -> None:
    """A missed notice costs at most the JWKS's maximum age: a cache older than that is re-read."""
    old, old_jwk = keypair("old")
    _, new_jwk = keypair("new")
    jwks = Jwks(old_jwk, new_jwk)
    verifier = TokenVerifier(jwks, ISSUER, min_refresh_seconds=0, max_age_seconds=0)
    leaked = jwt.encode(claims(), old, algorithm="ES256", headers={"kid": "old"})
    assert (await verifier.verify(leaked)).inst == "11301001"
    jwks.keys = [new_jwk]
    with pytest.raises(Unauthorized, match="unknown key"):
        await verifier.verify(leaked)


async def test_an_unreachable_registry_leaves_the_cached_keys_in_use() -> None:
    """A stale cache whose refresh fails keeps verifying with the keys it has (availability), and
    does not retry on every request."""
    jwks = Jwks(GOOD_JWK)
    verifier = TokenVerifier(jwks, ISSUER, min_refresh_seconds=60, max_age_seconds=0)
    await verifier.verify(_es256(GOOD))

    async def down() -> dict[str, Any]:
        jwks.fetches += 1
        raise OSError("registry down")

    verifier._fetch = down
    for _ in range(3):
        assert (await verifier.verify(_es256(GOOD))).inst == "11301001"
    assert jwks.fetches == 2  # one failed refresh, then the retry waits


# --- verified tokens remembered (TokenVerifier._verified) ------------------------------------------


async def test_a_remembered_token_still_expires() -> None:
    """A token verified while valid (inside the 5 s leeway) is refused once the leeway has passed,
    although its signature is not checked again."""
    verifier = TokenVerifier(Jwks(GOOD_JWK), ISSUER, min_refresh_seconds=0)
    now = int(time.time())
    token = _es256(GOOD, iat=now - 60, exp=now - 4)
    assert (await verifier.verify(token)).inst == "11301001"
    await asyncio.sleep(max(0.0, now - 4 + auth.LEEWAY_SECONDS - time.time()) + 0.05)
    with pytest.raises(Unauthorized, match="expired"):
        await verifier.verify(token)


async def test_the_standing_check_runs_for_a_remembered_token() -> None:
    """The registry's word on the institution is asked on every request, not remembered."""
    suspended: set[str] = set()

    async def standing(claims: Any) -> None:
        if claims.inst in suspended:
            raise Forbidden("institution suspended")

    verifier = TokenVerifier(Jwks(GOOD_JWK), ISSUER, min_refresh_seconds=0, check=standing)
    token = _es256(GOOD)
    assert (await verifier.verify(token)).inst == "11301001"
    suspended.add("11301001")
    with pytest.raises(Forbidden):
        await verifier.verify(token)


async def test_another_signature_on_remembered_claims_is_checked() -> None:
    """The whole token is the key: the same header and payload signed by another key are refused."""
    verifier = TokenVerifier(Jwks(GOOD_JWK), ISSUER, min_refresh_seconds=0)
    body = claims()
    genuine = jwt.encode(body, GOOD, algorithm="ES256", headers={"kid": "k1"})
    forged = jwt.encode(body, OTHER, algorithm="ES256", headers={"kid": "k1"})
    assert genuine.rsplit(".", 1)[0] == forged.rsplit(".", 1)[0]
    assert (await verifier.verify(genuine)).inst == "11301001"
    with pytest.raises(Unauthorized, match="rejected"):
        await verifier.verify(forged)


async def test_the_remembered_tokens_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "VERIFIED_TOKENS", 2)
    verifier = TokenVerifier(Jwks(GOOD_JWK), ISSUER, min_refresh_seconds=0)
    tokens = [_es256(GOOD) for _ in range(3)]  # three jti: three tokens
    for token in tokens:
        await verifier.verify(token)
    assert list(verifier._verified) == tokens[1:]  # the oldest went first
    assert (await verifier.verify(tokens[0])).inst == "11301001"  # verified again in full
