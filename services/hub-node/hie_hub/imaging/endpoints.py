"""FHIR REST endpoints of ImagingStudy: the studies delivered to this hub's institutions (XDS-I.b)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from hie_hub.core.bundles import searchset
from hie_hub.core.params import DEFAULT_COUNT, SearchParams
from hie_hub.core.rest import negotiated
from hie_hub.imaging import service as studies
from hie_hub.imaging.schemas import STUDY_SEARCH
from hie_hub.node import NodeDep, ReaderActor, UnitDep
from hie_platform.errors import fhir_response
from hie_schemas.identifiers import PATIENT_KEY_SYSTEM

router = APIRouter(prefix="/fhir", tags=["imaging"], dependencies=[Depends(negotiated)])


@router.get("/ImagingStudy", summary="Find the imaging studies delivered in your exchanges (XDS-I.b)")
async def find_imaging_studies(
    request: Request, node: NodeDep, actor: ReaderActor, unit: UnitDep
) -> JSONResponse:
    params = SearchParams(request, STUDY_SEARCH)
    count = params.count()
    query = studies.StudyQuery(
        patient_key=params.patient_key("patient.identifier", node.settings.patient_key_bytes),
        identifiers=params.any_of("identifier"),
        count=count if count is not None else DEFAULT_COUNT,
        cursor=params.cursor(),
    )
    found = await studies.search(node, unit, actor, query)
    base = f"{node.settings.fhir_base}/ImagingStudy"
    patient = {"patient.identifier": f"{PATIENT_KEY_SYSTEM}|{query.patient_key}"}
    links = [("self", params.link(base, patient))]
    if found.next_cursor is not None:
        links.append(("next", params.link(base, patient | {"_cursor": found.next_cursor.encode()})))
    resources = [await studies.resource(node, row) for row in found.rows]
    return fhir_response(200, searchset(node.settings.fhir_base, resources, found.total, links=links))


@router.get("/ImagingStudy/{study_id}", summary="Read one ImagingStudy")
async def read_imaging_study(study_id: str, node: NodeDep, actor: ReaderActor, unit: UnitDep) -> JSONResponse:
    row = await studies.read_study(node, unit, actor, study_id)
    return fhir_response(200, await studies.resource(node, row))
