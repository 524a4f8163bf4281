"""Clinical entries both ways: one FHIR resource <-> one CDA entry act (C-CDA shapes, K-CDA codes).

Condition <-> observation (code 55607006 Problem, value CD = the KCD-8 diagnosis);
MedicationStatement <-> substanceAdministration (consumable material = the HIRA EDI / KD code);
Observation <-> observation (value PQ, ST or CD); Procedure <-> procedure; AllergyIntolerance <->
observation (allergy type code, the substance as the consumable participant); ImagingStudy <->
observation of class DGIMG (id = Study Instance UID, id with extension = accession number).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

from hie_schemas import codes
from hie_schemas.cda.vocabulary import SNOMED, UCUM, from_ts, system_oid, system_uri, to_ts
from hie_schemas.cda.xml import XSI_TYPE, CdaError, Node, tag
from hie_schemas.codes import Section
from hie_schemas.documents.bundle import BundleIndex, Json, codings, dicts, obj, text

_TERMINOLOGY = "http://terminology.hl7.org/CodeSystem"
PROBLEM = ("55607006", "Problem")
ALLERGY_TYPES = {  # AllergyIntolerance.category <-> the SNOMED allergy type of the CDA observation
    "medication": ("416098002", "Drug allergy"),
    "food": ("414285001", "Food allergy"),
    "environment": ("426232007", "Environmental allergy"),
    "biologic": ("419199007", "Allergy to substance"),
}
_ALLERGY_CODES = {code: category for category, (code, _) in ALLERGY_TYPES.items()}
_MED_STATUS = {"active": "active", "completed": "completed", "stopped": "aborted", "on-hold": "suspended"}
_MED_STATUS_BACK = {v: k for k, v in _MED_STATUS.items()}
_OBS_CATEGORY = {
    Section.RESULTS: "laboratory",
    Section.KEY_RESULTS: "laboratory",
    Section.VITAL_SIGNS: "vital-signs",
    Section.SOCIAL_HISTORY: "social-history",
    Section.IMAGING_FINDINGS: "imaging",
}


def sub(parent: ET.Element, local: str, content: str | None = None, /, **attrs: str | None) -> ET.Element:
    """A child element of the CDA namespace; attributes given as None are left out."""
    element = ET.SubElement(parent, tag(local), {k: v for k, v in attrs.items() if v is not None})
    if content is not None:
        element.text = content
    return element


# --- writing -----------------------------------------------------------------------------------------


def concept(parent: ET.Element, local: str, value: Json, **attrs: str) -> ET.Element:
    """A CD: the first coding as code/codeSystem, the others as translations, the text as originalText."""
    coded = [c for c in codings(value) if text(c.get("code")) and text(c.get("system"))]
    element = sub(parent, local, **attrs)
    if coded:
        first = coded[0]
        element.attrib.update(_code_attributes(first))
    else:
        element.set("nullFlavor", "OTH")
    label = text(value.get("text"))
    if label:
        sub(element, "originalText", label)
    for extra in coded[1:]:
        sub(element, "translation", **_code_attributes(extra))
    return element


def _code_attributes(coding: Json) -> dict[str, str]:
    system = str(coding["system"])
    oid = system_oid(system)
    attrs = {"code": str(coding["code"]), "codeSystem": oid}
    if oid.startswith("2.25."):  # self-assigned: the URI says which system it is (vocabulary.py)
        attrs["codeSystemName"] = system
    display = text(coding.get("display"))
    return attrs | ({"displayName": display} if display else {})


def _status_code(resource: Json, element: str) -> str | None:
    for coding in codings(resource.get(element)):
        if text(coding.get("code")):
            return str(coding["code"])
    return None


def _time(parent: ET.Element, value: Any) -> None:
    if isinstance(value, str) and value:
        sub(parent, "effectiveTime", value=to_ts(value))


def _problem(entry: ET.Element, resource: Json, _: BundleIndex, __: Section | None) -> None:
    act = sub(entry, "observation", classCode="OBS", moodCode="EVN")
    sub(act, "code", code=PROBLEM[0], codeSystem=system_oid(SNOMED), displayName=PROBLEM[1])
    clinical = _status_code(resource, "clinicalStatus") or "active"
    sub(act, "statusCode", code="active" if clinical in ("active", "recurrence", "relapse") else "completed")
    _time(act, resource.get("recordedDate"))
    concept(act, "value", obj(resource.get("code")), **{XSI_TYPE: "CD"})


def _medication(entry: ET.Element, resource: Json, index: BundleIndex, _: Section | None) -> None:
    act = sub(entry, "substanceAdministration", classCode="SBADM", moodCode="EVN")
    dosage = [text(d.get("text")) for d in dicts(resource.get("dosage"))]
    if any(dosage):
        sub(act, "text", "; ".join(d for d in dosage if d))
    sub(act, "statusCode", code=_MED_STATUS.get(text(resource.get("status")) or "", "completed"))
    _time(act, resource.get("dateAsserted"))
    material = obj(resource.get("medicationCodeableConcept"))
    target = index.resolve(resource.get("medicationReference"))
    if target is not None:
        material = obj(target.resource.get("code"))
    product = sub(sub(act, "consumable"), "manufacturedProduct")
    concept(sub(product, "manufacturedMaterial"), "code", material)


def _observation(entry: ET.Element, resource: Json, _: BundleIndex, __: Section | None) -> None:
    act = sub(entry, "observation", classCode="OBS", moodCode="EVN")
    concept(act, "code", obj(resource.get("code")))
    status = text(resource.get("status"))
    sub(act, "statusCode", code="completed" if status in ("final", "amended", "corrected") else "active")
    _time(act, resource.get("effectiveDateTime"))
    quantity = obj(resource.get("valueQuantity"))
    if "value" in quantity:
        unit = text(quantity.get("code")) or text(quantity.get("unit"))
        sub(act, "value", **{XSI_TYPE: "PQ", "value": _number(quantity["value"]), "unit": unit})
    elif isinstance(resource.get("valueString"), str):
        sub(act, "value", resource["valueString"], **{XSI_TYPE: "ST"})
    elif isinstance(resource.get("valueCodeableConcept"), dict):
        concept(act, "value", resource["valueCodeableConcept"], **{XSI_TYPE: "CD"})


def _number(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _procedure(entry: ET.Element, resource: Json, _: BundleIndex, __: Section | None) -> None:
    act = sub(entry, "procedure", classCode="PROC", moodCode="EVN")
    concept(act, "code", obj(resource.get("code")))
    sub(act, "statusCode", code="completed" if resource.get("status") == "completed" else "active")
    _time(act, resource.get("performedDateTime"))


def _allergy(entry: ET.Element, resource: Json, _: BundleIndex, __: Section | None) -> None:
    act = sub(entry, "observation", classCode="OBS", moodCode="EVN")
    categories = [c for c in resource.get("category") or [] if c in ALLERGY_TYPES]
    code, display = ALLERGY_TYPES[categories[0] if categories else "biologic"]
    sub(act, "code", code=code, codeSystem=system_oid(SNOMED), displayName=display)
    clinical = _status_code(resource, "clinicalStatus") or "active"
    sub(act, "statusCode", code="active" if clinical == "active" else "completed")
    _time(act, resource.get("recordedDate"))
    role = sub(sub(act, "participant", typeCode="CSM"), "participantRole", classCode="MANU")
    concept(sub(role, "playingEntity", classCode="MMAT"), "code", obj(resource.get("code")))


def _study(entry: ET.Element, resource: Json, _: BundleIndex, __: Section | None) -> None:
    act = sub(entry, "observation", classCode="DGIMG", moodCode="EVN")
    for identifier in dicts(resource.get("identifier")):
        value = text(identifier.get("value")) or ""
        if identifier.get("system") == codes.DICOM_UID:
            sub(act, "id", root=value.removeprefix("urn:oid:"))
        elif value and any(c.get("code") == "ACSN" for c in codings(identifier.get("type"))):
            sub(act, "id", root=system_oid("urn:dicom:accession-number"), extension=value)
    modality = next((m for m in dicts(resource.get("modality")) if text(m.get("code"))), None)
    if modality is not None:
        sub(act, "code", **_code_attributes(modality))
    sub(act, "statusCode", code="completed")
    _time(act, resource.get("started"))


_WRITERS: dict[str, Callable[[ET.Element, Json, BundleIndex, Section | None], None]] = {
    "Condition": _problem,
    "MedicationStatement": _medication,
    "MedicationRequest": _medication,
    "Observation": _observation,
    "Procedure": _procedure,
    "AllergyIntolerance": _allergy,
    "ImagingStudy": _study,
}


def write_entry(section: ET.Element, index: BundleIndex, resource: Json, code: Section | None) -> None:
    """One CDA entry for ``resource``; a resource type K-CDA has no entry for is left to the narrative."""
    writer = _WRITERS.get(text(resource.get("resourceType")) or "")
    if writer is not None:
        writer(sub(section, "entry", typeCode="DRIV"), resource, index, code)


# --- reading -----------------------------------------------------------------------------------------


def read_concept(node: Node | None) -> Json:
    """A CodeableConcept of a CD (code + translations + originalText); {} when absent."""
    if node is None:
        return {}
    result: Json = {}
    found = [node, *list(node.all("translation"))]
    coded = [_coding(n) for n in found if n.attr("code") and n.attr("codeSystem")]
    if coded:
        result["coding"] = coded
    label = node.child_text("originalText") or (coded[0].get("display") if coded else None)
    if label:
        result["text"] = label
    return result


def _coding(node: Node) -> Json:
    coding: Json = {"system": system_uri(node.attr("codeSystem") or "", node.attr("codeSystemName"))}
    coding["code"] = node.attr("code")
    display = node.attr("displayName")
    return coding | ({"display": display} if display else {})


def _read_time(act: Node) -> str | None:
    time = act.first("effectiveTime")
    value = time.attr("value") if time is not None else None
    if value is None:
        return None
    converted = from_ts(value)
    if converted is None:
        raise CdaError(f"{value[:30]!r} is not an HL7 timestamp", f"{time.path}/@value" if time else act.path)
    return converted


def _status(system: str, code: str) -> Json:
    return {"coding": [{"system": f"{_TERMINOLOGY}/{system}", "code": code}]}


def _read_problem(act: Node) -> Json:
    value = act.first("value")
    if value is None or not value.attr("code"):
        raise CdaError(
            "a problem observation needs its diagnosis code in value", f"{act.path}/value", code="required"
        )
    active = (act.first("statusCode") or act).attr("code") != "completed"
    resource: Json = {
        "resourceType": "Condition",
        "clinicalStatus": _status("condition-clinical", "active" if active else "resolved"),
        "verificationStatus": _status("condition-ver-status", "confirmed"),
        "category": [_status("condition-category", "problem-list-item")],
        "code": read_concept(value),
    }
    recorded = _read_time(act)
    return resource | ({"recordedDate": recorded} if recorded else {})


def _read_allergy(act: Node, category: str) -> Json:
    substance = act.first("participant", "participantRole", "playingEntity", "code")
    active = (act.first("statusCode") or act).attr("code") != "completed"
    resource: Json = {
        "resourceType": "AllergyIntolerance",
        "clinicalStatus": _status("allergyintolerance-clinical", "active" if active else "resolved"),
        "verificationStatus": _status("allergyintolerance-verification", "confirmed"),
        "type": "allergy",
        "category": [category],
        "code": read_concept(substance),
    }
    recorded = _read_time(act)
    return resource | ({"recordedDate": recorded} if recorded else {})


def _read_study(act: Node) -> Json:
    identifiers: list[Json] = []
    for node in act.all("id"):
        root, extension = node.attr("root"), node.attr("extension")
        if root and extension:
            acsn = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}
            identifiers.append({"type": acsn, "value": extension})
        elif root:
            identifiers.insert(0, {"system": codes.DICOM_UID, "value": f"urn:oid:{root}"})
    resource: Json = {"resourceType": "ImagingStudy", "identifier": identifiers, "status": "available"}
    code = act.first("code")
    if code is not None and code.attr("code"):
        resource["modality"] = [_coding(code)]
    started = _read_time(act)
    return resource | ({"started": started} if started else {})


def _read_observation(act: Node, section: Section | None) -> Json:
    resource: Json = {"resourceType": "Observation"}
    status = (act.first("statusCode") or act).attr("code")
    resource["status"] = "final" if status in (None, "completed") else "preliminary"
    category = _OBS_CATEGORY.get(section) if section is not None else None
    if category:
        resource["category"] = [_status("observation-category", category)]
    resource["code"] = read_concept(act.first("code"))
    when = _read_time(act)
    if when:
        resource["effectiveDateTime"] = when
    value = act.first("value")
    kind = value.attr(XSI_TYPE) if value is not None else None
    if value is not None and kind == "PQ":
        unit = value.attr("unit")
        raw = value.attr("value") or ""
        try:
            measured = float(raw)
        except ValueError:
            raise CdaError("a PQ value needs a number", f"{value.path}/@value") from None
        # An integer stays an integer (FHIR decimal keeps the precision it was written with).
        number: float | int = int(measured) if measured.is_integer() and "." not in raw else measured
        resource["valueQuantity"] = {"value": number} | (
            {"unit": unit, "system": UCUM, "code": unit} if unit else {}
        )
    elif value is not None and kind == "CD":
        resource["valueCodeableConcept"] = read_concept(value)
    elif value is not None:
        resource["valueString"] = value.text()
    return resource


def _read_medication(act: Node, status: str | None) -> Json:
    material = act.first("consumable", "manufacturedProduct", "manufacturedMaterial", "code")
    if material is None:
        where = f"{act.path}/consumable/manufacturedProduct/manufacturedMaterial/code"
        raise CdaError("a medication needs its material code", where, code="required")
    resource: Json = {
        "resourceType": "MedicationStatement",
        "status": _MED_STATUS_BACK.get(status or "", "completed"),
        "medicationCodeableConcept": read_concept(material),
    }
    asserted = _read_time(act)
    if asserted:
        resource["dateAsserted"] = asserted
    dosage = act.child_text("text")
    return resource | ({"dosage": [{"text": dosage}]} if dosage else {})


def read_entry(entry: Node, section: Section | None) -> Json | None:
    """The FHIR resource (no id, no subject yet) of one CDA entry; None for an act K-CDA does not map."""
    medication = entry.first("substanceAdministration")
    if medication is not None:
        return _read_medication(medication, (medication.first("statusCode") or medication).attr("code"))
    procedure = entry.first("procedure")
    if procedure is not None:
        resource: Json = {"resourceType": "Procedure", "code": read_concept(procedure.first("code"))}
        active = (procedure.first("statusCode") or procedure).attr("code") == "active"
        resource["status"] = "in-progress" if active else "completed"
        performed = _read_time(procedure)
        return resource | ({"performedDateTime": performed} if performed else {})
    act = entry.first("observation")
    if act is None:
        return None
    if act.attr("classCode") == "DGIMG":
        return _read_study(act)
    code = (act.first("code") or act).attr("code")
    if code == PROBLEM[0]:
        return _read_problem(act)
    if code in _ALLERGY_CODES and act.first("participant") is not None:
        return _read_allergy(act, _ALLERGY_CODES[code])
    return _read_observation(act, section)
