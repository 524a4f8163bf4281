"""The patient's exchange history (who sent what to whom and when; accesses, emergencies highlighted)
and the finder of participating institutions (the registry's public FHIR directory, over HTTP)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import Response

from hie_consent import history
from hie_consent.portal_web.core import (
    PATH,
    PortalDep,
    RuntimeDep,
    institution_names,
)
from hie_consent.schemas import PatientHistory
from hie_platform.errors import BadRequest, FhirError, NotFound, ServiceUnavailable
from hie_platform.web import language
from hie_schemas.codes import REGIONS

router = APIRouter()
PAGE_SIZE = 20
KIND_SYSTEM = "https://hie-federation.kr/fhir/CodeSystem/institution-kind"


@router.get("/static/portal.css", include_in_schema=False)
async def stylesheet(web: PortalDep) -> Response:
    return web.site.stylesheet_response()


async def _history(runtime: RuntimeDep, patient_key: str) -> PatientHistory:
    """The patient's history, read and audited as ``GET /portal/me/history`` does."""
    async with runtime.db.transaction() as session:
        found = await history.patient_history_read(session, runtime, patient_key, via="web")
    return found


def _codes(found: PatientHistory) -> set[str]:
    codes = {c for e in found.exchanges for c in (e.from_institution, e.to_institution) if c}
    return codes | {a.institution for a in found.accesses if a.institution}


@router.get("/history", include_in_schema=False)
async def show(request: Request, web: PortalDep, runtime: RuntimeDep) -> Response:
    patient = await web.patient(request)
    if isinstance(patient, Response):
        return patient
    found = await _history(runtime, patient.patient_key)
    names = await institution_names(runtime, _codes(found), language(request))
    context = {"exchanges": found.exchanges, "accesses": found.accesses, "names": names}
    return web.page(request, "history.html", context, signed_in=True)


@router.get("/history/{exchange_id}", include_in_schema=False)
async def exchange(exchange_id: str, request: Request, web: PortalDep, runtime: RuntimeDep) -> Response:
    """One exchange's lines; another patient's exchange id is simply not found in this patient's history."""
    patient = await web.patient(request)
    if isinstance(patient, Response):
        return patient
    try:
        found = await _history(runtime, patient.patient_key)
        lines = [e for e in found.exchanges if e.exchange_id == exchange_id]
        if not lines:
            raise NotFound("there is no such exchange in your history")
    except FhirError as exc:
        return web.page(request, "error.html", {}, signed_in=True, error=exc)
    names = await institution_names(
        runtime, {c for e in lines for c in (e.from_institution, e.to_institution) if c}, language(request)
    )
    context = {"exchange_id": exchange_id, "lines": lines, "names": names}
    return web.page(request, "exchange.html", context, signed_in=True)


def _organization(resource: dict[str, Any]) -> dict[str, Any]:
    kinds = [c.get("code") for t in resource.get("type", []) for c in t.get("coding", [])]
    addresses = resource.get("address") or [{}]
    return {
        "code": resource.get("id", ""),
        "name": resource.get("name", ""),
        "name_en": (resource.get("alias") or [None])[0],
        "kind": kinds[0] if kinds else "",
        "region": addresses[0].get("state", ""),
    }


async def _search(
    runtime: RuntimeDep, name: str, region: str, offset: int
) -> tuple[int, list[dict[str, Any]]]:
    """GET {registry}/fhir/Organization (public, mCSD style): participating (active) institutions only."""
    params = {"active": "true", "_count": str(PAGE_SIZE), "_offset": str(offset)}
    if name:
        params["name"] = name
    if region:
        params["address-state"] = region
    url = f"{runtime.settings.registry_url.rstrip('/')}/fhir/Organization"
    try:
        response = await runtime.http.get(url, params=params, timeout=5.0)
    except httpx.HTTPError as exc:
        raise ServiceUnavailable("the directory of institutions cannot be reached") from exc
    if response.status_code != 200:
        raise ServiceUnavailable(f"the directory of institutions answered {response.status_code}")
    bundle = response.json()
    entries = [_organization(e["resource"]) for e in bundle.get("entry", []) if "resource" in e]
    return int(bundle.get("total") or 0), entries


@router.get("/institutions", include_in_schema=False)
async def institutions(request: Request, web: PortalDep, runtime: RuntimeDep) -> Response:
    name = request.query_params.get("name", "").strip()[:100]
    region = request.query_params.get("region", "")
    region = region if region in REGIONS else ""
    page_raw = request.query_params.get("page", "1") or "1"
    context: dict[str, Any] = {
        "query": {"name": name, "region": region},
        "regions": REGIONS,
        "rows": [],
        "total": 0,
        "prev_url": None,
        "next_url": None,
    }
    signed_in = (await web.signed(request)).patient is not None
    try:
        if not page_raw.isdigit() or int(page_raw) < 1:
            raise BadRequest("page must be a positive whole number", expression=["page"])
        page = int(page_raw)
        total, rows = await _search(runtime, name, region, (page - 1) * PAGE_SIZE)
    except FhirError as exc:
        return web.page(request, "institutions.html", context, signed_in=signed_in, error=exc)

    def link(number: int) -> str:
        kept = [(k, v) for k, v in (("name", name), ("region", region)) if v]
        return f"{PATH}/institutions?{urlencode([*kept, ('page', str(number))])}"

    context |= {
        "rows": rows,
        "total": total,
        "prev_url": link(page - 1) if page > 1 else None,
        "next_url": link(page + 1) if page * PAGE_SIZE < total else None,
    }
    return web.page(request, "institutions.html", context, signed_in=signed_in)
