"""K-CDA at real hubs (issue 17): $convert, ITI-65 with a CDA Binary, ITI-68 as CDA, and the two-hub
referral between a CDA-speaking clinic and a FHIR-speaking hospital, both ways, under consent and audit."""

from __future__ import annotations

import base64
import copy
import hashlib
from typing import Any

import pytest
from hub_support import SEVERANCE_CLINIC, SNUBH, Federation, located, matches, refused

from hie_schemas.cda import CDA_MEDIA_TYPE, cda_to_fhir, fhir_to_cda, parse_xml
from hie_schemas.cda.pseudonym import pseudonymise_xml
from hie_schemas.codes import DocumentType
from hie_schemas.documents.builders import build_document, build_submission

V3 = "{urn:hl7-org:v3}"
CLINIC_NAME, SNUBH_NAME = "서울 연세가정의학과의원", "분당서울대학교병원"


def clinic_referral(rrn: str) -> bytes:
    """The K-CDA referral a CDA-speaking EMR at the clinic produces (11301001 -> SNUBH)."""
    document = build_document(
        DocumentType.REFERRAL,
        author_code=SEVERANCE_CLINIC,
        author_name=CLINIC_NAME,
        patient_rrn=rrn,
        recipient_code=SNUBH,
        recipient_name=SNUBH_NAME,
        problems=(("E11.9", "합병증을 동반하지 않은 2형 당뇨병"),),
    )
    return fhir_to_cda(document)


def cda_submission(xml: bytes, author: str, rrn: str, recipients: list[str]) -> dict[str, Any]:
    """ITI-65 whose document is a Binary of contentType application/hl7-cda+xml."""
    placeholder = build_document(
        DocumentType.REFERRAL,
        author_code=author,
        author_name=CLINIC_NAME,
        patient_rrn=rrn,
        recipient_code=SNUBH,
    )
    body = build_submission([placeholder], author_code=author, patient_rrn=rrn, recipients=recipients)
    [document_entry] = [e for e in body["entry"] if e["resource"]["resourceType"] == "Bundle"]
    document_entry["resource"] = {
        "resourceType": "Binary",
        "contentType": CDA_MEDIA_TYPE,
        "data": base64.b64encode(xml).decode(),
    }
    document_entry["request"] = {"method": "POST", "url": "Binary"}
    [reference] = [
        e["resource"] for e in body["entry"] if e["resource"]["resourceType"] == "DocumentReference"
    ]
    reference.pop("masterIdentifier", None)
    reference["content"][0]["attachment"]["contentType"] = CDA_MEDIA_TYPE
    return body


async def post_xml(fed: Federation, hub: str, path: str, as_: str, xml: bytes) -> Any:
    return await fed.call("POST", hub, path, as_=as_, content=xml, headers={"Content-Type": CDA_MEDIA_TYPE})


async def get_cda(fed: Federation, hub: str, document_id: str, as_: str) -> Any:
    return await fed.call("GET", hub, f"/Bundle/{document_id}", as_=as_, headers={"Accept": CDA_MEDIA_TYPE})


def kcd_codes(xml: bytes) -> set[str]:
    return {v.get("code") or "" for v in parse_xml(xml).iter(f"{V3}value") if v.get("code")}


async def test_convert_answers_the_fhir_document_and_stores_nothing(federation: Federation, rrn: str) -> None:
    fed = federation
    fed.desk.grant(rrn)
    xml = clinic_referral(rrn)
    answer = await post_xml(fed, "severance", "/$convert", SEVERANCE_CLINIC, xml)
    assert answer.status_code == 200, answer.text
    document = answer.json()
    assert document["resourceType"] == "Bundle"
    assert document["type"] == "document"
    composition = document["entry"][0]["resource"]
    assert composition["type"]["coding"][0]["code"] == "1"  # 진료의뢰서 template
    conditions = [e["resource"] for e in document["entry"] if e["resource"]["resourceType"] == "Condition"]
    assert [c["code"]["coding"][0]["code"] for c in conditions] == ["E11.9"]
    [patient] = [e["resource"] for e in document["entry"] if e["resource"]["resourceType"] == "Patient"]
    assert patient["identifier"][0]["value"] == fed.desk.key(rrn)  # as the hub would store it
    assert rrn not in answer.text
    same = await post_xml(fed, "severance", "/Bundle/$convert", SEVERANCE_CLINIC, xml)
    assert same.status_code == 200
    assert await fed.patient_rows("severance", fed.desk.key(rrn)) == []


def _without_problems(xml: bytes) -> bytes:
    text = xml.decode()
    start = text.index('<component><section><code code="11450-4"')
    end = text.index("</section></component>", start) + len("</section></component>")
    return (text[:start] + text[end:]).encode()


BAD = {
    "not well-formed": (lambda xml: xml[:-30], 400, "/ClinicalDocument"),
    "external entity": (
        lambda xml: (
            b'<?xml version="1.0"?><!DOCTYPE c [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
            + xml.split(b"?>", 1)[1].replace(b"<title>", b"<title>&x;", 1)
        ),
        400,
        "/",
    ),
    "billion laughs": (
        lambda xml: (
            b'<?xml version="1.0"?><!DOCTYPE c [<!ENTITY a "aaaaaaaaaa">'
            b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
            b'<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]>'
            + xml.split(b"?>", 1)[1].replace(b"<title>", b"<title>&c;", 1)
        ),
        400,
        "/",
    ),
    "wrong template": (
        lambda xml: xml.replace(
            b'templateId root="1.2.410.100110.40.2.1.1"', b'templateId root="2.16.840.1.113883.10.20.22.1.1"'
        ),
        422,
        "/ClinicalDocument/templateId",
    ),
    "missing problems section": (_without_problems, 422, "/ClinicalDocument/component/structuredBody"),
}


@pytest.mark.parametrize("case", sorted(BAD))
async def test_bad_cda_is_refused_naming_the_element_and_nothing_is_stored(
    federation: Federation, rrn: str, case: str
) -> None:
    fed = federation
    fed.desk.grant(rrn)
    spoil, status, location = BAD[case]
    xml = spoil(clinic_referral(rrn))
    for response in (
        await post_xml(fed, "severance", "/$convert", SEVERANCE_CLINIC, xml),
        await fed.publish("severance", SEVERANCE_CLINIC, cda_submission(xml, SEVERANCE_CLINIC, rrn, [SNUBH])),
    ):
        refused(response, status)
        expressions = [e for issue in response.json()["issue"] for e in issue.get("expression", [])]
        assert any(e.startswith(location) for e in expressions), expressions
        assert "root:x:0:0" not in response.text
    assert await fed.patient_rows("severance", fed.desk.key(rrn)) == []


async def retrieved_by(fed: Federation, hub: str, actor: str, key: str, document_id: str) -> list[Any]:
    """The document.retrieve audit records of ``hub`` for one document."""
    audit = [r["record"] for r in await fed.hubs[hub].rows("audit_log") if r["record"]["patient_key"] == key]
    return [a for a in audit if a["action"] == "document.retrieve" and document_id in a["document_ids"]]


async def test_a_cda_clinic_refers_a_patient_to_a_fhir_hospital_across_hubs(
    federation: Federation, rrn: str
) -> None:
    fed = federation
    fed.desk.grant(rrn)
    key = fed.desk.key(rrn)
    xml = clinic_referral(rrn)

    # The clinic's EMR publishes its K-CDA referral to its hub (severance) for SNUBH.
    published = await fed.publish(
        "severance", SEVERANCE_CLINIC, cda_submission(xml, SEVERANCE_CLINIC, rrn, [SNUBH])
    )
    [doc_id], [task_id] = located(published, "DocumentReference"), located(published, "Task")

    # Stored as the FHIR document, the original XML kept as the DocumentReference's second content,
    # its RRN replaced by the patient key as everywhere the hub stores (design.md §5).
    own = await fed.call("GET", "severance", f"/DocumentReference/{doc_id}", as_=SEVERANCE_CLINIC)
    contents = own.json()["content"]
    assert [c["attachment"]["contentType"] for c in contents] == ["application/fhir+json", CDA_MEDIA_TYPE]
    kept, [sent_rrn] = pseudonymise_xml(xml, lambda _: key)
    assert sent_rrn == rrn
    assert base64.b64decode(contents[1]["attachment"]["data"]) == kept
    assert (await get_cda(fed, "severance", doc_id, SEVERANCE_CLINIC)).content == kept
    assert rrn.encode() not in kept

    # SNUBH (FHIR-speaking) receives the task at its own hub and reads the referral as FHIR.
    await fed.task_arrives("snubh", SNUBH, task_id, "received")
    fhir = await fed.call("GET", "snubh", f"/Bundle/{doc_id}", as_=SNUBH)
    assert fhir.status_code == 200, fhir.text
    served, expected = fhir.json(), cda_to_fhir(xml)
    assert served["entry"][0]["resource"]["type"] == expected["entry"][0]["resource"]["type"]
    conditions = [
        e["resource"]["code"] for e in served["entry"] if e["resource"]["resourceType"] == "Condition"
    ]
    assert conditions == [
        e["resource"]["code"] for e in expected["entry"] if e["resource"]["resourceType"] == "Condition"
    ]
    assert rrn not in fhir.text
    assert rrn.replace("-", "") not in fhir.text
    [read] = await retrieved_by(fed, "snubh", SNUBH, key, doc_id)
    assert read["actor_institution"] == SNUBH

    # The same consent rules: after withdrawal neither the FHIR nor the CDA form is served.
    fed.desk.withdraw(rrn)
    for accept in (CDA_MEDIA_TYPE, "application/fhir+json"):
        denied = await fed.call("GET", "snubh", f"/Bundle/{doc_id}", as_=SNUBH, headers={"Accept": accept})
        assert denied.status_code == 403
        assert "deny-withdrawn" in denied.json()["issue"][0]["diagnostics"]


async def test_a_fhir_hospital_sends_a_patient_to_a_cda_clinic_across_hubs(
    federation: Federation, rrn: str
) -> None:
    fed = federation
    fed.desk.grant(rrn)
    key = fed.desk.key(rrn)

    # SNUBH (FHIR-speaking) returns the patient to the clinic; the clinic's EMR reads K-CDA at severance.
    note = build_document(
        DocumentType.RETURN,
        author_code=SNUBH,
        author_name=SNUBH_NAME,
        patient_rrn=rrn,
        recipient_code=SEVERANCE_CLINIC,
        recipient_name=CLINIC_NAME,
    )
    returned = await fed.publish(
        "snubh",
        SNUBH,
        build_submission([note], author_code=SNUBH, patient_rrn=rrn, recipients=[SEVERANCE_CLINIC]),
    )
    [note_id], [return_task] = located(returned, "DocumentReference"), located(returned, "Task")
    await fed.task_arrives("severance", SEVERANCE_CLINIC, return_task, "received")
    as_cda = await get_cda(fed, "severance", note_id, SEVERANCE_CLINIC)
    assert as_cda.status_code == 200, as_cda.text
    assert as_cda.headers["content-type"].startswith(CDA_MEDIA_TYPE)
    root = parse_xml(as_cda.content)
    assert root.find(f"{V3}templateId").get("root") == "1.2.410.100110.40.2.1.2"  # type: ignore[union-attr]
    document_root = root.find(f"{V3}id").get("root") or ""  # type: ignore[union-attr]
    assert document_root.startswith(f"1.2.410.100110.40.2.1.2.{SNUBH}.")
    assert kcd_codes(as_cda.content) == {"I10"}
    assert rrn not in as_cda.text  # the patient key, never the RRN
    assert rrn.replace("-", "") not in as_cda.text
    cda_to_fhir(as_cda.content)  # what the hub serves passes its own K-CDA rules
    [read] = await retrieved_by(fed, "severance", SEVERANCE_CLINIC, key, note_id)
    assert read["actor_institution"] == SEVERANCE_CLINIC

    # Refused like any ITI-68 once the clinic is excluded by the patient.
    fed.desk.exclude(rrn, SEVERANCE_CLINIC)
    denied = await get_cda(fed, "severance", note_id, SEVERANCE_CLINIC)
    assert denied.status_code == 403, denied.text
    assert denied.json()["resourceType"] == "OperationOutcome"


async def test_an_rrn_outside_the_patient_id_is_refused_and_nothing_stored(
    federation: Federation, rrn: str
) -> None:
    fed = federation
    fed.desk.grant(rrn)
    # setId is not mapped to FHIR: only the check of the XML the hub would keep can find it there.
    xml = clinic_referral(rrn).replace(
        b"<title>", f'<setId root="1.2.3" extension="{rrn}" /><title>'.encode(), 1
    )
    answer = await fed.publish(
        "severance", SEVERANCE_CLINIC, cda_submission(xml, SEVERANCE_CLINIC, rrn, [SNUBH])
    )
    assert "resident registration number" in refused(answer, 400)
    assert rrn not in answer.text
    assert await fed.patient_rows("severance", fed.desk.key(rrn)) == []


async def test_without_consent_a_cda_referral_is_not_stored(federation: Federation, rrn: str) -> None:
    fed = federation
    xml = clinic_referral(rrn)
    answer = await fed.publish(
        "severance", SEVERANCE_CLINIC, cda_submission(xml, SEVERANCE_CLINIC, rrn, [SNUBH])
    )
    refused(answer, 403)
    assert await fed.patient_rows("severance", fed.desk.key(rrn)) == []


async def test_a_fhir_document_is_retrieved_as_generated_kcda_with_a_stable_shape(
    federation: Federation, rrn: str
) -> None:
    fed = federation
    fed.desk.grant(rrn)
    document = build_document(
        DocumentType.CARE_RECORD_SUMMARY,
        author_code=SEVERANCE_CLINIC,
        author_name=CLINIC_NAME,
        patient_rrn=rrn,
    )
    stored = await fed.publish(
        "severance",
        SEVERANCE_CLINIC,
        build_submission([document], author_code=SEVERANCE_CLINIC, patient_rrn=rrn),
    )
    [doc_id] = located(stored, "DocumentReference")
    first = await get_cda(fed, "severance", doc_id, SEVERANCE_CLINIC)
    assert first.status_code == 200, first.text
    back = cda_to_fhir(first.content)
    kinds = [e["resource"]["resourceType"] for e in back["entry"]]
    original = [e["resource"]["resourceType"] for e in copy.deepcopy(document)["entry"]]
    assert sorted(k for k in kinds if k not in ("Organization",)) == sorted(
        k for k in original if k != "Organization"
    )


def kcda_content(docref: dict[str, Any]) -> dict[str, Any]:
    """The DocumentReference's K-CDA content (its second), checked for what a K-CDA reader needs."""
    contents = docref["content"]
    assert [c["attachment"]["contentType"] for c in contents] == ["application/fhir+json", CDA_MEDIA_TYPE]
    second = contents[1]
    assert second["attachment"]["url"] == f"Bundle/{docref['id']}"
    assert second["attachment"]["language"] == "ko-KR"
    assert "data" not in second["attachment"]  # generated on demand
    return second


async def test_a_fhir_document_offers_its_kcda_rendition_at_both_hubs(
    federation: Federation, rrn: str
) -> None:
    """Issue 17 point 2: a document published as FHIR shows a K-CDA second content on every
    DocumentReference the hubs return (read, ITI-67, the walk-in search), and its url with Accept
    application/hl7-cda+xml serves exactly the bytes its size and hash describe, the same at the
    author's hub and at the recipient's."""
    fed = federation
    fed.desk.grant(rrn)
    note = build_document(
        DocumentType.RETURN,
        author_code=SNUBH,
        author_name=SNUBH_NAME,
        patient_rrn=rrn,
        recipient_code=SEVERANCE_CLINIC,
        recipient_name=CLINIC_NAME,
    )
    returned = await fed.publish(
        "snubh",
        SNUBH,
        build_submission([note], author_code=SNUBH, patient_rrn=rrn, recipients=[SEVERANCE_CLINIC]),
    )
    [note_id], [task_id] = located(returned, "DocumentReference"), located(returned, "Task")
    await fed.task_arrives("severance", SEVERANCE_CLINIC, task_id, "received")

    served: list[bytes] = []
    for hub, reader in (("snubh", SNUBH), ("severance", SEVERANCE_CLINIC)):
        read = await fed.call("GET", hub, f"/DocumentReference/{note_id}", as_=reader)
        assert read.status_code == 200, read.text
        second = kcda_content(read.json())
        assert second["format"] == {"system": "urn:ietf:rfc:3986", "code": "urn:oid:1.2.410.100110.40.2.1.2"}
        [found] = [d for d in matches(await fed.search(hub, reader, rrn)) if d["id"] == note_id]
        assert kcda_content(found) == second
        url = second["attachment"]["url"]
        as_cda = await fed.call("GET", hub, f"/{url}", as_=reader, headers={"Accept": CDA_MEDIA_TYPE})
        assert as_cda.status_code == 200, as_cda.text
        assert as_cda.headers["content-type"].startswith(CDA_MEDIA_TYPE)
        root = parse_xml(as_cda.content)
        assert root.find(f"{V3}templateId").get("root") == "1.2.410.100110.40.2.1.2"  # type: ignore[union-attr]
        assert second["attachment"]["size"] == len(as_cda.content)
        assert (
            second["attachment"]["hash"] == base64.b64encode(hashlib.sha1(as_cda.content).digest()).decode()
        )
        again = await fed.call("GET", hub, f"/{url}", as_=reader, headers={"Accept": CDA_MEDIA_TYPE})
        assert again.content == as_cda.content
        served.append(as_cda.content)
    assert served[0] == served[1]  # the recipient's hub serves the same K-CDA as the author's

    # The walk-in search through the clinic's hub finds the same rendition on what each hub holds.
    walk_in = matches(await fed.search("severance", SEVERANCE_CLINIC, rrn, _federated="true"))
    found = [d for d in walk_in if d["id"] == note_id]
    assert found
    for docref in found:
        assert kcda_content(docref)["attachment"]["size"] == len(served[0])

    # A DocumentReference PUT back as read (with the rendition) changes only its status.
    read = (await fed.call("GET", "snubh", f"/DocumentReference/{note_id}", as_=SNUBH)).json()
    put = await fed.call(
        "PUT",
        "snubh",
        f"/DocumentReference/{note_id}",
        as_=SNUBH,
        json={**read, "status": "entered-in-error"},
        headers={"Content-Type": "application/fhir+json"},
    )
    assert put.status_code == 200, put.text
    assert kcda_content(put.json()) == kcda_content(read)
