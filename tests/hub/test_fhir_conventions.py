"""What an off-the-shelf FHIR client expects of the hub (issue 14, points 1-7): versions and ETags,
JSON only (406 for XML), attachment size and hash, one response entry per request entry, search
totals and _summary=count, entered-in-error documents, and a walk-in search that sees the hub's own
just-published documents. Real hubs, registry and nats-server (tests/hub/conftest.py)."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from typing import Any

import httpx
from hub_support import (
    AGENCY_CLIENT,
    CRS,
    REFERRAL,
    SEVERANCE,
    SEVERANCE_CLINIC,
    SEVERANCE_CLINIC_2,
    SNUBH,
    STRICT,
    Federation,
    eventually,
    located,
    matches,
    outcomes,
    refused,
    submit,
)

from hie_hub.core.bundles import CREATED_TASK_EXTENSION
from hie_schemas.fhir import parse_resource
from hie_schemas.identifiers import RRN_SYSTEM


def canonical_sha1(resource: Any) -> tuple[int, str]:
    """size and hash (base64 SHA-1) of a document's canonical JSON, as a client computes them."""
    body = json.dumps(resource, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return len(body), base64.b64encode(hashlib.sha1(body).digest()).decode()


def attachment(body: dict[str, Any]) -> dict[str, Any]:
    """The DocumentReference's attachment in an ITI-65 transaction (builder order: List, DocRef, doc)."""
    reference = next(
        e["resource"] for e in body["entry"] if e["resource"]["resourceType"] == "DocumentReference"
    )
    found: dict[str, Any] = reference["content"][0]["attachment"]
    return found


def document_of(body: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = next(
        e["resource"] for e in body["entry"] if e["resource"].get("type") == "document"
    )
    return found


async def test_reads_carry_versions_and_updates_honour_if_match(federation: Federation, rrn: str) -> None:
    """Point 1: meta.versionId/lastUpdated, ETag and Last-Modified on reads of DocumentReference,
    Bundle and Task; If-None-Match answers 304; If-Match on PUT answers 412 when stale; the version
    moves with every change; the transaction-response names Type/id/_history/n with its etag."""
    fed = federation
    fed.desk.grant(rrn)
    published = await fed.publish(
        "severance", SEVERANCE_CLINIC, submit(REFERRAL, SEVERANCE_CLINIC, rrn, [SNUBH])
    )
    [doc_id], [task_id] = located(published, "DocumentReference"), located(published, "Task")
    for entry in published.json()["entry"]:
        assert (entry["response"]["location"][-11:], entry["response"]["etag"]) == ("/_history/1", 'W/"1"')

    async def read(path: str, **headers: str) -> httpx.Response:
        return await fed.call("GET", "severance", path, as_=SEVERANCE_CLINIC, headers=headers)

    for path in (f"/DocumentReference/{doc_id}", f"/Bundle/{doc_id}", f"/Task/{task_id}"):
        first = await read(path)
        assert first.status_code == 200, first.text
        # The requester's Task copy may already have moved (received) when it is read.
        version = first.json()["meta"]["versionId"]
        assert version == "1" or path.startswith("/Task/"), path
        assert first.headers["etag"] == f'W/"{version}"', path
        assert first.headers["last-modified"].endswith(" GMT")
        assert first.json()["meta"]["lastUpdated"]
        unchanged = await read(path, **{"If-None-Match": f'W/"{version}"'})
        assert unchanged.status_code == 304, unchanged.text
        assert (unchanged.content, (await read(path, **{"If-None-Match": 'W/"99"'})).status_code) == (
            b"",
            200,
        )

    reference = (await read(f"/DocumentReference/{doc_id}")).json()
    wrong = {**reference, "status": "entered-in-error"}
    stale = await fed.call(
        "PUT",
        "severance",
        f"/DocumentReference/{doc_id}",
        as_=SEVERANCE_CLINIC,
        json=wrong,
        headers={"If-Match": 'W/"7"'},
    )
    assert "version 1" in refused(stale, 412)
    assert (await read(f"/DocumentReference/{doc_id}")).json()["status"] == "current"  # nothing changed
    changed = await fed.call(
        "PUT",
        "severance",
        f"/DocumentReference/{doc_id}",
        as_=SEVERANCE_CLINIC,
        json=wrong,
        headers={"If-Match": 'W/"1"'},
    )
    assert changed.status_code == 200, changed.text
    assert changed.headers["etag"] == 'W/"2"'
    assert changed.json()["meta"]["versionId"] == "2"
    assert changed.json()["status"] == "entered-in-error"
    after = await read(f"/DocumentReference/{doc_id}", **{"If-None-Match": 'W/"1"'})
    assert after.status_code == 200
    assert after.headers["etag"] == 'W/"2"'
    assert (await read(f"/Bundle/{doc_id}")).headers["etag"] == 'W/"1"'  # the document itself never changes


async def test_a_task_update_honours_if_match(federation: Federation, rrn: str) -> None:
    """Point 1 for Task: the owner's copy (received when it arrived) moves to accepted only at the
    version it names (412 otherwise), and the answer carries the new version."""
    fed = federation
    task_id = await fed.referral_received(rrn)
    at_owner = await fed.call("GET", "snubh", f"/Task/{task_id}", as_=SNUBH)
    version = int(at_owner.json()["meta"]["versionId"])
    assert at_owner.headers["etag"] == f'W/"{version}"'
    accepted = {**at_owner.json(), "status": "accepted"}
    put = f"/Task/{task_id}"
    stale_task = await fed.call(
        "PUT", "snubh", put, as_=SNUBH, json=accepted, headers={"If-Match": f'W/"{version + 5}"'}
    )
    refused(stale_task, 412)
    moved = await fed.call(
        "PUT", "snubh", put, as_=SNUBH, json=accepted, headers={"If-Match": f'W/"{version}"'}
    )
    assert moved.status_code == 200, moved.text
    assert moved.headers["etag"] == f'W/"{version + 1}"'
    assert moved.json()["meta"]["versionId"] == str(version + 1)
    parse_resource(moved.json(), "Task")


async def test_json_only_and_the_general_parameters(federation: Federation, rrn: str) -> None:
    """Point 2: XML (Accept or _format) is 406 with a JSON OperationOutcome; _format=json and _pretty
    are accepted on every interaction, also under Prefer: handling=strict."""
    fed = federation
    fed.desk.grant(rrn)
    [doc_id] = located(
        await fed.publish("severance", SEVERANCE_CLINIC, submit(CRS, SEVERANCE_CLINIC, rrn)),
        "DocumentReference",
    )
    for headers, params in (
        ({"Accept": "application/fhir+xml"}, {}),
        ({"Accept": "application/xml, text/xml"}, {}),
        ({}, {"_format": "xml"}),
        ({}, {"_format": "application/fhir+xml"}),
    ):
        for path in ("/metadata", f"/DocumentReference/{doc_id}"):
            response = await fed.call(
                "GET", "severance", path, as_=SEVERANCE_CLINIC, headers=headers, params=params
            )
            assert "JSON only" in refused(response, 406), (path, headers, params)
    search = {"patient.identifier": f"{RRN_SYSTEM}|{rrn}"}
    refused(
        await fed.call(
            "GET", "severance", "/DocumentReference", as_=SEVERANCE_CLINIC, params=search | {"_format": "xml"}
        ),
        406,
    )
    xml = {"Accept": "application/fhir+xml"}
    for method, path, as_ in (
        ("GET", "/ImagingStudy/any", SEVERANCE_CLINIC),
        ("GET", "/Task", SEVERANCE_CLINIC),
        ("POST", "/$generate-crs", SEVERANCE_CLINIC),
        ("GET", "/AuditEvent", AGENCY_CLIENT),
    ):
        refused(await fed.call(method, "severance", path, as_=as_, headers=xml), 406)
    general = {"_format": "json", "_pretty": "true"}
    for path, params in (
        ("/DocumentReference", search | general),
        ("/DocumentReference", search | {"_format": "application/fhir+json"}),
        (f"/DocumentReference/{doc_id}", general),
        (f"/Bundle/{doc_id}", general),
        ("/Task", general),
        ("/Subscription", general),
        ("/metadata", general),
    ):
        for accept in ("application/fhir+json", "application/json", "*/*"):
            response = await fed.call(
                "GET",
                "severance",
                path,
                as_=SEVERANCE_CLINIC,
                params=params,
                headers=STRICT | {"Accept": accept},
            )
            assert response.status_code == 200, (path, response.text)
            assert response.headers["content-type"].startswith("application/fhir+json")
    statement = (await fed.call("GET", "severance", "/metadata", as_=None)).json()
    assert "xml" not in " ".join(statement["format"])


async def test_attachment_size_and_hash_are_checked_and_returned(federation: Federation, rrn: str) -> None:
    """Point 3: a size or hash that does not describe the document is 422 naming the entry, and
    nothing is stored; right ones are accepted; a read returns the size and hash of the bytes ITI-68
    serves."""
    fed = federation
    fed.desk.grant(rrn)
    body = submit(CRS, SEVERANCE_CLINIC, rrn)
    size, digest = canonical_sha1(document_of(body))
    for bad in ({"size": size + 1}, {"hash": base64.b64encode(hashlib.sha1(b"other").digest()).decode()}):
        wrong = copy.deepcopy(body)
        attachment(wrong).update(bad)
        response = await fed.publish("severance", SEVERANCE_CLINIC, wrong)
        message = refused(response, 422)
        [element] = bad
        assert f"attachment.{element}" in message
        [issue] = response.json()["issue"]
        assert issue["expression"] == [f"Bundle.entry[1].resource.content[0].attachment.{element}"]
    assert matches(await fed.search("severance", SEVERANCE_CLINIC, rrn)) == []  # nothing was stored
    right = copy.deepcopy(body)
    attachment(right).update(size=size, hash=digest)
    [doc_id] = located(await fed.publish("severance", SEVERANCE_CLINIC, right), "DocumentReference")

    served = await fed.call("GET", "severance", f"/Bundle/{doc_id}", as_=SEVERANCE_CLINIC)
    reference = (
        await fed.call("GET", "severance", f"/DocumentReference/{doc_id}", as_=SEVERANCE_CLINIC)
    ).json()
    stated = reference["content"][0]["attachment"]
    assert stated["size"] == len(served.content)
    assert stated["hash"] == base64.b64encode(hashlib.sha1(served.content).digest()).decode()
    [found] = matches(await fed.search("severance", SEVERANCE_CLINIC, rrn))
    assert found["content"][0]["attachment"]["hash"] == stated["hash"]
    parse_resource(reference, "DocumentReference")


async def test_the_transaction_response_answers_each_request_entry_once(
    federation: Federation, rrn: str
) -> None:
    """Point 4: one response entry per request entry, in order; the Tasks made are extensions on the
    DocumentReference's entry (one per recipient), also when the publish is replayed."""
    fed = federation
    fed.desk.grant(rrn)
    body = submit(REFERRAL, SEVERANCE_CLINIC, rrn, [SNUBH, SEVERANCE])
    first = await fed.publish("severance", SEVERANCE_CLINIC, body)
    answer = first.json()
    assert len(answer["entry"]) == len(body["entry"])
    kinds = [e["response"]["location"].split("/")[0] for e in answer["entry"]]
    assert kinds == [e["resource"]["resourceType"] for e in body["entry"]]
    [doc_entry] = [e for e in answer["entry"] if e["response"]["location"].startswith("DocumentReference/")]
    tasks = [x["valueReference"]["reference"] for x in doc_entry["response"]["extension"]]
    assert [x["url"] for x in doc_entry["response"]["extension"]] == [CREATED_TASK_EXTENSION] * 2
    assert len(set(tasks)) == 2
    assert sorted(located(first, "Task")) == sorted(t.split("/")[1] for t in tasks)
    owners = set()
    for task in tasks:
        read = await fed.call("GET", "severance", f"/{task}", as_=SEVERANCE_CLINIC)
        owners.add(read.json()["owner"]["identifier"]["value"])
    assert owners == {SNUBH, SEVERANCE}
    parse_resource(answer, "Bundle")
    replay = await fed.publish("severance", SEVERANCE_CLINIC, body)
    assert replay.json() == answer


async def test_head_on_reads_a_subscription_self_link_and_no_conditional_create(
    federation: Federation, rrn: str
) -> None:
    """Point 5: HEAD on the reads (headers, no body), a self link on the Subscription search, and
    conditional create refused with its reason."""
    fed = federation
    fed.desk.grant(rrn)
    published = await fed.publish(
        "severance", SEVERANCE_CLINIC, submit(REFERRAL, SEVERANCE_CLINIC, rrn, [SNUBH])
    )
    [doc_id], [task_id] = located(published, "DocumentReference"), located(published, "Task")
    subscriptions = await fed.call("GET", "severance", "/Subscription", as_=SEVERANCE_CLINIC)
    assert [link["relation"] for link in subscriptions.json()["link"]] == ["self"]

    [list_id] = located(published, "List")
    reads = (f"/DocumentReference/{doc_id}", f"/Bundle/{doc_id}", f"/Task/{task_id}", f"/List/{list_id}")
    for path in (*reads, "/metadata"):
        head = await fed.call("HEAD", "severance", path, as_=SEVERANCE_CLINIC)
        assert head.status_code == 200, path
        assert head.content == b""
        assert head.headers["content-type"].startswith("application/fhir+json")
    assert (await fed.call("HEAD", "severance", f"/Task/{task_id}", as_=SEVERANCE_CLINIC)).headers["etag"]

    assert (
        await fed.call("HEAD", "severance", "/Subscription/none", as_=SEVERANCE_CLINIC)
    ).status_code == 404

    conditional = submit(CRS, SEVERANCE_CLINIC, rrn)
    conditional["entry"][1]["request"]["ifNoneExist"] = "identifier=urn:ietf:rfc:3986|urn:uuid:x"
    assert "ifNoneExist" in refused(await fed.publish("severance", SEVERANCE_CLINIC, conditional), 400)


async def test_an_entered_in_error_document_stays_readable_and_leaves_default_search(
    federation: Federation, rrn: str
) -> None:
    """Point 6 (MHD): readable with its status; a search without status leaves it out, a search that
    asks for it finds it."""
    fed = federation
    fed.desk.grant(rrn)
    [kept] = located(
        await fed.publish("severance", SEVERANCE_CLINIC, submit(CRS, SEVERANCE_CLINIC, rrn)),
        "DocumentReference",
    )
    [doc_id] = located(
        await fed.publish("severance", SEVERANCE_CLINIC, submit(CRS, SEVERANCE_CLINIC, rrn)),
        "DocumentReference",
    )
    reference = (
        await fed.call("GET", "severance", f"/DocumentReference/{doc_id}", as_=SEVERANCE_CLINIC)
    ).json()
    changed = await fed.call(
        "PUT",
        "severance",
        f"/DocumentReference/{doc_id}",
        as_=SEVERANCE_CLINIC,
        json={**reference, "status": "entered-in-error"},
    )
    assert changed.status_code == 200, changed.text
    read = await fed.call("GET", "severance", f"/DocumentReference/{doc_id}", as_=SEVERANCE_CLINIC)
    assert read.status_code == 200
    assert read.json()["status"] == "entered-in-error"
    assert (await fed.call("GET", "severance", f"/Bundle/{doc_id}", as_=SEVERANCE_CLINIC)).status_code == 200
    assert [r["id"] for r in matches(await fed.search("severance", SEVERANCE_CLINIC, rrn))] == [kept]
    asked = await fed.search("severance", SEVERANCE_CLINIC, rrn, status="entered-in-error")
    assert [r["id"] for r in matches(asked)] == [doc_id]
    every = await fed.search("severance", SEVERANCE_CLINIC, rrn, status="current,superseded,entered-in-error")
    assert {r["id"] for r in matches(every)} == {kept, doc_id}


async def test_a_walk_in_search_sees_what_was_just_published_at_its_hub(
    federation: Federation, rrn: str
) -> None:
    """Point 7: the hub's own documents come from its database in a walk-in search, so one published
    a moment ago is there at once (no wait for the record locator), every time."""
    fed = federation
    fed.desk.grant(rrn)
    for _ in range(10):
        [doc_id] = located(
            await fed.publish("severance", SEVERANCE_CLINIC, submit(CRS, SEVERANCE_CLINIC, rrn)),
            "DocumentReference",
        )
        walk_in = await fed.call(
            "GET",
            "severance",
            "/DocumentReference",
            as_=SEVERANCE_CLINIC_2,
            params={"patient.identifier": f"{RRN_SYSTEM}|{rrn}", "_federated": "true"},
        )
        assert doc_id in [r["id"] for r in matches(walk_in)], outcomes(walk_in)


async def test_a_walk_in_result_read_through_the_hub_has_the_size_and_hash_of_what_it_serves(
    federation: Federation, rrn: str
) -> None:
    """Point 3 across hubs: a document held at Severance, found by a walk-in search at SNUBH and read
    through SNUBH, has the size and hash of the bytes SNUBH serves for it."""
    fed = federation
    fed.desk.grant(rrn)
    [doc_id] = located(
        await fed.publish("severance", SEVERANCE_CLINIC, submit(CRS, SEVERANCE_CLINIC, rrn)),
        "DocumentReference",
    )

    async def found() -> list[dict[str, Any]] | None:
        walk_in = await fed.call(
            "GET",
            "snubh",
            "/DocumentReference",
            as_=SNUBH,
            params={"patient.identifier": f"{RRN_SYSTEM}|{rrn}", "_federated": "true"},
        )
        return [r for r in matches(walk_in) if r["id"] == doc_id] or None

    await eventually(found, "the record locator to name severance")
    served = await fed.call("GET", "snubh", f"/Bundle/{doc_id}", as_=SNUBH)
    assert served.status_code == 200, served.text
    reference = (await fed.call("GET", "snubh", f"/DocumentReference/{doc_id}", as_=SNUBH)).json()
    stated = reference["content"][0]["attachment"]
    assert (stated["size"], stated["hash"]) == (
        len(served.content),
        base64.b64encode(hashlib.sha1(served.content).digest()).decode(),
    )


async def test_a_kcda_publish_is_version_one_as_its_response_says(federation: Federation, rrn: str) -> None:
    """Point 1: what the hub adds to a document it has just stored (the K-CDA original as a second
    content) is not a new version: the read answers the version the transaction-response named."""
    from test_hub_cda import cda_submission, clinic_referral

    fed = federation
    fed.desk.grant(rrn)
    body = cda_submission(clinic_referral(rrn), SEVERANCE_CLINIC, rrn, [SNUBH])
    published = await fed.publish("severance", SEVERANCE_CLINIC, body)
    [doc_id] = located(published, "DocumentReference")
    [entry] = [e for e in published.json()["entry"] if e["response"]["location"].startswith("DocumentRef")]
    assert entry["response"]["location"] == f"DocumentReference/{doc_id}/_history/1"
    read = await fed.call("GET", "severance", f"/DocumentReference/{doc_id}", as_=SEVERANCE_CLINIC)
    assert (read.headers["etag"], read.json()["meta"]["versionId"]) == ('W/"1"', "1")
    assert len(read.json()["content"]) == 2  # the FHIR document and the K-CDA original
