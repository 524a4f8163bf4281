"""One exception family rendered as FHIR OperationOutcome with the right HTTP status."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hie_platform.logging import get_logger
from hie_schemas.fhir import FHIR_JSON
from hie_schemas.issues import Issue

log = get_logger(__name__)

__all__ = ["FhirError", "Issue", "operation_outcome"]


def operation_outcome(issues: Sequence[Issue]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [i.to_fhir() for i in issues]}


class FhirError(Exception):
    """Base of every expected failure; subclasses fix the HTTP status and issue type."""

    status: ClassVar[int] = 400
    code: ClassVar[str] = "invalid"

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


class BadRequest(FhirError):
    status = 400
    code = "invalid"


class Unauthorized(FhirError):
    status = 401
    code = "login"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="hie"'}


class Forbidden(FhirError):
    status = 403
    code = "forbidden"


class NotFound(FhirError):
    status = 404
    code = "not-found"


class Conflict(FhirError):
    status = 409
    code = "conflict"


class PreconditionFailed(FhirError):
    status = 412
    code = "conflict"


class PayloadTooLarge(FhirError):
    status = 413
    code = "too-long"


class UnsupportedMediaType(FhirError):
    status = 415
    code = "not-supported"


class Unprocessable(FhirError):
    status = 422
    code = "processing"


class ServiceUnavailable(FhirError):
    status = 503
    code = "transient"


def fhir_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as an OperationOutcome; nothing leaves as a stack trace."""

    @app.exception_handler(FhirError)
    async def _fhir_error(_request: Request, exc: FhirError) -> JSONResponse:
        return fhir_response(exc.status, exc.operation_outcome(), exc.headers())

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        issues = [
            Issue(
                f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}",
                code="invalid",
                expression=(".".join(str(p) for p in err.get("loc", ()) if p != "body"),),
            )
            for err in exc.errors()
        ]
        return fhir_response(400, operation_outcome(issues or [Issue("invalid request")]))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not-found", 405: "not-supported", 401: "login", 403: "forbidden"}.get(
            exc.status_code, "invalid"
        )
        return fhir_response(exc.status_code, operation_outcome([Issue(str(exc.detail), code=code)]))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return fhir_response(500, operation_outcome([Issue("internal error", code="exception")]))
