"""FHIR REST endpoints of the hub's base: publish (ITI-65 transaction) and the CapabilityStatement."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from hie_hub.core.capability import capability_statement
from hie_hub.core.params import json_body
from hie_hub.core.rest import negotiated
from hie_hub.exchange import service as exchange
from hie_hub.node import HubActor, NodeDep, UnitDep
from hie_platform.errors import fhir_response

router = APIRouter(prefix="/fhir", tags=["fhir"], dependencies=[Depends(negotiated)])


@router.get("/metadata", summary="CapabilityStatement (no token needed)")
@router.head("/metadata", include_in_schema=False)
async def metadata(request: Request, node: NodeDep) -> JSONResponse:
    return fhir_response(200, capability_statement(node.settings, request.app.version))


@router.post("", summary="ITI-65 Provide Document Bundle (transaction)")
@router.post("/", include_in_schema=False)  # clients that join base and "" with a slash
async def publish(request: Request, node: NodeDep, actor: HubActor, unit: UnitDep) -> JSONResponse:
    body = await json_body(request)
    return fhir_response(200, await exchange.publish(node, unit, actor, body))
