"""The CapabilityStatement of a hub node: exactly the interactions, parameters and operations
implemented (tests/hub/test_mhd.py checks each one against the running node)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hie_hub.audit.endpoints import AUDIT_SEARCH
from hie_hub.config import HubSettings
from hie_hub.core.bundles import CREATED_TASK_EXTENSION
from hie_hub.documents.endpoints import DOCUMENT_SEARCH
from hie_hub.imaging.endpoints import STUDY_SEARCH
from hie_hub.lists.endpoints import LIST_SEARCH
from hie_hub.subscriptions.service import TOPIC
from hie_hub.tasks.endpoints import TASK_SEARCH
from hie_schemas.fhir import FHIR_JSON, FHIR_VERSION

MHD = "https://profiles.ihe.net/ITI/MHD"
KRNPI = "hira-krnpi system|code (or the bare 8-digit code)"
PAGING = "opaque position of the next page (from the next link); pages are stable while documents are added"
DATE = "eq, gt, lt, ge, le; a date or dateTime without timezone is read in KST (+09:00)"
COUNT = "page size (default 100, at most 1000: a larger value is served as 1000, as the self link says)"
# _summary and _total on the searches that give Bundle.total.
SUMMARY_PARAMS: dict[str, tuple[str, str]] = {
    "_summary": ("token", "count only (Bundle.total, no entries); other values are not supported"),
    "_total": ("token", "none | estimate | accurate: Bundle.total is always the accurate count"),
}

DOCUMENT_PARAMS: dict[str, tuple[str, str]] = {
    "patient.identifier": ("token", "required: RRN (mois-rrn) or patient-key system|value"),
    "type": ("token", "K-CDA template (urn:oid:1.2.410.100110.40.2.1|n) or LOINC document type; comma = or"),
    "status": (
        "token",
        "current | superseded | entered-in-error; comma = or (default: current, superseded; an "
        "entered-in-error document is found only when asked for, and stays readable)",
    ),
    "date": ("date", f"the document's time (Composition.date = DocumentReference.date); {DATE}"),
    "author": ("reference", f"author institution: {KRNPI}"),
    "author:identifier": ("reference", f"author institution: {KRNPI}"),
    "author.identifier": ("token", f"author institution: {KRNPI}"),
    "_count": ("number", COUNT),
    "_cursor": ("string", PAGING),
    "_federated": ("token", "true: search every hub that holds documents for the patient (walk-in search)"),
    "purpose": ("token", "with _federated: treatment (default) | emergency (needs justification)"),
    "justification": ("string", "why emergency access is needed (or header X-HIE-Justification)"),
    **SUMMARY_PARAMS,
}
LIST_PARAMS: dict[str, tuple[str, str]] = {
    "patient.identifier": ("token", "required: RRN or patient-key system|value"),
    "code": ("token", "submissionset (folders are not kept)"),
    "date": ("date", f"List.date; {DATE}"),
    "status": ("token", "current"),
    "identifier": ("token", "SubmissionSet identifier, system|value or value"),
    "_count": ("number", "page size"),
    "_cursor": ("string", PAGING),
}
TASK_PARAMS: dict[str, tuple[str, str]] = {
    "owner": ("reference", f"the caller's institution: {KRNPI}"),
    "owner:identifier": ("reference", f"the caller's institution: {KRNPI}"),
    "requester": ("reference", f"the caller's institution: {KRNPI}"),
    "requester:identifier": ("reference", f"the caller's institution: {KRNPI}"),
    "status": ("token", "requested | received | accepted | rejected | completed"),
    "_count": ("number", f"{COUNT}; a 'next' link leads to the following page"),
    "_since": (
        "date",
        "Tasks changed after this instant, oldest change first; with 'Prefer: wait=N' the request "
        "waits for one (without it: newest change first)",
    ),
    "_cursor": ("string", PAGING),
    **SUMMARY_PARAMS,
}
STUDY_PARAMS: dict[str, tuple[str, str]] = {
    "patient.identifier": ("token", "required: RRN or patient-key system|value"),
    "identifier": (
        "token",
        "urn:dicom:uid|urn:oid:<Study Instance UID> (urn:oid: may be left out), |<accession number>, "
        "or a bare value for either; comma = or",
    ),
    "_count": ("number", "page size (default 100, at most 1000)"),
    "_cursor": ("string", PAGING),
}
AUDIT_PARAMS: dict[str, tuple[str, str]] = {
    "patient.identifier": ("token", "RRN or patient-key system|value"),
    "date": ("date", f"when the record was made; {DATE}"),
    "_count": ("number", COUNT),
    "_cursor": ("string", PAGING),
    **SUMMARY_PARAMS,
}
# The tables above describe exactly what the endpoints accept (tests/hub/test_mhd.py compares them).
ACCEPTED = {
    "DocumentReference": (DOCUMENT_PARAMS, DOCUMENT_SEARCH),
    "List": (LIST_PARAMS, LIST_SEARCH),
    "Task": (TASK_PARAMS, TASK_SEARCH),
    "ImagingStudy": (STUDY_PARAMS, STUDY_SEARCH),
    "AuditEvent": (AUDIT_PARAMS, AUDIT_SEARCH),
}


# Reads and updates of a versioned resource: meta.versionId / ETag, If-None-Match, If-Match.
VERSIONED: dict[str, Any] = {
    "versioning": "versioned-update",
    "readHistory": False,
    "updateCreate": False,
    "conditionalCreate": False,
    "conditionalRead": "not-match",
    "conditionalUpdate": False,
}


def _params(table: dict[str, tuple[str, str]]) -> list[dict[str, str]]:
    return [{"name": name, "type": kind, "documentation": doc} for name, (kind, doc) in table.items()]


def _interactions(*codes: str) -> list[dict[str, str]]:
    return [{"code": code} for code in codes]


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
                "documentation": (
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
                ),
                "security": {
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
                },
                "resource": [
                    {
                        "type": "DocumentReference",
                        "interaction": _interactions("read", "update", "search-type"),
                        **VERSIONED,
                        "documentation": (
                            "update: the author sets status entered-in-error (nothing else), If-Match "
                            "honoured; content.attachment.size and hash describe the document as ITI-68 "
                            "serves it (SHA-1 of its bytes); an entered-in-error document stays readable "
                            "with its status and is left out of searches that do not ask for it"
                        ),
                        "searchParam": _params(DOCUMENT_PARAMS),
                    },
                    {
                        "type": "Bundle",
                        "interaction": _interactions("read"),
                        "versioning": "versioned",
                        "readHistory": False,
                        "conditionalRead": "not-match",
                        "documentation": "the document (ITI-68), at DocumentReference.content.attachment.url",
                    },
                    {
                        "type": "List",
                        "interaction": _interactions("read", "search-type"),
                        "documentation": "SubmissionSets published at this hub (ITI-66)",
                        "searchParam": _params(LIST_PARAMS),
                    },
                    {
                        "type": "Task",
                        "interaction": _interactions("read", "update", "search-type"),
                        **VERSIONED,
                        "searchParam": _params(TASK_PARAMS),
                    },
                    {
                        "type": "ImagingStudy",
                        "interaction": _interactions("read", "search-type"),
                        "documentation": (
                            "studies the imaging gateway delivered to the recipient's PACS in an exchange "
                            "this hub received; seen by the two parties, as their documents; the PACS as "
                            "a contained Endpoint (dicom-dimse)"
                        ),
                        "searchParam": _params(STUDY_PARAMS),
                    },
                    {
                        "type": "Subscription",
                        "interaction": _interactions("create", "read", "delete", "search-type"),
                        "documentation": (
                            f"rest-hook only, topic {TOPIC} (R4 Subscriptions Backport style); "
                            "the payload is signed (X-HIE-Signature-256)"
                        ),
                        "operation": [
                            {
                                "name": "status",
                                "definition": "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-status",
                            }
                        ],
                    },
                    {
                        "type": "AuditEvent",
                        "interaction": _interactions("search-type"),
                        "documentation": "agency scope; IHE BALP patterns; the hash chain in an extension",
                        "searchParam": _params(AUDIT_PARAMS),
                    },
                ],
                "interaction": [{"code": "transaction", "documentation": "ITI-65 Provide Document Bundle"}],
                "operation": [
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
                ],
            }
        ],
    }
