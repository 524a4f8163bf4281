"""The agency's lifecycle API: applications, review, agreement, approval, suspension, revocation."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from hie_platform.auth import CurrentActor, require_scope
from hie_platform.errors import BadRequest, Forbidden
from hie_platform.http import ReadSessionDep, SessionDep
from hie_registry import participation, repository
from hie_registry.lifecycle import Action
from hie_registry.models import Institution
from hie_registry.schemas import Application, HistoryEntry, InstitutionDetail, StepRequest, StepResult
from hie_registry.service import institution_view, known_institution
from hie_schemas.auth import SCOPE_AGENCY, SCOPE_EXCHANGE, TokenClaims
from hie_schemas.identifiers import InvalidIdentifierError, validate_patient_key

router = APIRouter(tags=["lifecycle"])
AgencyActor = Annotated[TokenClaims, Depends(require_scope(SCOPE_AGENCY))]


def detail(inst: Institution) -> InstitutionDetail:
    return InstitutionDetail(**institution_view(inst).model_dump(), contacts=dict(inst.contacts or {}))


@router.post(
    "/institutions",
    status_code=201,
    response_model=InstitutionDetail,
    summary="Enter an institution's application (agency)",
)
async def apply(
    body: Application, session: SessionDep, request: Request, actor: AgencyActor
) -> InstitutionDetail:
    inst = await participation.apply(session, request.app.state.runtime.outbox, body, actor)
    return detail(inst)


@router.post(
    "/institutions/{code}/{action}",
    response_model=StepResult,
    summary="Take a lifecycle step: review, sign-agreement, approve, activate, reject, suspend, "
    "reinstate, revoke",
)
async def step(
    code: str, action: Action, body: StepRequest, session: SessionDep, request: Request, actor: CurrentActor
) -> StepResult:
    inst, evidence, credentials = await participation.take_step(
        session, request.app.state.runtime.outbox, code, action, actor, body.reason
    )
    return StepResult(institution=institution_view(inst), evidence=evidence, credentials=credentials)


@router.get("/institutions/{code}/history", response_model=list[HistoryEntry])
async def history(code: str, session: ReadSessionDep, actor: CurrentActor) -> list[HistoryEntry]:
    if SCOPE_AGENCY not in actor.scopes and actor.inst != code:
        raise Forbidden("only the agency or the institution itself may read its history")
    return await participation.history(session, code)


@router.get(
    "/institutions/{code}/detail",
    response_model=InstitutionDetail,
    summary="The directory entry with contact details (agency)",
)
async def institution_detail(code: str, session: ReadSessionDep, _actor: AgencyActor) -> InstitutionDetail:
    return detail(await known_institution(session, code))


@router.get(
    "/statistics", tags=["agency"], summary="Institutions by kind, region and state; exchanges per month"
)
async def statistics(session: ReadSessionDep, _actor: AgencyActor) -> dict[str, object]:
    return await repository.statistics(session)


@router.get("/locator", tags=["locator"], summary="Which hubs hold documents for a patient key")
async def locate(patient_key: str, session: ReadSessionDep, actor: CurrentActor) -> dict[str, object]:
    try:
        key = validate_patient_key(patient_key)
    except InvalidIdentifierError as exc:
        raise BadRequest(exc.reason, expression=["patient_key"]) from None
    if SCOPE_EXCHANGE not in actor.scopes:
        raise Forbidden("the 'exchange' scope is required")
    return {"patient_key": key, "hubs": await repository.hubs_for(session, key)}
