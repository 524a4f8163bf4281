"""IHE MHD completeness: ITI-67 parameters and stable paging, ITI-66 SubmissionSets, replacement and
entered-in-error across hubs, and a CapabilityStatement that says exactly what the node does."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from hub_support import (
    CRS,
    REFERRAL,
    SEVERANCE,
    SEVERANCE_CLINIC,
    SEVERANCE_CLINIC_2,
    SNUBH,
    Federation,
    eventually,
    krnpi,
    located,
    matches,
    refused,
    rrn_forms,
    submit,
)

from hie_hub.core.capability import ACCEPTED
from hie_schemas.documents.builders import KST
from hie_schemas.fhir import parse_resource
from hie_schemas.identifiers import PATIENT_KEY_SYSTEM, RRN_SYSTEM


async def follow(fed: Federation, hub: str, as_: str, first: httpx.Response) -> list[list[str]]:
    """Every page of a search, following next links; the ids of each page."""
    pages: list[list[str]] = []
    response = first
    while True:
        pages.append([r["id"] for r in matches(response)])
        links = {link["relation"]: link["url"] for link in response.json().get("link", [])}
        if "next" not in links:
            return pages
        url = links["next"].removeprefix(fed.hubs[hub].fhir)
        response = await fed.call("GET", hub, url, as_=as_)


async def test_find_by_date_author_type_status_with_stable_pages(federation: Federation, rrn: str) -> None:
    fed = federation
    fed.desk.grant(rrn, at=datetime.now(UTC) - timedelta(days=60))
    now = datetime.now(KST)
    days: dict[int, str] = {}
    for ago in (10, 5, 1):
        body = submit(CRS, SEVERANCE_CLINIC, rrn, created_at=now - timedelta(days=ago))
        [days[ago]] = located(await fed.publish("severance", SEVERANCE_CLINIC, body), "DocumentReference")
    [referral] = located(
        await fed.publish(
            "severance", SEVERANCE_CLINIC, submit(REFERRAL, SEVERANCE_CLINIC, rrn, [SEVERANCE])
        ),
        "DocumentReference",
    )
    newest_first = [referral, days[1], days[5], days[10]]

    async def ids(**params: str) -> list[str]:
        return [r["id"] for r in matches(await fed.search("severance", SEVERANCE_CLINIC, rrn, **params))]

    assert await ids() == newest_first
    six_days_ago = (now - timedelta(days=6)).date().isoformat()
    assert await ids(date=f"ge{six_days_ago}") == [referral, days[1], days[5]]
    assert await ids(date=f"lt{six_days_ago}") == [days[10]]
    five_days_ago = (now - timedelta(days=5)).date().isoformat()
    assert await ids(date=five_days_ago) == [days[5]]  # a day is the range it names
    assert await ids(date=f"gt{five_days_ago}") == [referral, days[1]]
    month = (now - timedelta(days=5)).strftime("%Y-%m")
    assert set(await ids(date=month)) <= set(newest_first)
    window = await fed.call(
        "GET",
        "severance",
        "/DocumentReference",
        as_=SEVERANCE_CLINIC,
        params=[
            ("patient.identifier", f"{RRN_SYSTEM}|{rrn}"),
            ("date", f"ge{six_days_ago}"),
            ("date", f"le{(now - timedelta(days=2)).date().isoformat()}"),
        ],
    )
    assert [r["id"] for r in matches(window)] == [days[5]]
    assert await ids(type="urn:oid:1.2.410.100110.40.2.1|1") == [referral]
    assert await ids(status="current,superseded") == newest_first
    assert await ids(**{"author.identifier": krnpi(SEVERANCE_CLINIC)}) == newest_first
    assert await ids(author=SEVERANCE) == []

    # The hub hospital sees only what was addressed to it, and finds it by its author.
    hospital = await fed.search("severance", SEVERANCE, rrn, **{"author:identifier": krnpi(SEVERANCE_CLINIC)})
    assert [r["id"] for r in matches(hospital)] == [referral]

    # Pages of two, followed by their next links: all documents, each once, newest first; a document
    # published between two pages does not shift the pages that follow.
    first = await fed.search("severance", SEVERANCE_CLINIC, rrn, _count="2")
    assert first.json()["total"] == 4
    next_url = next(link["url"] for link in first.json()["link"] if link["relation"] == "next")
    assert not any(form in next_url for form in rrn_forms(rrn))
    assert PATIENT_KEY_SYSTEM in httpx.URL(next_url).params["patient.identifier"]
    await fed.publish("severance", SEVERANCE_CLINIC, submit(CRS, SEVERANCE_CLINIC, rrn))
    pages = await follow(fed, "severance", SEVERANCE_CLINIC, first)
    assert pages == [newest_first[:2], newest_first[2:]]

    for bad in ({"date": "sa2025-01-01"}, {"date": "2025-13-45"}, {"_cursor": "not-a-cursor"}):
        refused(await fed.search("severance", SEVERANCE_CLINIC, rrn, **bad), 400)
    refused(await fed.search("severance", SEVERANCE_CLINIC, rrn, author="1234"), 400)


async def test_submission_sets_are_found_with_iti_66(federation: Federation, rrn: str) -> None:
    fed = federation
    fed.desk.grant(rrn)
    published = await fed.publish(
        "severance", SEVERANCE_CLINIC, submit(REFERRAL, SEVERANCE_CLINIC, rrn, [SEVERANCE])
    )
    [list_id], [doc_id] = located(published, "List"), located(published, "DocumentReference")
    assert (
        published.json()["entry"][0]["response"]["location"] == f"List/{list_id}/_history/1"
    )  # request order

    async def lists(as_: str, **params: str) -> list[dict[str, Any]]:
        response = await fed.call(
            "GET",
            "severance",
            "/List",
            as_=as_,
            params={"patient.identifier": f"{RRN_SYSTEM}|{rrn}", **params},
        )
        return matches(response)

    [by_author] = await lists(SEVERANCE_CLINIC)
    parse_resource(by_author, "List")
    assert by_author["id"] == list_id
    assert by_author["entry"] == [{"item": {"reference": f"DocumentReference/{doc_id}"}}]
    assert by_author["subject"]["identifier"]["system"] == PATIENT_KEY_SYSTEM
    assert not any(form in str(by_author) for form in rrn_forms(rrn))
    assert [x["id"] for x in await lists(SEVERANCE, code="submissionset")] == [list_id]  # the recipient
    assert await lists(SEVERANCE_CLINIC_2) == []  # neither author nor recipient
    assert await lists(SEVERANCE_CLINIC, code="folder") == []
    identifier = by_author["identifier"][0]
    assert [x["id"] for x in await lists(SEVERANCE_CLINIC, identifier=identifier["value"])] == [list_id]
    assert await lists(SEVERANCE_CLINIC, identifier="urn:uuid:00000000-0000-0000-0000-000000000000") == []
    read = await fed.call("GET", "severance", f"/List/{list_id}", as_=SEVERANCE)
    assert read.status_code == 200
    assert read.json()["id"] == list_id
    refused(await fed.call("GET", "severance", f"/List/{list_id}", as_=SEVERANCE_CLINIC_2), 404)
    # Once the patient withdraws, the recipient no longer sees the List (its only entry is withheld).
    fed.desk.withdraw(rrn)
    assert await lists(SEVERANCE) == []
    assert [x["id"] for x in await lists(SEVERANCE_CLINIC)] == [list_id]


async def status_at(fed: Federation, hub: str, as_: str, doc_id: str, status: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        response = await fed.call("GET", hub, f"/DocumentReference/{doc_id}", as_=as_)
        body: dict[str, Any] = response.json()
        return body if response.status_code == 200 and body["status"] == status else None

    return await eventually(check, f"DocumentReference/{doc_id} {status} at {hub}")


async def test_a_replacement_supersedes_the_original_at_every_hub(federation: Federation, rrn: str) -> None:
    fed = federation
    fed.desk.grant(rrn)
    [old] = located(
        await fed.publish("severance", SEVERANCE_CLINIC, submit(REFERRAL, SEVERANCE_CLINIC, rrn, [SNUBH])),
        "DocumentReference",
    )
    await status_at(fed, "snubh", SNUBH, old, "current")
    replacement = submit(REFERRAL, SEVERANCE_CLINIC, rrn, [SNUBH], relates_to=[("replaces", old)])
    [new] = located(await fed.publish("severance", SEVERANCE_CLINIC, replacement), "DocumentReference")

    superseded = await status_at(fed, "severance", SEVERANCE_CLINIC, old, "superseded")
    parse_resource(superseded, "DocumentReference")
    current = matches(await fed.search("severance", SEVERANCE_CLINIC, rrn, status="current"))
    assert [r["id"] for r in current] == [new]
    [stored_new] = current
    assert stored_new["relatesTo"] == [
        {"code": "replaces", "target": {"reference": f"DocumentReference/{old}"}}
    ]
    # The copy delivered to SNUBH is superseded too, and the replacement arrived there as well.
    await status_at(fed, "snubh", SNUBH, old, "superseded")
    await status_at(fed, "snubh", SNUBH, new, "current")

    again = submit(REFERRAL, SEVERANCE_CLINIC, rrn, [SNUBH], relates_to=[("replaces", old)])
    assert "superseded" in refused(await fed.publish("severance", SEVERANCE_CLINIC, again), 409)
    unknown = submit(CRS, SEVERANCE_CLINIC, rrn, relates_to=[("replaces", "no-such-document")])
    refused(await fed.publish("severance", SEVERANCE_CLINIC, unknown), 422)
    not_theirs = submit(CRS, SEVERANCE_CLINIC_2, rrn, relates_to=[("replaces", new)])
    refused(await fed.publish("severance", SEVERANCE_CLINIC_2, not_theirs), 422)
    # Nothing of the refused submissions was kept.
    assert len(matches(await fed.search("severance", SEVERANCE_CLINIC, rrn))) == 2


async def test_the_author_marks_a_document_entered_in_error(federation: Federation, rrn: str) -> None:
    fed = federation
    fed.desk.grant(rrn)
    [doc_id] = located(
        await fed.publish("severance", SEVERANCE_CLINIC, submit(REFERRAL, SEVERANCE_CLINIC, rrn, [SNUBH])),
        "DocumentReference",
    )
    delivered = await status_at(fed, "snubh", SNUBH, doc_id, "current")
    reference = (
        await fed.call("GET", "severance", f"/DocumentReference/{doc_id}", as_=SEVERANCE_CLINIC)
    ).json()
    wrong = {**reference, "status": "entered-in-error"}

    async def put(hub: str, as_: str, body: dict[str, Any]) -> httpx.Response:
        return await fed.call("PUT", hub, f"/DocumentReference/{doc_id}", as_=as_, json=body)

    refused(await put("severance", SEVERANCE_CLINIC_2, wrong), 404)  # not visible to it at all
    refused(await put("snubh", SNUBH, {**delivered, "status": "entered-in-error"}), 403)  # a recipient
    assert "description" in refused(
        await put("severance", SEVERANCE_CLINIC, {**wrong, "description": "x"}), 422
    )
    refused(await put("severance", SEVERANCE_CLINIC, {**reference, "status": "superseded"}), 422)
    refused(await put("severance", SEVERANCE_CLINIC, {**wrong, "id": "other"}), 400)
    changed = await put("severance", SEVERANCE_CLINIC, wrong)
    assert changed.status_code == 200, changed.text
    assert changed.json()["status"] == "entered-in-error"
    assert (await put("severance", SEVERANCE_CLINIC, wrong)).json() == changed.json()  # repeated: the same
    found = matches(await fed.search("severance", SEVERANCE_CLINIC, rrn, status="entered-in-error"))
    assert [r["id"] for r in found] == [doc_id]
    await status_at(fed, "snubh", SNUBH, doc_id, "entered-in-error")


async def test_the_capability_statement_says_what_the_node_does(federation: Federation, rrn: str) -> None:
    fed = federation
    response = await fed.call("GET", "severance", "/metadata", as_=None)
    statement = response.json()
    parse_resource(statement, "CapabilityStatement")
    [rest] = statement["rest"]
    openapi = (await fed.http.get(f"{fed.hubs['severance'].running.url}/openapi.json")).json()
    routes = {(method.upper(), path) for path, item in openapi["paths"].items() for method in item}
    paths = {
        "read": ("GET", "/fhir/{type}/{id}"),
        "update": ("PUT", "/fhir/{type}/{id}"),
        "delete": ("DELETE", "/fhir/{type}/{id}"),
        "create": ("POST", "/fhir/{type}"),
        "search-type": ("GET", "/fhir/{type}"),
    }
    for resource in rest["resource"]:
        for interaction in resource["interaction"]:
            method, template = paths[interaction["code"]]
            path = template.replace("{type}", resource["type"])
            wanted = {
                (method, path.replace("{id}", name))
                for name in ("{document_id}", "{task_id}", "{list_id}", "{subscription_id}", "{study_id}")
            }
            assert routes & wanted, f"{resource['type']} {interaction['code']} is advertised but not routed"
        declared = {p["name"] for p in resource.get("searchParam", [])}
        if resource["type"] in ACCEPTED:
            table, accepted = ACCEPTED[resource["type"]]
            assert declared == set(table) == accepted
    assert ("POST", "/fhir") in routes
    assert ("POST", "/fhir/$generate-crs") in routes
    definition = await fed.call("GET", "severance", "/OperationDefinition/generate-crs", as_=None)
    parse_resource(definition.json(), "OperationDefinition")
    # Every advertised DocumentReference parameter is accepted under strict handling.
    fed.desk.grant(rrn)
    strict = await fed.call(
        "GET",
        "severance",
        "/DocumentReference",
        as_=SEVERANCE_CLINIC,
        headers={"Prefer": "handling=strict"},
        params={
            "patient.identifier": f"{RRN_SYSTEM}|{rrn}",
            "type": "34133-9",
            "status": "current",
            "date": "ge2020-01-01",
            "author": SEVERANCE_CLINIC,
            "_count": "5",
        },
    )
    assert strict.status_code == 200, strict.text
