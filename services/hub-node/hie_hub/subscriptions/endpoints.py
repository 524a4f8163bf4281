"""Rest-hook Subscriptions (FHIR R4 Subscriptions Backport style): an institution registers a webhook
that is told about its Tasks; the payload is signed with HMAC-SHA256 (``X-HIE-Signature-256``).

``Subscription.criteria`` is the topic ``notifications.TOPIC``; the backport filter-criteria extension
may say ``Task?owner=<hira-krnpi>|<code>`` (the default: the Tasks addressed to the caller) or
``Task?requester=…`` (the Tasks it sent), always the caller's own code. The secret is the caller's
(extension ``SECRET_URL``, at least 32 characters) or made by the hub; it is shown once, in the
answer to the create.
"""

from __future__ import annotations

import secrets
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from hie_hub.core.bundles import searchset
from hie_hub.core.params import SearchParams, fhir_body, json_body
from hie_hub.core.rest import negotiated
from hie_hub.models import Subscription
from hie_hub.node import NodeDep, ReaderActor
from hie_hub.subscriptions import repository
from hie_hub.subscriptions.service import ACTIVE, BACKPORT, OFF, TOPIC, status_parameters
from hie_platform.errors import NotFound, Unprocessable, fhir_response
from hie_platform.http import ReadSessionDep, SessionDep
from hie_schemas.auth import TokenClaims
from hie_schemas.fhir import FHIR_JSON
from hie_schemas.identifiers import KRNPI_SYSTEM

router = APIRouter(prefix="/fhir", tags=["notifications"], dependencies=[Depends(negotiated)])

SECRET_URL = "https://hie-federation.kr/fhir/StructureDefinition/subscription-hmac-secret"
FILTER_URL = f"{BACKPORT}/backport-filter-criteria"
CONTENT_URL = f"{BACKPORT}/backport-payload-content"
CONTENTS = ("full-resource", "id-only", "empty")


def _extension(element: Any, url: str) -> dict[str, Any] | None:
    extensions = element.get("extension") if isinstance(element, dict) else None
    return next((e for e in extensions or [] if isinstance(e, dict) and e.get("url") == url), None)


def _role(body: dict[str, Any], actor: TokenClaims) -> str:
    extension = _extension(body.get("_criteria"), FILTER_URL)
    if extension is None:
        return "owner"
    value = str(extension.get("valueString") or "")
    resource, _, query = value.partition("?")
    name, _, token = query.partition("=")
    system, _, code = token.rpartition("|")
    if resource != "Task" or name not in ("owner", "requester") or system not in ("", KRNPI_SYSTEM):
        raise Unprocessable(
            "the filter criteria must be Task?owner=<hira-krnpi>|<code> or Task?requester=…",
            expression=("Subscription.criteria",),
        )
    if code != actor.inst:
        raise Unprocessable(
            f"institution {actor.inst} may subscribe only to its own Tasks",
            expression=("Subscription.criteria",),
        )
    return name


def _endpoint(channel: dict[str, Any], node: NodeDep) -> str:
    endpoint = channel.get("endpoint")
    parts = urlsplit(endpoint) if isinstance(endpoint, str) else None
    allowed = ("https",) if not node.settings.is_development else ("https", "http")
    if parts is None or parts.scheme not in allowed or not parts.hostname:
        raise Unprocessable(
            f"channel.endpoint must be an absolute {' or '.join(allowed)} URL",
            expression=("Subscription.channel.endpoint",),
        )
    return str(endpoint)


def _checked(body: Any) -> dict[str, Any]:
    """A FHIR Subscription on this hub's topic, or the 4xx that says what is wrong with it."""
    resource = fhir_body(body, "Subscription")
    if resource.get("criteria") != TOPIC:
        raise Unprocessable(
            f"Subscription.criteria must be the topic {TOPIC}", expression=("Subscription.criteria",)
        )
    return resource


def _content(channel: dict[str, Any]) -> str:
    """The payload content a rest-hook channel asks for (full-resource unless it says id-only)."""
    if channel.get("type") != "rest-hook":
        raise Unprocessable(
            "only channel.type rest-hook is supported", expression=("Subscription.channel.type",)
        )
    if channel.get("payload") not in (None, FHIR_JSON):
        raise Unprocessable(
            f"channel.payload must be {FHIR_JSON}", expression=("Subscription.channel.payload",)
        )
    content_extension = _extension(channel.get("_payload"), CONTENT_URL) or {}
    content = str(content_extension.get("valueCode") or "full-resource")
    if content not in CONTENTS:
        raise Unprocessable(
            f"payload content must be one of {', '.join(CONTENTS)}", expression=("Subscription.channel",)
        )
    return content


def _secret(body: dict[str, Any]) -> str:
    """The HMAC secret the institution chose, or a new one (returned once, on create)."""
    secret_extension = _extension(body, SECRET_URL)
    secret = str((secret_extension or {}).get("valueString") or "") or secrets.token_urlsafe(32)
    if len(secret) < 32:
        raise Unprocessable(
            "the HMAC secret must be at least 32 characters", expression=("Subscription.extension",)
        )
    return secret


def _stored(body: dict[str, Any], subscription_id: str) -> dict[str, Any]:
    """The resource as kept: this hub's id and status, without the secret's extension."""
    stored = {k: v for k, v in body.items() if k not in ("id", "meta", "extension")}
    stored |= {"id": subscription_id, "status": ACTIVE}
    others = [e for e in body.get("extension") or [] if isinstance(e, dict) and e.get("url") != SECRET_URL]
    if others:
        stored["extension"] = others
    return stored


def _read(body: Any, actor: TokenClaims, node: NodeDep) -> Subscription:
    """The Subscription as stored, or the 4xx that says what is wrong with it."""
    body = _checked(body)
    channel = body.get("channel") or {}
    content = _content(channel)
    secret = _secret(body)
    subscription_id = str(uuid.uuid4())
    return Subscription(
        id=subscription_id,
        institution=actor.inst,
        role=_role(body, actor),
        status=ACTIVE,
        endpoint=_endpoint(channel, node),
        secret=secret,
        content=content,
        headers=[h for h in channel.get("header") or [] if isinstance(h, str)],
        events=0,
        resource=_stored(body, subscription_id),
        created_at=datetime.now(UTC),
    )


def _resource(row: Subscription) -> dict[str, Any]:
    return {**row.resource, "status": row.status}


async def _own(read: ReadSessionDep, actor: TokenClaims, subscription_id: str) -> Subscription:
    row = await repository.subscription(read, subscription_id)
    if row is None or row.institution != actor.inst:
        raise NotFound("no such Subscription")
    return row


@router.post("/Subscription", status_code=201, summary="Register a rest-hook Subscription (webhook)")
async def create_subscription(
    request: Request, node: NodeDep, actor: ReaderActor, session: SessionDep
) -> JSONResponse:
    row = _read(await json_body(request), actor, node)
    session.add(row)
    answer = _resource(row) | {"extension": [{"url": SECRET_URL, "valueString": row.secret}]}
    location = {"Location": f"{node.settings.fhir_base}/Subscription/{row.id}"}
    return fhir_response(201, answer, location)


@router.get("/Subscription", summary="The caller's Subscriptions")
async def search_subscriptions(
    request: Request, node: NodeDep, actor: ReaderActor, read: ReadSessionDep
) -> JSONResponse:
    params = SearchParams(request, frozenset())
    rows = await repository.subscriptions_of(read, actor.inst)
    links = [("self", params.link(f"{node.settings.fhir_base}/Subscription", {}))]
    bundle = searchset(node.settings.fhir_base, [_resource(r) for r in rows], len(rows), links=links)
    return fhir_response(200, bundle)


@router.get(
    "/Subscription/{subscription_id}",
    summary="Read one of the caller's Subscriptions",
)
@router.head("/Subscription/{subscription_id}", include_in_schema=False)
async def read_subscription(subscription_id: str, actor: ReaderActor, read: ReadSessionDep) -> JSONResponse:
    return fhir_response(200, _resource(await _own(read, actor, subscription_id)))


@router.get("/Subscription/{subscription_id}/$status", summary="SubscriptionStatus (backport $status)")
async def subscription_status(
    subscription_id: str, node: NodeDep, actor: ReaderActor, read: ReadSessionDep
) -> JSONResponse:
    row = await _own(read, actor, subscription_id)
    status = status_parameters(node.settings.fhir_base, row, "query-status", row.events, [])
    return fhir_response(200, searchset(node.settings.fhir_base, [status], 1))


@router.delete("/Subscription/{subscription_id}", status_code=204, summary="Stop a Subscription")
async def delete_subscription(subscription_id: str, actor: ReaderActor, session: SessionDep) -> Response:
    row = await _own(session, actor, subscription_id)
    row.status = OFF
    return Response(status_code=204)
