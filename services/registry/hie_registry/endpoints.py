"""Registry HTTP API: OAuth2 token, JWKS, the public directory, agency edits."""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from hie_platform.auth import require_scope
from hie_platform.http import ReadSessionDep, SessionDep
from hie_platform.logging import get_logger
from hie_registry import keys, repository
from hie_registry.service import (
    InvalidClientError,
    authenticate_client,
    hub_view,
    institution_view,
    issue_token,
    known_institution,
    publish_change,
)
from hie_schemas.auth import SCOPE_AGENCY, TokenClaims
from hie_schemas.directory import HubView, InstitutionView

log = get_logger(__name__)
router = APIRouter()
# One router a tag (each route says its tag through its router), included at the end.
auth_router = APIRouter(tags=["auth"])
agency_router = APIRouter(tags=["agency"])
directory_router = APIRouter(tags=["directory"])
AgencyActor = Annotated[TokenClaims, Depends(require_scope(SCOPE_AGENCY))]


def _oauth_error(status: int, error: str, description: str) -> JSONResponse:
    # RFC 6749 §5.2: the token endpoint answers with its own error format, not OperationOutcome.
    headers = {"WWW-Authenticate": 'Basic realm="hie"'} if status == 401 else None
    return JSONResponse(
        {"error": error, "error_description": description}, status_code=status, headers=headers
    )


def _basic_credentials(request: Request) -> tuple[str, str] | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        client_id, sep, secret = base64.b64decode(value).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (client_id, secret) if sep else None


@auth_router.post("/oauth2/token", summary="OAuth2 client-credentials grant (RFC 6749 §4.4)")
async def token(
    request: Request,
    session: ReadSessionDep,
    grant_type: Annotated[str, Form()],
    client_id: Annotated[str | None, Form()] = None,
    client_secret: Annotated[str | None, Form()] = None,
    scope: Annotated[str | None, Form()] = None,
) -> JSONResponse:
    if grant_type != "client_credentials":
        return _oauth_error(400, "unsupported_grant_type", "only client_credentials is supported")
    credentials = _basic_credentials(request) or (
        (client_id, client_secret) if client_id and client_secret else None
    )
    if credentials is None:
        return _oauth_error(401, "invalid_client", "client credentials are required")
    runtime = request.app.state.runtime
    settings = runtime.settings
    try:
        client, inst = await authenticate_client(session, *credentials)
        access_token = issue_token(
            request.app.state.keyring, settings.issuer, settings.token_ttl_seconds, client, inst, scope
        )
    except InvalidClientError as exc:
        return _oauth_error(
            401 if "scope" not in str(exc) else 400,
            "invalid_scope" if "scope" in str(exc) else "invalid_client",
            str(exc),
        )
    return JSONResponse(
        {"access_token": access_token, "token_type": "Bearer", "expires_in": settings.token_ttl_seconds},
        headers={"Cache-Control": "no-store"},
    )


@auth_router.get("/.well-known/jwks.json", summary="Public keys that verify access tokens")
async def jwks(request: Request) -> dict[str, Any]:
    data: dict[str, Any] = request.app.state.keyring.jwks()
    return data


class KeyChange(BaseModel):
    reason: str = Field(min_length=1, max_length=500, description="why; kept in the audit trail")


class KeyRingView(BaseModel):
    kid: str = Field(description="the key that signs from now on")
    keys: list[str] = Field(description="the keys in the JWKS (they verify)")
    retired: list[str] = Field(description="keys retired by this call: refused everywhere at once")


async def _key_change(
    request: Request,
    session: SessionDep,
    actor: TokenClaims,
    ring: keys.KeyRing,
    retired: list[str],
    reason: str,
) -> KeyRingView:
    """Serve the new ring, refuse the retired kids here at once, audit and log the change."""
    runtime = request.app.state.runtime
    request.app.state.keyring = ring
    for kid in retired:
        runtime.verifier.retire(kid)
    detail = {"signing": ring.current.kid, "retired": retired, "reason": reason}
    await runtime.audit.record(
        session, action="signing-key-change", actor=actor, outcome="success", detail=detail
    )
    log.warning("signing keys changed", actor=actor.sub, signing=ring.current.kid, retired=retired)
    return KeyRingView(kid=ring.current.kid, keys=[k.kid for k in ring.keys], retired=retired)


@agency_router.get("/keys", summary="The registry's signing keys: which signs, which are retired")
async def list_keys(session: ReadSessionDep, _actor: AgencyActor) -> list[dict[str, Any]]:
    return await keys.listing(session)


@agency_router.post(
    "/keys/rotate",
    response_model=KeyRingView,
    summary="Sign with a new key; old keys verify until their tokens expire, or stop at once "
    "(retire_previous=true, for a leaked key)",
)
async def rotate_key(
    session: SessionDep,
    request: Request,
    actor: AgencyActor,
    retire_previous: bool = False,
    body: KeyChange | None = None,
) -> KeyRingView:
    runtime = request.app.state.runtime
    ring, retired = await keys.rotate(
        session, runtime.outbox, runtime.settings.token_ttl_seconds, retire_previous=retire_previous
    )
    reason = body.reason if body else ("retire previous keys" if retire_previous else "rotation")
    return await _key_change(request, session, actor, ring, retired, reason)


@agency_router.post(
    "/keys/{kid}/retire",
    response_model=KeyRingView,
    summary="Retire one signing key at once (leaked): it leaves the JWKS and every service refuses it",
)
async def retire_key(
    kid: str, body: KeyChange, session: SessionDep, request: Request, actor: AgencyActor
) -> KeyRingView:
    ring = await keys.retire(session, request.app.state.runtime.outbox, kid)
    return await _key_change(request, session, actor, ring, [kid], body.reason)


@directory_router.get("/institutions/{code}", response_model=InstitutionView)
async def get_institution(code: str, session: ReadSessionDep) -> InstitutionView:
    return institution_view(await known_institution(session, code))


@directory_router.get("/institutions", response_model=list[InstitutionView])
async def list_institutions(
    session: ReadSessionDep, hub: str | None = None, kind: str | None = None, state: str | None = None
) -> list[InstitutionView]:
    rows = await repository.institutions(session, hub=hub, kind=kind, state=state)
    return [institution_view(i) for i in rows]


@directory_router.get("/hubs", response_model=list[HubView])
async def list_hubs(session: ReadSessionDep) -> list[HubView]:
    return [hub_view(hub, inst) for hub, inst in await repository.hubs(session)]


class DicomEndpointBody(BaseModel):
    ae_title: str = Field(min_length=1, max_length=16, pattern=r"^[ -~]*[!-~][ -~]*$")
    host: str = Field(min_length=1, max_length=255)
    port: int = Field(ge=1, le=65535)


@agency_router.put(
    "/institutions/{code}/dicom",
    response_model=InstitutionView,
    summary="Register the DICOM endpoint (PACS) of an institution",
)
async def set_dicom_endpoint(
    code: str, body: DicomEndpointBody, session: SessionDep, request: Request, _actor: AgencyActor
) -> InstitutionView:
    inst = await known_institution(session, code)
    inst.dicom_ae, inst.dicom_host, inst.dicom_port = body.ae_title.strip(), body.host, body.port
    inst.updated_at = datetime.now(UTC)
    await publish_change(session, request.app.state.runtime.outbox, inst, "dicom-endpoint")
    return institution_view(inst)


router.include_router(auth_router)
router.include_router(agency_router)
router.include_router(directory_router)
