"""Bearer-token verification against the registry's JWKS (ES256 only) and the FastAPI dependencies.

Keys are cached; the cache follows the registry three ways: an unknown kid re-reads the JWKS
(rotation), a retired key's event (``hie.registry.key.retired``) drops its kid at once, and a JWKS
older than ``max_age_seconds`` is re-read before use, so a missed event costs at most that long.
Tokens already verified are remembered (whole token as the key) while their key stands and they
have not expired; the claims check (``check``: the institution's standing) runs on every request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import jwt
from cachetools import LRUCache
from fastapi import Depends, Request
from pydantic import ValidationError

from hie_platform.errors import Forbidden, ServiceUnavailable, Unauthorized
from hie_platform.logging import get_logger
from hie_schemas import subjects
from hie_schemas.auth import ALGORITHM, AUDIENCE, TokenClaims
from hie_schemas.events import SigningKeyRetired

if TYPE_CHECKING:
    from hie_platform.bus import Bus

log = get_logger(__name__)

JwksFetcher = Callable[[], Awaitable[dict[str, Any]]]
# Extra check after the signature, e.g. "is this institution still in good standing?".
ClaimsCheck = Callable[[TokenClaims], Awaitable[None]]
LEEWAY_SECONDS = 5
# The registry issues 300-second tokens; a longer one was not issued by it as configured (a forged
# token signed with a leaked key, or a mis-set registry), so it is refused.
DEFAULT_MAX_LIFETIME_SECONDS = 600
# Verified tokens remembered per process: a few per institution calling within one token lifetime.
VERIFIED_TOKENS = 4096


@dataclass(frozen=True)
class _Verified:
    kid: str
    key: Any  # the key object the signature was checked with; a re-read JWKS makes new ones
    claims: TokenClaims


class TokenVerifier:
    """Verifies access tokens locally against a cached JWKS that follows the registry's rotations and
    retirements; refuses a token that lives longer than ``max_lifetime_seconds`` (exp - iat)."""

    def __init__(
        self,
        fetch_jwks: JwksFetcher,
        issuer: str,
        audience: str = AUDIENCE,
        min_refresh_seconds: float = 2.0,
        check: ClaimsCheck | None = None,
        *,
        max_lifetime_seconds: int = DEFAULT_MAX_LIFETIME_SECONDS,
        max_age_seconds: float = 60.0,
    ) -> None:
        self._fetch = fetch_jwks
        self._issuer = issuer
        self._audience = audience
        self._min_refresh = min_refresh_seconds
        self._max_lifetime = max_lifetime_seconds
        self._max_age = max_age_seconds
        self._keys: dict[str, Any] = {}
        self._fetched_at = float("-inf")
        # kid -> when its retirement was heard (monotonic): refused from then on, whatever a JWKS
        # fetched before that moment says.
        self._retired: dict[str, float] = {}
        self._lock = asyncio.Lock()
        self._check = check
        # token -> what verified it; only signatures already checked, keyed by the whole token
        self._verified: LRUCache[str, _Verified] = LRUCache(maxsize=VERIFIED_TOKENS)

    def retire(self, kid: str) -> None:
        """Refuse ``kid`` from now on (the registry retired it)."""
        self._retired[kid] = time.monotonic()
        self._keys.pop(kid, None)

    async def key_retired(self, kid: str) -> None:
        """The registry's notice: refuse ``kid`` at once, then re-read the JWKS, which confirms it."""
        self.retire(kid)
        log.warning("signing key retired: its tokens are refused", kid=kid)
        await self._refresh_quietly()

    async def _refresh(self, wanted_at: float | None = None) -> None:
        async with self._lock:
            if wanted_at is not None and self._fetched_at >= wanted_at:
                return  # another request read the JWKS while this one waited
            started = time.monotonic()
            try:
                jwks = await self._fetch()
                keyset = jwt.PyJWKSet.from_dict(jwks)
            except Exception as exc:
                raise ServiceUnavailable("cannot read the registry's signing keys") from exc
            keys = {k.key_id: k.key for k in keyset.keys if k.key_id}
            for kid, heard in list(self._retired.items()):
                if kid in keys and started >= heard:
                    # Read after the retirement and still published: the notice was not the
                    # registry's word (the registry drops a key from its JWKS before it tells).
                    del self._retired[kid]
                else:
                    keys.pop(kid, None)
            self._keys = keys
            self._fetched_at = started

    async def _refresh_quietly(self, wanted_at: float | None = None) -> None:
        try:
            await self._refresh(wanted_at)
        except ServiceUnavailable:
            # The cached keys keep serving while the registry is unreachable; retry after the
            # minimum interval rather than on every request.
            log.warning("signing keys not refreshed: the registry's JWKS cannot be read")
            self._fetched_at = time.monotonic() - self._max_age + self._min_refresh

    async def _key(self, kid: str) -> Any:
        if kid in self._retired:
            raise Unauthorized("token signed with a retired key")
        now = time.monotonic()
        age = now - self._fetched_at
        if kid not in self._keys and age >= self._min_refresh:
            await self._refresh(now)
        elif age >= self._max_age:
            await self._refresh_quietly(now)
        key = self._keys.get(kid)
        if key is None:
            raise Unauthorized("token signed with an unknown key")
        return key

    async def verify(self, token: str) -> TokenClaims:
        """The token's claims, or Unauthorized; the standing check runs on every call.

        A token verified before is answered from ``_verified`` while its key is the one it was
        verified with (not retired, not re-read from a JWKS since) and it has not expired: an EMR
        sends the same token for its whole lifetime, and the ES256 signature and claims check cost
        about 0.2 ms of CPU per request (2.5 % of an ITI-65 publish; docs/operations.md).
        """
        known = self._verified.get(token)
        if known is not None and await self._key(known.kid) is known.key:
            claims = known.claims
            if claims.exp <= time.time() - LEEWAY_SECONDS:  # PyJWT's own test for "expired"
                del self._verified[token]
                raise Unauthorized("token expired")
        else:
            claims = await self._verified_now(token)
        if self._check is not None:
            await self._check(claims)
        return claims

    async def _verified_now(self, token: str) -> TokenClaims:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("malformed bearer token") from None
        # Only ES256: refuses "alg: none" and HS256-with-the-public-key confusion outright.
        if header.get("alg") != ALGORITHM or not isinstance(header.get("kid"), str):
            raise Unauthorized("token algorithm or key id not accepted")
        kid = header["kid"]
        key = await self._key(kid)
        try:
            raw = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self._audience,
                issuer=self._issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iat", "iss", "aud", "sub", "jti"]},
            )
            claims = TokenClaims.model_validate(raw)
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("token issued in the future") from None
        except (jwt.PyJWTError, ValidationError):
            raise Unauthorized("token rejected") from None
        if claims.exp - claims.iat > self._max_lifetime:
            raise Unauthorized(f"token lifetime longer than the accepted {self._max_lifetime} seconds")
        self._verified[token] = _Verified(kid, key, claims)  # the least recently used goes first
        return claims

    async def follow(self, bus: Bus) -> None:
        """Drop a retired key as soon as the registry says so, then re-read the JWKS."""

        async def retired(notice: SigningKeyRetired) -> None:
            await self.key_retired(notice.kid)

        await bus.follow(subjects.REGISTRY_KEY_RETIRED, SigningKeyRetired, retired)


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
