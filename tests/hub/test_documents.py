"""The hub's FHIR document layer: accepted ITI-65 submissions and the exchange's document profiles."""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from submissions import (
    AUTHOR,
    CREATED,
    CT,
    ICD10_WHO,
    MR,
    OTHER_RECIPIENT,
    RECIPIENT,
    RRN,
    SECRET,
    Json,
    _assert_no_rrn,
    _bad_request,
    _body,
    _document,
    _document_at,
    _issues,
    _parse,
    _resource,
    _resource_of_transaction,
    _section,
    _stored_json,
)

from hie_hub.documents import check_document
from hie_schemas import codes
from hie_schemas.codes import DOCUMENT_KINDS, DocumentType, Section
from hie_schemas.documents.builders import build_document, build_submission
from hie_schemas.documents.profiles import INTENDED_RECIPIENT_URL, RECIPIENTS_EXPRESSION
from hie_schemas.fhir import parse_resource
from hie_schemas.identifiers import PATIENT_KEY_SYSTEM, RRN_SYSTEM, patient_key_from_rrn

# --- accepted submissions --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(DocumentType))
def test_every_document_type_is_accepted_with_the_rrn_replaced_by_the_patient_key(kind: DocumentType) -> None:
    body = _body((kind,))
    sent_document, _ = _document_at(body)
    submission = _parse(body)

    key = patient_key_from_rrn(RRN, SECRET)
    assert submission.patient_key == key
    _assert_no_rrn(_stored_json(submission))
    assert submission.intended_recipients == (RECIPIENT,)
    [stored] = submission.documents
    assert stored.document_type is kind
    assert stored.created_at == CREATED
    assert stored.author_institution == AUTHOR
    assert stored.author_department == "0100"
    assert stored.studies == ()
    assert stored.document_id == sent_document["id"] == stored.document["id"]
    attachment = stored.document_reference["content"][0]["attachment"]
    assert attachment["url"] == f"Bundle/{stored.document_id}"
    assert attachment["contentType"] == "application/fhir+json"
    patient_key = {"system": PATIENT_KEY_SYSTEM, "value": key}
    assert stored.document_reference["subject"] == {"type": "Patient", "identifier": patient_key}
    patient = next(
        e["resource"] for e in stored.document["entry"] if e["resource"]["resourceType"] == "Patient"
    )
    assert patient["identifier"] == [{"use": "official", **patient_key}]
    assert patient["name"][0]["text"] == "홍길동"
    assert patient["birthDate"] == "1960-03-15"
    item = submission.submission_set["entry"][0]["item"]["reference"]
    assert item == f"DocumentReference/{stored.document_reference['id']}"
    assert not stored.document_reference["id"].startswith("urn:")
    for resource in (submission.submission_set, stored.document_reference, stored.document):
        parse_resource(resource)  # what the hub stores is still valid FHIR R4


def test_a_document_built_now_is_not_older_than_the_moment_it_was_built() -> None:
    before = datetime.now(UTC)
    document = build_document(DocumentType.REFERRAL, author_code=AUTHOR, author_name="의원", patient_rrn=RRN)
    body = build_submission([document], author_code=AUTHOR, patient_rrn=RRN, recipients=[RECIPIENT])
    assert before <= _parse(body).documents[0].created_at <= datetime.now(UTC)


def test_referral_with_imaging_studies_names_them_with_their_accession_numbers() -> None:
    submission = _parse(_body(studies=(CT, MR, CT)))
    assert submission.documents[0].studies == (CT, MR)


def test_imaging_report_carries_its_study() -> None:
    submission = _parse(_body((DocumentType.IMAGING_REPORT,), department="1600", studies=(CT,)))
    [report] = submission.documents
    assert report.studies == (CT,)
    assert report.author_department == "1600"


def test_one_submission_holds_several_documents_and_deduplicates_recipients() -> None:
    kinds = (DocumentType.REFERRAL, DocumentType.CARE_RECORD_SUMMARY, DocumentType.IMAGING_REPORT)
    submission = _parse(_body(kinds, recipients=(RECIPIENT, OTHER_RECIPIENT, RECIPIENT), studies=(CT,)))
    assert submission.intended_recipients == (RECIPIENT, OTHER_RECIPIENT)
    assert [d.document_type for d in submission.documents] == list(kinds)
    listed = [e["item"]["reference"] for e in submission.submission_set["entry"]]
    assert listed == [f"DocumentReference/{d.document_reference['id']}" for d in submission.documents]
    assert len({d.document_id for d in submission.documents}) == 3
    _assert_no_rrn(_stored_json(submission))


def test_input_is_left_alone_and_a_resubmission_keeps_its_document_ids() -> None:
    body = _body((DocumentType.RETURN, DocumentType.CARE_RECORD_SUMMARY))
    sent = copy.deepcopy(body)
    first, second = _parse(body), _parse(body)
    assert body == sent
    assert [d.document_id for d in first.documents] == [d.document_id for d in second.documents]


def test_a_document_without_department_and_with_a_patient_key_instead_of_an_rrn() -> None:
    body = _body(department=None)
    key = patient_key_from_rrn(RRN, SECRET)
    for entry in body["entry"]:
        _replace_rrn(entry, {"system": PATIENT_KEY_SYSTEM, "value": key})
    submission = _parse(body)
    assert submission.patient_key == key
    assert submission.documents[0].author_department is None


def _replace_rrn(node: Any, replacement: Json) -> None:
    if isinstance(node, dict):
        for name, child in node.items():
            if isinstance(child, dict) and child.get("system") == RRN_SYSTEM:
                node[name] = dict(replacement)
            else:
                _replace_rrn(child, replacement)
    elif isinstance(node, list):
        for i, child in enumerate(node):
            if isinstance(child, dict) and child.get("system") == RRN_SYSTEM:
                node[i] = dict(replacement)
            else:
                _replace_rrn(child, replacement)


def test_references_may_use_the_servers_absolute_urls() -> None:
    body = _body()
    document, _ = _document_at(body)
    reference, _ = _resource_of_transaction(body, "DocumentReference")
    reference["content"][0]["attachment"]["url"] = f"https://hub.example.kr/fhir/Bundle/{document['id']}"
    _bad_request(copy.deepcopy(body))
    submission = _parse(body, base_url="https://hub.example.kr/fhir/")
    assert submission.documents[0].document_reference["content"][0]["attachment"]["url"] == (
        f"Bundle/{document['id']}"
    )


# --- profile failures: 422 with every issue --------------------------------------------------------------


def _drop_section(section: Section) -> Callable[[Json], list[tuple[str, str]]]:
    def mutate(body: Json) -> list[tuple[str, str]]:
        composition, path = _resource(body, "Composition")
        composition["section"] = [
            s for s in composition["section"] if s["code"]["coding"][0]["code"] != section.value
        ]
        return [("required", f"{path}.section")]

    return mutate


def _empty_problems(body: Json) -> list[tuple[str, str]]:
    section, path = _section(body, Section.PROBLEMS)
    del section["entry"], section["text"]
    return [("required", path)]


def _icd10_condition(body: Json) -> list[tuple[str, str]]:
    condition, path = _resource(body, "Condition")
    condition["code"]["coding"][0]["system"] = ICD10_WHO
    return [("code-invalid", f"{path}.code")]


def _uncoded_condition(body: Json) -> list[tuple[str, str]]:
    condition, path = _resource(body, "Condition")
    del condition["code"]
    return [("required", f"{path}.code")]


def _unknown_medication_code(body: Json) -> list[tuple[str, str]]:
    medication, path = _resource(body, "MedicationStatement")
    medication["medicationCodeableConcept"]["coding"][0]["system"] = "http://example.org/drug-codes"
    return [("code-invalid", f"{path}.medicationCodeableConcept")]


def _observation_as_problem(body: Json) -> list[tuple[str, str]]:
    section, _ = _section(body, Section.PROBLEMS)
    observation, path = _resource(body, "Observation")
    section["entry"] = [{"reference": f"urn:uuid:{observation['id']}"}]
    return [("invalid", path)]


def _findings_without_reading(body: Json) -> list[tuple[str, str]]:
    section, path = _section(body, Section.IMAGING_FINDINGS)
    del section["text"]
    section["entry"] = [e for e in section["entry"] if "derivedFrom" not in _target(body, e)]
    return [("required", path)]


def _target(body: Json, reference: Json) -> Json:
    document, _ = _document_at(body)
    return next(e["resource"] for e in document["entry"] if e["fullUrl"] == reference["reference"])


def _composition_field(name: str, value: Any) -> Callable[[Json], list[tuple[str, str]]]:
    def mutate(body: Json) -> list[tuple[str, str]]:
        composition, path = _resource(body, "Composition")
        composition[name] = value
        return [("invalid", f"{path}.{name}")]

    return mutate


def _seven_digit_institution(body: Json) -> list[tuple[str, str]]:
    organization, path = _resource(body, "Organization")
    organization["identifier"][0]["value"] = AUTHOR[:7]
    return [("invalid", f"{path}.identifier")]


def _type_disagrees(body: Json) -> list[tuple[str, str]]:
    reference, path = _resource_of_transaction(body, "DocumentReference")
    summary = DOCUMENT_KINDS[DocumentType.CARE_RECORD_SUMMARY]
    reference["type"] = {"coding": [{"system": codes.TEMPLATE_SYSTEM, "code": summary.template_code}]}
    return [("invalid", f"{path}.type")]


def _recipient_without_krnpi(body: Json) -> list[tuple[str, str]]:
    submission_set, path = _resource_of_transaction(body, "List")
    submission_set["extension"][1]["valueReference"]["identifier"]["system"] = "urn:oid:1.2.410.100110.10"
    return [
        ("invalid", f"{path}.extension[1].valueReference.identifier"),
        ("required", f"{path}.extension.where(url='{INTENDED_RECIPIENT_URL}')"),
    ]


def _study_without_uid(body: Json) -> list[tuple[str, str]]:
    study, path = _resource(body, "ImagingStudy")
    study["identifier"] = [i for i in study["identifier"] if i.get("system") != codes.DICOM_UID]
    return [("required", f"{path}.identifier")]


def _patient_without_key(body: Json) -> list[tuple[str, str]]:
    patient, path = _resource(body, "Patient")
    patient["identifier"] = [{"system": "http://hospital.example.kr/mrn", "value": "MRN-004211"}]
    return [("required", f"{path}.identifier")]


def _no_recipient_and_no_problems(body: Json) -> list[tuple[str, str]]:
    body["entry"][0]["resource"]["extension"] = body["entry"][0]["resource"]["extension"][:1]
    return [
        ("required", f"Bundle.entry[0].resource.extension.where(url='{INTENDED_RECIPIENT_URL}')"),
        *_drop_section(Section.PROBLEMS)(body),
    ]


PROFILE_CASES: dict[str, tuple[DocumentType, Callable[[Json], list[tuple[str, str]]]]] = {
    "missing problems section": (DocumentType.REFERRAL, _drop_section(Section.PROBLEMS)),
    "care record summary without problems": (
        DocumentType.CARE_RECORD_SUMMARY,
        _drop_section(Section.PROBLEMS),
    ),
    "empty problems section": (DocumentType.REFERRAL, _empty_problems),
    "condition coded with WHO ICD-10": (DocumentType.RETURN, _icd10_condition),
    "condition without code": (DocumentType.CONSULT_REPLY, _uncoded_condition),
    "medication with an unknown code system": (DocumentType.TRANSFER_OPINION, _unknown_medication_code),
    "observation listed as a problem": (DocumentType.REFERRAL, _observation_as_problem),
    "imaging report without findings": (DocumentType.IMAGING_REPORT, _drop_section(Section.IMAGING_FINDINGS)),
    "findings without a reading": (DocumentType.IMAGING_REPORT, _findings_without_reading),
    "preliminary document": (DocumentType.CARE_RECORD_SUMMARY, _composition_field("status", "preliminary")),
    "date without timezone": (DocumentType.CARE_RECORD_SUMMARY, _composition_field("date", "2025-03-04")),
    "date in the future": (
        DocumentType.RETURN,
        _composition_field("date", (datetime.now(UTC) + timedelta(hours=1)).isoformat(timespec="seconds")),
    ),
    "seven-digit institution code": (DocumentType.REFERRAL, _seven_digit_institution),
    "DocumentReference.type disagrees": (DocumentType.REFERRAL, _type_disagrees),
    "recipient without 요양기관기호": (DocumentType.REFERRAL, _recipient_without_krnpi),
    "ImagingStudy without Study Instance UID": (DocumentType.REFERRAL, _study_without_uid),
    "Patient without RRN or patient key": (DocumentType.CARE_RECORD_SUMMARY, _patient_without_key),
    "two issues at once": (DocumentType.REFERRAL, _no_recipient_and_no_problems),
}


@pytest.mark.parametrize("case", list(PROFILE_CASES))
def test_profile_violations_are_all_reported_with_their_expressions(case: str) -> None:
    kind, mutate = PROFILE_CASES[case]
    body = _body((kind,), studies=(CT,))
    expected = mutate(body)
    assert _issues(body) == sorted(expected)


def test_referral_without_recipient() -> None:
    body = _body(recipients=())
    expression = RECIPIENTS_EXPRESSION.replace("List", "Bundle.entry[0].resource", 1)
    assert _issues(body) == [("required", expression)]


def test_issues_of_two_documents_are_collected_together() -> None:
    body = _body((DocumentType.REFERRAL, DocumentType.CARE_RECORD_SUMMARY))
    for n in range(2):
        document, _ = _document_at(body, n)
        document["entry"][0]["resource"]["status"] = "preliminary"
    expected = [("invalid", f"{_document_at(body, n)[1]}.entry[0].resource.status") for n in range(2)]
    assert _issues(body) == sorted(expected)


@pytest.mark.parametrize("kind", list(DocumentType))
def test_built_documents_conform_to_their_profile(kind: DocumentType) -> None:
    document = _document(kind, studies=(CT,))
    assert check_document(document, DOCUMENT_KINDS[kind], [RECIPIENT]) == []


def test_check_document_reads_untrusted_json_without_raising() -> None:
    referral = DOCUMENT_KINDS[DocumentType.REFERRAL]
    garbage: Json = {"resourceType": "Bundle", "type": "document", "entry": [{"resource": 3}, "x"]}
    assert [i.code for i in check_document(garbage, referral, [])] == ["required"]
    composition: Json = {"resourceType": "Composition", "type": [], "section": {"entry": 1}, "author": "x"}
    issues = check_document(
        {"resourceType": "Bundle", "type": "document", "entry": [{"resource": composition}]}, referral, []
    )
    assert {i.code for i in issues} == {"code-invalid", "invalid", "required"}
    assert all(i.expression for i in issues)
