"""Access-token claims and scopes of the federation (OAuth2 client credentials, ES256 JWT)."""

from __future__ import annotations

from pydantic import ConfigDict

from hie_schemas.directory import InstitutionKind
from hie_schemas.model import FrozenModel

AUDIENCE = "hie-federation"
ALGORITHM = "ES256"

SCOPE_EXCHANGE = "exchange"  # institutions: publish, search, read, consent at the desk
SCOPE_AGENCY = "agency"  # the operating agency: lifecycle, directory edits, statistics


class TokenClaims(FrozenModel):
    """The claims a service reads from a verified access token."""

    model_config = ConfigDict(extra="ignore")

    iss: str
    sub: str  # client id
    aud: str
    exp: int
    iat: int
    jti: str
    inst: str  # 요양기관기호
    kind: InstitutionKind
    hub: str | None = None
    scope: str = ""

    @property
    def scopes(self) -> frozenset[str]:
        return frozenset(self.scope.split())
