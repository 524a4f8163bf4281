"""``GET {hub}/fhir/AuditEvent``: the hub's audit trail as FHIR AuditEvents, for the operating agency.

Parameters: ``patient.identifier`` (RRN or patient key; the records about one patient), ``date``
(the record's time, with prefixes), ``_count`` and ``_cursor`` (newest first). The records are not
indexed by patient (the platform keeps them as one hash chain), so the agency's query reads the chain;
it is an oversight tool, not an EMR one.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy import Select, func, select

from hie_hub.audit.schemas import AUDIT_SEARCH, audit_event
from hie_hub.core.bundles import count_only, searchset
from hie_hub.core.params import DEFAULT_COUNT, Cursor, SearchParams
from hie_hub.core.rest import negotiated
from hie_hub.models import PLATFORM, as_utc
from hie_hub.node import NodeDep
from hie_platform.auth import require_scope
from hie_platform.errors import BadRequest, fhir_response
from hie_platform.http import ReadSessionDep
from hie_schemas.auth import SCOPE_AGENCY, TokenClaims
from hie_schemas.identifiers import PATIENT_KEY_SYSTEM

router = APIRouter(prefix="/fhir", tags=["audit"], dependencies=[Depends(negotiated)])
AgencyActor = Annotated[TokenClaims, Depends(require_scope(SCOPE_AGENCY))]
_BATCH = 500


@router.get("/AuditEvent", summary="The audit trail as AuditEvents (agency scope)")
async def search_audit_events(
    request: Request, node: NodeDep, _agency: AgencyActor, read: ReadSessionDep
) -> JSONResponse:
    params = SearchParams(request, AUDIT_SEARCH)
    params.check_total()
    key = (
        params.patient_key("patient.identifier", node.settings.patient_key_bytes)
        if params.one("patient.identifier") is not None
        else None
    )
    dates = params.dates("date")
    count = params.count()
    count = DEFAULT_COUNT if count is None else count
    cursor = params.cursor()
    t = PLATFORM.audit
    query: Select[Any] = select(t.c.sequence, t.c.recorded_at, t.c.record, t.c.prev_hash, t.c.hash)
    if key is not None:
        query = query.where(t.c.record["patient_key"].as_string() == key)
    for bound in dates:
        if bound.lower is not None:
            query = query.where(t.c.recorded_at >= bound.lower)
        if bound.upper is not None:
            query = query.where(t.c.recorded_at < bound.upper)
    total = await read.scalar(select(func.count()).select_from(query.subquery()))
    if cursor is not None:
        if not cursor.key.isdigit():
            raise BadRequest("_cursor is not a cursor this server issued", expression=("_cursor",))
        query = query.where(t.c.sequence < int(cursor.key))
    rows = (await read.execute(query.order_by(t.c.sequence.desc()).limit(count + 1))).all()
    returned = rows[:count]
    events = [
        audit_event(node.settings.node, node.hub, row.sequence, row.record, row.prev_hash, row.hash)
        for row in returned
    ]
    base = f"{node.settings.fhir_base}/AuditEvent"
    replace = {"patient.identifier": f"{PATIENT_KEY_SYSTEM}|{key}"} if key else {}
    links = [("self", params.link(base, replace))]
    if len(rows) > count and returned:
        last = returned[-1]
        links.append(
            (
                "next",
                params.link(
                    base, replace | {"_cursor": Cursor(as_utc(last.recorded_at), str(last.sequence)).encode()}
                ),
            )
        )
    bundle = searchset(node.settings.fhir_base, events, int(total or 0), links=links)
    return fhir_response(200, count_only(bundle) if params.count_only() else bundle)
