"""The public directory as FHIR (IHE mCSD style): Organization and Endpoint search with paging.

Readable without a token, like the national "find participating institutions" page; contact
details (Organization.telecom/contact) are shown only to the agency.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import Select, func, or_, select

from hie_platform.errors import BadRequest, FhirError, NotFound
from hie_platform.http import ReadSessionDep
from hie_registry.models import Hub, Institution
from hie_schemas.auth import SCOPE_AGENCY
from hie_schemas.directory import InstitutionKind, InstitutionState
from hie_schemas.fhir import FHIR_JSON
from hie_schemas.identifiers import KRNPI_SYSTEM, institution_oid

router = APIRouter(prefix="/fhir", tags=["directory (FHIR)"])

KIND_SYSTEM = "https://hie-federation.kr/fhir/CodeSystem/institution-kind"
STATE_EXTENSION = "https://hie-federation.kr/fhir/StructureDefinition/participation-state"
CONNECTION_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
HIE_CONNECTION_SYSTEM = "https://hie-federation.kr/fhir/CodeSystem/endpoint-connection-type"
DEFAULT_COUNT, MAX_COUNT = 50, 200
ORGANIZATION_PARAMS = {"name", "address-state", "type", "partof", "active", "identifier", "_count", "_offset"}


def organization(inst: Institution, hub_codes: dict[str, str], with_contacts: bool) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Organization",
        "id": inst.code,
        "extension": [{"url": STATE_EXTENSION, "valueCode": inst.state}],
        "identifier": [
            {"system": KRNPI_SYSTEM, "value": inst.code},
            {"system": "urn:ietf:rfc:3986", "value": f"urn:oid:{institution_oid(inst.code)}"},
        ],
        "active": InstitutionState(inst.state).in_good_standing,
        "type": [{"coding": [{"system": KIND_SYSTEM, "code": inst.kind}]}],
        "name": inst.name,
    }
    if inst.name_en:
        resource["alias"] = [inst.name_en]
    if inst.region:
        resource["address"] = [{"state": inst.region, "country": "KR"}]
    hub_code = hub_codes.get(inst.hub or "")
    if inst.kind == InstitutionKind.CLINIC and hub_code:
        resource["partOf"] = {"reference": f"Organization/{hub_code}"}
    endpoints = [f"Endpoint/{eid}" for eid, _ in endpoint_ids(inst)]
    if endpoints:
        resource["endpoint"] = [{"reference": ref} for ref in endpoints]
    contacts = inst.contacts or {}
    if with_contacts and contacts:
        telecom = [
            {"system": s, "value": contacts[k]}
            for k, s in (("phone", "phone"), ("email", "email"))
            if contacts.get(k)
        ]
        resource["contact"] = [{"name": {"text": contacts.get("person", "")}, "telecom": telecom}]
    return resource


def endpoint_ids(inst: Institution) -> list[tuple[str, str]]:
    ids = []
    if inst.fhir_base:
        ids.append((f"{inst.code}-fhir", "fhir"))
    if inst.dicom_ae and inst.dicom_host and inst.dicom_port:
        ids.append((f"{inst.code}-dicom", "dicom"))
    return ids


def endpoint(inst: Institution, which: str) -> dict[str, Any]:
    base: dict[str, Any] = {
        "resourceType": "Endpoint",
        "id": f"{inst.code}-{which}",
        "status": "active" if InstitutionState(inst.state).in_good_standing else "suspended",
        "managingOrganization": {"reference": f"Organization/{inst.code}"},
        "payloadType": [{"text": "any"}],
    }
    if which == "fhir":
        base["connectionType"] = {"system": CONNECTION_SYSTEM, "code": "hl7-fhir-rest"}
        base["address"] = inst.fhir_base
    else:
        base["connectionType"] = {"system": HIE_CONNECTION_SYSTEM, "code": "dicom-dimse"}
        base["address"] = f"dicom://{inst.dicom_ae}@{inst.dicom_host}:{inst.dicom_port}"
    return base


def _int_param(request: Request, name: str, default: int, upper: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit():
        raise BadRequest(f"{name} must be a non-negative integer", expression=[name])
    return min(int(raw), upper)


def _filters(
    query: Select[tuple[Institution]], request: Request, hub_codes: dict[str, str]
) -> Select[tuple[Institution]]:
    params = request.query_params
    strict = "handling=strict" in request.headers.get("prefer", "")
    unknown = set(params) - ORGANIZATION_PARAMS
    if unknown and strict:
        raise BadRequest(f"unknown search parameters: {', '.join(sorted(unknown))}")
    if name := params.get("name"):
        pattern = f"%{name.lower()}%"
        query = query.where(
            or_(func.lower(Institution.name).like(pattern), func.lower(Institution.name_en).like(pattern))
        )
    if state := params.get("address-state"):
        query = query.where(Institution.region == state)
    if kind := params.get("type"):
        query = query.where(Institution.kind == kind.rpartition("|")[2])
    if partof := params.get("partof"):
        code = partof.rpartition("/")[2]
        slug = next((s for s, c in hub_codes.items() if c == code), None)
        query = query.where(
            Institution.hub == (slug or "\x00"), Institution.kind == InstitutionKind.CLINIC.value
        )
    if (active := params.get("active")) is not None:
        if active not in ("true", "false"):
            raise BadRequest("active must be true or false", expression=["active"])
        good = Institution.state == InstitutionState.ACTIVE.value
        query = query.where(good if active == "true" else ~good)
    if identifier := params.get("identifier"):
        system, _, value = identifier.rpartition("|")
        if system and system != KRNPI_SYSTEM:
            raise BadRequest(f"identifier system must be {KRNPI_SYSTEM}", expression=["identifier"])
        query = query.where(Institution.code == value)
    return query


async def _is_agency(request: Request) -> bool:
    if not request.headers.get("authorization"):
        return False
    from hie_platform.auth import current_actor

    try:
        actor = await current_actor(request)
    except FhirError:
        return False
    return SCOPE_AGENCY in actor.scopes


async def _hub_codes(session: ReadSessionDep) -> dict[str, str]:
    rows = (await session.execute(select(Hub.slug, Hub.institution_code))).all()
    return {row.slug: row.institution_code for row in rows}


@router.get("/Organization", summary="Search participating institutions (mCSD ITI-90 style)")
async def search_organizations(request: Request, session: ReadSessionDep) -> JSONResponse:
    count = _int_param(request, "_count", DEFAULT_COUNT, MAX_COUNT)
    offset = _int_param(request, "_offset", 0, 10**9)
    hub_codes = await _hub_codes(session)
    query: Select[Any] = _filters(select(Institution), request, hub_codes)
    total = await session.scalar(select(func.count()).select_from(query.order_by(None).subquery()))
    rows: list[Institution] = list(
        (await session.scalars(query.order_by(Institution.code).limit(count).offset(offset))).all()
    )
    with_contacts = await _is_agency(request)
    base = str(request.url.remove_query_params(["_offset"]))
    links = [{"relation": "self", "url": str(request.url)}]
    if offset + count < (total or 0):
        sep = "&" if "?" in base else "?"
        links.append({"relation": "next", "url": f"{base}{sep}{urlencode({'_offset': offset + count})}"})
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": links,
        "entry": [
            {
                "fullUrl": f"{request.base_url}fhir/Organization/{i.code}",
                "resource": organization(i, hub_codes, with_contacts),
                "search": {"mode": "match"},
            }
            for i in rows
        ],
    }
    return JSONResponse(bundle, media_type=FHIR_JSON)


@router.get("/Organization/{code}")
async def read_organization(code: str, request: Request, session: ReadSessionDep) -> JSONResponse:
    inst = await session.get(Institution, code) if code.isdigit() and len(code) == 8 else None
    if inst is None:
        raise NotFound(f"Organization/{code} not found")
    resource = organization(inst, await _hub_codes(session), await _is_agency(request))
    return JSONResponse(resource, media_type=FHIR_JSON)


@router.get("/Endpoint", summary="Search endpoints (organization=<code>)")
async def search_endpoints(request: Request, session: ReadSessionDep) -> JSONResponse:
    org = request.query_params.get("organization", "").rpartition("/")[2]
    query = select(Institution).order_by(Institution.code).limit(MAX_COUNT)
    if org:
        query = query.where(Institution.code == org)
    rows = (await session.scalars(query)).all()
    entries = [{"resource": endpoint(i, which)} for i in rows for _, which in endpoint_ids(i)]
    return JSONResponse(
        {"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries},
        media_type=FHIR_JSON,
    )


@router.get("/Endpoint/{endpoint_id}")
async def read_endpoint(endpoint_id: str, session: ReadSessionDep) -> JSONResponse:
    code, _, which = endpoint_id.partition("-")
    inst = await session.get(Institution, code) if code.isdigit() and len(code) == 8 else None
    if inst is None or (code + "-" + which, which) not in endpoint_ids(inst):
        raise NotFound(f"Endpoint/{endpoint_id} not found")
    return JSONResponse(endpoint(inst, which), media_type=FHIR_JSON)
