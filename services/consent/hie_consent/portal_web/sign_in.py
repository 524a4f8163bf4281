"""Signing in with a one-time code (RRN + mobile → code → session), and signing out (which ends the
session server-side, not only the cookie).

The same functions as the portal API (``portal.start_sign_in``, ``portal.sign_in``), so the same
rules hold: codes live five minutes, a new code replaces the old, wrong codes count towards a lockout,
and the development code is shown only when the service runs in development.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import SecretStr, ValidationError

from hie_consent import portal, sessions
from hie_consent.identity import IdentityProvider, WrongCode
from hie_consent.models import PLATFORM
from hie_consent.portal_web.core import PATH, PortalDep, RuntimeDep, form_fields
from hie_consent.schemas import CodeSubmission, IdentityStart
from hie_platform.errors import BadRequest, FhirError
from hie_platform.web import FormAlreadyUsed, FormRejected

router = APIRouter()


@router.get("/", include_in_schema=False)
async def home(request: Request, web: PortalDep) -> Response:
    target = "consent" if (await web.signed(request)).patient is not None else "sign-in"
    return RedirectResponse(f"{PATH}/{target}", status_code=303)


@router.get("/sign-in", include_in_schema=False)
async def sign_in_page(request: Request, web: PortalDep) -> Response:
    if (await web.signed(request)).patient is not None:
        return RedirectResponse(f"{PATH}/consent", status_code=303)
    return web.sign_in_page(request)


def _code_page(
    request: Request,
    web: PortalDep,
    challenge_id: str,
    attempts_left: int,
    dev_code: str | None = None,
    error: FhirError | None = None,
) -> Response:
    context = {
        "challenge_id": challenge_id,
        "attempts_left": attempts_left,
        "minutes": max(1, web.settings.code_ttl_seconds // 60),
        # Shown exactly when the API reveals it: development only (ChallengeOpened.dev_code).
        "dev_code": dev_code,
    }
    return web.page(request, "code.html", context, signed_in=False, error=error, here=f"{PATH}/sign-in")


@router.post("/sign-in", include_in_schema=False)
async def start(request: Request, web: PortalDep, runtime: RuntimeDep) -> Response:
    form = await form_fields(request)
    phone = form.get("phone", "").strip()
    try:
        checked = web.forms.check(request, form.get("form_token"), "sign-in")
        try:
            body = IdentityStart(rrn=SecretStr(form.get("rrn", "").strip()), phone=phone)
        except ValidationError:
            # The RRN is never echoed; the phone format is the only thing a person can get wrong here.
            raise BadRequest("enter your mobile number like 010-1234-5678", expression=["phone"]) from None
        provider: IdentityProvider = request.app.state.identity
        async with runtime.db.transaction() as session:
            await web.forms.claim(session, PLATFORM.processed, checked)
            opened = await portal.start_sign_in(session, web.settings, provider, body.rrn, body.phone)
    except FhirError as exc:
        return web.sign_in_page(request, error=exc, phone=phone)
    return _code_page(request, web, opened.challenge_id, opened.attempts_left, opened.dev_code)


@router.post("/sign-in/verify", include_in_schema=False)
async def verify(request: Request, web: PortalDep, runtime: RuntimeDep) -> Response:
    form = await form_fields(request)
    challenge_id = form.get("challenge_id", "")
    attempts = form.get("attempts_left", "")
    shown_left = int(attempts) if attempts.isdigit() else 0
    try:
        checked = web.forms.check(request, form.get("form_token"), "verify")
        if checked.context != challenge_id:
            raise FormRejected("the code form does not belong to this verification")
        try:
            code = CodeSubmission(code=form.get("code", "").strip()).code
        except ValidationError:
            raise BadRequest("the code is six digits", expression=["code"]) from None
        # A wrong code (and the lockout at the last attempt) is raised once the transaction has
        # committed the counted attempt and the claimed form (identity.check_code).
        async with runtime.db.transaction() as session:
            await web.forms.claim(session, PLATFORM.processed, checked)
            result = await portal.sign_in(session, web.settings, challenge_id, code)
    except WrongCode as exc:
        return _code_page(request, web, challenge_id, exc.attempts_left, error=exc)
    except FhirError as exc:
        if isinstance(exc, FormAlreadyUsed) and (await web.signed(request)).patient is not None:
            return RedirectResponse(f"{PATH}/consent", status_code=303)  # the first submission signed in
        if exc.status in (400, 403):
            return _code_page(request, web, challenge_id, shown_left, error=exc)
        return web.sign_in_page(request, error=exc)  # locked, expired, replaced, used, unknown: start again
    response = RedirectResponse(f"{PATH}/consent", status_code=303)
    web.start_session(response, request, result.access_token, result.expires_in)
    return response


@router.post("/sign-out", include_in_schema=False)
async def sign_out(request: Request, web: PortalDep, runtime: RuntimeDep) -> Response:
    """Ends the session server-side (as ``DELETE /portal/session``), then drops the cookie: a copy of
    the cookie taken before opens nothing at any replica."""
    form = await form_fields(request)
    try:
        web.forms.check(request, form.get("form_token"), "sign-out")
    except FhirError as exc:
        return web.sign_in_page(request, error=exc)
    signed = await web.signed(request)
    if signed.patient is not None:
        await sessions.end(runtime.db, signed.patient)
    response = RedirectResponse(f"{PATH}/sign-in", status_code=303)
    web.end_session(response, request)
    return response
