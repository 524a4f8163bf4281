"""The registry's ES256 signing keys and JWKS: the newest key signs, every unretired key verifies;
a retired key leaves the JWKS and every verifier is told at once (hie.registry.key.retired)."""

from __future__ import annotations

import itertools
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.ext.asyncio import AsyncSession

from hie_platform.errors import NotFound
from hie_platform.outbox import Outbox
from hie_registry import repository
from hie_registry.models import SigningKey
from hie_schemas import subjects
from hie_schemas.events import SigningKeyRetired


@dataclass(frozen=True)
class LoadedKey:
    kid: str
    private_key: ec.EllipticCurvePrivateKey
    created_at: datetime

    def public_jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.private_key.public_key()))
        jwk.update({"kid": self.kid, "use": "sig", "alg": "ES256"})
        return jwk


class KeyRing:
    def __init__(self, keys: list[LoadedKey]) -> None:
        if not keys:
            raise ValueError("the key ring needs at least one key")
        self.keys = sorted(keys, key=lambda k: _aware(k.created_at))

    @property
    def current(self) -> LoadedKey:
        return self.keys[-1]

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.public_jwk() for k in self.keys]}


def _load(row: SigningKey) -> LoadedKey:
    key = serialization.load_pem_private_key(row.private_pem.encode(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"signing key {row.kid} is not an EC key")
    return LoadedKey(row.kid, key, row.created_at)


async def add_key(session: AsyncSession) -> LoadedKey:
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    row = SigningKey(kid=uuid.uuid4().hex[:16], private_pem=pem, created_at=datetime.now(UTC))
    await repository.add_signing_key(session, row)
    return _load(row)


async def load_key_ring(session: AsyncSession) -> KeyRing:
    """All unretired keys; creates the first one on a fresh database."""
    rows = await repository.signing_keys(session, unretired=True)
    keys = [_load(r) for r in rows] or [await add_key(session)]
    return KeyRing(keys)


async def _active(session: AsyncSession) -> list[SigningKey]:
    rows = await repository.signing_keys(session, unretired=True)
    return sorted(rows, key=lambda r: _aware(r.created_at))


async def _retire(session: AsyncSession, outbox: Outbox, rows: list[SigningKey]) -> list[str]:
    """Retire ``rows`` now and tell every verifier (hie.registry.key.retired) to refuse their kids."""
    now = datetime.now(UTC)
    for row in rows:
        row.retired_at = now
        await outbox.add(session, subjects.REGISTRY_KEY_RETIRED, SigningKeyRetired(kid=row.kid))
    await repository.flush(session)
    return [row.kid for row in rows]


async def rotate(
    session: AsyncSession, outbox: Outbox, token_ttl_seconds: int, *, retire_previous: bool = False
) -> tuple[KeyRing, list[str]]:
    """Add a signing key; retire the older keys at once (``retire_previous``, a leaked key), or only
    those no unexpired token can still need.

    Without ``retire_previous`` a key is retired once a newer key has been signing for longer than the
    token lifetime, so every token it signed has expired. Returns the ring and the retired kids.
    """
    await add_key(session)
    ordered = await _active(session)
    if retire_previous:
        retiring = ordered[:-1]
    else:
        now = datetime.now(UTC)
        retiring = [
            older
            for older, newer in itertools.pairwise(ordered)
            if (now - _aware(newer.created_at)).total_seconds() > token_ttl_seconds + 60
        ]
    retired = await _retire(session, outbox, retiring)
    return await load_key_ring(session), retired


async def retire(session: AsyncSession, outbox: Outbox, kid: str) -> KeyRing:
    """Retire one key at once; when it is the one signing, a new key takes over first."""
    ordered = await _active(session)
    row = next((r for r in ordered if r.kid == kid), None)
    if row is None:
        raise NotFound(f"no signing key {kid!r} in use")
    if row is ordered[-1]:
        await add_key(session)
    await _retire(session, outbox, [row])
    return await load_key_ring(session)


async def listing(session: AsyncSession) -> list[dict[str, Any]]:
    """Every key, newest first: kid, created, retired, and which one signs."""
    rows = await repository.signing_keys(session)
    ordered = sorted(rows, key=lambda r: _aware(r.created_at), reverse=True)
    signing = next((r.kid for r in ordered if r.retired_at is None), None)
    return [
        {
            "kid": r.kid,
            "created_at": _aware(r.created_at).isoformat(),
            "retired_at": _aware(r.retired_at).isoformat() if r.retired_at else None,
            "signing": r.kid == signing,
        }
        for r in ordered
    ]


def _aware(moment: datetime) -> datetime:
    # SQLite returns naive datetimes for timezone-aware columns; they were stored in UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
