"""What every console page shares: keys, templates, the agency's session, page and error rendering.

The session lives server-side (console/sessions.py); the cookie, sealed with a key derived from
``HIE_REGISTRY_CONSOLE_SESSION_SECRET`` (HttpOnly, SameSite=Strict, Secure over HTTPS, path /console),
holds only its id and the client id, and is not a bearer token for any API. Signing out deletes the
session, so a copy of the cookie opens nothing afterwards. Every page re-reads the client and its
institution, so revoking the agency's credentials ends console sessions at the next click.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, Response

from hie_platform.errors import FhirError, Unauthorized
from hie_platform.web import (
    FormGuard,
    Sealer,
    derive_key,
    set_cookie,
)
from hie_platform.webui import Site
from hie_registry import repository
from hie_registry.config import RegistrySettings
from hie_registry.console.i18n import STRINGS
from hie_registry.console.sessions import SessionStore
from hie_registry.console.settings import ConsoleSettings
from hie_schemas.auth import AUDIENCE, SCOPE_AGENCY, TokenClaims
from hie_schemas.directory import InstitutionKind, InstitutionState

PATH = "/console"
SESSION_COOKIE = "hie_console_session"
BROWSER_COOKIE = "hie_console_browser"
HERE = Path(__file__).parent


@dataclass(frozen=True)
class AgencySession:
    """A signed-in agency user: the claims its actions are recorded under."""

    claims: TokenClaims
    session_id: str


class Console:
    def __init__(self, settings: ConsoleSettings, service: RegistrySettings) -> None:
        secret = settings.session_secret.get_secret_value()
        self.settings = settings
        self.public_url = service.public_url
        self.issuer = service.issuer
        self.sessions = Sealer(derive_key(secret, "hie-console-session"))
        self.store = SessionStore(settings.session_idle_seconds, settings.session_max_seconds)
        self.forms = FormGuard(
            derive_key(secret, "hie-console-form"),
            BROWSER_COOKIE,
            PATH,
            consumer="console-form",
            ttl_seconds=settings.form_ttl_seconds,
        )
        self.site = Site(PATH, HERE / "templates", STRINGS, HERE / "static" / "console.css", self.forms)

    # --- session ---------------------------------------------------------------------------------

    def new_session(self, client_id: str) -> str:
        sid, _ = self.store.open(client_id)
        return self.sessions.seal({"sid": sid, "sub": client_id})

    def end_session(self, request: Request) -> None:
        """Delete the session the cookie names (sign-out): the cookie alone opens nothing after this."""
        value = self.sessions.unseal(request.cookies.get(SESSION_COOKIE, ""))
        if value is not None and isinstance(value.get("sid"), str):
            self.store.end(value["sid"])

    def start_session(self, response: Response, request: Request, client_id: str) -> None:
        set_cookie(
            response,
            request,
            SESSION_COOKIE,
            self.new_session(client_id),
            path=PATH,
            max_age=self.settings.session_max_seconds,
            public_url=self.public_url,
        )

    async def agency(self, request: Request) -> AgencySession | None:
        value = self.sessions.unseal(request.cookies.get(SESSION_COOKIE, ""))
        if value is None or not isinstance(value.get("sid"), str) or not isinstance(value.get("sub"), str):
            return None
        sid, sub = value["sid"], value["sub"]
        live = self.store.get(sid, sub)  # ended by sign-out, idle or too old: gone
        if live is None:
            return None
        async with request.app.state.runtime.db.read_sessions() as session:
            client = await repository.client(session, sub)
            inst = await repository.institution(session, client.institution_code) if client else None
        if (
            client is None
            or inst is None
            or client.revoked_at is not None
            or SCOPE_AGENCY not in client.scopes.split()
            or not InstitutionState(inst.state).in_good_standing
        ):
            return None
        claims = TokenClaims(
            iss=self.issuer,
            sub=sub,
            aud=AUDIENCE,
            iat=live.authenticated_at,
            exp=live.authenticated_at + self.settings.session_max_seconds,
            jti=sid,
            inst=inst.code,
            kind=InstitutionKind(inst.kind),
            hub=inst.hub,
            scope=client.scopes,
        )
        return AgencySession(claims=claims, session_id=sid)

    # --- pages -----------------------------------------------------------------------------------

    def page(
        self,
        request: Request,
        name: str,
        context: Mapping[str, Any],
        *,
        agency: AgencySession | None,
        status: int = 200,
        error: FhirError | None = None,
        here: str | None = None,
    ) -> HTMLResponse:
        """Render a page; ``here`` is the page's GET address when it answers a POST."""
        page_context = {"agency": agency, **context}
        signed_in = agency is not None
        return self.site.page(
            request, name, page_context, signed_in=signed_in, status=status, error=error, here=here
        )

    def sign_in_required(self, request: Request) -> HTMLResponse:
        error = Unauthorized("sign in with the agency's client id and secret to use the console")
        return self.page(request, "sign_in.html", {"client_id": ""}, agency=None, error=error)


async def _console(request: Request) -> Console:
    console: Console = request.state.console
    return console


ConsoleDep = Annotated[Console, Depends(_console)]


async def _agency(request: Request, console: ConsoleDep) -> AgencySession | None:
    return await console.agency(request)


AgencyDep = Annotated[AgencySession | None, Depends(_agency)]
