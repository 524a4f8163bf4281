"""The patient's own channels: the portal (sign in with a code, then consent, withdraw, re-consent) and
the call centre (an agent takes the request by phone, the patient completes it with a texted code)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import SecretStr, ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from hie_consent import identity, service
from hie_consent.config import ConsentSettings
from hie_consent.identity import ChallengePurpose, Delivery, IdentityClaim, IdentityProvider, SmsSender
from hie_consent.models import IdentityChallenge
from hie_consent.schemas import (
    CallCentreRequest,
    ChallengeOpened,
    ConsentChannel,
    ConsentRequest,
    ConsentVersionView,
    Exclusion,
    PatientSessionToken,
    Signer,
    SignerRelationship,
)
from hie_consent.service import NewVersion
from hie_consent.sessions import issue
from hie_platform.errors import BadRequest
from hie_platform.runtime import Runtime
from hie_schemas.auth import TokenClaims
from hie_schemas.consent import ConsentPolicy
from hie_schemas.identifiers import InvalidIdentifierError, Rrn


def _rrn(value: SecretStr) -> Rrn:
    try:
        return Rrn(value.get_secret_value())
    except InvalidIdentifierError as exc:
        raise BadRequest(f"rrn: {exc.reason}", expression=["rrn"]) from None  # the value is not echoed


def _exclusions(request: ConsentRequest) -> tuple[Exclusion, ...]:
    found = tuple(e.exclusion() for e in request.exclusions)
    if len({(e.kind, e.code) for e in found}) != len(found):
        raise BadRequest("an institution or department is excluded twice", expression=["exclusions"])
    return found


async def _latest_view(session: AsyncSession, patient_key: str) -> ConsentVersionView:
    return (await service.version_views(session, patient_key))[0]


def _opened(settings: ConsentSettings, row: IdentityChallenge, delivery: Delivery) -> ChallengeOpened:
    """The answer to a code sent: the challenge, its expiry, attempts left, and the code in development."""
    return ChallengeOpened(
        challenge_id=row.id,
        expires_at=row.expires_at,
        attempts_left=identity.attempts_left(settings, row),
        dev_code=delivery.dev_code if settings.reveals_codes else None,
    )


# --- portal -----------------------------------------------------------------------------------------


async def start_sign_in(
    session: AsyncSession,
    settings: ConsentSettings,
    provider: IdentityProvider,
    rrn: SecretStr,
    phone: str,
) -> ChallengeOpened:
    """Send the patient a code through the identity provider (RRN and phone must belong together)."""
    claim = IdentityClaim(rrn=_rrn(rrn), phone=phone)
    patient_key = claim.rrn.patient_key(settings.patient_key_bytes)
    now = datetime.now(UTC)
    row, code = await identity.open_challenge(session, settings, patient_key, ChallengePurpose.PORTAL, now)
    return _opened(settings, row, await provider.send_code(claim, code, row.id))


async def sign_in(
    session: AsyncSession, settings: ConsentSettings, challenge_id: str, code: str
) -> PatientSessionToken:
    """The patient's session for the right code; a wrong one raises after its attempt is committed
    (identity.check_code)."""
    checked = await identity.check_code(
        session, settings, challenge_id, ChallengePurpose.PORTAL, code, datetime.now(UTC)
    )
    return issue(settings, checked.patient_key, "otp")


async def record_for_patient(
    session: AsyncSession,
    runtime: Runtime,
    settings: ConsentSettings,
    patient_key: str,
    request: ConsentRequest,
) -> ConsentVersionView:
    """The signed-in patient consents, withdraws (entirely or partly) or consents again."""
    exclusions = _exclusions(request)
    await service.check_targets(runtime, exclusions)
    new = NewVersion(
        patient_key=patient_key,
        policy=request.policy,
        effective_at=None,
        exclusions=exclusions,
        recorded_by=settings.agency_institution,
        channel=ConsentChannel.PORTAL,
        signer=Signer(relationship=SignerRelationship.SELF),
    )
    await service.append_version(session, runtime, settings, new, actor=None, audit_detail={"via": "portal"})
    return await _latest_view(session, patient_key)


# --- call centre ------------------------------------------------------------------------------------


def _stored_request(request: CallCentreRequest, exclusions: tuple[Exclusion, ...]) -> dict[str, Any]:
    """What is kept until the patient completes the request (no RRN, no phone)."""
    return {
        "policy": request.policy.value,
        "exclusions": [e.model_dump(mode="json") for e in exclusions],
        "signer": request.signer.model_dump(mode="json"),
    }


def _pending_version(row_request: dict[str, Any], patient_key: str, agent: str) -> NewVersion:
    try:
        return NewVersion(
            patient_key=patient_key,
            policy=ConsentPolicy(row_request["policy"]),
            effective_at=None,
            exclusions=tuple(Exclusion.model_validate(e) for e in row_request["exclusions"]),
            recorded_by=agent,
            channel=ConsentChannel.PHONE,
            signer=Signer.model_validate(row_request["signer"]),
        )
    except (KeyError, ValueError, ValidationError) as exc:
        raise BadRequest("the stored call-centre request is unreadable") from exc


async def open_call(
    session: AsyncSession,
    runtime: Runtime,
    settings: ConsentSettings,
    sender: SmsSender,
    agent: TokenClaims,
    request: CallCentreRequest,
) -> ChallengeOpened:
    """An agent records what the patient asked for; it takes effect when the patient sends the code back."""
    rrn = _rrn(request.rrn)
    patient_key = rrn.patient_key(settings.patient_key_bytes)
    exclusions = _exclusions(request)
    await service.check_targets(runtime, exclusions)
    pending = _pending_version(_stored_request(request, exclusions), patient_key, agent.inst)
    # The same checks as on completion, now, so the agent hears about a mistake during the call.
    await service.check_version(session, settings, pending, datetime.now(UTC))
    now = datetime.now(UTC)
    row, code = await identity.open_challenge(
        session,
        settings,
        patient_key,
        ChallengePurpose.CALL_CENTRE,
        now,
        agent_institution=agent.inst,
        request=_stored_request(request, exclusions),
    )
    await runtime.audit.record(
        session,
        action="call-centre-request",
        actor=agent,
        outcome="pending",
        patient_key=patient_key,
        detail={"policy": request.policy.value, "request": row.id},
    )
    return _opened(settings, row, await sender.send_code(request.phone, code, row.id))


async def complete_call(
    session: AsyncSession, runtime: Runtime, settings: ConsentSettings, request_id: str, code: str
) -> ConsentVersionView:
    """The patient sends back the texted code: the request becomes a consent version (channel phone).
    A wrong code raises after its attempt is committed (identity.check_code)."""
    checked = await identity.check_code(
        session, settings, request_id, ChallengePurpose.CALL_CENTRE, code, datetime.now(UTC)
    )
    agent = checked.agent_institution or settings.agency_institution
    # The registry was asked when the agent opened the request: no look-up while the write lock is held.
    pending = _pending_version(checked.request or {}, checked.patient_key, agent)
    row = await service.append_version(
        session,
        runtime,
        settings,
        pending,
        actor=None,
        audit_detail={"via": "call-centre", "agent_institution": agent, "request": request_id},
    )
    checked.consent_version = row.version
    return await _latest_view(session, checked.patient_key)


async def consent_views(session: AsyncSession, patient_key: str) -> list[ConsentVersionView]:
    return await service.version_views(session, patient_key)
