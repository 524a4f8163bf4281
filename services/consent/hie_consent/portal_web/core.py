"""What every portal page shares: keys, templates, the patient's session cookie, page rendering.

The session cookie holds the patient session token the portal API issues (HS256, audience
``hie-patient-portal``, 10 minutes, signed with a key derived from ``portal_session_secret``), so the
pages and the API share one notion of a signed-in patient. It is HttpOnly, SameSite=Strict, Secure
over HTTPS, limited to /portal and expires with the token. Signing out (the page or the API) ends the
session server-side (``sessions.end``), so a copy of the cookie opens nothing afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, Response

from hie_consent import sessions
from hie_consent.config import ConsentSettings
from hie_consent.endpoints import RuntimeDep as RuntimeDep  # the API's, for the pages
from hie_consent.portal_web.i18n import STRINGS
from hie_platform.errors import FhirError, Forbidden, ServiceUnavailable, Unauthorized
from hie_platform.runtime import Runtime
from hie_platform.web import (
    FormGuard,
    clear_cookie,
    derive_key,
    set_cookie,
)
from hie_platform.webui import Site

PATH = "/portal"
SESSION_COOKIE = "hie_portal_session"
BROWSER_COOKIE = "hie_portal_browser"
HERE = Path(__file__).parent
# Query parameters that would name a patient: the portal takes none, it shows the session's patient only.
PATIENT_PARAMETERS = frozenset({"patient", "patient.identifier", "patient_key", "patient-key", "rrn", "key"})


@dataclass(frozen=True)
class Signed:
    """The outcome of reading the session cookie: a patient, or why there is none."""

    patient: sessions.PatientSession | None
    problem: Unauthorized | None = None


class Portal:
    def __init__(self, settings: ConsentSettings) -> None:
        secret = settings.portal_session_secret.get_secret_value()
        self.settings = settings
        self.forms = FormGuard(
            derive_key(secret, "hie-portal-web-form"), BROWSER_COOKIE, PATH, consumer="portal-web-form"
        )
        self.site = Site(PATH, HERE / "templates", STRINGS, HERE / "static" / "portal.css", self.forms)
        self.page = self.site.page

    async def signed(self, request: Request) -> Signed:
        """The cookie's session, if its token is valid and the session has not been ended (signed out
        at any replica: the consent database says so)."""
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            return Signed(None, Unauthorized("please sign in with a one-time code first"))
        try:
            return Signed(await sessions.open_session(request.app.state.runtime.db, self.settings, token))
        except Unauthorized as exc:
            return Signed(None, exc)

    async def patient(self, request: Request) -> sessions.PatientSession | Response:
        """The signed-in patient of a page that shows their records, or the page to show instead: the
        sign-in page, or the refusal of a URL that names a patient."""
        signed = await self.signed(request)
        if signed.patient is None:
            return self.sign_in_page(request, error=signed.problem)
        try:
            refuse_patient_parameters(request)
        except FhirError as exc:
            return self.page(request, "error.html", {}, signed_in=True, error=exc)
        return signed.patient

    def start_session(self, response: Response, request: Request, token: str, seconds: int) -> None:
        set_cookie(
            response,
            request,
            SESSION_COOKIE,
            token,
            path=PATH,
            max_age=seconds,
            public_url=self.settings.public_url,
        )

    @staticmethod
    def end_session(response: Response, request: Request) -> None:
        clear_cookie(response, request, SESSION_COOKIE, path=PATH)

    def sign_in_page(self, request: Request, error: FhirError | None = None, phone: str = "") -> HTMLResponse:
        response = self.page(
            request, "sign_in.html", {"phone": phone}, signed_in=False, error=error, here=f"{PATH}/sign-in"
        )
        if isinstance(error, Unauthorized):
            self.end_session(response, request)  # an expired or broken session cookie is dropped
        return response


def refuse_patient_parameters(request: Request) -> None:
    """A URL that tries to name a patient (tampering) is refused outright, not silently ignored."""
    named = PATIENT_PARAMETERS & set(request.query_params)
    if named:
        raise Forbidden(
            "the portal shows only your own records and takes no patient identifier "
            f"({', '.join(sorted(named))})"
        )


async def institution_names(runtime: Runtime, codes: set[str], lang: str) -> dict[str, str]:
    """Names of institutions from the registry client (cached); a code stays a code if unknown."""
    names: dict[str, str] = {}
    for code in sorted(c for c in codes if c):
        try:
            view = await runtime.registry.institution(code) if code.isdigit() and len(code) == 8 else None
        except ServiceUnavailable:
            view = None
        if view is not None:
            names[code] = (view.name_en or view.name) if lang == "en" else view.name
    return names


async def _portal(request: Request) -> Portal:
    portal: Portal | None = getattr(request.app.state, "portal_web", None)
    if portal is None:
        portal = Portal(request.app.state.settings)
        request.app.state.portal_web = portal
    return portal


PortalDep = Annotated[Portal, Depends(_portal)]


async def form_fields(request: Request) -> dict[str, str]:
    return {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
