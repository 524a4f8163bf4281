"""One exception family rendered as FHIR OperationOutcome with the right HTTP status."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import asyncpg
import nats.errors
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from hie_platform.logging import get_logger
from hie_schemas.fhir import FHIR_JSON
from hie_schemas.issues import Issue

log = get_logger(__name__)

__all__ = ["FhirError", "Issue", "RpcError", "operation_outcome"]


def operation_outcome(issues: Sequence[Issue]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [i.to_fhir() for i in issues]}


class FhirError(Exception):
    """Base of every expected failure; a subclass declares its HTTP status and FHIR issue type as
    class keywords, e.g. ``class Gone(FhirError, status=410, code="expired")``."""

    status: ClassVar[int] = 400
    code: ClassVar[str] = "invalid"

    def __init_subclass__(cls, *, status: int | None = None, code: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if status is not None:
            cls.status = status
        if code is not None:
            cls.code = code

    def __init__(
        self, diagnostics: str, *, issues: Sequence[Issue] | None = None, expression: Sequence[str] = ()
    ):
        super().__init__(diagnostics)
        self.diagnostics = diagnostics
        self.issues: tuple[Issue, ...] = (
            tuple(issues) if issues else (Issue(diagnostics, code=self.code, expression=tuple(expression)),)
        )

    def operation_outcome(self) -> dict[str, Any]:
        return operation_outcome(self.issues)

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(FhirError, status=400, code="invalid"):
    """The request is malformed or names something the FHIR API does not take."""


class Unauthorized(FhirError, status=401, code="login"):
    """No valid bearer token."""

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="hie"'}


class Forbidden(FhirError, status=403, code="forbidden"):
    """The caller is known but may not do this (its role, its standing, the patient's consent)."""


class NotFound(FhirError, status=404, code="not-found"):
    """No such resource, or none the caller may know of."""


class Conflict(FhirError, status=409, code="conflict"):
    """The request contradicts what is stored."""


class PreconditionFailed(FhirError, status=412, code="conflict"):
    """If-Match names a version that is no longer current."""


class PayloadTooLarge(FhirError, status=413, code="too-long"):
    """The body is bigger than the route accepts."""


class UnsupportedMediaType(FhirError, status=415, code="not-supported"):
    """The body's content type is not one the route reads."""


class Unprocessable(FhirError, status=422, code="processing"):
    """Well-formed, but breaks a business rule or a profile."""


class ServiceUnavailable(FhirError, status=503, code="transient"):
    """Something the request needs is away; retrying later may succeed."""


class DatabaseUnavailable(ServiceUnavailable):
    """The database cannot be reached (restarting, refused, connection lost): retry shortly."""

    def __init__(self) -> None:
        super().__init__("the database is unavailable; retry the request shortly")

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}


class RpcError(Exception):
    """A NATS request/reply call that got no usable reply; caught by type, like nats.py's errors.
    ``str()`` keeps the form "<subject>: <reason>" that callers logged before the subclasses."""

    def __init__(self, subject: str, reason: str) -> None:
        super().__init__(f"{subject}: {reason}")
        self.subject = subject
        self.reason = reason

    @classmethod
    def from_nats(cls, subject: str, exc: BaseException) -> RpcError:
        """The typed error for what nats.py raised from ``nc.request``."""
        if isinstance(exc, nats.errors.NoRespondersError):
            return RpcNoResponders(subject, type(exc).__name__)
        if isinstance(exc, nats.errors.TimeoutError | TimeoutError):
            return RpcTimeout(subject, type(exc).__name__)
        return cls(subject, type(exc).__name__)


class RpcTimeout(RpcError):
    """Nobody answered within the timeout (the responder is slow or the reply was lost)."""


class RpcNoResponders(RpcError):
    """No service listens on the subject now (its hub or service is down or not permitted)."""


class RpcRemoteError(RpcError):
    """The responder answered with an error (header ``Hie-Error``): it refused or failed the request."""


# asyncpg's errors that mean the server is away, not that the request was wrong: the connection
# failed or was lost (class 08), the server is shutting down or starting up (57P01-57P03), or it has
# no room for another connection (53).
_UNAVAILABLE_NAMES = frozenset(
    {"PostgresConnectionError", "OperatorInterventionError", "InsufficientResourcesError"}
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__, getattr(current, "orig", None)]


def database_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` says the database cannot be reached now (as opposed to a bug or bad data)."""
    for found in _chain(exc):
        if isinstance(found, ConnectionError | sa_exc.TimeoutError | sa_exc.DisconnectionError):
            return True
        if isinstance(found, sa_exc.DBAPIError) and found.connection_invalidated:
            return True
        if any(cls.__name__ in _UNAVAILABLE_NAMES for cls in type(found).__mro__):
            return True
    return False


class FhirJSONResponse(JSONResponse):
    """FHIR JSON rendered by orjson: the same compact UTF-8 bytes as Starlette's json.dumps (insertion
    order, no ASCII escaping) at a fraction of its CPU (issue 13 point 2: 67.6 vs 60.9 docs/s, 11.6 vs
    13.2 ms CPU per publish). What orjson refuses (an integer beyond 64 bits) falls back to json."""

    media_type = FHIR_JSON

    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content)
        except TypeError:  # orjson.JSONEncodeError is a TypeError
            return super().render(content)


def fhir_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return FhirJSONResponse(body, status_code=status, headers=headers)


# Refusals a security monitor watches (bad or missing credentials, no right, oversized bodies) are
# warnings with the reason; other client errors are info lines without it, because their
# diagnostics may quote the caller's input (which may carry a resident registration number).
SECURITY_STATUSES = frozenset({401, 403, 413})
MAX_ISSUES = 20  # issues listed in one OperationOutcome for a request that fails validation
_INT_DIGITS_LIMIT = "Exceeds the limit ("  # CPython's message for int() beyond sys.get_int_max_str_digits()


def log_refusal(
    status: int, code: str, *, method: str, route: str, reason: str = "", inst: str | None = None
) -> None:
    """One structured line per refused request: event "request refused", status, issue code, route."""
    fields: dict[str, Any] = {"status": status, "code": code, "method": method, "route": route}
    if inst is not None:
        fields["inst"] = inst
    if status in SECURITY_STATUSES or status >= 500:
        log.warning("request refused", reason=reason[:300], **fields)
    else:
        log.info("request refused", **fields)


def _log_request_refusal(request: Request, status: int, code: str, reason: str = "") -> None:
    log_refusal(
        status,
        code,
        method=request.method,
        route=getattr(request.scope.get("route"), "path", "unmatched"),
        reason=reason,
        inst=getattr(request.state, "actor_inst", None),
    )


def validation_issues(errors: Sequence[Any], limit: int = MAX_ISSUES) -> list[Issue]:
    """The first ``limit`` validation errors as issues, then one that counts the rest: a body with
    200,000 unknown keys is 200,000 errors, and building (and sending) one issue each held the event
    loop for seconds."""
    issues = [
        Issue(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}",
            code="invalid",
            expression=(".".join(str(p) for p in err.get("loc", ()) if p != "body"),),
        )
        for err in errors[:limit]
    ]
    if len(errors) > limit:
        issues.append(Issue(f"and {len(errors) - limit} more issues not listed", code="invalid"))
    return issues or [Issue("invalid request")]


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as an OperationOutcome; nothing leaves as a stack trace."""

    @app.exception_handler(FhirError)
    async def _fhir_error(request: Request, exc: FhirError) -> JSONResponse:
        _log_request_refusal(request, exc.status, exc.code, exc.diagnostics)
        return fhir_response(exc.status, exc.operation_outcome(), exc.headers())

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        _log_request_refusal(request, 400, "invalid")
        return fhir_response(400, operation_outcome(validation_issues(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not-found", 405: "not-supported", 401: "login", 403: "forbidden"}.get(
            exc.status_code, "invalid"
        )
        _log_request_refusal(request, exc.status_code, code, str(exc.detail))
        return fhir_response(exc.status_code, operation_outcome([Issue(str(exc.detail), code=code)]))

    async def _database(request: Request, exc: Exception) -> JSONResponse:
        # A database restart or outage answers 503 (retry later), not 500: the request was fine.
        if not database_unavailable(exc):
            return await _unexpected(request, exc)
        unavailable = DatabaseUnavailable()
        _log_request_refusal(
            request, unavailable.status, unavailable.code, f"database unavailable: {type(exc).__name__}"
        )
        return fhir_response(unavailable.status, unavailable.operation_outcome(), unavailable.headers())

    for family in (sa_exc.SQLAlchemyError, ConnectionError, asyncpg.PostgresError):
        app.add_exception_handler(family, _database)

    @app.exception_handler(ValueError)
    async def _value(request: Request, exc: ValueError) -> JSONResponse:
        # int() of more than 4,300 digits (CPython's limit, sys.set_int_max_str_digits) raises
        # ValueError wherever a route turns caller input into a number (e.g. ``_count``): the request
        # was wrong, not the service. Request bodies never get here (json_limits.py refuses first).
        if not str(exc).startswith(_INT_DIGITS_LIMIT):
            return await _unexpected(request, exc)
        refusal = BadRequest("a number in the request has too many digits")
        _log_request_refusal(request, refusal.status, refusal.code, refusal.diagnostics)
        return fhir_response(refusal.status, refusal.operation_outcome())

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return fhir_response(500, operation_outcome([Issue("internal error", code="exception")]))
