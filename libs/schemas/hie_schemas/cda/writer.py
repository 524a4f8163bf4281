"""FHIR document Bundle -> K-CDA (CDA R2 with the Korean document templates), pure.

The header carries the template, the document id, the patient, the author institution, the
custodian and the recipients; each Composition.section becomes a CDA section with its narrative and
one entry per resource it references (the mapping table is in docs/kcda.md).
"""

from __future__ import annotations

import random
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import datetime
from typing import Any

from hie_schemas import codes
from hie_schemas.cda import entries as E
from hie_schemas.cda.entries import sub
from hie_schemas.cda.vocabulary import (
    ADMINISTRATIVE_GENDER,
    CDA_TYPE_ID,
    CONFIDENTIALITY,
    system_oid,
    to_ts,
)
from hie_schemas.cda.xml import V3, XSI, CdaError, parse_xml, tag
from hie_schemas.codes import DocumentKind
from hie_schemas.documents.bundle import BundleIndex, Json, codings, composition_of, dicts, obj, text
from hie_schemas.documents.profiles import author_institution, kind_of, section_of
from hie_schemas.identifiers import KRNPI_SYSTEM, institution_oid

INFORMATION_RECIPIENT_URL = "http://hl7.org/fhir/ccda/StructureDefinition/InformationRecipientExtension"
_GENDERS = {"male": "M", "female": "F", "other": "UN"}
_XHTML_LI = "{http://www.w3.org/1999/xhtml}li"


def document_id_root(kind: DocumentKind, institution: str, when: datetime, rand: Callable[[], int]) -> str:
    """The national rule: <template OID>.<요양기관기호>.<timestamp><random>, one OID arc for the last two."""
    return f"{kind.template_oid}.{institution}.{when.strftime('%Y%m%d%H%M%S')}{rand() % 1_000_000:06d}"


def _document_id(
    document: Json, kind: DocumentKind, institution: str, when: datetime, rand: Any
) -> tuple[str, str | None]:
    """The document's own K-CDA id when it came in as one (urn:oid:<template OID>...), else a new one."""
    identifier = obj(document.get("identifier"))
    system, value = text(identifier.get("system")) or "", text(identifier.get("value")) or ""
    if value.startswith(f"urn:oid:{kind.template_oid}."):
        return value[8:], None
    if system.startswith(f"urn:oid:{kind.template_oid}.") and value:
        return system[8:], value
    return document_id_root(kind, institution, when, rand), None


def fhir_to_cda(document: Json, *, rand: Callable[[], int] = lambda: random.randrange(1_000_000)) -> bytes:
    """The K-CDA XML (UTF-8) of a FHIR document of one of the six kinds; ``CdaError`` names the
    FHIRPath of what is missing (a document that passed the hub's profile checks always converts)."""
    composition = composition_of(document)
    if composition is None:
        raise CdaError("the first entry of a document must be its Composition", "Bundle.entry[0].resource")
    kind = kind_of(composition.get("type"))
    if kind is None:
        raise CdaError("Composition.type names no K-CDA template", "Bundle.entry[0].resource.type")
    institution = author_institution(document)
    if institution is None:
        message = "the custodian or author Organization needs a 요양기관기호"
        raise CdaError(message, "Bundle.entry[0].resource.custodian", code="required")
    raw_date = text(composition.get("date")) or ""
    try:
        when = datetime.fromisoformat(raw_date)
    except ValueError:
        raise CdaError("Composition.date must be a dateTime", "Bundle.entry[0].resource.date") from None
    index = BundleIndex(document)
    root = ET.Element(tag("ClinicalDocument"), {f"{{{XSI}}}schemaLocation": f"{V3} CDA.xsd"})
    sub(root, "realmCode", code="KR")
    sub(root, "typeId", root=CDA_TYPE_ID[0], extension=CDA_TYPE_ID[1])
    sub(root, "templateId", root=kind.template_oid)
    id_root, id_extension = _document_id(document, kind, institution, when, rand)
    sub(root, "id", root=id_root, extension=id_extension)
    if kind.loinc:
        sub(root, "code", code=kind.loinc, codeSystem=system_oid(codes.LOINC), displayName=kind.display)
    else:
        sub(sub(root, "code", nullFlavor="OTH"), "originalText", kind.korean)
    sub(root, "title", text(composition.get("title")) or kind.korean)
    sub(root, "effectiveTime", value=to_ts(raw_date))
    confidentiality = text(composition.get("confidentiality")) or "N"
    sub(root, "confidentialityCode", code=confidentiality, codeSystem=CONFIDENTIALITY)
    sub(root, "languageCode", code="ko-KR")
    _record_target(root, index, composition)
    _authors(root, index, composition, to_ts(raw_date))
    custodian = index.resolve(composition.get("custodian"))
    custodian_org = sub(sub(root, "custodian"), "assignedCustodian")
    _organization(custodian_org, "representedCustodianOrganization", custodian.resource if custodian else {})
    _recipients(root, index, composition)
    body = sub(sub(root, "component"), "structuredBody")
    for section in dicts(composition.get("section")):
        _section(sub(body, "component"), index, section)
    xml: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return xml


def identifiers(parent: ET.Element, local: str, values: list[Json]) -> None:
    for identifier in values:
        system, value = text(identifier.get("system")), text(identifier.get("value"))
        if system == KRNPI_SYSTEM and value:
            sub(parent, local, root=institution_oid(value))
        elif system and value:
            sub(parent, local, root=system_oid(system), extension=value, assigningAuthorityName=system)
    if not values:
        sub(parent, local, nullFlavor="NI")


def _record_target(root: ET.Element, index: BundleIndex, composition: Json) -> None:
    located = index.resolve(composition.get("subject"))
    patient = located.resource if located is not None else {}
    role = sub(sub(root, "recordTarget"), "patientRole")
    identifiers(role, "id", dicts(patient.get("identifier")))
    person = sub(role, "patient")
    for name in dicts(patient.get("name"))[:1]:
        _name(person, name)
    gender = _GENDERS.get(text(patient.get("gender")) or "")
    if gender:
        sub(person, "administrativeGenderCode", code=gender, codeSystem=ADMINISTRATIVE_GENDER)
    else:
        sub(person, "administrativeGenderCode", nullFlavor="UNK")
    birth = text(patient.get("birthDate"))
    if birth:
        sub(person, "birthTime", value=to_ts(birth))


def _name(parent: ET.Element, name: Json) -> None:
    element = sub(parent, "name")
    family, given = text(name.get("family")), [g for g in name.get("given") or [] if isinstance(g, str)]
    full = text(name.get("text"))
    if family and full == family + "".join(given):
        sub(element, "family", family)
        for part in given:
            sub(element, "given", part)
    else:
        element.text = full or " ".join([*given, family or ""]).strip()


def _organization(parent: ET.Element, local: str, organization: Json) -> None:
    element = sub(parent, local)
    identifiers(element, "id", dicts(organization.get("identifier")))
    name = text(organization.get("name"))
    if name:
        sub(element, "name", name)


def _authors(root: ET.Element, index: BundleIndex, composition: Json, when: str) -> None:
    for reference in dicts(composition.get("author")):
        target = index.resolve(reference)
        if target is None:
            continue
        resource, kind = target.resource, target.resource_type
        author = sub(root, "author")
        sub(author, "time", value=when)
        assigned = sub(author, "assignedAuthor")
        if kind == "PractitionerRole":
            practitioner = index.resolve(resource.get("practitioner"))
            person = practitioner.resource if practitioner else {}
            identifiers(assigned, "id", dicts(person.get("identifier")))
            for specialty in dicts(resource.get("specialty"))[:1]:
                E.concept(assigned, "code", specialty)
            for name in dicts(person.get("name"))[:1]:
                _name(sub(assigned, "assignedPerson"), name)
            organization = index.resolve(resource.get("organization"))
            _organization(assigned, "representedOrganization", organization.resource if organization else {})
        elif kind == "Organization":
            identifiers(assigned, "id", dicts(resource.get("identifier")))
            _organization(assigned, "representedOrganization", resource)
        elif kind == "Device":
            sub(assigned, "id", nullFlavor="NA")
            device = sub(assigned, "assignedAuthoringDevice")
            names = [text(n.get("name")) for n in dicts(resource.get("deviceName"))]
            sub(device, "softwareName", next((n for n in names if n), "device"))
        else:  # a Practitioner alone
            identifiers(assigned, "id", dicts(resource.get("identifier")))
            for name in dicts(resource.get("name"))[:1]:
                _name(sub(assigned, "assignedPerson"), name)


def _recipients(root: ET.Element, index: BundleIndex, composition: Json) -> None:
    for extension in dicts(composition.get("extension")):
        if extension.get("url") != INFORMATION_RECIPIENT_URL:
            continue
        target = index.resolve(extension.get("valueReference"))
        if target is not None and target.resource_type == "Organization":
            intended = sub(sub(root, "informationRecipient"), "intendedRecipient")
            _organization(intended, "receivedOrganization", target.resource)


def narrative_lines(section: Json) -> list[str]:
    """The lines of a FHIR narrative: its list items, else its text as one line."""
    div = text(obj(section.get("text")).get("div"))
    if div is None:
        return []
    try:
        root = parse_xml(div.encode())
    except CdaError:
        return []
    items = ["".join(li.itertext()).strip() for li in root.iter(_XHTML_LI)]
    if items:
        return [item for item in items if item]
    whole = " ".join("".join(root.itertext()).split())
    return [whole] if whole else []


def _section(component: ET.Element, index: BundleIndex, section: Json) -> None:
    element = sub(component, "section")
    code = section_of(section)
    title = text(section.get("title"))
    concept = obj(section.get("code"))
    if code is not None:
        system = codes.section_system(code)
        sub(element, "code", code=code.value, codeSystem=system_oid(system), displayName=title)
    elif codings(concept):
        E.concept(element, "code", concept)
    if title:
        sub(element, "title", title)
    lines = narrative_lines(section)
    narrative = sub(element, "text")
    if lines:
        listing = sub(narrative, "list")
        for line in lines:
            sub(listing, "item", line)
    for reference in dicts(section.get("entry")):
        target = index.resolve(reference)
        if target is not None:
            E.write_entry(element, index, target.resource, code)
