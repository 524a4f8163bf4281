"""Walk-in search across three hubs (임의방문), emergency access, patient-requested transfer and
submission to a public agency: real hubs, the real registry's record locator, one nats-server."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx
from hub_support import (
    AGENCY_CLIENT,
    CNUH,
    CNUH_CLINIC,
    SEVERANCE_CLINIC,
    SNUBH,
    SNUBH_CLINIC,
    Federation,
    eventually,
    hub_outcomes,
    located,
    matches,
    outcomes,
    refused,
    rrn_forms,
    submit,
)

from hie_platform.bus import Bus
from hie_registry import seed
from hie_schemas.codes import DocumentType
from hie_schemas.contract import RPCS, Kind, Operation, subject
from hie_schemas.documents.profiles import (
    JUSTIFICATION_EXTENSION_URL,
    PURPOSE_EXTENSION_URL,
    PURPOSE_SYSTEM,
)
from hie_schemas.envelope import Envelope, Source
from hie_schemas.events import DocumentPublished
from hie_schemas.fhir import parse_resource
from hie_schemas.identifiers import RRN_SYSTEM

CRS = DocumentType.CARE_RECORD_SUMMARY
HOLDERS = {"severance": SEVERANCE_CLINIC, "snubh": SNUBH_CLINIC, "cnuh": CNUH_CLINIC}


async def walk_in(
    fed: Federation, rrn: str, *, as_: str = CNUH, hub: str = "cnuh", **params: str
) -> httpx.Response:
    return await fed.call(
        "GET",
        hub,
        "/DocumentReference",
        as_=as_,
        params={"patient.identifier": f"{RRN_SYSTEM}|{rrn}", "_federated": "true", **params},
    )


async def held_everywhere(fed: Federation, rrn: str) -> dict[str, str]:
    """One summary per hub, each by a clinic of that hub; waits until the locator knows all three."""
    ids: dict[str, str] = {}
    for hub, clinic in HOLDERS.items():
        [ids[hub]] = located(await fed.publish(hub, clinic, submit(CRS, clinic, rrn)), "DocumentReference")

    async def all_found() -> list[dict[str, Any]] | None:
        found = matches(await walk_in(fed, rrn))
        return found if len(found) == 3 else None

    await eventually(all_found, "the record locator to know the three hubs")
    return ids


def hub_of(outcome: dict[str, Any]) -> str:
    return str(outcome["issue"][0]["details"]["coding"][0]["code"])


async def test_walk_in_search_asks_every_holding_hub(federation: Federation, rrn: str) -> None:
    fed = federation
    fed.desk.grant(rrn)
    ids = await held_everywhere(fed, rrn)
    response = await walk_in(fed, rrn)
    bundle = response.json()
    parse_resource(bundle, "Bundle")
    assert {r["id"] for r in matches(response)} == set(ids.values())
    assert hub_outcomes(response) == []
    sources = {r["id"]: r["meta"]["source"] for r in matches(response)}
    assert sources[ids["snubh"]] == "urn:hie-federation:hub:snubh"
    assert not any(form in response.text for form in rrn_forms(rrn))

    # A document held elsewhere is retrieved through the asking hub, at the usual ITI-68 URL.
    snubh_doc = ids["snubh"]
    [found] = [r for r in matches(response) if r["id"] == snubh_doc]
    assert found["content"][0]["attachment"]["url"] == f"Bundle/{snubh_doc}"
    document = await fed.call("GET", "cnuh", f"/Bundle/{snubh_doc}", as_=CNUH)
    assert document.status_code == 200, document.text
    assert document.json()["id"] == snubh_doc
    reference = await fed.call("GET", "cnuh", f"/DocumentReference/{snubh_doc}", as_=CNUH)
    assert reference.json()["id"] == snubh_doc
    # A document of another institution of the asking hub itself comes through the same grant.
    own_hub = await fed.call("GET", "cnuh", f"/Bundle/{ids['cnuh']}", as_=CNUH)
    assert own_hub.status_code == 200, own_hub.text
    # Only the institution that searched may retrieve through the grant.
    refused(await fed.call("GET", "cnuh", f"/Bundle/{snubh_doc}", as_=CNUH_CLINIC), 404)

    # Each holder audited the disclosure with the asking institution as the actor.
    key = fed.desk.key(rrn)
    audit = [
        r["record"] for r in await fed.hubs["snubh"].rows("audit_log") if r["record"]["patient_key"] == key
    ]
    searched = [a for a in audit if a["action"] == "federated.search"]
    assert searched
    assert searched[-1]["actor_institution"] == CNUH
    assert searched[-1]["detail"]["requester_hub"] == "cnuh"
    assert {a["action"] for a in audit} >= {"federated.retrieve"}

    # The patient excludes SNUBH's clinic: that hub now denies, explicitly; the others still answer.
    fed.desk.exclude(rrn, SNUBH_CLINIC)
    partial = await walk_in(fed, rrn)
    assert {r["id"] for r in matches(partial)} == {ids["severance"], ids["cnuh"]}
    [denied] = hub_outcomes(partial)
    parse_resource(denied, "OperationOutcome")
    assert hub_of(denied) == "snubh"
    assert denied["issue"][0]["code"] == "suppressed"
    assert "deny-holder-excluded" in denied["issue"][0]["diagnostics"]
    # The holder decides again at retrieval: the grant is not a permission.
    refused(await fed.call("GET", "cnuh", f"/Bundle/{snubh_doc}", as_=CNUH), 403)
    # The refused retrieval is in the asking hub's audit too: recorded, then refused (it used to be
    # rolled back with the 403).
    asked = [
        r["record"]
        for r in await fed.hubs["cnuh"].rows("audit_log")
        if r["record"]["patient_key"] == key and r["record"]["action"] == "federated.retrieve"
    ]
    assert [a["outcome"] for a in asked][-1] == "denied", asked


async def test_hubs_that_are_down_or_too_slow_are_named(federation: Federation, rrn: str) -> None:
    fed = federation
    fed.desk.grant(rrn)
    await held_everywhere(fed, rrn)
    key = fed.desk.key(rrn)
    bus = await Bus.connect(fed.hubs["cnuh"].settings.nats_url, name="test-down-and-slow")
    try:
        # The locator heard of two more hubs: knuh, whose node is down, and pnuh, which never answers.
        for hub in ("knuh", "pnuh"):
            event = DocumentPublished(
                hub=hub,
                patient_key=key,
                author_institution=next(h.code for h in seed.HUBS if h.hub == hub),
                document_ids=[f"{hub}-doc"],
                document_types=[CRS],
                published_at=datetime.now(UTC),
            )
            await bus.publish(
                subject(Kind.DOCUMENT_PUBLISHED, sender=hub),
                Envelope.wrap(event, Source(service="t", node=hub)),
            )

        async def silent(_msg: Any) -> None:
            await asyncio.sleep(30)

        await bus.nc.subscribe(RPCS[Operation.HUB_SEARCH].pattern(to="pnuh"), cb=silent)

        async def five_hubs() -> httpx.Response | None:
            response = await walk_in(fed, rrn)
            return response if len(hub_outcomes(response)) == 2 else None

        response = await eventually(five_hubs, "the locator to name knuh and pnuh")
        assert len(matches(response)) == 3
        by_hub = {hub_of(o): o["issue"][0] for o in hub_outcomes(response)}
        assert by_hub["knuh"]["code"] == "transient"
        assert "unreachable" in by_hub["knuh"]["diagnostics"]
        assert by_hub["pnuh"]["code"] == "timeout"
    finally:
        await bus.close()


async def test_emergency_access_needs_a_justification_and_is_flagged(
    federation: Federation, rrn: str
) -> None:
    fed = federation
    fed.desk.grant(rrn)
    ids = await held_everywhere(fed, rrn)
    fed.desk.withdraw(rrn)
    refused_everywhere = await walk_in(fed, rrn)
    # The asker's own hub holds a document of another institution too: every hub denies.
    assert matches(refused_everywhere) == []
    assert {hub_of(o) for o in outcomes(refused_everywhere)} == {"severance", "snubh", "cnuh"}

    assert "justification" in refused(await walk_in(fed, rrn, purpose="emergency"), 400)
    refused(await walk_in(fed, rrn, purpose="public-agency"), 400)
    why = "의식 없는 응급환자, 보호자 없음 (unconscious, no guardian)"
    emergency = await walk_in(fed, rrn, purpose="emergency", justification=why)
    assert {r["id"] for r in matches(emergency)} == set(ids.values())
    assert hub_outcomes(emergency) == []
    retrieved = await fed.call("GET", "cnuh", f"/Bundle/{ids['severance']}", as_=CNUH)
    assert retrieved.status_code == 200, retrieved.text

    key = fed.desk.key(rrn)
    for hub in ("severance", "cnuh"):
        records = [
            r["record"] for r in await fed.hubs[hub].rows("audit_log") if r["record"]["patient_key"] == key
        ]
        flagged = [r for r in records if r["purpose"] == "emergency"]
        assert flagged
        assert all(r["detail"]["flagged"] and r["detail"]["justification"] == why for r in flagged)
    # The header form of the justification (percent-encoded UTF-8) works too.
    by_header = await fed.call(
        "GET",
        "cnuh",
        "/DocumentReference",
        as_=CNUH,
        headers={"X-HIE-Justification": quote("응급 수술 중 (emergency surgery)")},
        params={"patient.identifier": f"{RRN_SYSTEM}|{rrn}", "_federated": "true", "purpose": "emergency"},
    )
    assert len(matches(by_header)) == 3


def purpose(code: str, justification: str | None = None) -> list[dict[str, Any]]:
    extensions: list[dict[str, Any]] = [
        {"url": PURPOSE_EXTENSION_URL, "valueCoding": {"system": PURPOSE_SYSTEM, "code": code}}
    ]
    if justification:
        extensions.append({"url": JUSTIFICATION_EXTENSION_URL, "valueString": justification})
    return extensions


async def test_a_patient_requested_transfer_needs_no_consent(federation: Federation, rrn: str) -> None:
    fed = federation  # no consent recorded at all (의료법 §21-3: the patient asked for the transfer)
    plain = submit(CRS, SEVERANCE_CLINIC, rrn, [SNUBH])
    assert "referral" in refused(await fed.publish("severance", SEVERANCE_CLINIC, plain), 422)
    treatment = submit(DocumentType.REFERRAL, SEVERANCE_CLINIC, rrn, [SNUBH])
    refused(await fed.publish("severance", SEVERANCE_CLINIC, treatment), 403)
    requested = submit(CRS, SEVERANCE_CLINIC, rrn, [SNUBH], extensions=purpose("patient-request"))
    published = await fed.publish("severance", SEVERANCE_CLINIC, requested)
    [task_id], [doc_id] = located(published, "Task"), located(published, "DocumentReference")
    task = await fed.task_arrives("snubh", SNUBH, task_id, "received")
    assert task["code"]["coding"][0]["code"] == "patient-request"
    assert task["focus"]["reference"] == f"DocumentReference/{doc_id}"
    sent = [
        r
        for r in await fed.hubs["severance"].rows("outbox")
        if r["subject"].startswith(subject(Kind.EXCHANGE_SENT, sender="x")[:-1])
        and doc_id in r["payload"].decode()
    ]
    assert sent
    assert '"purpose":"patient-request"' in sent[0]["payload"].decode()
    bad = submit(CRS, SEVERANCE_CLINIC, rrn, [SNUBH], extensions=purpose("gossip"))
    refused(await fed.publish("severance", SEVERANCE_CLINIC, bad), 422)
    no_reason = submit(CRS, SEVERANCE_CLINIC, rrn, [SNUBH], extensions=purpose("emergency"))
    assert "justification" in refused(await fed.publish("severance", SEVERANCE_CLINIC, no_reason), 400)


async def register_public_agency(fed: Federation, code: str) -> str:
    """A public agency (e.g. 병무청) applied, reviewed, approved and activated; returns its secret."""
    if code in fed.registry.credentials:
        return str(fed.registry.credentials[code])  # registered for an earlier run of this module
    agency = {"Authorization": f"Bearer {await fed.token(AGENCY_CLIENT)}"}
    url = fed.registry.url
    applied = await fed.http.post(
        f"{url}/institutions",
        headers=agency,
        json={"code": code, "name": "병무청", "kind": "public-agency", "region": "대전"},
    )
    assert applied.status_code == 201, applied.text
    secret = ""
    for action in ("review", "approve", "activate"):
        step = await fed.http.post(
            f"{url}/institutions/{code}/{action}", headers=agency, json={"reason": f"test {action}"}
        )
        assert step.status_code == 200, step.text
        secret = (step.json().get("credentials") or {}).get("client_secret") or secret
    fed.registry.credentials[code] = secret
    return secret


async def test_submission_to_a_public_agency(federation: Federation, rrn: str) -> None:
    fed = federation
    fed.desk.grant(rrn)
    agency = "99100001"
    await register_public_agency(fed, agency)
    wrong_purpose = submit(CRS, SEVERANCE_CLINIC, rrn, [agency], extensions=purpose("patient-request"))

    async def hub_knows_the_agency() -> str | None:
        # The hub's directory view follows the registry's events (approved, then activated).
        message = refused(await fed.publish("severance", SEVERANCE_CLINIC, wrong_purpose), 422)
        return message if "good standing" not in message else None

    assert "public agency" in await eventually(hub_knows_the_agency, "the agency active at the hub")
    not_an_agency = submit(CRS, SEVERANCE_CLINIC, rrn, [SNUBH], extensions=purpose("public-agency"))
    refused(await fed.publish("severance", SEVERANCE_CLINIC, not_an_agency), 422)

    body = submit(CRS, SEVERANCE_CLINIC, rrn, [agency], extensions=purpose("public-agency"))
    published = await fed.publish("severance", SEVERANCE_CLINIC, body)
    [task_id], [doc_id] = located(published, "Task"), located(published, "DocumentReference")
    # The agency belongs to no hub: it reads what was submitted to it at the holder's hub.
    task = await fed.task_arrives("severance", agency, task_id, "received")
    assert task["code"]["coding"][0]["code"] == "public-agency"
    found = await fed.search("severance", agency, rrn)
    assert [r["id"] for r in matches(found)] == [doc_id]
    assert (await fed.call("GET", "severance", f"/Bundle/{doc_id}", as_=agency)).status_code == 200
    # ... and nothing else: it cannot publish, nor search across hubs.
    refused(await fed.publish("severance", agency, body), 403)
    refused(await walk_in(fed, rrn, as_=agency, hub="severance"), 403)
    # Consent-based: once the patient withdraws, the agency can no longer read it.
    fed.desk.withdraw(rrn)
    refused(await fed.call("GET", "severance", f"/Bundle/{doc_id}", as_=agency), 403)
