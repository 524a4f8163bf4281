"""Bearer-token verification against the registry's JWKS (ES256 only) and the FastAPI dependencies."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import jwt
from fastapi import Depends, Request
from pydantic import ValidationError

from hie_platform.errors import Forbidden, ServiceUnavailable, Unauthorized
from hie_schemas.auth import ALGORITHM, AUDIENCE, TokenClaims

JwksFetcher = Callable[[], Awaitable[dict[str, Any]]]
# Extra check after the signature, e.g. "is this institution still in good standing?".
ClaimsCheck = Callable[[TokenClaims], Awaitable[None]]


class TokenVerifier:
    """Verifies access tokens locally; re-reads the JWKS when it meets an unknown key id (rotation)."""

    def __init__(
        self,
        fetch_jwks: JwksFetcher,
        issuer: str,
        audience: str = AUDIENCE,
        min_refresh_seconds: float = 2.0,
        check: ClaimsCheck | None = None,
    ) -> None:
        self._fetch = fetch_jwks
        self._issuer = issuer
        self._audience = audience
        self._min_refresh = min_refresh_seconds
        self._keys: dict[str, Any] = {}
        self._fetched_at = 0.0
        self._check = check

    async def _refresh(self) -> None:
        try:
            jwks = await self._fetch()
            keyset = jwt.PyJWKSet.from_dict(jwks)
        except Exception as exc:
            raise ServiceUnavailable("cannot read the registry's signing keys") from exc
        self._keys = {k.key_id: k.key for k in keyset.keys if k.key_id}
        self._fetched_at = time.monotonic()

    async def _key(self, kid: str) -> Any:
        if kid not in self._keys and time.monotonic() - self._fetched_at >= self._min_refresh:
            await self._refresh()
        key = self._keys.get(kid)
        if key is None:
            raise Unauthorized("token signed with an unknown key")
        return key

    async def verify(self, token: str) -> TokenClaims:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("malformed bearer token") from None
        # Only ES256: refuses "alg: none" and HS256-with-the-public-key confusion outright.
        if header.get("alg") != ALGORITHM or not isinstance(header.get("kid"), str):
            raise Unauthorized("token algorithm or key id not accepted")
        key = await self._key(header["kid"])
        try:
            raw = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self._audience,
                issuer=self._issuer,
                leeway=5,
                options={"require": ["exp", "iat", "iss", "aud", "sub", "jti"]},
            )
            claims = TokenClaims.model_validate(raw)
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except (jwt.PyJWTError, ValidationError):
            raise Unauthorized("token rejected") from None
        if self._check is not None:
            await self._check(claims)
        return claims


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("a bearer token is required")
    return token.strip()


async def current_actor(request: Request) -> TokenClaims:
    verifier: TokenVerifier = request.app.state.runtime.verifier
    claims = await verifier.verify(bearer_token(request))
    request.state.actor_inst = claims.inst  # names the caller in the refusal log (errors.py)
    return claims


CurrentActor = Annotated[TokenClaims, Depends(current_actor)]


def require_scope(scope: str) -> Callable[[TokenClaims], Awaitable[TokenClaims]]:
    """A dependency that admits only tokens carrying ``scope``."""

    async def dependency(actor: CurrentActor) -> TokenClaims:
        if scope not in actor.scopes:
            raise Forbidden(f"the '{scope}' scope is required")
        return actor

    return dependency
