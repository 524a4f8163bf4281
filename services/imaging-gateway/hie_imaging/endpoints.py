"""Gateway HTTP API: the status of a study as this gateway sees it."""

from __future__ import annotations

from fastapi import APIRouter

from hie_imaging import service
from hie_imaging.dicom.spool import InvalidUidError, validate_uid
from hie_imaging.schemas import StudyStatus
from hie_platform.auth import CurrentActor
from hie_platform.errors import NotFound
from hie_platform.http import ReadSessionDep

router = APIRouter(tags=["imaging"])


@router.get(
    "/studies/{study_uid}",
    response_model=StudyStatus,
    summary="Where the instances of a study stand at this gateway",
    responses={404: {"description": "No such study here, or not visible to the caller (OperationOutcome)"}},
)
async def get_study(study_uid: str, actor: CurrentActor, session: ReadSessionDep) -> StudyStatus:
    # The agency, a party to one of the study's exchanges, or the sender of its instances; anyone
    # else gets the same 404 as for an unknown study, so the answer reveals nothing.
    try:
        validate_uid(study_uid)
    except InvalidUidError:
        raise NotFound(f"no study {study_uid!r} at this gateway") from None
    status = await service.study_status(session, study_uid)
    if status is None or not await service.may_see_study(session, actor, study_uid):
        raise NotFound(f"no study {study_uid} at this gateway")
    return status
