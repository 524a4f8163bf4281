"""The one place the FHIR release is chosen: R4 models from fhir.resources' R4B sub-package.

The bare ``fhir.resources`` package is R5; nothing else in the project imports it directly.
"""

from __future__ import annotations

from typing import Any, cast

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle, BundleEntry
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.composition import Composition
from fhir.resources.R4B.consent import Consent
from fhir.resources.R4B.documentreference import DocumentReference
from fhir.resources.R4B.domainresource import DomainResource
from fhir.resources.R4B.endpoint import Endpoint
from fhir.resources.R4B.fhirresourcemodel import FHIRResourceModel
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.list import List as FhirList
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.organization import Organization
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.resource import Resource
from fhir.resources.R4B.task import Task
from pydantic import ValidationError

FHIR_VERSION = "4.0.1"
FHIR_JSON = "application/fhir+json"

__all__ = [
    "FHIR_JSON",
    "FHIR_VERSION",
    "AuditEvent",
    "Bundle",
    "BundleEntry",
    "CapabilityStatement",
    "Composition",
    "Consent",
    "DocumentReference",
    "Endpoint",
    "FHIRResourceModel",
    "FhirList",
    "FhirParseError",
    "ImagingStudy",
    "OperationOutcome",
    "Organization",
    "Patient",
    "Task",
    "parse_resource",
    "to_json_dict",
]


class FhirParseError(ValueError):
    """JSON that is not a valid FHIR R4 resource of a known type."""

    def __init__(self, message: str, resource_type: str | None = None) -> None:
        super().__init__(message)
        self.resource_type = resource_type


def parse_resource(data: Any, expected: str | None = None) -> FHIRResourceModel:
    """Validate a JSON object as an R4 resource, optionally of an expected resourceType."""
    if not isinstance(data, dict):
        raise FhirParseError("a FHIR resource must be a JSON object")
    resource_type = data.get("resourceType")
    if not isinstance(resource_type, str):
        raise FhirParseError("resourceType is missing")
    if expected is not None and resource_type != expected:
        raise FhirParseError(f"expected resourceType {expected}, got {resource_type}", resource_type)
    try:
        model = get_fhir_model_class(resource_type)
    except (KeyError, ValueError):
        raise FhirParseError(f"unknown resourceType {resource_type}", resource_type) from None
    if not issubclass(model, Resource) or model in (Resource, DomainResource):
        raise FhirParseError(f"{resource_type} is not a resource type", resource_type)
    try:
        return cast(FHIRResourceModel, model.model_validate(data))
    except ValidationError as exc:
        raise FhirParseError(_describe(exc), resource_type) from None
    except Exception as exc:  # fhir_core raises AttributeError/TypeError for some mistyped values
        raise FhirParseError(f"invalid {resource_type}: {type(exc).__name__}", resource_type) from None


def to_json_dict(resource: FHIRResourceModel) -> dict[str, Any]:
    """Serialize a model as FHIR JSON (aliases, no nulls)."""
    return resource.model_dump(mode="json", by_alias=True, exclude_none=True)


def _describe(exc: ValidationError, limit: int = 10) -> str:
    """Where and why validation failed, never the offending value (it may be an RRN or a name)."""
    problems = [
        f"{'.'.join(str(part) for part in err.get('loc', ())) or '(root)'}: {err.get('msg', 'invalid')}"
        for err in exc.errors(include_input=False, include_url=False)
    ]
    more = f" (+{len(problems) - limit} more)" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more
