"""The hub's hash-chained audit records as FHIR AuditEvents, in the patterns of IHE Basic Audit Log
Patterns (BALP): the REST interaction and IHE transaction as subtype, the purpose of use, the
requesting institution as the requestor agent, this node as the source, the patient and the
documents as entities. The chain itself (sequence, hash, previous hash) rides along in an extension
so that a reader can check it against ``hie_hub.audit.verify``.
"""

from __future__ import annotations

from typing import Any

from hie_hub.core.search import DATE, PAGES, SUMMARY_PARAMS, SearchParameter
from hie_schemas.consent import Purpose
from hie_schemas.identifiers import KRNPI_SYSTEM, PATIENT_KEY_SYSTEM

DCM = "http://dicom.nema.org/resources/ontology/DCM"
RESTFUL = "http://hl7.org/fhir/restful-interaction"
IHE_EVENTS = "urn:ihe:event-type-code"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
CHAIN_URL = "https://hie-federation.kr/fhir/StructureDefinition/audit-chain"
# The AuditEvent search's parameters: what the router accepts and the CapabilityStatement declares.
AUDIT_SEARCH: dict[str, SearchParameter] = {
    "patient.identifier": SearchParameter("token", "RRN or patient-key system|value"),
    "date": SearchParameter("date", f"when the record was made; {DATE}"),
    **PAGES,
    **SUMMARY_PARAMS,
}
ACTION_SYSTEM = "https://hie-federation.kr/fhir/CodeSystem/audit-action"

# Our action → (AuditEvent.action, REST interaction, IHE transaction or None).
ACTIONS: dict[str, tuple[str, str, str | None]] = {
    "document.publish": ("C", "create", "ITI-65"),
    "exchange.deny": ("C", "create", "ITI-65"),
    "exchange.receive": ("C", "create", None),
    "document.search": ("E", "search-type", "ITI-67"),
    "document.read": ("R", "read", "ITI-67"),
    "document.retrieve": ("R", "read", "ITI-68"),
    "document.entered-in-error": ("U", "update", None),
    "list.search": ("E", "search-type", "ITI-66"),
    "list.read": ("R", "read", "ITI-66"),
    "imaging.search": ("E", "search-type", None),
    "imaging.read": ("R", "read", None),
    "federated.search": ("E", "search-type", "ITI-67"),
    "federated.retrieve": ("R", "read", "ITI-68"),
    "crs.generate": ("E", "operation", None),
    "task.update": ("U", "update", None),
}
PURPOSE_OF_USE: dict[str, list[str]] = {
    Purpose.TREATMENT.value: ["TREAT"],
    Purpose.EMERGENCY.value: ["ETREAT", "BTG"],
    Purpose.PATIENT_REQUEST.value: ["PATRQT"],
    Purpose.PUBLIC_AGENCY.value: ["PUBHLTH"],
}


def _outcome(outcome: str) -> str:
    # 0 success, 4 minor failure (a refusal the rules required), 8 serious failure.
    return {"success": "0", "partial": "4", "denied": "4", "not-found": "4"}.get(outcome, "8")


def audit_event(
    node: str, hub: str, sequence: int, record: dict[str, Any], prev_hash: str, digest: str
) -> dict[str, Any]:
    """One audit record as an AuditEvent (R4)."""
    action = str(record.get("action") or "")
    code, interaction, transaction = ACTIONS.get(action, ("E", "operation", None))
    subtype = [{"system": RESTFUL, "code": interaction}, {"system": ACTION_SYSTEM, "code": action}]
    if transaction is not None:
        subtype.insert(1, {"system": IHE_EVENTS, "code": transaction})
    detail = record.get("detail") or {}
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": f"{node}-{sequence}",
        "extension": [
            {
                "url": CHAIN_URL,
                "extension": [
                    {"url": "sequence", "valueInteger": sequence},
                    {"url": "hash", "valueString": digest},
                    {"url": "previous", "valueString": prev_hash},
                ],
            }
        ],
        "type": {"system": DCM, "code": "110112", "display": "Query"}
        if code == "E"
        else {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest"},
        "subtype": subtype,
        "action": code,
        "recorded": record.get("recorded_at"),
        "outcome": _outcome(str(record.get("outcome"))),
        "agent": _agents(record, node),
        "source": {
            "site": hub,
            "observer": {"display": f"hub node {node}"},
            "type": [{"system": SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
        "entity": _entities(record),
    }
    description = " ".join(
        part
        for part in (
            f"rule {record['rule']}" if record.get("rule") else "",
            f"consent version {record['consent_version']}" if record.get("consent_version") else "",
            f"justification: {detail['justification']}" if detail.get("justification") else "",
        )
        if part
    )
    if description:
        event["outcomeDesc"] = description
    purpose = PURPOSE_OF_USE.get(str(record.get("purpose")))
    if purpose:
        event["purposeOfEvent"] = [{"coding": [{"system": ACT_REASON, "code": c}]} for c in purpose]
    return event


def _agents(record: dict[str, Any], node: str) -> list[dict[str, Any]]:
    agents: list[dict[str, Any]] = []
    institution = record.get("actor_institution")
    if institution:
        agent: dict[str, Any] = {
            "type": {"coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]},
            "who": {"identifier": {"system": KRNPI_SYSTEM, "value": institution}},
            "requestor": True,
        }
        if record.get("actor_client"):
            agent["altId"] = str(record["actor_client"])
        agents.append(agent)
    agents.append(
        {
            "type": {"coding": [{"system": DCM, "code": "110152", "display": "Destination Role ID"}]},
            "who": {"display": f"hub node {node}"},
            "requestor": not institution,
        }
    )
    return agents


def _entities(record: dict[str, Any]) -> list[dict[str, Any]]:
    entities: list[dict[str, Any]] = []
    if record.get("patient_key"):
        entities.append(
            {
                "what": {"identifier": {"system": PATIENT_KEY_SYSTEM, "value": record["patient_key"]}},
                "type": {"system": ENTITY_TYPE, "code": "1", "display": "Person"},
                "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"},
            }
        )
    for document_id in record.get("document_ids") or []:
        entities.append(
            {
                "what": {"reference": f"DocumentReference/{document_id}"},
                "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                "role": {"system": OBJECT_ROLE, "code": "3", "display": "Report"},
            }
        )
    for study_id in (record.get("detail") or {}).get("imaging_studies") or []:
        entities.append(
            {
                "what": {"reference": f"ImagingStudy/{study_id}"},
                "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                "role": {"system": OBJECT_ROLE, "code": "4", "display": "Domain Resource"},
            }
        )
    return entities
