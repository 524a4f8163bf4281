"""Console pages: sign-in and sign-out, applications waiting for a decision, one institution with its
evidence and history, and the lifecycle steps (each with a required reason)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError

from hie_platform.errors import BadRequest, Conflict, FhirError, Forbidden, NotFound, Unauthorized
from hie_platform.web import clear_cookie
from hie_registry import participation, repository
from hie_registry.console.core import PATH, SESSION_COOKIE, AgencyDep, AgencySession, Console, ConsoleDep
from hie_registry.lifecycle import Action, Role, TransitionError, transition
from hie_registry.models import PLATFORM, Institution
from hie_registry.schemas import Credentials, StepRequest
from hie_registry.service import InvalidClientError, authenticate_client
from hie_schemas.auth import SCOPE_AGENCY
from hie_schemas.directory import InstitutionKind, InstitutionState

router = APIRouter()
WAITING = (
    InstitutionState.APPLIED,
    InstitutionState.UNDER_REVIEW,
    InstitutionState.AGREEMENT_SIGNED,
    InstitutionState.APPROVED,
)


async def _form(request: Request) -> dict[str, str]:
    return {k: v for k, v in (await request.form()).items() if isinstance(v, str)}


# --- signing in and out ------------------------------------------------------------------------------


@router.get("/sign-in", include_in_schema=False)
async def sign_in_page(request: Request, console: ConsoleDep, agency: AgencyDep) -> Response:
    if agency is not None:
        return RedirectResponse(f"{PATH}/", status_code=303)
    return console.page(request, "sign_in.html", {"client_id": ""}, agency=None)


@router.post("/sign-in", include_in_schema=False)
async def sign_in(request: Request, console: ConsoleDep) -> Response:
    """Check the agency's client credentials with the token endpoint's own logic, then open a session."""
    form = await _form(request)
    client_id, secret = form.get("client_id", "").strip(), form.get("client_secret", "")
    runtime = request.app.state.runtime
    try:
        checked = console.forms.check(request, form.get("form_token"), "sign-in")
        if not client_id or not secret:
            raise BadRequest("enter the client id and the client secret")
        async with runtime.db.transaction() as session:
            await console.forms.claim(session, PLATFORM.processed, checked)
            try:
                client, _inst = await authenticate_client(session, client_id, secret)
            except InvalidClientError as exc:
                raise Unauthorized(str(exc)) from None
            if SCOPE_AGENCY not in client.scopes.split():
                raise Forbidden("only the operating agency's client may use the console")
    except FhirError as exc:
        return console.page(request, "sign_in.html", {"client_id": client_id}, agency=None, error=exc)
    response = RedirectResponse(f"{PATH}/", status_code=303)
    console.start_session(response, request, client_id)
    return response


@router.post("/sign-out", include_in_schema=False)
async def sign_out(request: Request, console: ConsoleDep, agency: AgencyDep) -> Response:
    form = await _form(request)
    try:
        console.forms.check(request, form.get("form_token"), "sign-out")
    except FhirError as exc:
        return console.page(request, "error.html", {}, agency=agency, error=exc, here=f"{PATH}/")
    console.end_session(request)
    response = RedirectResponse(f"{PATH}/sign-in", status_code=303)
    clear_cookie(response, request, SESSION_COOKIE, path=PATH)
    return response


# --- applications ------------------------------------------------------------------------------------


@router.get("/", include_in_schema=False)
async def applications(request: Request, console: ConsoleDep, agency: AgencyDep) -> Response:
    if agency is None:
        return RedirectResponse(f"{PATH}/sign-in", status_code=303)
    async with request.app.state.runtime.db.read_sessions() as session:
        rows = await repository.institutions_in(session, [s.value for s in WAITING])
        evidence = await repository.latest_evidence(session, [r.code for r in rows], Action.REVIEW.value)
    view = [
        {
            "code": r.code,
            "name": r.name,
            "kind": r.kind,
            "hub": r.hub,
            "state": r.state,
            "created_at": r.created_at,
            "evidence": evidence.get(r.code),
        }
        for r in rows
    ]
    return console.page(request, "applications.html", {"rows": view}, agency=agency)


# --- one institution and its lifecycle steps -----------------------------------------------------------


def agency_actions(inst: Institution) -> list[str]:
    """The steps the agency may take from the institution's current state (the state machine decides)."""
    allowed = []
    for action in Action:
        try:
            transition(action, InstitutionKind(inst.kind), InstitutionState(inst.state), {Role.AGENCY})
        except (TransitionError, ValueError):
            continue
        allowed.append(action.value)
    return allowed


async def institution_page(
    request: Request,
    console: Console,
    agency: AgencySession,
    code: str,
    *,
    error: FhirError | None = None,
    done: Action | None = None,
    credentials: Credentials | None = None,
    reasons: dict[str, str] | None = None,
) -> Response:
    async with request.app.state.runtime.db.read_sessions() as session:
        inst = await repository.institution(session, code) if code.isdigit() and len(code) == 8 else None
        if inst is None:
            return console.page(
                request, "error.html", {}, agency=agency, error=error or NotFound(f"no institution {code}")
            )
        history = await participation.history(session, code)
    reviews = [h.evidence for h in history if h.action == Action.REVIEW.value]
    contacts = ", ".join(str(v) for v in (inst.contacts or {}).values() if v)
    context = {
        "inst": inst,
        "contacts": contacts,
        "history": history,
        "evidence": reviews[-1] if reviews else None,
        "actions": agency_actions(inst),
        "version": str(len(history)),
        "credentials": credentials,
        "reasons": reasons or {},
        "message_key": f"done.{done.value}" if done is not None else None,
    }
    return console.page(
        request, "institution.html", context, agency=agency, error=error, here=f"{PATH}/institutions/{code}"
    )


@router.get("/institutions/{code}", include_in_schema=False)
async def institution(code: str, request: Request, console: ConsoleDep, agency: AgencyDep) -> Response:
    if agency is None:
        return console.sign_in_required(request)
    return await institution_page(request, console, agency, code)


@router.post("/institutions/{code}/{action}", include_in_schema=False)
async def take_step(
    code: str, action: str, request: Request, console: ConsoleDep, agency: AgencyDep
) -> Response:
    """One lifecycle step with the agency's reason, through the same rules as the API
    (participation.take_step); on approval the new client secret is shown once, on this answer only."""
    if agency is None:
        return console.sign_in_required(request)
    form = await _form(request)
    reason = form.get("reason", "")
    runtime = request.app.state.runtime
    try:
        try:
            step = Action(action)
        except ValueError:
            raise BadRequest(f"unknown step {action!r}") from None
        checked = console.forms.check(request, form.get("form_token"), f"step:{code}:{step.value}")
        try:
            body = StepRequest(reason=reason.strip())
        except ValidationError as exc:
            problem = exc.errors()[0].get("msg", "invalid") if exc.errors() else "invalid"
            raise BadRequest(f"reason: {problem}", expression=["reason"]) from None
        async with runtime.db.transaction() as session:
            await console.forms.claim(session, PLATFORM.processed, checked)
            if await repository.institution(session, code, for_update=True) is None:
                raise NotFound(f"no institution {code}")
            # The form is valid only for the state it showed: the count of steps taken since.
            if str(await repository.event_count(session, code)) != checked.context:
                raise Conflict("the institution changed since this page was opened; check its state below")
            _inst, _evidence, credentials = await participation.take_step(
                session, runtime.outbox, code, step, agency.claims, body.reason
            )
    except FhirError as exc:
        return await institution_page(request, console, agency, code, error=exc, reasons={action: reason})
    return await institution_page(request, console, agency, code, done=step, credentials=credentials)
