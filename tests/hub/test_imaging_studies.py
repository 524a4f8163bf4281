"""Findable at the destination hub (IHE XDS-I.b): a study the imaging gateway delivered in an
exchange becomes an ImagingStudy at the recipient's hub, seen only by the parties of the exchange.

Real hub nodes, registry and nats-server (SQLite and PostgreSQL); the gateway's StudyProgress events
are published on the hubs' own nats-server as the gateway's outbox would publish them.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from hub_support import (
    AGENCY_CLIENT,
    SEVERANCE,
    SEVERANCE_CLINIC,
    SEVERANCE_CLINIC_2,
    SNUBH,
    SNUBH_CLINIC,
    Federation,
    eventually,
    located,
    matches,
    refused,
    submit,
)

from hie_hub.imaging.service import imaging_study, study_id
from hie_hub.models import DeliveredStudy
from hie_platform.bus import Bus
from hie_schemas.codes import DICOM_UID, DocumentType
from hie_schemas.contract import Kind, subject
from hie_schemas.directory import DicomEndpointInfo, InstitutionKind, InstitutionState, InstitutionView
from hie_schemas.envelope import Envelope, Source
from hie_schemas.events import Delivery, StudyProgress, StudyRef
from hie_schemas.fhir import parse_resource
from hie_schemas.identifiers import PATIENT_KEY_SYSTEM, RRN_SYSTEM

DOC = Path(__file__).resolve().parents[2] / "docs" / "fhir-profiles.md"
GATEWAY = Source(service="imaging-gateway", node="test-gateway")
SNUBH_PACS = {"ae_title": "SNUBH_PACS", "host": "10.31.0.12", "port": 11112}


def new_study(accession: str | None = None) -> StudyRef:
    """A fresh Study Instance UID (2.25 + a uuid, as DICOM PS3.5 B.2 allows)."""
    return StudyRef(study_instance_uid=f"2.25.{uuid.uuid4().int}", accession_number=accession)


@pytest.fixture
async def gateway(federation: Federation) -> AsyncIterator[Bus]:
    """A connection to the hubs' nats-server that publishes as the imaging gateways do."""
    bus = await Bus.connect(federation.hubs["snubh"].settings.nats_url, name="test-imaging-gateway")
    yield bus
    await bus.close()


async def report(
    bus: Bus,
    hub: str,
    study: StudyRef,
    exchange_id: str | None,
    delivered: int,
    *,
    state: str = "delivered",
    at: datetime | None = None,
) -> None:
    """One StudyProgress, as the gateway's ProgressReporter writes it (a new event id each time)."""
    progress = StudyProgress(
        hub=hub,
        study_instance_uid=study.study_instance_uid,
        exchange_id=exchange_id,
        received=max(delivered, 1),
        relayed=0,
        delivered=delivered,
        failed=0,
        state=state,
        updated_at=at or datetime.now(UTC),
    )
    await bus.publish(subject(Kind.STUDY_PROGRESS, sender=hub), Envelope.wrap(progress, GATEWAY))


async def refer(
    fed: Federation,
    rrn: str,
    studies: tuple[StudyRef, ...],
    *,
    author: str = SEVERANCE_CLINIC,
    to: str = SNUBH,
) -> tuple[str, str, str]:
    """A referral naming the studies; (document id, task id, exchange id) once the recipient has it."""
    fed.desk.grant(rrn)
    hub_of = {SNUBH: "snubh", SEVERANCE: "severance"}
    published = await fed.publish(
        "severance", author, submit(DocumentType.REFERRAL, author, rrn, [to], studies=studies)
    )
    [doc_id], [task_id] = located(published, "DocumentReference"), located(published, "Task")
    task = await fed.task_arrives(hub_of[to], to, task_id, "received")
    exchange_id = str(task["identifier"][0]["value"]).removeprefix("urn:uuid:")
    return doc_id, task_id, exchange_id


async def find(fed: Federation, hub: str, as_: str, rrn: str, **params: str) -> httpx.Response:
    return await fed.call(
        "GET", hub, "/ImagingStudy", as_=as_, params={"patient.identifier": f"{RRN_SYSTEM}|{rrn}", **params}
    )


def by_uid(study: StudyRef) -> dict[str, str]:
    return {"identifier": f"{DICOM_UID}|urn:oid:{study.study_instance_uid}"}


async def findable(
    fed: Federation, hub: str, as_: str, rrn: str, study: StudyRef, instances: int
) -> dict[str, Any]:
    """Poll the search until the study is listed with ``instances`` instances; the resource."""

    async def check() -> dict[str, Any] | None:
        found = matches(await find(fed, hub, as_, rrn, **by_uid(study)))
        return found[0] if found and found[0]["numberOfInstances"] == instances else None

    return await eventually(check, f"ImagingStudy {study.study_instance_uid} with {instances} at {hub}", 30)


async def study_rows(fed: Federation, hub: str, study: StudyRef) -> list[dict[str, Any]]:
    rows = await fed.hubs[hub].rows("imaging_studies")
    return [row for row in rows if row["study_instance_uid"] == study.study_instance_uid]


async def test_the_recipient_finds_and_reads_the_delivered_study(
    federation: Federation, gateway: Bus, rrn: str
) -> None:
    fed = federation
    agency = {"Authorization": f"Bearer {await fed.token(AGENCY_CLIENT)}"}
    registered = await fed.http.put(
        f"{fed.registry.url}/institutions/{SNUBH}/dicom", json=SNUBH_PACS, headers=agency
    )
    assert registered.status_code == 200, registered.text
    ct, mr = new_study("CT250304-0017"), new_study()
    _, task_id, exchange_id = await refer(fed, rrn, (ct, mr))

    # Received but not yet at the PACS: nothing to find. Then the series arrives in two batches.
    started = datetime.now(UTC)
    await report(gateway, "snubh", ct, exchange_id, 0, state="queued", at=started)
    await report(gateway, "snubh", ct, exchange_id, 2, state="queued", at=started + timedelta(seconds=1))
    await report(gateway, "snubh", ct, exchange_id, 5, at=started + timedelta(seconds=2))
    study = await findable(fed, "snubh", SNUBH, rrn, ct, 5)
    parse_resource(study, "ImagingStudy")
    assert study["id"] == study_id(ct.study_instance_uid, exchange_id)
    assert study["identifier"][0] == {"system": DICOM_UID, "value": f"urn:oid:{ct.study_instance_uid}"}
    assert study["identifier"][1]["value"] == "CT250304-0017"
    assert study["status"] == "available"
    key = fed.desk.key(rrn)
    assert study["subject"]["identifier"] == {"system": PATIENT_KEY_SYSTEM, "value": key}
    assert study["basedOn"] == [{"reference": f"Task/{task_id}"}]
    assert rrn not in json.dumps(study)
    assert rrn.replace("-", "") not in json.dumps(study)

    # The recipient's PACS, as the registry lists it (its cache hears the change).
    async def with_endpoint() -> dict[str, Any] | None:
        found = matches(await find(fed, "snubh", SNUBH, rrn, **by_uid(ct)))
        return found[0] if found and found[0].get("contained") else None

    study = await eventually(with_endpoint, "the PACS endpoint in the ImagingStudy")
    [endpoint] = study["contained"]
    assert study["endpoint"] == [{"reference": "#pacs"}]
    assert endpoint["connectionType"]["code"] == "dicom-dimse"
    assert endpoint["address"] == "dicom://SNUBH_PACS@10.31.0.12:11112"
    assert endpoint["managingOrganization"]["identifier"]["value"] == SNUBH

    # A late report (fewer instances, older) and a repeated one change nothing; a report of the
    # second study, published after them, shows that they were read.
    await report(gateway, "snubh", ct, exchange_id, 3, state="queued", at=started + timedelta(seconds=1.5))
    await report(gateway, "snubh", ct, exchange_id, 5, at=started + timedelta(seconds=2))
    await report(gateway, "snubh", mr, exchange_id, 1)
    await findable(fed, "snubh", SNUBH, rrn, mr, 1)
    [row] = await study_rows(fed, "snubh", ct)
    assert (row["instances"], row["state"], row["patient_key"]) == (5, "delivered", key)
    assert (row["from_institution"], row["to_institution"], row["exchange_id"]) == (
        SEVERANCE_CLINIC,
        SNUBH,
        exchange_id,
    )
    assert await study_rows(fed, "severance", ct) == []  # the sender's hub registers nothing

    # Found by the patient key as well, both studies, one page at a time; read by id.
    both = await fed.call(
        "GET",
        "snubh",
        "/ImagingStudy",
        as_=SNUBH,
        params={"patient.identifier": f"{PATIENT_KEY_SYSTEM}|{key}"},
    )
    assert {s["id"] for s in matches(both)} == {study["id"], study_id(mr.study_instance_uid, exchange_id)}
    first = await find(fed, "snubh", SNUBH, rrn, _count="1")
    assert first.json()["total"] == 2
    [page_one] = matches(first)
    [next_url] = [link["url"] for link in first.json()["link"] if link["relation"] == "next"]
    assert rrn not in next_url
    headers = {"Authorization": f"Bearer {await fed.token(SNUBH)}"}
    [page_two] = matches(await fed.http.get(next_url, headers=headers))
    assert {page_one["id"], page_two["id"]} == {s["id"] for s in matches(both)}
    read = await fed.call("GET", "snubh", f"/ImagingStudy/{study['id']}", as_=SNUBH)
    assert read.status_code == 200, read.text
    assert read.json() == study

    # Anyone else at the hub: an empty search, and the answer to an id that does not exist.
    assert matches(await find(fed, "snubh", SNUBH_CLINIC, rrn)) == []
    unknown = str(uuid.uuid4())
    hidden = refused(await fed.call("GET", "snubh", f"/ImagingStudy/{study['id']}", as_=SNUBH_CLINIC), 404)
    absent = refused(await fed.call("GET", "snubh", f"/ImagingStudy/{unknown}", as_=SNUBH_CLINIC), 404)
    assert hidden.replace(study["id"], "<id>") == absent.replace(unknown, "<id>")

    # Every search and read is audited, with the studies it disclosed.
    audit = await fed.call(
        "GET", "snubh", "/AuditEvent", as_=AGENCY_CLIENT, params={"patient.identifier": f"{RRN_SYSTEM}|{rrn}"}
    )
    events = matches(audit)
    reads = [
        event
        for event in events
        if {"system": "https://hie-federation.kr/fhir/CodeSystem/audit-action", "code": "imaging.read"}
        in event["subtype"]
    ]
    [read_event] = [e for e in reads if e["agent"][0]["who"]["identifier"]["value"] == SNUBH]
    parse_resource(read_event, "AuditEvent")
    assert read_event["action"] == "R"
    assert {"reference": f"ImagingStudy/{study['id']}"} in [e["what"] for e in read_event["entity"]]
    actions = {s["code"] for e in events for s in e["subtype"] if s["system"].endswith("audit-action")}
    assert "imaging.search" in actions

    # Consent is asked at the moment of reading: after a withdrawal the study is refused and hidden.
    fed.desk.withdraw(rrn)
    assert "consent refuses" in refused(
        await fed.call("GET", "snubh", f"/ImagingStudy/{study['id']}", as_=SNUBH), 403
    )
    # The refusal is raised, and its audit record is committed all the same.
    denied = [
        (r["record"]["actor_institution"], r["record"]["rule"])
        for r in await fed.hubs["snubh"].rows("audit_log")
        if r["record"]["action"] == "imaging.read"
        and r["record"]["patient_key"] == key
        and r["record"]["outcome"] == "denied"
    ]
    assert denied == [(SNUBH, "deny-withdrawn")]
    assert matches(await find(fed, "snubh", SNUBH, rrn)) == []


async def test_progress_that_is_not_this_hubs_delivery_creates_nothing(
    federation: Federation, gateway: Bus, rrn: str
) -> None:
    fed = federation
    ct, other = new_study(), new_study()
    _, _, exchange_id = await refer(fed, rrn, (ct,))

    await report(gateway, "severance", ct, exchange_id, 4)  # the sending hub's gateway; it sent it
    await report(gateway, "cnuh", ct, exchange_id, 4)  # another hub's gateway
    await report(gateway, "snubh", other, str(uuid.uuid4()), 4)  # an exchange no hub knows
    await report(gateway, "snubh", ct, None, 4, state="held")  # not claimed by any exchange
    await report(gateway, "snubh", ct, exchange_id, 0, state="queued")  # nothing at the PACS yet
    # Each hub reads its events in order: once this one is in, the ones above were read.
    await report(gateway, "snubh", ct, exchange_id, 1)
    await findable(fed, "snubh", SNUBH, rrn, ct, 1)
    for hub in fed.hubs:
        expected = 1 if hub == "snubh" else 0
        assert len(await study_rows(fed, hub, ct)) == expected, hub
        assert await study_rows(fed, hub, other) == [], hub


async def test_progress_read_before_its_delivery_waits_for_it(
    federation: Federation, gateway: Bus, rrn: str
) -> None:
    """After an outage the hub may read a study's progress before the exchange's Delivery (another
    stream): it keeps trying until the exchange is there."""
    fed = federation
    ct, sentinel = new_study(), new_study()
    _, task_id, first_exchange = await refer(fed, rrn, (ct, sentinel))
    # A second exchange of the same documents, whose Delivery is held back: a copy of the first one's.
    [sent] = [
        Envelope.from_bytes(row["payload"])
        for row in await fed.hubs["severance"].rows("outbox")
        if row["subject"].startswith("hie.hub.snubh.inbox.delivery.") and task_id.encode() in row["payload"]
    ]
    delivery = sent.payload(Delivery)
    exchange_id, second_task = str(uuid.uuid4()), str(uuid.uuid4())
    held_back = Delivery(
        exchange=delivery.exchange.model_copy(update={"exchange_id": exchange_id, "task_id": second_task}),
        task=delivery.task
        | {
            "id": second_task,
            "identifier": [{"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{exchange_id}"}],
        },
        documents=delivery.documents,
    )

    await report(gateway, "snubh", ct, exchange_id, 6)
    await report(gateway, "snubh", sentinel, first_exchange, 1)
    await findable(fed, "snubh", SNUBH, rrn, sentinel, 1)
    assert await study_rows(fed, "snubh", ct) == []  # read, and waiting for its exchange

    await gateway.publish(
        subject(Kind.DELIVERY, to="snubh", sender=held_back.exchange.from_hub),
        Envelope.wrap(held_back, GATEWAY),
    )
    study = await findable(fed, "snubh", SNUBH, rrn, ct, 6)
    assert study["basedOn"] == [{"reference": f"Task/{second_task}"}]


async def test_within_one_hub_the_sender_sees_the_study_too(
    federation: Federation, gateway: Bus, rrn: str
) -> None:
    fed = federation
    ct = new_study()
    _, _, exchange_id = await refer(fed, rrn, (ct,), to=SEVERANCE)
    await report(gateway, "severance", ct, exchange_id, 3)
    await findable(fed, "severance", SEVERANCE, rrn, ct, 3)
    await findable(fed, "severance", SEVERANCE_CLINIC, rrn, ct, 3)
    assert matches(await find(fed, "severance", SEVERANCE_CLINIC_2, rrn)) == []


# --- the documented example ---------------------------------------------------------------------------


def test_the_documented_example_is_what_the_hub_serves() -> None:
    """docs/fhir-profiles.md shows an ImagingStudy exactly as hie_hub.imaging.service builds it."""
    [example] = [
        body
        for body in (json.loads(b) for b in re.findall(r"```json\n(.*?)```", DOC.read_text(), re.DOTALL))
        if body.get("resourceType") == "ImagingStudy"
    ]
    at = datetime(2025, 3, 4, 1, 12, 40, tzinfo=UTC)
    row = DeliveredStudy(
        id=example["id"],
        study_instance_uid="1.2.410.200001.1.3.20250304.1",
        exchange_id="5b0c7f0e-3f7a-4f63-9d2e-8d1b2f6c1a90",
        task_id="9e4a2c61-7b0d-4d8e-a1f3-2c5e8b7d6f40",
        patient_key="5f0c9e3b8a7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a3928170615243a",
        from_institution="11301001",
        to_institution=SNUBH,
        document_id="6d4b1a8e-2c3f-4e5d-8a9b-0c1d2e3f4a5b",
        accession_number="CT250304-0017",
        instances=312,
        state="delivered",
        first_update_at=at - timedelta(minutes=3),
        last_update_at=at,
        recorded_at=at - timedelta(minutes=3),
    )
    snubh = InstitutionView(
        code=SNUBH,
        oid=f"1.2.410.100110.10.{SNUBH}",
        name="분당서울대학교병원",
        kind=InstitutionKind.HUB,
        state=InstitutionState.ACTIVE,
        hub="snubh",
        dicom=DicomEndpointInfo(**SNUBH_PACS),
    )
    assert example == imaging_study(row, snubh)
    assert example["id"] == study_id(row.study_instance_uid, row.exchange_id)
    parse_resource(example, "ImagingStudy")
