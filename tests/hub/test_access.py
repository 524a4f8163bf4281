"""Who may call a hub and what bad requests get: tokens, hubs, authors, recipients, parameters, Tasks."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from hub_support import (
    SEVERANCE,
    SEVERANCE_CLINIC,
    SEVERANCE_CLINIC_2,
    SNUBH,
    SNUBH_CLINIC,
    Federation,
    krnpi,
)

from hie_hub.core.bundles import created_tasks
from hie_schemas import codes
from hie_schemas.codes import DocumentType
from hie_schemas.documents.builders import build_document, build_submission
from hie_schemas.fhir import parse_resource
from hie_schemas.identifiers import RRN_SYSTEM


def submission(kind: DocumentType, author: str, rrn: str, recipients: list[str]) -> dict[str, Any]:
    doc = build_document(
        kind,
        author_code=author,
        author_name="의원",
        patient_rrn=rrn,
        recipient_code=recipients[0] if recipients else None,
    )
    return build_submission([doc], author_code=author, patient_rrn=rrn, recipients=recipients)


def referral(author: str, rrn: str, recipient: str = SNUBH) -> dict[str, Any]:
    return submission(DocumentType.REFERRAL, author, rrn, [recipient])


def outcome(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    return " ".join(issue["diagnostics"] for issue in body["issue"])


async def test_metadata_describes_the_node_without_a_token(federation: Federation) -> None:
    response = await federation.http.get(f"{federation.hubs['severance'].fhir}/metadata")
    assert response.status_code == 200
    statement = response.json()
    parse_resource(statement, "CapabilityStatement")
    resources = {r["type"]: r for r in statement["rest"][0]["resource"]}
    assert set(resources) == {
        "DocumentReference",
        "Bundle",
        "List",
        "Task",
        "ImagingStudy",
        "Subscription",
        "AuditEvent",
    }
    assert {p["name"] for p in resources["DocumentReference"]["searchParam"]} >= {
        "patient.identifier",
        "type",
        "status",
        "date",
        "author",
        "_count",
        "_federated",
    }
    assert {i["code"] for i in resources["Task"]["interaction"]} == {"read", "update", "search-type"}
    assert statement["rest"][0]["interaction"] == [
        {"code": "transaction", "documentation": "ITI-65 Provide Document Bundle"}
    ]


async def test_no_token_is_401(federation: Federation, rrn: str) -> None:
    fed = federation
    assert "bearer token" in outcome(
        await fed.call("POST", "severance", "", as_=None, json=referral(SEVERANCE_CLINIC, rrn)), 401
    )
    outcome(
        await fed.call(
            "GET",
            "severance",
            "/DocumentReference",
            as_=None,
            params={"patient.identifier": f"{RRN_SYSTEM}|{rrn}"},
        ),
        401,
    )
    outcome(await fed.call("GET", "severance", "/Task", as_=None), 401)
    bad = await fed.call("GET", "severance", "/Task", as_=None, headers={"Authorization": "Bearer not-a-jwt"})
    outcome(bad, 401)


async def test_clinic_of_another_hub_is_refused(federation: Federation, rrn: str) -> None:
    fed = federation
    fed.desk.grant(rrn)
    refused = await fed.publish("severance", SNUBH_CLINIC, referral(SNUBH_CLINIC, rrn, SEVERANCE))
    assert "snubh" in outcome(refused, 403)
    outcome(await fed.search("severance", SNUBH_CLINIC, rrn), 403)
    assert await fed.patient_rows("severance", fed.desk.key(rrn)) == []


async def test_publishing_someone_elses_document_is_refused(federation: Federation, rrn: str) -> None:
    fed = federation
    fed.desk.grant(rrn)
    refused = await fed.publish("severance", SEVERANCE_CLINIC_2, referral(SEVERANCE_CLINIC, rrn))
    assert SEVERANCE_CLINIC in outcome(refused, 403)
    assert await fed.patient_rows("severance", fed.desk.key(rrn)) == []


@pytest.mark.parametrize(
    ("recipient", "reason"),
    [("11309999", "unknown to the registry"), ("99000001", "belongs to no hub")],
)
async def test_recipient_must_be_a_participant_of_a_hub(
    federation: Federation, rrn: str, recipient: str, reason: str
) -> None:
    fed = federation
    fed.desk.grant(rrn)
    diagnostics = outcome(
        await fed.publish("severance", SEVERANCE_CLINIC, referral(SEVERANCE_CLINIC, rrn, recipient)), 422
    )
    assert recipient in diagnostics
    assert reason in diagnostics
    assert await fed.patient_rows("severance", fed.desk.key(rrn)) == []


async def test_bad_bodies_get_operation_outcomes(federation: Federation) -> None:
    fed = federation
    malformed = await fed.call(
        "POST",
        "severance",
        "",
        as_=SEVERANCE_CLINIC,
        content=b'{"resourceType": "Bundle",',
        headers={"Content-Type": "application/fhir+json"},
    )
    assert "not valid JSON" in outcome(malformed, 400)
    outcome(
        await fed.call(
            "POST",
            "severance",
            "",
            as_=SEVERANCE_CLINIC,
            content=b"<Bundle/>",
            headers={"Content-Type": "application/fhir+xml"},
        ),
        415,
    )
    outcome(await fed.call("POST", "severance", "", as_=SEVERANCE_CLINIC, json=[1, 2]), 400)


async def test_a_summary_without_recipients_is_stored_for_its_author_only(
    federation: Federation, rrn: str
) -> None:
    fed = federation
    published = await fed.publish(
        "severance", SEVERANCE_CLINIC, submission(DocumentType.CARE_RECORD_SUMMARY, SEVERANCE_CLINIC, rrn, [])
    )
    assert published.status_code == 200, published.text
    locations = [e["response"]["location"] for e in published.json()["entry"]]
    assert not [loc for loc in locations if loc.startswith("Task/")]
    assert not created_tasks(published.json())
    [doc_id] = [loc.split("/")[1] for loc in locations if loc.startswith("DocumentReference/")]
    own = await fed.search("severance", SEVERANCE_CLINIC, rrn)
    assert [e["resource"]["id"] for e in own.json()["entry"]] == [doc_id]
    # Another clinic of the same hub neither finds nor reads it.
    assert (await fed.search("severance", SEVERANCE_CLINIC_2, rrn)).json()["total"] == 0
    outcome(await fed.call("GET", "severance", f"/Bundle/{doc_id}", as_=SEVERANCE_CLINIC_2), 404)
    outcome(await fed.call("GET", "severance", f"/DocumentReference/{doc_id}", as_=SEVERANCE_CLINIC_2), 404)
    outcome(await fed.call("GET", "severance", "/Bundle/no-such-document", as_=SEVERANCE_CLINIC), 404)


async def test_search_parameters(federation: Federation, rrn: str) -> None:
    fed = federation
    fed.desk.grant(rrn)
    for body in (
        referral(SEVERANCE_CLINIC, rrn),
        submission(DocumentType.CARE_RECORD_SUMMARY, SEVERANCE_CLINIC, rrn, []),
    ):
        assert (await fed.publish("severance", SEVERANCE_CLINIC, body)).status_code == 200
    everything = await fed.search("severance", SEVERANCE_CLINIC, rrn)
    assert everything.json()["total"] == 2

    def types(response: httpx.Response) -> list[str]:
        return [e["resource"]["type"]["coding"][0]["code"] for e in response.json()["entry"]]

    by_template = await fed.search("severance", SEVERANCE_CLINIC, rrn, type=f"{codes.TEMPLATE_SYSTEM}|1")
    assert types(by_template) == ["1"]
    by_loinc = await fed.search("severance", SEVERANCE_CLINIC, rrn, type="34133-9")
    assert types(by_loinc) == ["4"]
    counted = await fed.search("severance", SEVERANCE_CLINIC, rrn, _count="1")
    assert (counted.json()["total"], len(counted.json()["entry"])) == (2, 1)
    assert (await fed.search("severance", SEVERANCE_CLINIC, rrn, status="superseded")).json()["total"] == 0
    by_key = await fed.call(
        "GET",
        "severance",
        "/DocumentReference",
        as_=SEVERANCE_CLINIC,
        params={"patient.identifier": f"https://hie-federation.kr/fhir/sid/patient-key|{fed.desk.key(rrn)}"},
    )
    assert by_key.json()["total"] == 2

    # Unknown parameters are ignored (FHIR's lenient default) unless the client asks for strict handling.
    lenient = await fed.search("severance", SEVERANCE_CLINIC, rrn, facility="x")
    assert lenient.json()["total"] == 2
    strict = await fed.call(
        "GET",
        "severance",
        "/DocumentReference",
        as_=SEVERANCE_CLINIC,
        headers={"Prefer": "handling=strict"},
        params={"patient.identifier": f"{RRN_SYSTEM}|{rrn}", "facility": "x"},
    )
    assert "facility" in outcome(strict, 400)
    outcome(await fed.call("GET", "severance", "/DocumentReference", as_=SEVERANCE_CLINIC), 400)
    bad_rrn = await fed.call(
        "GET",
        "severance",
        "/DocumentReference",
        as_=SEVERANCE_CLINIC,
        params={"patient.identifier": f"{RRN_SYSTEM}|991399-1234567"},
    )
    assert "991399" not in outcome(bad_rrn, 400)
    outcome(await fed.search("severance", SEVERANCE_CLINIC, rrn, _count="many"), 400)


async def test_only_the_owner_moves_a_task_along_the_workflow(federation: Federation, rrn: str) -> None:
    fed = federation
    fed.desk.grant(rrn)
    published = await fed.publish("severance", SEVERANCE_CLINIC, referral(SEVERANCE_CLINIC, rrn))
    [task_id] = created_tasks(published.json())
    task = await fed.task_arrives("snubh", SNUBH, task_id, "received")

    async def put(hub: str, as_: str, **changes: Any) -> httpx.Response:
        return await fed.call("PUT", hub, f"/Task/{task_id}", as_=as_, json={**task, **changes})

    # The requester sees its Task (at its hub) but cannot move it; an outsider does not see it at all.
    assert (await fed.call("GET", "severance", f"/Task/{task_id}", as_=SEVERANCE_CLINIC)).status_code == 200
    outcome(await put("severance", SEVERANCE_CLINIC, status="accepted"), 403)
    outcome(await fed.call("GET", "snubh", f"/Task/{task_id}", as_=SNUBH_CLINIC), 404)
    outcome(await fed.call("GET", "snubh", "/Task", as_=SNUBH_CLINIC, params={"owner": krnpi(SNUBH)}), 403)
    # Only requested/received → accepted | rejected, accepted → completed.
    assert "received to completed" in outcome(await put("snubh", SNUBH, status="completed"), 409)
    outcome(await put("snubh", SNUBH, status="cancelled"), 409)
    outcome(await put("snubh", SNUBH, status="accepted", id="another-id"), 400)
    assert (await put("snubh", SNUBH, status="accepted")).status_code == 200
    assert (await put("snubh", SNUBH, status="accepted")).status_code == 200  # a repeated PUT changes nothing
    outcome(await put("snubh", SNUBH, status="rejected"), 409)
    foreign_output = [{"type": {"text": "note"}, "valueReference": {"reference": "DocumentReference/nope"}}]
    outcome(await put("snubh", SNUBH, status="completed", output=foreign_output), 422)
    assert [t["id"] for t in await fed.inbox("snubh", SNUBH, status="accepted") if t["id"] == task_id] == [
        task_id
    ]
    await fed.task_status("severance", SEVERANCE_CLINIC, task_id, "accepted")
    # The requester lists what it sent; the FHIR :identifier modifier is understood too.
    sent = await fed.call(
        "GET",
        "severance",
        "/Task",
        as_=SEVERANCE_CLINIC,
        headers={"Prefer": "handling=strict"},
        params={"requester:identifier": krnpi(SEVERANCE_CLINIC), "status": "accepted"},
    )
    assert task_id in [e["resource"]["id"] for e in sent.json()["entry"]]
