"""FHIR R4 resources the hub builds: referral Tasks and the Bundles it answers with."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from hie_schemas.codes import HIRA_DEPARTMENT, DocumentType
from hie_schemas.events import ExchangeKind
from hie_schemas.identifiers import KRNPI_SYSTEM, PATIENT_KEY_SYSTEM, RRN_SYSTEM

# The kinds of exchange, as Task.code (a code system of the federation; values = ExchangeKind).
EXCHANGE_KIND_SYSTEM = "https://hie-federation.kr/fhir/CodeSystem/exchange-kind"
KIND_DISPLAY: dict[ExchangeKind, str] = {
    ExchangeKind.REFERRAL: "진료의뢰 (referral)",
    ExchangeKind.RETURN: "진료회송 (return)",
    ExchangeKind.CONSULT_REPLY: "진료회신 (consult reply)",
    ExchangeKind.TRANSFER: "전원 (transfer)",
    ExchangeKind.PATIENT_REQUEST: "환자 요청 전송 (patient-requested transfer, 의료법 §21-3)",
    ExchangeKind.PUBLIC_AGENCY: "공공기관 제출 (submission to a public agency)",
}
# The document that makes a submission an exchange, in order of precedence.
KIND_BY_DOCUMENT: dict[DocumentType, ExchangeKind] = {
    DocumentType.REFERRAL: ExchangeKind.REFERRAL,
    DocumentType.RETURN: ExchangeKind.RETURN,
    DocumentType.CONSULT_REPLY: ExchangeKind.CONSULT_REPLY,
    DocumentType.TRANSFER_OPINION: ExchangeKind.TRANSFER,
}
# Namespace of the deterministic transaction-response ids (a replayed publish answers identically).
_RESPONSE_NS = uuid.UUID("6d1f3c4e-8a51-4d0c-9f0e-6f1f3a2b9c11")


class TaskStatus(StrEnum):
    """The FHIR task-status codes the referral workflow uses."""

    REQUESTED = "requested"
    RECEIVED = "received"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    COMPLETED = "completed"

    @property
    def rank(self) -> int:
        """Progress along the workflow; a copy never moves backwards (notices may arrive late)."""
        return _RANK[self]


_RANK = {
    TaskStatus.REQUESTED: 0,
    TaskStatus.RECEIVED: 1,
    TaskStatus.ACCEPTED: 2,
    TaskStatus.REJECTED: 3,
    TaskStatus.COMPLETED: 3,
}


def exchange_kind(types: Iterable[DocumentType]) -> tuple[ExchangeKind, int] | None:
    """The kind of exchange a submission makes and the index of its leading document, if any."""
    ordered = list(types)
    for doc_type, kind in KIND_BY_DOCUMENT.items():
        if doc_type in ordered:
            return kind, ordered.index(doc_type)
    return None


def organization(code: str) -> dict[str, Any]:
    return {"type": "Organization", "identifier": {"system": KRNPI_SYSTEM, "value": code}}


def document_reference(document_id: str) -> dict[str, Any]:
    return {"reference": f"DocumentReference/{document_id}"}


def build_task(
    *,
    task_id: str,
    exchange_id: str,
    kind: ExchangeKind,
    requester: str,
    owner: str,
    patient_key: str,
    focus: str,
    inputs: Sequence[str],
    at: datetime,
) -> dict[str, Any]:
    """A referral/return Task (status requested, intent order) pointing at the exchanged documents."""
    task: dict[str, Any] = {
        "resourceType": "Task",
        "id": task_id,
        "meta": {"lastUpdated": at.isoformat()},
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{exchange_id}"}],
        "status": TaskStatus.REQUESTED.value,
        "intent": "order",
        "code": {
            "coding": [{"system": EXCHANGE_KIND_SYSTEM, "code": kind.value, "display": KIND_DISPLAY[kind]}]
        },
        "focus": document_reference(focus),
        "for": {"identifier": {"system": PATIENT_KEY_SYSTEM, "value": patient_key}},
        "authoredOn": at.isoformat(),
        "lastModified": at.isoformat(),
        "requester": organization(requester),
        "owner": organization(owner),
    }
    if inputs:
        task["input"] = [
            {"type": {"text": "attached document"}, "valueReference": document_reference(doc_id)}
            for doc_id in inputs
        ]
    return task


def with_status(
    task: dict[str, Any], status: TaskStatus, output: Sequence[str], at: datetime
) -> dict[str, Any]:
    """A copy of ``task`` in ``status``, with its output documents (e.g. the return note)."""
    updated = dict(task)
    updated["status"] = status.value
    updated["lastModified"] = at.isoformat()
    updated["meta"] = {**task.get("meta", {}), "lastUpdated": at.isoformat()}
    if output:
        updated["output"] = [
            {"type": {"text": "result document"}, "valueReference": document_reference(doc_id)}
            for doc_id in output
        ]
    return updated


def output_document_ids(task: dict[str, Any]) -> list[str]:
    """Ids of the DocumentReferences in Task.output (relative or absolute references)."""
    ids: list[str] = []
    for output in task.get("output") or []:
        if not isinstance(output, dict):
            continue
        reference = (output.get("valueReference") or {}).get("reference")
        if isinstance(reference, str):
            parts = reference.rstrip("/").split("/")
            if len(parts) >= 2 and parts[-2] == "DocumentReference" and parts[-1]:
                ids.append(parts[-1])
    return list(dict.fromkeys(ids))


# The Tasks an ITI-65 created, on the response entry of the DocumentReference they are about (FHIR R4
# wants exactly one response entry per request entry): one extension per Task, valueReference Task/id.
CREATED_TASK_EXTENSION = "https://hie-federation.kr/fhir/StructureDefinition/created-task"


@dataclass(frozen=True)
class Created:
    """One created resource in a transaction response, at its version; ``tasks``: the ids of the
    Tasks made about it (a DocumentReference that leads an exchange)."""

    resource_type: str
    id: str
    at: datetime
    version: int = 1
    tasks: tuple[str, ...] = ()


def transaction_response(document_ids: Sequence[str], created: Sequence[Created]) -> dict[str, Any]:
    """ITI-65 answer; its id derives from the documents so that a replayed publish answers the same."""
    bundle_id = uuid.uuid5(_RESPONSE_NS, "|".join(document_ids))
    entries = []
    for c in created:
        response: dict[str, Any] = {
            "status": "201 Created",
            "location": f"{c.resource_type}/{c.id}/_history/{c.version}",
            "etag": f'W/"{c.version}"',
            "lastModified": c.at.isoformat(),
        }
        if c.tasks:
            response["extension"] = [
                {"url": CREATED_TASK_EXTENSION, "valueReference": {"reference": f"Task/{task_id}"}}
                for task_id in c.tasks
            ]
        entries.append({"response": response})
    return {
        "resourceType": "Bundle",
        "id": str(bundle_id),
        "type": "transaction-response",
        "entry": entries,
    }


def created_tasks(response: dict[str, Any]) -> list[str]:
    """The ids of the Tasks a transaction-response names (CREATED_TASK_EXTENSION)."""
    return [
        ext["valueReference"]["reference"].split("/")[1]
        for entry in response.get("entry") or []
        for ext in (entry.get("response") or {}).get("extension") or []
        if ext.get("url") == CREATED_TASK_EXTENSION
    ]


def searchset(
    base: str,
    resources: Sequence[dict[str, Any]],
    total: int | None,
    *,
    links: Sequence[tuple[str, str]] = (),
    outcomes: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """A searchset Bundle: the matches, then one entry per OperationOutcome (search.mode outcome).

    Links are built by the caller from the query with any RRN replaced by the patient key: an RRN is
    never echoed.
    """
    bundle: dict[str, Any] = {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "searchset"}
    if total is not None:
        bundle["total"] = total
    if links:
        bundle["link"] = [{"relation": relation, "url": url} for relation, url in links]
    entries = [
        {
            "fullUrl": f"{base}/{r['resourceType']}/{r['id']}",
            "resource": r,
            "search": {"mode": "match"},
        }
        for r in resources
    ]
    entries += [
        {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": outcome, "search": {"mode": "outcome"}}
        for outcome in outcomes
    ]
    bundle["entry"] = entries
    return bundle


def count_only(bundle: dict[str, Any]) -> dict[str, Any]:
    """``_summary=count``: the searchset's total and self link, no entries."""
    links = [link for link in bundle.get("link") or [] if link["relation"] == "self"]
    return {k: v for k, v in bundle.items() if k not in ("entry", "link")} | (
        {"link": links} if links else {}
    )


def scrub_rrn(value: Any, patient_key: str) -> Any:
    """Replace every RRN identifier left in a resource by the patient key (defence in depth: the
    document parser already rewrites them; nothing with an RRN may reach the database)."""
    if isinstance(value, dict):
        if value.get("system") == RRN_SYSTEM and "value" in value:
            return {**value, "system": PATIENT_KEY_SYSTEM, "value": patient_key}
        return {k: scrub_rrn(v, patient_key) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_rrn(v, patient_key) for v in value]
    return value


def rename_references(value: Any, renames: dict[str, str]) -> Any:
    """A copy of ``value`` with every ``reference`` found in ``renames`` replaced."""
    if isinstance(value, dict):
        return {
            k: (
                renames.get(v, v)
                if k == "reference" and isinstance(v, str)
                else rename_references(v, renames)
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [rename_references(v, renames) for v in value]
    return value


def stamp_metadata(
    docref: dict[str, Any], *, author: str, department: str | None, created_at: datetime
) -> dict[str, Any]:
    """Write the document's metadata into its DocumentReference where MHD maps the XDS attributes
    (author institution, creationTime → attachment.creation, practice setting), so that a hub the
    document is delivered to reads the same values the consent rule was asked about."""
    stamped = dict(docref)
    authors = list(stamped.get("author") or [])
    if not any((a.get("identifier") or {}).get("value") == author for a in authors if isinstance(a, dict)):
        authors.append(organization(author))
    stamped["author"] = authors
    contents = [dict(c) for c in stamped.get("content") or [{}]]
    contents[0]["attachment"] = {**(contents[0].get("attachment") or {}), "creation": created_at.isoformat()}
    stamped["content"] = contents
    if department is not None:
        context = dict(stamped.get("context") or {})
        setting = dict(context.get("practiceSetting") or {})
        codings = list(setting.get("coding") or [])
        if not any(c.get("system") == HIRA_DEPARTMENT for c in codings):
            codings.append({"system": HIRA_DEPARTMENT, "code": department})
        context["practiceSetting"] = {**setting, "coding": codings}
        stamped["context"] = context
    return stamped


def read_metadata(docref: dict[str, Any]) -> tuple[str | None, datetime | None]:
    """(department, created_at) as ``stamp_metadata`` wrote them."""
    department = None
    for coding in ((docref.get("context") or {}).get("practiceSetting") or {}).get("coding") or []:
        if coding.get("system") == HIRA_DEPARTMENT and coding.get("code"):
            department = str(coding["code"])
    created_at = None
    contents = docref.get("content") or [{}]
    raw = (contents[0].get("attachment") or {}).get("creation")
    if isinstance(raw, str):
        try:
            created_at = datetime.fromisoformat(raw)
        except ValueError:
            created_at = None
    return department, created_at
