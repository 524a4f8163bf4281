"""``POST {hub}/fhir/$generate-crs``: a care record summary generated on request for a walk-in or
emergency patient (진료기록요약지, domain.md), from what this hub holds and consent lets flow to the
asking institution. The summary is returned, not stored; the request is audited with the documents
it drew on.

Body: a FHIR Parameters resource with ``patient`` (valueIdentifier: RRN or patient key),
optionally ``purpose`` (valueCode treatment | emergency) and ``justification`` (valueString,
required for emergency).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from hie_hub.core.disclosure import Access, decisions, first_refusal, newest_version
from hie_hub.core.params import json_body
from hie_hub.core.rest import negotiated
from hie_hub.documents import repository as documents_repo
from hie_hub.documents.pseudonym import rrn_strings
from hie_hub.models import DocumentStatus
from hie_hub.node import AuditDep, HubActor, NodeDep, UnitDep
from hie_platform.db import raise_after_commit
from hie_platform.errors import BadRequest, Forbidden, NotFound, ServiceUnavailable, fhir_response
from hie_schemas.consent import Purpose
from hie_schemas.documents.summary import SourceDocument, build_summary, newest_patient
from hie_schemas.fhir import FhirParseError, parse_resource
from hie_schemas.identifiers import InvalidIdentifierError, patient_key_from_identifier

router = APIRouter(prefix="/fhir", tags=["documents"], dependencies=[Depends(negotiated)])


def _checked(body: Any) -> dict[Any, Any]:
    """The Parameters resource, validated; an error never echoes an RRN the body carried."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise BadRequest("$generate-crs takes a FHIR Parameters resource", expression=("Parameters",))
    try:
        parse_resource(body, "Parameters")
    except FhirParseError as exc:
        message = str(exc)
        for value in (s for s in rrn_strings(body) if len(s) >= 6):
            message = message.replace(value, "<redacted>")
        raise BadRequest(f"invalid Parameters: {message}") from None
    return body


def _purpose(values: dict[Any, Any]) -> tuple[Purpose, str | None]:
    """purpose (treatment | emergency) and the justification emergency access needs."""
    raw = (values.get("purpose") or {}).get("valueCode") or Purpose.TREATMENT.value
    if raw not in (Purpose.TREATMENT.value, Purpose.EMERGENCY.value):
        raise BadRequest(
            "parameter purpose must be treatment or emergency", expression=("Parameters.parameter",)
        )
    justification = str((values.get("justification") or {}).get("valueString") or "").strip() or None
    if raw == Purpose.EMERGENCY.value and justification is None:
        raise BadRequest(
            "emergency access needs the parameter justification", expression=("Parameters.parameter",)
        )
    return Purpose(raw), justification


def _parameters(body: Any, secret: bytes) -> tuple[str, Purpose, str | None]:
    values = {p.get("name"): p for p in _checked(body).get("parameter") or [] if isinstance(p, dict)}
    identifier = (values.get("patient") or {}).get("valueIdentifier") or {}
    try:
        key = patient_key_from_identifier(str(identifier.get("system")), str(identifier.get("value")), secret)
    except InvalidIdentifierError as exc:
        raise BadRequest(
            f"parameter patient (valueIdentifier): {exc.reason}", expression=("Parameters.parameter",)
        ) from None
    return key, *_purpose(values)


@router.post("/$generate-crs", summary="Generate a care record summary (CRS) on request")
async def generate_crs(
    request: Request,
    node: NodeDep,
    actor: HubActor,
    unit: UnitDep,
    audit: AuditDep,
) -> JSONResponse:
    key, purpose, justification = _parameters(await json_body(request), node.settings.patient_key_bytes)
    access = Access(actor.inst, purpose, justification)
    async with unit.reading() as read:
        rows = await documents_repo.documents_of_patient(read, key, statuses=[DocumentStatus.CURRENT.value])
    decided = await decisions(node, access, rows)
    permitted = [row for row, d in zip(rows, decided, strict=True) if d is None or d.permit]
    refusal = first_refusal(decided)
    detail = {"held": len(rows), "used": len(permitted)} | access.audit_detail()
    session = unit.writing()
    await audit.record(
        session,
        action="crs.generate",
        actor=actor,
        outcome="success" if permitted else ("denied" if rows else "not-found"),
        patient_key=key,
        document_ids=[row.document_id for row in permitted],
        purpose=purpose.value,
        rule=refusal.rule.value if refusal is not None and not permitted else None,
        consent_version=newest_version(decided),
        detail=detail,
    )
    # A refusal is raised once its audit record has committed (hie_platform.db.raise_after_commit).
    if not rows:
        raise raise_after_commit(session, NotFound("this hub holds no documents for the patient"))
    if not permitted:
        rule = refusal.rule.value if refusal else "unknown"
        raise raise_after_commit(
            session, Forbidden(f"consent does not let this hub's records flow to {actor.inst}: rule {rule}")
        )
    sources = [SourceDocument(row.document_id, row.created_at, row.bundle) for row in permitted]
    hub = await node.registry.hub(node.hub)
    if hub is None:
        raise ServiceUnavailable(f"the registry does not know hub {node.hub}")
    base = node.settings.fhir_base
    summary = build_summary(
        sources,
        patient=newest_patient(sources) or {"resourceType": "Patient"},
        custodian_code=hub.code,
        custodian_name=hub.name,
        generator=f"HIE hub node {node.hub}",
        created_at=datetime.now(UTC),
        source_url=lambda document_id: f"{base}/DocumentReference/{document_id}",
    )
    return fhir_response(200, summary)


OPERATION_DEFINITION: dict[str, Any] = {
    "resourceType": "OperationDefinition",
    "id": "generate-crs",
    "name": "GenerateCrs",
    "title": "진료기록요약지 생성 (care record summary on request)",
    "status": "active",
    "kind": "operation",
    "code": "generate-crs",
    "system": True,
    "type": False,
    "instance": False,
    "affectsState": False,
    "description": (
        "A care record summary (K-CDA template 1.2.410.100110.40.2.1.4) generated from the documents this "
        "hub holds for the patient that consent lets flow to the caller; returned, not stored."
    ),
    "parameter": [
        {"name": "patient", "use": "in", "min": 1, "max": "1", "type": "Identifier"},
        {"name": "purpose", "use": "in", "min": 0, "max": "1", "type": "code"},
        {"name": "justification", "use": "in", "min": 0, "max": "1", "type": "string"},
        {"name": "return", "use": "out", "min": 1, "max": "1", "type": "Bundle"},
    ],
}


@router.get("/OperationDefinition/generate-crs", summary="The definition of $generate-crs")
async def generate_crs_definition(node: NodeDep) -> JSONResponse:
    return fhir_response(
        200, OPERATION_DEFINITION | {"url": f"{node.settings.fhir_base}/OperationDefinition/generate-crs"}
    )
