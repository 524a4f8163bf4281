"""What the ITI-65 parser tests share: a fixed patient, author and clock, builders of submissions, and
the FHIRPath locations the hub reports."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pytest

from hie_hub.documents import Submission, parse_submission
from hie_platform.errors import BadRequest, Unprocessable
from hie_schemas.codes import DocumentType, Section
from hie_schemas.documents.builders import KST, build_document, build_submission
from hie_schemas.events import StudyRef

Json = dict[str, Any]


SECRET = b"test-federation-secret-3f9c2a7e41"
RRN = "600315-1520418"
RRN_DIGITS = RRN.replace("-", "")
OTHER_RRN = "750822-2764103"
AUTHOR = "11100011"
RECIPIENT = "22200022"
OTHER_RECIPIENT = "33300033"
CREATED = datetime(2025, 3, 4, 9, 30, tzinfo=KST)
CT = StudyRef(study_instance_uid="1.2.410.200001.1.3.20250304.1", accession_number="CT250304-0017")
MR = StudyRef(study_instance_uid="1.2.410.200001.1.3.20250304.2")
ICD10_WHO = "http://hl7.org/fhir/sid/icd-10"


def _document(kind: DocumentType, **overrides: Any) -> Json:
    arguments: Json = {
        "author_code": AUTHOR,
        "author_name": "서울중앙내과의원",
        "patient_rrn": RRN,
        "created_at": CREATED,
    }
    return build_document(kind, **(arguments | overrides))


def _body(
    kinds: tuple[DocumentType, ...] = (DocumentType.REFERRAL,),
    recipients: tuple[str, ...] = (RECIPIENT,),
    **overrides: Any,
) -> Json:
    documents = [_document(kind, **overrides) for kind in kinds]
    return build_submission(documents, author_code=AUTHOR, patient_rrn=RRN, recipients=recipients)


def _parse(body: Any, **kwargs: Any) -> Submission:
    return parse_submission(body, secret=SECRET, **kwargs)


def _stored_json(submission: Submission) -> str:
    stored = [submission.submission_set] + [[d.document, d.document_reference] for d in submission.documents]
    return json.dumps(stored, ensure_ascii=False)


def _assert_no_rrn(text: str) -> None:
    for value in (RRN, RRN_DIGITS, OTHER_RRN, OTHER_RRN.replace("-", "")):
        assert value not in text


# --- locating things in a transaction, with the FHIRPath the hub reports -------------------------------


def _document_at(body: Json, n: int = 0) -> tuple[Json, str]:
    positions = [i for i, e in enumerate(body["entry"]) if e["resource"]["resourceType"] == "Bundle"]
    return body["entry"][positions[n]]["resource"], f"Bundle.entry[{positions[n]}].resource"


def _resource(body: Json, resource_type: str) -> tuple[Json, str]:
    document, path = _document_at(body)
    for j, entry in enumerate(document["entry"]):
        if entry["resource"]["resourceType"] == resource_type:
            return entry["resource"], f"{path}.entry[{j}].resource"
    raise AssertionError(f"no {resource_type} in the document")


def _section(body: Json, section: Section) -> tuple[Json, str]:
    composition, path = _resource(body, "Composition")
    for i, candidate in enumerate(composition["section"]):
        if candidate["code"]["coding"][0]["code"] == section.value:
            return candidate, f"{path}.section[{i}]"
    raise AssertionError(f"no section {section}")


def _issues(body: Json) -> list[tuple[str, str]]:
    with pytest.raises(Unprocessable) as caught:
        _parse(body)
    outcome = caught.value.operation_outcome()
    _assert_no_rrn(json.dumps(outcome, ensure_ascii=False))
    assert all(issue["diagnostics"] and issue["expression"] for issue in outcome["issue"])
    return sorted((issue["code"], issue["expression"][0]) for issue in outcome["issue"])


def _bad_request(body: Any) -> BadRequest:
    with pytest.raises(BadRequest) as caught:
        _parse(body)
    _assert_no_rrn(json.dumps(caught.value.operation_outcome(), ensure_ascii=False) + str(caught.value))
    return caught.value


def _resource_of_transaction(body: Json, resource_type: str) -> tuple[Json, str]:
    for i, entry in enumerate(body["entry"]):
        if entry["resource"]["resourceType"] == resource_type:
            return entry["resource"], f"Bundle.entry[{i}].resource"
    raise AssertionError(resource_type)
