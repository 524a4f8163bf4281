"""What every console page shares: keys, templates, the agency's session, page and error rendering.

The session is a cookie sealed with a key derived from ``HIE_REGISTRY_CONSOLE_SESSION_SECRET``
(HttpOnly, SameSite=Strict, Secure over HTTPS, path /console) holding only a session id, the client id
and two times; it is not a bearer token for any API. Every page re-reads the client and its
institution, so revoking the agency's credentials ends console sessions at the next click.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, Response

from hie_platform.errors import FhirError, Unauthorized
from hie_platform.web import (
    LANGUAGES,
    Catalog,
    FormGuard,
    Sealer,
    derive_key,
    language,
    language_url,
    render,
    set_cookie,
    template_environment,
)
from hie_registry.config import RegistrySettings
from hie_registry.console.i18n import STRINGS
from hie_registry.console.settings import ConsoleSettings
from hie_registry.models import Client, Institution
from hie_schemas.auth import AUDIENCE, SCOPE_AGENCY, TokenClaims
from hie_schemas.directory import InstitutionKind, InstitutionState

PATH = "/console"
SESSION_COOKIE = "hie_console_session"
BROWSER_COOKIE = "hie_console_browser"
ENV = template_environment(Path(__file__).parent / "templates")
CATALOG = Catalog(STRINGS)


@dataclass(frozen=True)
class AgencySession:
    """A signed-in agency user: the claims its actions are recorded under."""

    claims: TokenClaims
    renewed: str | None = None  # a re-sealed cookie (sliding idle timeout) to send back


class Console:
    def __init__(self, settings: ConsoleSettings, service: RegistrySettings) -> None:
        secret = settings.session_secret.get_secret_value()
        self.settings = settings
        self.public_url = service.public_url
        self.issuer = service.issuer
        self.sessions = Sealer(derive_key(secret, "hie-console-session"))
        self.forms = FormGuard(
            derive_key(secret, "hie-console-form"),
            BROWSER_COOKIE,
            PATH,
            consumer="console-form",
            ttl_seconds=settings.form_ttl_seconds,
        )

    # --- session ---------------------------------------------------------------------------------

    def new_session(self, client_id: str) -> str:
        now = int(time.time())
        return self.sessions.seal({"sid": secrets.token_hex(16), "sub": client_id, "auth": now, "seen": now})

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
        if value is None:
            return None
        now = int(time.time())
        try:
            auth, seen, sub, sid = (
                int(value["auth"]),
                int(value["seen"]),
                str(value["sub"]),
                str(value["sid"]),
            )
        except (KeyError, TypeError, ValueError):
            return None
        if now - seen > self.settings.session_idle_seconds or now - auth > self.settings.session_max_seconds:
            return None
        async with request.app.state.runtime.db.read_sessions() as session:
            client = await session.get(Client, sub)
            inst = await session.get(Institution, client.institution_code) if client else None
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
            iat=auth,
            exp=auth + self.settings.session_max_seconds,
            jti=sid,
            inst=inst.code,
            kind=InstitutionKind(inst.kind),
            hub=inst.hub,
            scope=client.scopes,
        )
        renewed = self.sessions.seal({**value, "seen": now}) if now - seen >= 60 else None
        return AgencySession(claims=claims, renewed=renewed)

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
        lang = language(request)
        t = CATALOG.translator(lang)
        other = LANGUAGES[1] if lang == LANGUAGES[0] else LANGUAGES[0]
        browser, new = self.forms.browser(request)

        def form_token(purpose: str, context: str = "") -> str:
            return self.forms.issue(browser, purpose, context)

        response = render(
            request,
            ENV,
            name,
            {
                "t": t,
                "lang": lang,
                "other_lang": other,
                "here": here or request.url.path,
                "lang_url": language_url(request, here, other),
                "agency": agency,
                "form_token": form_token,
                "error": error_view(t, error) if error is not None else None,
                "message_key": None,
                **context,
            },
            status=status if error is None else error.status,
            headers=error.headers() if error is not None else None,
        )
        self.forms.remember_browser(response, request, browser, new)
        if agency is not None and agency.renewed is not None:
            set_cookie(
                response,
                request,
                SESSION_COOKIE,
                agency.renewed,
                path=PATH,
                max_age=self.settings.session_max_seconds,
                public_url=self.public_url,
            )
        return response

    def sign_in_required(self, request: Request) -> HTMLResponse:
        error = Unauthorized("sign in with the agency's client id and secret to use the console")
        return self.page(request, "sign_in.html", {"client_id": ""}, agency=None, error=error)


def error_view(t: Any, error: FhirError) -> dict[str, Any]:
    details: Sequence[str] = [i.diagnostics for i in error.issues] or [error.diagnostics]
    return {"status": error.status, "title": t(f"error.{error.status}"), "details": details}


def _console(request: Request) -> Console:
    console: Console = request.state.console
    return console


ConsoleDep = Annotated[Console, Depends(_console)]


async def _agency(request: Request, console: ConsoleDep) -> AgencySession | None:
    return await console.agency(request)


AgencyDep = Annotated[AgencySession | None, Depends(_agency)]
