"""Bad input gets a precise 4xx OperationOutcome and leaves nothing behind (design.md §7)."""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from hub_support import (
    SEVERANCE,
    SEVERANCE_CLINIC,
    SEVERANCE_CLINIC_2,
    SNUBH,
    Federation,
    refused,
    rrn_forms,
    submit,
)

from hie_schemas.codes import DocumentType
from hie_schemas.identifiers import RRN_SYSTEM

REFERRAL = DocumentType.REFERRAL
LIMIT = 10 * 1024 * 1024  # the platform's default body limit
Case = Callable[[Federation, str], Awaitable[httpx.Response]]
FHIR = {"Content-Type": "application/fhir+json"}


async def raw(fed: Federation, content: bytes | AsyncIterator[bytes], **headers: str) -> httpx.Response:
    return await fed.call(
        "POST", "severance", "", as_=SEVERANCE_CLINIC, content=content, headers=FHIR | headers
    )


def referral(rrn: str, **kw: Any) -> dict[str, Any]:
    return submit(REFERRAL, SEVERANCE_CLINIC, rrn, [SNUBH], **kw)


def document_of(body: dict[str, Any]) -> dict[str, Any]:
    return next(e["resource"] for e in body["entry"] if e["resource"]["resourceType"] == "Bundle")


async def malformed_json(fed: Federation, rrn: str) -> httpx.Response:
    return await raw(fed, b'{"resourceType": "Bundle", "type": ')


async def not_fhir(fed: Federation, rrn: str) -> httpx.Response:
    return await fed.publish("severance", SEVERANCE_CLINIC, {"hello": "world"})


async def wrong_resource_type(fed: Federation, rrn: str) -> httpx.Response:
    return await fed.publish("severance", SEVERANCE_CLINIC, {"resourceType": "Patient", "gender": "male"})


async def invalid_fhir(fed: Federation, rrn: str) -> httpx.Response:
    body = referral(rrn)
    document_of(body)["entry"][0]["resource"]["status"] = 42
    return await fed.publish("severance", SEVERANCE_CLINIC, body)


async def xml(fed: Federation, rrn: str) -> httpx.Response:
    return await raw(fed, b"<Bundle/>", **{"Content-Type": "application/fhir+xml"})


async def too_large(fed: Federation, rrn: str) -> httpx.Response:
    return await raw(fed, b" " * (LIMIT + 1))


async def too_large_streamed(fed: Federation, rrn: str) -> httpx.Response:
    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit applies as it arrives
        for _ in range(11):
            yield b" " * (1024 * 1024)

    return await raw(fed, chunks())


async def unknown_document_type(fed: Federation, rrn: str) -> httpx.Response:
    body = referral(rrn)
    composition = document_of(body)["entry"][0]["resource"]
    composition["type"] = {"coding": [{"system": "urn:oid:1.2.410.100110.40.2.1", "code": "99"}]}
    return await fed.publish("severance", SEVERANCE_CLINIC, body)


async def unknown_diagnosis_system(fed: Federation, rrn: str) -> httpx.Response:
    body = referral(rrn)
    for entry in document_of(body)["entry"]:
        if entry["resource"]["resourceType"] == "Condition":
            entry["resource"]["code"]["coding"][0]["system"] = "http://hl7.org/fhir/sid/icd-10"
    return await fed.publish("severance", SEVERANCE_CLINIC, body)


async def someone_elses_document(fed: Federation, rrn: str) -> httpx.Response:
    return await fed.publish(
        "severance", SEVERANCE_CLINIC, submit(REFERRAL, SEVERANCE_CLINIC_2, rrn, [SNUBH])
    )


async def unknown_recipient(fed: Federation, rrn: str) -> httpx.Response:
    return await fed.publish(
        "severance", SEVERANCE_CLINIC, submit(REFERRAL, SEVERANCE_CLINIC, rrn, ["99999999"])
    )


async def no_consent(fed: Federation, rrn: str) -> httpx.Response:
    fed.desk.withdraw(rrn)
    return await fed.publish("severance", SEVERANCE_CLINIC, referral(rrn))


async def strict_unknown_parameter(fed: Federation, rrn: str) -> httpx.Response:
    return await fed.call(
        "GET",
        "severance",
        "/DocumentReference",
        as_=SEVERANCE,
        headers={"Prefer": "handling=strict"},
        params={"patient.identifier": f"{RRN_SYSTEM}|{rrn}", "setting": rrn},
    )


async def empty_task_update(fed: Federation, rrn: str) -> httpx.Response:
    return await fed.call(
        "PUT", "severance", "/Task/no-such-task", as_=SEVERANCE, json={"resourceType": "Task"}
    )


CASES: dict[str, tuple[Case, int, str]] = {
    "malformed JSON": (malformed_json, 400, "not valid JSON"),
    "JSON that is not FHIR": (not_fhir, 400, "Bundle"),
    "wrong resourceType": (wrong_resource_type, 400, "Bundle"),
    "invalid FHIR element": (invalid_fhir, 400, "status"),
    "XML": (xml, 415, "application/fhir+json"),
    "body over the limit": (too_large, 413, "exceeds"),
    "streamed body over the limit": (too_large_streamed, 413, "exceeds"),
    "unknown document type code": (unknown_document_type, 422, "Composition.type"),
    "diagnosis outside KCD-8": (unknown_diagnosis_system, 422, "kostat-kcd-8"),
    "a document of another institution": (someone_elses_document, 403, SEVERANCE_CLINIC_2),
    "a non-participant recipient": (unknown_recipient, 422, "99999999"),
    "no consent": (no_consent, 403, "deny-withdrawn"),
    "unknown search parameter, strict": (strict_unknown_parameter, 400, "setting"),
    "invalid Task update": (empty_task_update, 400, "Task"),
}


async def clinical_rows(fed: Federation) -> str:
    tables = ("documents", "tasks", "submission_sets", "federated_grants", "webhook_deliveries")
    rows = [row for table in tables for row in await fed.hubs["severance"].rows(table)]
    return json.dumps(rows, default=str, sort_keys=True)


@pytest.mark.parametrize("case", list(CASES))
async def test_bad_input_is_refused_precisely_and_stores_nothing(
    federation: Federation, rrn: str, case: str
) -> None:
    fed = federation
    fed.desk.grant(rrn)
    make, status, mentioned = CASES[case]
    before = await clinical_rows(fed)
    response = await make(fed, rrn)
    diagnostics = refused(response, status)
    assert mentioned in diagnostics or mentioned in json.dumps(response.json()), diagnostics
    assert not any(form in response.text for form in rrn_forms(rrn))
    assert await clinical_rows(fed) == before


async def test_unknown_parameters_are_ignored_by_default(federation: Federation, rrn: str) -> None:
    fed = federation
    lenient = await fed.search("severance", SEVERANCE, rrn, setting="x", **{"foo.bar": "1"})
    assert lenient.status_code == 200
    links = " ".join(link["url"] for link in lenient.json()["link"])
    assert "setting" not in links
    assert "foo.bar" not in links


async def test_a_repeated_publish_is_answered_the_same_and_stored_once(
    federation: Federation, rrn: str
) -> None:
    fed = federation
    fed.desk.grant(rrn)
    body = referral(rrn)
    first = await fed.publish("severance", SEVERANCE_CLINIC, body)
    again = await fed.publish("severance", SEVERANCE_CLINIC, copy.deepcopy(body))
    assert first.status_code == again.status_code == 200, again.text
    assert again.json() == first.json()
    key = fed.desk.key(rrn)
    assert len([r for r in await fed.hubs["severance"].rows("documents") if r["patient_key"] == key]) == 1
    assert (
        len([r for r in await fed.hubs["severance"].rows("submission_sets") if r["patient_key"] == key]) == 1
    )
    assert len([r for r in await fed.hubs["severance"].rows("tasks") if r["patient_key"] == key]) == 1
