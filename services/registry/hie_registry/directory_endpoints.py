"""The public directory as FHIR (IHE mCSD style): Organization and Endpoint search with paging.

Readable without a token, like the national "find participating institutions" page; contact
details (Organization.telecom/contact) are shown only to the agency.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, Request, Response

from hie_platform.errors import BadRequest, FhirError, NotFound
from hie_registry.directory_index import DirectoryIndex, Entry
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


def organization(inst: Entry, hub_codes: dict[str, str], with_contacts: bool) -> dict[str, Any]:
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


def endpoint_ids(inst: Entry) -> list[tuple[str, str]]:
    ids = []
    if inst.fhir_base:
        ids.append((f"{inst.code}-fhir", "fhir"))
    if inst.dicom_ae and inst.dicom_host and inst.dicom_port:
        ids.append((f"{inst.code}-dicom", "dicom"))
    return ids


def endpoint(inst: Entry, which: str) -> dict[str, Any]:
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


def _criteria(request: Request, hub_codes: dict[str, str]) -> dict[str, str]:
    """The search parameters as the directory index's criteria (FHIR names → index fields)."""
    params = request.query_params
    strict = "handling=strict" in request.headers.get("prefer", "")
    unknown = set(params) - ORGANIZATION_PARAMS
    if unknown and strict:
        raise BadRequest(f"unknown search parameters: {', '.join(sorted(unknown))}")
    criteria: dict[str, str] = {}
    if name := params.get("name"):
        criteria["name"] = name
    if state := params.get("address-state"):
        criteria["region"] = state
    if kind := params.get("type"):
        criteria["kind"] = kind.rpartition("|")[2]
    if partof := params.get("partof"):
        code = partof.rpartition("/")[2]
        criteria["hub"] = next((s for s, c in hub_codes.items() if c == code), "\x00")
    if (active := params.get("active")) is not None:
        if active not in ("true", "false"):
            raise BadRequest("active must be true or false", expression=["active"])
        criteria["active"] = active
    if identifier := params.get("identifier"):
        system, _, value = identifier.rpartition("|")
        if system and system != KRNPI_SYSTEM:
            raise BadRequest(f"identifier system must be {KRNPI_SYSTEM}", expression=["identifier"])
        criteria["code"] = value or "\x00"
    return criteria


def directory(request: Request) -> DirectoryIndex:
    """The app's in-memory directory (built in the lifespan, before the first request)."""
    index: DirectoryIndex = request.app.state.directory
    return index


async def _is_agency(request: Request) -> bool:
    if not request.headers.get("authorization"):
        return False
    from hie_platform.auth import current_actor

    try:
        actor = await current_actor(request)
    except FhirError:
        return False
    return SCOPE_AGENCY in actor.scopes


@router.get("/Organization", summary="Search participating institutions (mCSD ITI-90 style)")
async def search_organizations(request: Request) -> Response:
    count = _int_param(request, "_count", DEFAULT_COUNT, MAX_COUNT)
    offset = _int_param(request, "_offset", 0, 10**9)
    snapshot = await directory(request).snapshot()
    matches = snapshot.search(_criteria(request, snapshot.hub_codes))
    total = len(matches)
    with_contacts = await _is_agency(request)
    base = str(request.url.remove_query_params(["_offset"]))
    links = [{"relation": "self", "url": str(request.url)}]
    if offset + count < total:
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
                # The cached public resource goes into the bundle as it was serialized.
                "resource": organization(i, snapshot.hub_codes, True)
                if with_contacts
                else orjson.Fragment(snapshot.public(i, organization)),
                "search": {"mode": "match"},
            }
            for i in matches[offset : offset + count]
        ],
    }
    return Response(orjson.dumps(bundle), media_type=FHIR_JSON)


@router.get("/Organization/{code}")
async def read_organization(code: str, request: Request) -> Response:
    snapshot = await directory(request).snapshot()
    inst = snapshot.by_code.get(code)
    if inst is None:
        raise NotFound(f"Organization/{code} not found")
    if await _is_agency(request):
        body = orjson.dumps(organization(inst, snapshot.hub_codes, True))
    else:
        body = snapshot.public(inst, organization)
    return Response(body, media_type=FHIR_JSON)


@router.get("/Endpoint", summary="Search endpoints (organization=<code>)")
async def search_endpoints(request: Request) -> Response:
    org = request.query_params.get("organization", "").rpartition("/")[2]
    snapshot = await directory(request).snapshot()
    rows = snapshot.search({"code": org} if org else {})[:MAX_COUNT]
    entries = [{"resource": endpoint(i, which)} for i in rows for _, which in endpoint_ids(i)]
    bundle = {"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries}
    return Response(orjson.dumps(bundle), media_type=FHIR_JSON)


@router.get("/Endpoint/{endpoint_id}")
async def read_endpoint(endpoint_id: str, request: Request) -> Response:
    code, _, which = endpoint_id.partition("-")
    inst = (await directory(request).snapshot()).by_code.get(code)
    if inst is None or (code + "-" + which, which) not in endpoint_ids(inst):
        raise NotFound(f"Endpoint/{endpoint_id} not found")
    return Response(orjson.dumps(endpoint(inst, which)), media_type=FHIR_JSON)
