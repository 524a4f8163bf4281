"""Consent HTTP API for institutions and the agency: FHIR Consent (record, search, read, signature
image), decisions, and the agency's view of a patient's consent versions and exchange history.

A consent record is read only by the institution that recorded it and by the agency
(``service.may_read``); anyone else finds nothing (an empty searchset, the 404 of an unknown id), so
that it cannot learn a record exists. docs/consent.md, "Who reads a consent record"."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.ext.asyncio import AsyncSession

from hie_consent import history, service
from hie_consent.config import ConsentSettings
from hie_consent.fhir import searchset
from hie_consent.schemas import ConsentVersionView, ExchangeHistoryEntry
from hie_platform.auth import current_actor, require_scope
from hie_platform.db import raise_after_commit
from hie_platform.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    UnsupportedMediaType,
    fhir_response,
)
from hie_platform.http import SessionDep, request_json
from hie_platform.runtime import Runtime
from hie_schemas.auth import SCOPE_AGENCY, SCOPE_EXCHANGE, TokenClaims
from hie_schemas.directory import InstitutionKind
from hie_schemas.events import DecisionReply, DecisionRequest
from hie_schemas.identifiers import (
    InvalidIdentifierError,
    parse_token_param,
    patient_key_from_identifier,
    validate_patient_key,
)

router = APIRouter()
ExchangeActor = Annotated[TokenClaims, Depends(require_scope(SCOPE_EXCHANGE))]
AgencyActor = Annotated[TokenClaims, Depends(require_scope(SCOPE_AGENCY))]
# FHIR token search (system|value); the value may be an RRN, so it is never echoed back.
PatientParam = Annotated[str, Query(alias="patient.identifier", description="system|value")]
_JSON_TYPES = ("application/fhir+json", "application/json")
# meta.versionId: a positive 32-bit integer (the column's range on PostgreSQL); a larger number made
# the database driver raise (a 500) instead of being refused as a bad request.
VersionId = Annotated[int, Path(ge=1, le=2**31 - 1, description="meta.versionId")]


def app_state(name: str) -> Callable[[Request], Awaitable[Any]]:
    """A dependency that hands a route what the lifespan put on ``app.state`` under ``name`` (async:
    FastAPI runs a plain ``def`` dependency in its threadpool, a hop per request for a getattr)."""

    async def get(request: Request) -> Any:
        return getattr(request.app.state, name)

    return get


async def _reader(actor: Annotated[TokenClaims, Depends(current_actor)]) -> TokenClaims:
    """An institution (scope exchange) or the agency; what each may read is decided per record."""
    if not actor.scopes & {SCOPE_EXCHANGE, SCOPE_AGENCY}:
        raise Forbidden(f"the '{SCOPE_EXCHANGE}' or '{SCOPE_AGENCY}' scope is required")
    return actor


RuntimeDep = Annotated[Runtime, Depends(app_state("runtime"))]
SettingsDep = Annotated[ConsentSettings, Depends(app_state("settings"))]
ReaderActor = Annotated[TokenClaims, Depends(_reader)]
# The same answer for an unknown id and for a record the caller may not read.
NO_CONSENT = "no such Consent (or version)"
NO_SIGNATURE = "no signature image for this Consent version"


def _patient_key(patient: PatientParam, settings: SettingsDep) -> str:
    """The patient key of ``patient.identifier`` (an RRN is turned into the key, never echoed)."""
    try:
        return patient_key_from_identifier(*parse_token_param(patient), settings.patient_key_bytes)
    except InvalidIdentifierError as exc:
        raise BadRequest(f"patient.identifier: {exc}", expression=["patient.identifier"]) from None


# Listed after the caller's identity in each route, so an unauthenticated call is refused first.
PatientKey = Annotated[str, Depends(_patient_key)]


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


async def _json_body(request: Request) -> Any:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in _JSON_TYPES:
        raise UnsupportedMediaType("send the resource as application/fhir+json")
    try:
        return await request_json(request)  # parsed within the shared limits (json_limits.py)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body is not JSON") from None


@dataclass(frozen=True)
class Reading:
    """What a read of consent records needs: the request, its session, the runtime and the reader."""

    request: Request
    session: AsyncSession
    runtime: Runtime
    actor: TokenClaims


async def _reading(request: Request, session: SessionDep, runtime: RuntimeDep, actor: ReaderActor) -> Reading:
    return Reading(request, session, runtime, actor)


ReadingDep = Annotated[Reading, Depends(_reading)]
# The FHIR Consent routes; a JSONResponse return needs no response_class (FastAPI's default).
fhir_router = APIRouter(tags=["consent"])
history_router = APIRouter(tags=["history"])


@fhir_router.post(
    "/fhir/Consent",
    status_code=201,
    summary="Record a new version of a patient's consent (give, withdraw, exclude)",
)
async def create_consent(
    request: Request, session: SessionDep, runtime: RuntimeDep, settings: SettingsDep, actor: ExchangeActor
) -> JSONResponse:
    row = await service.record_consent(session, runtime, settings, actor, await _json_body(request))
    location = f"{_base_url(request)}/fhir/Consent/{row.resource_id}/_history/{row.version}"
    return fhir_response(201, row.resource, {"Location": location, "ETag": f'W/"{row.version}"'})


@fhir_router.get("/fhir/Consent", summary="A patient's consent versions, newest first (searchset Bundle)")
async def search_consent(reading: ReadingDep, key: PatientKey) -> JSONResponse:
    resources = await service.consent_versions(reading.session, reading.runtime, reading.actor, key)
    return fhir_response(200, searchset(_base_url(reading.request), resources))


async def _read(reading: Reading, resource_id: str, version_id: int | None) -> JSONResponse:
    resource = await service.consent_resource(
        reading.session, reading.runtime, reading.actor, resource_id, version_id
    )
    if resource is None:
        # Raised once the refused read's audit record has committed. The id is not echoed.
        raise raise_after_commit(reading.session, NotFound(NO_CONSENT))
    return fhir_response(200, resource, {"ETag": f'W/"{resource["meta"]["versionId"]}"'})


@fhir_router.get("/fhir/Consent/{resource_id}", summary="The current version of a Consent")
async def read_consent(reading: ReadingDep, resource_id: str) -> JSONResponse:
    return await _read(reading, resource_id, None)


@fhir_router.get("/fhir/Consent/{resource_id}/_history/{version_id}", summary="One version of a Consent")
async def read_consent_version(reading: ReadingDep, resource_id: str, version_id: VersionId) -> JSONResponse:
    return await _read(reading, resource_id, version_id)


@fhir_router.get(
    "/fhir/Consent/{resource_id}/_history/{version_id}/signature",
    response_class=Response,
    responses={200: {"content": {"image/png": {}, "image/jpeg": {}}}},
    summary="The signature image of a desk consent (the recording institution and the agency only)",
)
async def read_signature(reading: ReadingDep, resource_id: str, version_id: VersionId) -> Response:
    image = await service.signature(reading.session, reading.runtime, reading.actor, resource_id, version_id)
    if image is None:
        raise raise_after_commit(reading.session, NotFound(NO_SIGNATURE))
    return Response(image.data, media_type=image.content_type, headers={"Cache-Control": "no-store"})


router.include_router(fhir_router)


@router.post(
    "/decisions",
    tags=["decisions"],
    response_model=DecisionReply,
    summary="May this document flow from holder to recipient now? (the holder, the recipient or the agency)",
)
async def post_decision(
    body: DecisionRequest, session: SessionDep, runtime: RuntimeDep, actor: ReaderActor
) -> DecisionReply:
    if actor.kind is not InstitutionKind.AGENCY and actor.inst not in (
        body.query.holder,
        body.query.recipient,
    ):
        # A decision names the rule (e.g. the recipient is excluded): only a party to the flow asks it.
        raise Forbidden("only the holder, the recipient or the agency asks about a flow")
    try:
        validate_patient_key(body.query.patient_key)
    except InvalidIdentifierError as exc:
        raise BadRequest(f"query.patient_key: {exc.reason}", expression=["query.patient_key"]) from None
    decision = await service.decide_flow(session, runtime, body.query, actor, via="http")
    return DecisionReply(decision=decision)


@history_router.get(
    "/exchange-history",
    response_model=list[ExchangeHistoryEntry],
    summary="Who exchanged the patient's records, what and when; newest first",
)
async def get_exchange_history(
    session: SessionDep, runtime: RuntimeDep, actor: AgencyActor, key: PatientKey
) -> list[ExchangeHistoryEntry]:
    return await history.exchange_history(session, runtime, actor, key)


@history_router.get(
    "/consent-records",
    response_model=list[ConsentVersionView],
    summary="The agency's view of a patient's consent versions: channel, signer, exclusions and reasons",
)
async def get_consent_records(
    session: SessionDep, runtime: RuntimeDep, actor: AgencyActor, key: PatientKey
) -> list[ConsentVersionView]:
    views = await service.version_views(session, key)
    await runtime.audit.record_read(session, "consent-read", actor, key)
    return views


router.include_router(history_router)
