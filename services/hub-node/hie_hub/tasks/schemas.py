"""The referral Task as FHIR R4: its exchange kind, its statuses, and the Task the hub builds."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Any

from hie_hub.core.search import COUNT, KRNPI, PAGING, SUMMARY_PARAMS, SearchParameter
from hie_hub.documents.schemas import document_reference, organization
from hie_schemas.codes import DocumentType
from hie_schemas.events import ExchangeKind
from hie_schemas.identifiers import PATIENT_KEY_SYSTEM

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


_CALLER = f"the caller's institution: {KRNPI}"
# The Task search's parameters: what the router accepts and the CapabilityStatement declares.
TASK_SEARCH: dict[str, SearchParameter] = {
    "owner": SearchParameter("reference", _CALLER),
    "owner:identifier": SearchParameter("reference", _CALLER),
    "requester": SearchParameter("reference", _CALLER),
    "requester:identifier": SearchParameter("reference", _CALLER),
    "status": SearchParameter("token", "requested | received | accepted | rejected | completed"),
    "_count": SearchParameter("number", f"{COUNT}; a 'next' link leads to the following page"),
    "_since": SearchParameter(
        "date",
        "Tasks changed after this instant, oldest change first; with 'Prefer: wait=N' the request "
        "waits for one (without it: newest change first)",
    ),
    "_cursor": SearchParameter("string", PAGING),
    **SUMMARY_PARAMS,
}
