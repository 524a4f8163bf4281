"""Token verification refuses forged, expired and confused tokens (ES256 only)."""

from __future__ import annotations

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

from hie_platform.auth import TokenVerifier
from hie_platform.errors import Unauthorized
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
    return jwt.encode(claims(**overrides), key, algorithm="ES256", headers={"kid": kid})


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
