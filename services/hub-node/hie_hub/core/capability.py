"""The CapabilityStatement of a hub node: exactly the interactions, parameters and operations
implemented (tests/hub/test_mhd.py checks each one against the running node). The search parameters
come from each resource's table (DOCUMENT_SEARCH …), the same tables the routers accept."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hie_hub.audit.schemas import AUDIT_SEARCH
from hie_hub.config import HubSettings
from hie_hub.core.bundles import CREATED_TASK_EXTENSION
from hie_hub.core.search import SearchTable, declared
from hie_hub.documents.schemas import DOCUMENT_SEARCH
from hie_hub.imaging.schemas import STUDY_SEARCH
from hie_hub.lists.schemas import LIST_SEARCH
from hie_hub.subscriptions.service import TOPIC
from hie_hub.tasks.schemas import TASK_SEARCH
from hie_schemas.fhir import FHIR_JSON, FHIR_VERSION

MHD = "https://profiles.ihe.net/ITI/MHD"
# Each searchable resource's table: its rows are what the router accepts and what is declared.
SEARCHES: dict[str, SearchTable] = {
    "DocumentReference": DOCUMENT_SEARCH,
    "List": LIST_SEARCH,
    "Task": TASK_SEARCH,
    "ImagingStudy": STUDY_SEARCH,
    "AuditEvent": AUDIT_SEARCH,
}
# (table, accepted names) per resource, as tests/hub/test_mhd.py compares them with the running node.
ACCEPTED = {kind: (table, frozenset(table)) for kind, table in SEARCHES.items()}


# Reads and updates of a versioned resource: meta.versionId / ETag, If-None-Match, If-Match.
VERSIONED: dict[str, Any] = {
    "versioning": "versioned-update",
    "readHistory": False,
    "updateCreate": False,
    "conditionalCreate": False,
    "conditionalRead": "not-match",
    "conditionalUpdate": False,
}


def _interactions(*codes: str) -> list[dict[str, str]]:
    return [{"code": code} for code in codes]


REST_DOCUMENTATION = (
    "IHE MHD for the hub's institutions: publish (ITI-65, with replace by relatesTo), find "
    "(ITI-67, also across hubs with _federated=true), find SubmissionSets (ITI-66), retrieve "
    "(ITI-68); referral/return workflow as Task with long polling and rest-hook "
    "Subscriptions; the imaging studies delivered in an exchange as ImagingStudy "
    "(XDS-I.b); a care record summary on request ($generate-crs); the audit trail as "
    "AuditEvent for the agency. Unknown search parameters are ignored unless "
    "'Prefer: handling=strict' is sent; _format (json) and _pretty are accepted "
    "everywhere, XML is refused with 406. Reads carry meta.versionId, ETag and "
    "Last-Modified (GET and HEAD, If-None-Match answers 304); updates honour If-Match "
    "(412); no version history is kept (the transaction-response location names the "
    "version created). ITI-65 answers one entry per request entry; the Tasks it made "
    f"are extensions {CREATED_TASK_EXTENSION} on the DocumentReference's entry. "
    "Conditional create (ifNoneExist) is refused: a document is stored once per "
    "Bundle.identifier. See docs/fhir-profiles.md."
)
DOCUMENT_REFERENCE = (
    "update: the author sets status entered-in-error (nothing else), If-Match honoured; "
    "content.attachment.size and hash describe the document as ITI-68 serves it (SHA-1 of its bytes); "
    "an entered-in-error document stays readable with its status and is left out of searches that do "
    "not ask for it"
)
IMAGING_STUDY = (
    "studies the imaging gateway delivered to the recipient's PACS in an exchange this hub received; "
    "seen by the two parties, as their documents; the PACS as a contained Endpoint (dicom-dimse)"
)
SECURITY: dict[str, Any] = {
    "service": [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                    "code": "OAuth",
                }
            ]
        }
    ],
    "description": (
        "Bearer JWT (ES256) from the registry's OAuth2 client-credentials endpoint: scope "
        "'exchange' for an institution of this hub (a public agency may read what was "
        "submitted to it), scope 'agency' for AuditEvent."
    ),
}


def capability_statement(settings: HubSettings, software_version: str) -> dict[str, Any]:
    base = settings.fhir_base
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": datetime.now(UTC).date().isoformat(),
        "kind": "instance",
        "software": {"name": "hie-hub-node", "version": software_version},
        "implementation": {"description": f"HIE hub node {settings.hub}", "url": base},
        "fhirVersion": FHIR_VERSION,
        # JSON only: Accept application/fhir+xml or _format=xml is answered 406 (OperationOutcome).
        "format": ["json", FHIR_JSON],
        "instantiates": [
            f"{MHD}/CapabilityStatement/IHE.MHD.DocumentRecipient",
            f"{MHD}/CapabilityStatement/IHE.MHD.DocumentResponder",
        ],
        "rest": [
            {
                "mode": "server",
                "documentation": REST_DOCUMENTATION,
                "security": SECURITY,
                "resource": _resources(),
                "interaction": [{"code": "transaction", "documentation": "ITI-65 Provide Document Bundle"}],
                "operation": _operations(base),
            }
        ],
    }


def _resource(
    kind: str, interactions: tuple[str, ...], documentation: str | None, **more: Any
) -> dict[str, Any]:
    """One CapabilityStatement.rest.resource; its searchParam from the resource's table."""
    resource: dict[str, Any] = {"type": kind, "interaction": _interactions(*interactions), **more}
    if documentation is not None:
        resource["documentation"] = documentation
    if kind in SEARCHES:
        resource["searchParam"] = declared(SEARCHES[kind])
    return resource


def _resources() -> list[dict[str, Any]]:
    status = "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-status"
    return [
        _resource("DocumentReference", ("read", "update", "search-type"), DOCUMENT_REFERENCE, **VERSIONED),
        _resource(
            "Bundle",
            ("read",),
            "the document (ITI-68), at DocumentReference.content.attachment.url",
            versioning="versioned",
            readHistory=False,
            conditionalRead="not-match",
        ),
        _resource("List", ("read", "search-type"), "SubmissionSets published at this hub (ITI-66)"),
        _resource("Task", ("read", "update", "search-type"), None, **VERSIONED),
        _resource("ImagingStudy", ("read", "search-type"), IMAGING_STUDY),
        _resource(
            "Subscription",
            ("create", "read", "delete", "search-type"),
            f"rest-hook only, topic {TOPIC} (R4 Subscriptions Backport style); "
            "the payload is signed (X-HIE-Signature-256)",
            operation=[{"name": "status", "definition": status}],
        ),
        _resource(
            "AuditEvent",
            ("search-type",),
            "agency scope; IHE BALP patterns; the hash chain in an extension",
        ),
    ]


def _operations(base: str) -> list[dict[str, Any]]:
    return [
        {
            "name": "generate-crs",
            "definition": f"{base}/OperationDefinition/generate-crs",
            "documentation": (
                "POST Parameters(patient, purpose, justification): a care record summary from "
                "the documents this hub holds that consent lets flow to the caller"
            ),
        },
        {
            "name": "convert",
            "definition": "http://hl7.org/fhir/OperationDefinition/Resource-convert",
            "documentation": (
                "POST a K-CDA document (application/hl7-cda+xml): the FHIR document it becomes, "
                "nothing stored. ITI-65 also takes a K-CDA Binary, and ITI-68 answers "
                "Accept: application/hl7-cda+xml (docs/kcda.md)"
            ),
        },
    ]
