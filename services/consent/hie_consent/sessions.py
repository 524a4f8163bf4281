"""The patient's portal session: a short-lived HS256 token signed with a key only this service holds.

It can never pass for an institution token: institution tokens are ES256 JWTs from the registry for
the audience ``hie-federation``, and every service's verifier accepts nothing else; this token is
HS256 for the audience ``hie-patient-portal`` and only the portal endpoints accept it (and refuse
institution tokens).

Signing out ends a session before its token expires: its ``jti`` goes into the consent database
(``ended_portal_sessions``), which every replica reads on every portal request (the API's
``CurrentPatient`` and the pages' cookie alike), so a copy of the token or cookie opens nothing
anywhere. A row is kept until the token could no longer pass at any replica, then pruned.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import jwt
from fastapi import Depends, Request
from sqlalchemy.exc import IntegrityError

from hie_consent import repository
from hie_consent.config import ConsentSettings
from hie_consent.schemas import PatientSessionToken
from hie_platform.auth import bearer_token
from hie_platform.db import Database
from hie_platform.errors import Unauthorized
from hie_schemas.identifiers import InvalidIdentifierError, validate_patient_key

PATIENT_AUDIENCE = "hie-patient-portal"
PATIENT_SCOPE = "patient"
ALGORITHM = "HS256"
LEEWAY_SECONDS = 5
# An ended session's row outlives its token by this much, for replicas whose clocks run behind.
CLOCK_MARGIN_SECONDS = 300


@dataclass(frozen=True)
class PatientSession:
    patient_key: str
    session_id: str
    expires_at: int


def _issuer(settings: ConsentSettings) -> str:
    return f"{settings.base_url.rstrip('/')}/portal"


def issue(settings: ConsentSettings, patient_key: str, method: str) -> PatientSessionToken:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": _issuer(settings),
        "aud": PATIENT_AUDIENCE,
        "sub": patient_key,
        "iat": now,
        "exp": now + settings.portal_session_seconds,
        "jti": uuid.uuid4().hex,
        "scope": PATIENT_SCOPE,
        "amr": [method],  # RFC 8176: how the patient proved who they are (otp)
    }
    token = jwt.encode(claims, settings.session_key, algorithm=ALGORITHM, headers={"typ": "JWT"})
    return PatientSessionToken(access_token=token, expires_in=settings.portal_session_seconds)


def verify(settings: ConsentSettings, token: str) -> PatientSession:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise Unauthorized("malformed bearer token") from None
    if header.get("alg") != ALGORITHM:
        raise Unauthorized("not a patient session token")
    try:
        claims = jwt.decode(
            token,
            settings.session_key,
            algorithms=[ALGORITHM],
            audience=PATIENT_AUDIENCE,
            issuer=_issuer(settings),
            leeway=LEEWAY_SECONDS,
            options={"require": ["exp", "iat", "iss", "aud", "sub", "jti"]},
        )
        if claims.get("scope") != PATIENT_SCOPE:
            raise Unauthorized("not a patient session token")
        key = validate_patient_key(str(claims["sub"]))
    except jwt.ExpiredSignatureError:
        raise Unauthorized("the session has expired; verify your identity again") from None
    except (jwt.PyJWTError, InvalidIdentifierError):
        raise Unauthorized("session token rejected") from None
    return PatientSession(patient_key=key, session_id=str(claims["jti"]), expires_at=int(claims["exp"]))


async def open_session(db: Database, settings: ConsentSettings, token: str) -> PatientSession:
    """The patient of a valid token whose session has not been ended (Unauthorized otherwise)."""
    patient = verify(settings, token)
    async with db.read_sessions() as session:
        ended = await repository.session_ended(session, patient.session_id)
    if ended:
        raise Unauthorized("the session has ended (signed out); verify your identity again")
    return patient


async def end(db: Database, patient: PatientSession) -> None:
    """Sign out: from now on no replica accepts this session's token (nor the cookie holding it)."""
    keep_until = patient.expires_at + LEEWAY_SECONDS + CLOCK_MARGIN_SECONDS
    try:
        async with db.transaction() as session:
            await repository.end_session(
                session, patient.session_id, datetime.fromtimestamp(keep_until, UTC), datetime.now(UTC)
            )
    except IntegrityError:
        pass  # a concurrent sign-out of the same session committed first: it is ended


async def current_patient(request: Request) -> PatientSession:
    settings: ConsentSettings = request.app.state.settings
    return await open_session(request.app.state.runtime.db, settings, bearer_token(request))


CurrentPatient = Annotated[PatientSession, Depends(current_patient)]
