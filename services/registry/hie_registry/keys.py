"""The registry's ES256 signing keys and JWKS: the newest key signs, every unretired key verifies."""

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
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from hie_registry.models import SigningKey


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
    session.add(row)
    await session.flush()
    return _load(row)


async def load_key_ring(session: AsyncSession) -> KeyRing:
    """All unretired keys; creates the first one on a fresh database."""
    rows = (await session.scalars(select(SigningKey).where(SigningKey.retired_at.is_(None)))).all()
    keys = [_load(r) for r in rows] or [await add_key(session)]
    return KeyRing(keys)


async def rotate(session: AsyncSession, token_ttl_seconds: int) -> KeyRing:
    """Add a signing key and retire keys that no unexpired token can still need.

    A key is retired once a newer key has been signing for longer than the token lifetime, so
    every token it signed has expired.
    """
    await add_key(session)
    rows = (await session.scalars(select(SigningKey).where(SigningKey.retired_at.is_(None)))).all()
    now = datetime.now(UTC)
    ordered = sorted(rows, key=lambda r: _aware(r.created_at))
    for older, newer in itertools.pairwise(ordered):
        if (now - _aware(newer.created_at)).total_seconds() > token_ttl_seconds + 60:
            older.retired_at = now
    await session.flush()
    return await load_key_ring(session)


def _aware(moment: datetime) -> datetime:
    # SQLite returns naive datetimes for timezone-aware columns; they were stored in UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
