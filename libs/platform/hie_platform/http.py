"""The HTTP shell every service shares: correlation ids, access log, body limit, metrics, health."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hie_platform import heap, json_limits
from hie_platform.bus import bus_collector
from hie_platform.errors import (
    FhirError,
    PayloadTooLarge,
    install_error_handlers,
    log_refusal,
    operation_outcome,
)
from hie_platform.logging import CORRELATION_HEADER, correlation_id, get_logger, new_correlation_id
from hie_platform.outbox import outbox_collector

log = get_logger("hie.access")
_JSON_SCOPE_KEY = "hie.json_body"  # the request body as parsed (within limits) by PlatformMiddleware


class Metrics:
    """A Prometheus registry per app (several apps can live in one test process)."""

    def __init__(self, service: str) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hie_http_requests_total",
            "HTTP requests",
            ["service", "method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "hie_http_request_seconds",
            "HTTP request latency",
            ["service", "method", "route"],
            registry=self.registry,
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.service = service


class _BodyTooLarge(Exception):
    pass


async def _buffered(receive: Receive) -> tuple[Receive, bytes | None]:
    """Read the whole request body now (``receive`` enforces the limit); replay it as one message.
    Also returns the body (None when the client went away before sending all of it)."""
    body = bytearray()
    whole: bytes | None = None
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away: pass that on
            pending = [message]
            break
        body += message.get("body", b"")
        if not message.get("more_body", False):
            whole = bytes(body)
            pending = [{"type": "http.request", "body": whole, "more_body": False}]
            break

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay, whole


def _may_be_json(headers: dict[bytes, bytes]) -> bool:
    """A body that some route may parse as JSON: a JSON media type (``application/json``,
    ``application/fhir+json``, any ``+json``), or no media type at all with a body."""
    content_type = headers.get(b"content-type")
    if content_type is None:
        return headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers
    return content_type.split(b";")[0].strip().lower().endswith(b"json")


def _checked_json(scope: Scope, body: bytes) -> FhirError | None:
    """Parse a JSON body within the limits (json_limits.py) before any route sees it; the value is
    kept in the scope for ``request_json``. Not JSON at all is left to the route to report."""
    if not body:
        return None
    try:
        scope[_JSON_SCOPE_KEY] = json_limits.loads(body)
    except json_limits.JsonLimitExceeded as refusal:
        return refusal
    except (ValueError, UnicodeDecodeError):
        pass
    return None


async def _admitted(
    scope: Scope, headers: dict[bytes, bytes], receive: Receive
) -> tuple[Receive, FhirError | None]:
    """The ``receive`` the app gets, or the refusal of a JSON body beyond the limits. A JSON body is
    read whole and checked first; so is a chunked one, up to the size limit: parsers that catch every
    error (FastAPI's form and body readers) would otherwise turn 413 into 400."""
    json_body = _may_be_json(headers)
    if not json_body and not (b"content-length" not in headers and b"transfer-encoding" in headers):
        return receive, None
    replay, body = await _buffered(receive)
    refusal = _checked_json(scope, body) if json_body and body is not None else None
    return replay, refusal


class PlatformMiddleware:
    """Pure ASGI: correlation id in and out, body size limit, metrics, access log without query strings."""

    def __init__(self, app: ASGIApp, metrics: Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        cid = (
            headers.get(CORRELATION_HEADER.lower().encode(), b"").decode("latin-1")[:64]
            or new_correlation_id()
        )
        token = correlation_id.set(cid)
        started = time.perf_counter()
        status = 500
        declared = headers.get(b"content-length")
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _BodyTooLarge
            return message

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-correlation-id", cid.encode())]
            await send(message)

        try:
            if declared is not None and declared.isdigit() and int(declared) > self.max_body:
                raise _BodyTooLarge
            app_receive, refusal = await _admitted(scope, headers, limited_receive)
            if refusal is not None:
                status = refusal.status
                await self._refuse(send, cid, scope, refusal)
                return
            await self.app(scope, app_receive, send_with_headers)
        except _BodyTooLarge:
            status = 413
            await self._refuse(
                send, cid, scope, PayloadTooLarge(f"request body exceeds {self.max_body} bytes")
            )
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope.get("method", "")
            self.metrics.requests.labels(self.metrics.service, method, route, str(status)).inc()
            self.metrics.latency.labels(self.metrics.service, method, route).observe(elapsed)
            if route not in ("/healthz", "/readyz", "/metrics"):
                log.info("request", method=method, route=route, status=status, ms=round(elapsed * 1000, 2))
            correlation_id.reset(token)

    async def _refuse(self, send: Send, cid: str, scope: Scope, refusal: FhirError) -> None:
        """Answer before the app runs (a body too large, or JSON beyond the limits)."""
        log_refusal(
            refusal.status,
            refusal.code,
            method=scope.get("method", ""),
            route=getattr(scope.get("route"), "path", "unmatched"),
            reason=refusal.diagnostics,
        )
        body = json.dumps(operation_outcome(refusal.issues))
        await send(
            {
                "type": "http.response.start",
                "status": refusal.status,
                "headers": [(b"content-type", b"application/fhir+json"), (b"x-correlation-id", cid.encode())],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})


def health_router() -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz", summary="Readiness: the database and NATS are reachable")
    async def readyz(request: Request, response: Response) -> dict[str, Any]:
        runtime = getattr(request.app.state, "runtime", None)
        checks = {
            "database": bool(runtime and await runtime.db.ping()),
            "nats": bool(runtime and runtime.bus.connected),
        }
        ready = all(checks.values())
        response.status_code = 200 if ready else 503
        # The node's name: a launcher can tell its own process from another that answers on the port.
        node = runtime.settings.node if runtime else None
        return {"status": "ready" if ready else "not-ready", "checks": checks, "node": node}

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics(request: Request) -> Response:
        registry = request.app.state.metrics.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router


def create_service_app(
    *,
    service: str,
    title: str,
    version: str,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]],
    routers: Sequence[APIRouter],
    max_body_bytes: int,
    description: str = "",
) -> FastAPI:
    @asynccontextmanager
    async def started(app: FastAPI) -> AsyncIterator[None]:
        async with lifespan(app):
            if heap.serving():
                heap.freeze_startup_heap()
            yield

    app = FastAPI(title=title, version=version, description=description, lifespan=started)
    app.state.metrics = Metrics(service)
    app.state.metrics.registry.register(outbox_collector(service, app))
    app.state.metrics.registry.register(bus_collector())  # hie_bus_refused_messages_total
    install_error_handlers(app)
    app.add_middleware(PlatformMiddleware, metrics=app.state.metrics, max_body_bytes=max_body_bytes)
    app.include_router(health_router())
    for router in routers:
        app.include_router(router)
    return app


# --- request-scoped unit of work ------------------------------------------------------------------


AFTER_COMMIT = "hie.after_commit"


async def _write_session(request: Request) -> AsyncIterator[AsyncSession]:
    """The request scope commits (before the response is sent; a commit that wrote events wakes the
    outbox relay), then awaits the steps queued in ``session.info[AFTER_COMMIT]`` (each must not
    raise; see after_commit)."""
    runtime = request.app.state.runtime
    async with runtime.db.transaction() as session:
        yield session
    for step in session.info.pop(AFTER_COMMIT, []):
        await step()


def after_commit(session: AsyncSession, step: Callable[[], Awaitable[None]]) -> None:
    """Run ``step`` once the request's transaction has committed, before the response is sent."""
    session.info.setdefault(AFTER_COMMIT, []).append(step)


async def _read_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.runtime.db.read_sessions() as session:
        yield session


async def request_json(request: Request) -> Any:
    """The request body as JSON, parsed once within the limits (json_limits.py): raises
    ``JsonLimitExceeded`` beyond them, ``ValueError``/``UnicodeDecodeError`` when it is not JSON."""
    if _JSON_SCOPE_KEY in request.scope:
        return request.scope[_JSON_SCOPE_KEY]
    return json_limits.loads(await request.body())


SessionDep = Annotated[AsyncSession, Depends(_write_session, scope="function")]
ReadSessionDep = Annotated[AsyncSession, Depends(_read_session, scope="function")]
