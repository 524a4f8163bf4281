"""A care record summary generated on request ($generate-crs) from what a hub holds, under consent."""

from __future__ import annotations

import json
from typing import Any

import httpx
from hub_support import (
    SEVERANCE,
    SEVERANCE_CLINIC,
    SEVERANCE_CLINIC_2,
    Federation,
    located,
    new_rrn,
    refused,
    rrn_forms,
    submit,
)

from hie_schemas import codes
from hie_schemas.codes import DOCUMENT_KINDS, DocumentType, Section
from hie_schemas.documents.profiles import check_document, composition_of
from hie_schemas.fhir import parse_resource
from hie_schemas.identifiers import PATIENT_KEY_SYSTEM, RRN_SYSTEM

CRS = DocumentType.CARE_RECORD_SUMMARY


def parameters(rrn: str, **values: str) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": "patient", "valueIdentifier": {"system": RRN_SYSTEM, "value": rrn}}
    ]
    params += [
        {"name": name, "valueCode" if name == "purpose" else "valueString": value}
        for name, value in values.items()
    ]
    return {"resourceType": "Parameters", "parameter": params}


async def generate(fed: Federation, as_: str, body: Any) -> httpx.Response:
    return await fed.call("POST", "severance", "/$generate-crs", as_=as_, json=body)


def section_codes(summary: dict[str, Any], section: Section) -> set[str]:
    composition = composition_of(summary) or {}
    resources = {e["fullUrl"]: e["resource"] for e in summary["entry"]}
    [found] = [s for s in composition["section"] if s["code"]["coding"][0]["code"] == section.value]
    concepts = [
        resources[entry["reference"]].get("code")
        or resources[entry["reference"]].get("medicationCodeableConcept")
        for entry in found.get("entry", [])
    ]
    return {c["coding"][0]["code"] if c.get("coding") else c["text"] for c in concepts}


async def test_a_summary_is_generated_from_what_the_hub_holds(federation: Federation, rrn: str) -> None:
    fed = federation
    fed.desk.grant(rrn)
    key = fed.desk.key(rrn)
    referral = submit(
        DocumentType.REFERRAL,
        SEVERANCE_CLINIC,
        rrn,
        [SEVERANCE],
        problems=[("I10", "본태성 고혈압"), ("J45.9", "천식")],
        medications=[("645102950", "암로디핀 5mg")],
    )
    [from_referral] = located(await fed.publish("severance", SEVERANCE_CLINIC, referral), "DocumentReference")
    summary_2 = submit(
        CRS,
        SEVERANCE_CLINIC_2,
        rrn,
        problems=[("I10", "본태성 고혈압"), ("E11.9", "2형 당뇨병")],
        allergies=["페니실린"],
        procedures=["위내시경"],
    )
    [from_clinic_2] = located(
        await fed.publish("severance", SEVERANCE_CLINIC_2, summary_2), "DocumentReference"
    )

    # The hub hospital sees the patient as a walk-in: a summary of everything consent lets flow to it.
    response = await generate(fed, SEVERANCE, parameters(rrn))
    assert response.status_code == 200, response.text
    summary = response.json()
    parse_resource(summary, "Bundle")
    assert check_document(summary, DOCUMENT_KINDS[CRS], []) == []
    assert section_codes(summary, Section.PROBLEMS) == {"I10", "J45.9", "E11.9"}  # once per code
    assert section_codes(summary, Section.MEDICATIONS) == {"645102950"}
    assert section_codes(summary, Section.ALLERGIES) == {"페니실린"}
    assert "위내시경" in section_codes(summary, Section.PROCEDURES)
    sources = {e["resource"].get("meta", {}).get("source") for e in summary["entry"][4:]}
    base = fed.hubs["severance"].fhir
    assert sources == {
        f"{base}/DocumentReference/{from_referral}",
        f"{base}/DocumentReference/{from_clinic_2}",
    }
    patient = next(e["resource"] for e in summary["entry"] if e["resource"]["resourceType"] == "Patient")
    assert patient["identifier"][0] == {"use": "official", "system": PATIENT_KEY_SYSTEM, "value": key}
    assert not any(form in json.dumps(summary) for form in rrn_forms(rrn))
    custodian = next(
        e["resource"] for e in summary["entry"] if e["resource"]["resourceType"] == "Organization"
    )
    assert custodian["identifier"][0]["value"] == SEVERANCE
    assert summary["entry"][0]["resource"]["type"]["coding"][0]["system"] == codes.TEMPLATE_SYSTEM

    # The patient excludes the second clinic: its diagnosis no longer appears.
    fed.desk.exclude(rrn, SEVERANCE_CLINIC_2)
    narrower = (await generate(fed, SEVERANCE, parameters(rrn))).json()
    assert section_codes(narrower, Section.PROBLEMS) == {"I10", "J45.9"}

    # Withdrawn: refused, unless in an emergency with a justification (flagged in the audit).
    fed.desk.withdraw(rrn)
    assert "deny-withdrawn" in refused(await generate(fed, SEVERANCE, parameters(rrn)), 403)
    why = "의식 저하로 내원, 보호자 연락 불가"
    emergency = await generate(fed, SEVERANCE, parameters(rrn, purpose="emergency", justification=why))
    assert emergency.status_code == 200, emergency.text
    assert section_codes(emergency.json(), Section.PROBLEMS) == {"I10", "J45.9", "E11.9"}
    audit = [
        r["record"]
        for r in await fed.hubs["severance"].rows("audit_log")
        if r["record"]["patient_key"] == key
    ]
    generated = [a for a in audit if a["action"] == "crs.generate"]
    assert [a["outcome"] for a in generated] == ["success", "success", "denied", "success"]
    assert generated[-1]["detail"]["flagged"]
    assert generated[-1]["detail"]["justification"] == why
    assert set(generated[-1]["document_ids"]) == {from_referral, from_clinic_2}


async def test_bad_requests_for_a_summary(federation: Federation, rrn: str) -> None:
    fed = federation
    refused(await generate(fed, SEVERANCE, parameters(new_rrn())), 404)  # nothing held for that patient
    refused(await generate(fed, SEVERANCE, {"resourceType": "Patient"}), 400)
    refused(await generate(fed, SEVERANCE, {"resourceType": "Parameters", "parameter": []}), 400)
    bad = await generate(fed, SEVERANCE, parameters("991399-1234567"))
    assert "991399" not in refused(bad, 400)
    assert "justification" in refused(
        await generate(fed, SEVERANCE, parameters(rrn, purpose="emergency")), 400
    )
    refused(await generate(fed, SEVERANCE, parameters(rrn, purpose="marketing")), 400)
    refused(await fed.call("POST", "severance", "/$generate-crs", as_=None, json=parameters(rrn)), 401)
