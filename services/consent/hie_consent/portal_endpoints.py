"""The patient's HTTP API (portal) and the call centre's.

Portal: prove identity with a one-time code, get a short-lived session, then read and change one's
own consent and see one's own history, and sign out (``DELETE /portal/session``: the token is refused
by every replica from then on). Nothing here takes a patient identifier once signed in: the session
names the patient, so a patient can only ever see their own records.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from hie_consent import history, portal, sessions
from hie_consent.endpoints import RuntimeDep, SettingsDep, app_state
from hie_consent.identity import IdentityProvider, SmsSender
from hie_consent.schemas import (
    CallCentreRequest,
    ChallengeOpened,
    CodeSubmission,
    ConsentRequest,
    ConsentVersionView,
    IdentityStart,
    PatientHistory,
    PatientSessionToken,
)
from hie_consent.sessions import CurrentPatient
from hie_platform.auth import require_scope
from hie_platform.http import ReadSessionDep, SessionDep
from hie_schemas.auth import SCOPE_AGENCY, TokenClaims

router = APIRouter()
portal_router = APIRouter(tags=["portal"])
call_centre_router = APIRouter(tags=["call centre"])
Agent = Annotated[TokenClaims, Depends(require_scope(SCOPE_AGENCY))]
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "malformed request (e.g. an RRN that is not one); OperationOutcome"},
    409: {"description": "e.g. a withdrawal without a consent in force; OperationOutcome"},
    410: {"description": "the code expired or was replaced; OperationOutcome"},
    422: {"description": "wrong code (attempts left), unknown institution/department; OperationOutcome"},
    429: {"description": "locked after too many wrong codes (Retry-After); OperationOutcome"},
}


IdentityDep = Annotated[IdentityProvider, Depends(app_state("identity"))]
SmsDep = Annotated[SmsSender, Depends(app_state("sms"))]


@portal_router.post(
    "/portal/identity/challenges",
    status_code=201,
    response_model=ChallengeOpened,
    response_model_exclude_none=True,
    responses=_ERRORS,
    summary="Send the patient a one-time code through the identity provider (본인인증)",
)
async def start_identity_check(
    body: IdentityStart,
    session: SessionDep,
    settings: SettingsDep,
    provider: IdentityDep,
) -> ChallengeOpened:
    return await portal.start_sign_in(session, settings, provider, body.rrn, body.phone)


@portal_router.post(
    "/portal/identity/challenges/{challenge_id}/verify",
    response_model=PatientSessionToken,
    responses=_ERRORS,
    summary="Answer the code; returns the patient's session token (Bearer, a few minutes)",
)
async def verify_identity(
    challenge_id: str, body: CodeSubmission, session: SessionDep, settings: SettingsDep
) -> PatientSessionToken:
    # A wrong code is raised after the request's transaction has committed the counted attempt.
    return await portal.sign_in(session, settings, challenge_id, body.code)


@portal_router.delete(
    "/portal/session",
    status_code=204,
    response_class=Response,
    responses={401: {"description": "no session, or one already ended or expired; OperationOutcome"}},
    summary="Sign out: the session's token (and the portal cookie holding it) opens nothing from now on",
)
async def sign_out(patient: CurrentPatient, runtime: RuntimeDep) -> Response:
    await sessions.end(runtime.db, patient)
    return Response(status_code=204)


@portal_router.get(
    "/portal/me/consents",
    response_model=list[ConsentVersionView],
    summary="The signed-in patient's consent versions, newest first",
)
async def my_consents(patient: CurrentPatient, session: ReadSessionDep) -> list[ConsentVersionView]:
    return await portal.consent_views(session, patient.patient_key)


@portal_router.post(
    "/portal/me/consents",
    status_code=201,
    response_model=ConsentVersionView,
    responses=_ERRORS,
    summary="Consent, withdraw entirely or partly, or consent again (the complete new version)",
)
async def change_my_consent(
    body: ConsentRequest,
    patient: CurrentPatient,
    session: SessionDep,
    runtime: RuntimeDep,
    settings: SettingsDep,
) -> ConsentVersionView:
    return await portal.record_for_patient(session, runtime, settings, patient.patient_key, body)


@portal_router.get(
    "/portal/me/history",
    response_model=PatientHistory,
    summary="Every exchange of the patient's records and every access to them; emergencies flagged",
)
async def my_history(patient: CurrentPatient, session: SessionDep, runtime: RuntimeDep) -> PatientHistory:
    return await history.patient_history_read(session, runtime, patient.patient_key)


@call_centre_router.post(
    "/call-centre/requests",
    status_code=201,
    response_model=ChallengeOpened,
    response_model_exclude_none=True,
    responses=_ERRORS,
    summary="An agent takes a patient's consent request by phone; a code is texted to the patient",
)
async def open_call_request(
    body: CallCentreRequest,
    agent: Agent,
    session: SessionDep,
    runtime: RuntimeDep,
    settings: SettingsDep,
    sender: SmsDep,
) -> ChallengeOpened:
    return await portal.open_call(session, runtime, settings, sender, agent, body)


@call_centre_router.post(
    "/call-centre/requests/{request_id}/complete",
    status_code=201,
    response_model=ConsentVersionView,
    responses=_ERRORS,
    summary="The patient completes the request with the texted code: the consent version is recorded",
)
async def complete_call_request(
    request_id: str, body: CodeSubmission, session: SessionDep, runtime: RuntimeDep, settings: SettingsDep
) -> ConsentVersionView:
    return await portal.complete_call(session, runtime, settings, request_id, body.code)


router.include_router(portal_router)
router.include_router(call_centre_router)
