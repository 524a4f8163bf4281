"""ITI-65 submissions the hub cannot read: 400 without echoing the RRN, for any mutation."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from submissions import (
    AUTHOR,
    CT,
    OTHER_RRN,
    RECIPIENT,
    RRN,
    Json,
    _assert_no_rrn,
    _bad_request,
    _body,
    _document,
    _document_at,
    _parse,
    _resource,
    _resource_of_transaction,
    _section,
    _stored_json,
)

from hie_platform.errors import BadRequest, Unprocessable
from hie_schemas.codes import DocumentType, Section
from hie_schemas.documents.builders import build_submission

# --- malformed input: 400 ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body", [None, [], "Bundle", 42, {"resourceType": "Patient"}, {"resourceType": "Bundle"}]
)
def test_anything_but_a_bundle_is_refused(body: Any) -> None:
    _bad_request(body)


def test_a_batch_is_not_a_transaction() -> None:
    body = _body()
    body["type"] = "batch"
    assert _bad_request(body).issues[0].expression == ("Bundle.type",)


def test_attachment_pointing_nowhere() -> None:
    body = _body()
    reference, path = _resource_of_transaction(body, "DocumentReference")
    reference["content"][0]["attachment"]["url"] = "urn:uuid:00000000-0000-4000-8000-000000000000"
    assert _bad_request(body).issues[0].expression == (f"{path}.content[0].attachment.url",)


@pytest.mark.parametrize("value", [7, 3.5, True, None, {"reference": "Bundle/x"}])
def test_a_mistyped_attachment_url_is_a_bad_request(value: Any) -> None:
    # fhir_core trips with AttributeError on some of these; the client still gets a 400.
    body = _body()
    reference, path = _resource_of_transaction(body, "DocumentReference")
    reference["content"][0]["attachment"]["url"] = value
    assert _bad_request(body).issues[0].expression[0].startswith(path)


def test_invalid_rrn_is_refused_without_echoing_it() -> None:
    invalid = "601315-1520418"  # month 13
    body = build_submission(
        [_document(DocumentType.REFERRAL, patient_rrn=invalid)], author_code=AUTHOR, patient_rrn=invalid
    )
    error = _bad_request(body)
    outcome = json.dumps(error.operation_outcome(), ensure_ascii=False)
    assert invalid not in outcome
    assert invalid.replace("-", "") not in outcome
    assert "resident registration number" in error.diagnostics


def test_documents_about_different_patients_are_refused() -> None:
    documents = [
        _document(DocumentType.REFERRAL),
        _document(DocumentType.CARE_RECORD_SUMMARY, patient_rrn=OTHER_RRN),
    ]
    body = build_submission(documents, author_code=AUTHOR, patient_rrn=RRN, recipients=[RECIPIENT])
    _bad_request(copy.deepcopy(body))
    body["entry"][2]["resource"]["subject"]["identifier"]["value"] = (
        OTHER_RRN  # metadata agrees with each document
    )
    assert "same patient" in _bad_request(body).diagnostics


def test_fhir_validation_errors_do_not_echo_the_rrn() -> None:
    body = _body()
    patient, path = _resource(body, "Patient")
    patient["birthDate"] = RRN  # pydantic quotes the offending input value
    error = _bad_request(body)
    assert error.issues[0].expression == (path,)
    assert "birthDate" in error.diagnostics


def test_rrn_in_narrative_text_is_refused() -> None:
    body = _body()
    section, _ = _section(body, Section.REASON_FOR_REFERRAL)
    section["text"]["div"] = f'<div xmlns="http://www.w3.org/1999/xhtml">환자 주민번호 {RRN}</div>'
    assert "outside a Patient identifier" in _bad_request(body).diagnostics


def test_a_transaction_may_not_carry_other_resources() -> None:
    body = _body()
    patient, _ = _resource(body, "Patient")
    body["entry"].append({"fullUrl": "urn:uuid:5d0c6f0e-3d7b-4b53-9a56-2a8f2d1c0b11", "resource": patient})
    _bad_request(body)


def test_the_same_document_twice_in_one_submission_is_refused() -> None:
    document = _document(DocumentType.REFERRAL)
    body = build_submission([document, document], author_code=AUTHOR, patient_rrn=RRN, recipients=[RECIPIENT])
    assert "same Bundle.identifier" in _bad_request(body).diagnostics


def test_a_document_entry_that_is_not_an_object_is_refused() -> None:
    body = _body()
    document, path = _document_at(body)
    document["entry"].insert(1, "urn:uuid:0b9d3c1e-2f4a-4e4b-9f7e-0c6d5a4b3c2d")
    assert _bad_request(body).issues[0].expression == (path,)


def test_a_document_nobody_describes_is_refused() -> None:
    body = _body()
    document, _ = _document_at(body)
    body["entry"].append(
        {"fullUrl": "urn:uuid:1b8f1b0e-8d55-4c55-a3c4-56d1f0a3c2aa", "resource": copy.deepcopy(document)}
    )
    _bad_request(body)


# --- property: nothing but a FHIR error ever escapes ----------------------------------------------------


_TEMPLATE = _body((DocumentType.REFERRAL,), studies=(CT,))


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    return [prefix] + [p for key, child in children for p in _paths(child, (*prefix, key))]


_PATHS = [p for p in _paths(_TEMPLATE) if p]
_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.sampled_from(
        [RRN, "Bundle", "document", "transaction", "Composition", "urn:uuid:x", "11450-4", AUTHOR]
    ),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(
        st.sampled_from(["reference", "system", "value", "code"]), st.text(max_size=8), max_size=2
    ),
)


def _mutate(body: Json, path: tuple[Any, ...], delete: bool, value: Any) -> None:
    parent: Any = body
    for key in path[:-1]:
        try:
            parent = parent[key]
        except (KeyError, IndexError, TypeError):
            return
    if (isinstance(parent, dict) and path[-1] in parent) or (
        isinstance(parent, list) and isinstance(path[-1], int) and path[-1] < len(parent)
    ):
        if delete:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(_PATHS), st.booleans(), _VALUES), min_size=1, max_size=4))
def test_mutated_submissions_fail_only_with_fhir_errors(
    mutations: list[tuple[tuple[Any, ...], bool, Any]],
) -> None:
    body = copy.deepcopy(_TEMPLATE)
    for path, delete, value in mutations:
        _mutate(body, path, delete, value)
    try:
        submission = _parse(body)
    except (BadRequest, Unprocessable) as error:  # anything else fails the test
        _assert_no_rrn(json.dumps(error.operation_outcome(), ensure_ascii=False) + str(error))
    else:
        _assert_no_rrn(_stored_json(submission))
