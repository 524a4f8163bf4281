"""K-CDA (CDA R2 XML, one of the six Korean templates) -> the FHIR document Bundle the hub stores.

The result has the shape ``hie_schemas.documents.builders.build_document`` gives an EMR's FHIR
document: Composition first (template + LOINC type codings), then Patient, Organizations,
Practitioner/PractitionerRole, the recipient Organization (InformationRecipientExtension) and one
resource per CDA entry, every resource with a uuid id and urn:uuid fullUrl.
"""

from __future__ import annotations

import html
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable

from hie_schemas import codes
from hie_schemas.cda import rules
from hie_schemas.cda.entries import read_concept, read_entry
from hie_schemas.cda.vocabulary import from_ts, institution_code, system_uri
from hie_schemas.cda.writer import INFORMATION_RECIPIENT_URL
from hie_schemas.cda.xml import Node, parse_xml, tag
from hie_schemas.codes import DocumentKind, Section
from hie_schemas.documents.bundle import Json
from hie_schemas.identifiers import KRNPI_SYSTEM

URI_SYSTEM = "urn:ietf:rfc:3986"
_GENDERS = {"M": "male", "F": "female", "UN": "other"}


def identifier(node: Node) -> Json | None:
    """A FHIR Identifier of an II: the 요양기관기호 by KR Core's system, others by their root's URI."""
    root, extension = node.attr("root"), node.attr("extension")
    if root is None:
        return None
    code = institution_code(root)
    if code is not None and extension is None:
        return {"use": "official", "system": KRNPI_SYSTEM, "value": code}
    if extension is None:
        return {"system": URI_SYSTEM, "value": f"urn:oid:{root}"}
    return {"system": system_uri(root, node.attr("assigningAuthorityName")), "value": extension}


def _name(node: Node | None) -> Json | None:
    if node is None:
        return None
    family = node.child_text("family")
    given = [g.text() for g in node.all("given") if g.text()]
    if family:
        return {"use": "official", "text": family + "".join(given), "family": family, "given": given}
    full = node.text()
    return {"text": full} if full else None


class _Document:
    """The entries of the Bundle being built, and the Organizations already in it (one per institution)."""

    def __init__(self, new_id: Callable[[], str]) -> None:
        self.new_id = new_id
        self.entries: list[Json] = []
        self.organizations: dict[tuple[str, ...], Json] = {}
        self.patient: Json = {}

    def add(self, resource: Json) -> Json:
        resource_id = self.new_id()
        full = {"resourceType": resource.pop("resourceType"), "id": resource_id, **resource}
        self.entries.append({"fullUrl": f"urn:uuid:{resource_id}", "resource": full})
        return {"reference": f"urn:uuid:{resource_id}"}

    def organization(self, node: Node | None) -> Json | None:
        if node is None:
            return None
        ids = [i for i in (identifier(n) for n in node.all("id")) if i is not None]
        name = node.child_text("name")
        key = (*(f"{i['system']}|{i['value']}" for i in ids), name or "")
        if key not in self.organizations:
            resource: Json = {"resourceType": "Organization"}
            if ids:
                resource["identifier"] = ids
            if any(i["system"] == KRNPI_SYSTEM for i in ids):
                resource["active"] = True
            if name:
                resource["name"] = name
            self.organizations[key] = self.add(resource)
        return dict(self.organizations[key])


def _patient(doc: Node, built: _Document) -> None:
    role = doc.need("recordTarget", "patientRole")
    patient: Json = {"resourceType": "Patient"}
    ids = [i for i in (identifier(n) for n in role.all("id")) if i is not None]
    patient["identifier"] = [{"use": "official", **i} if "use" not in i else i for i in ids]
    person = role.first("patient")
    name = _name(person.first("name") if person else None)
    if name:
        patient["name"] = [name]
    gender = (person.first("administrativeGenderCode") if person else None) or role
    patient["gender"] = _GENDERS.get(gender.attr("code") or "", "unknown")
    birth = person.first("birthTime") if person else None
    born = from_ts(birth.attr("value") or "") if birth is not None else None
    if born:
        patient["birthDate"] = born[:10]
    built.patient = built.add(patient)


def _author(author: Node, built: _Document) -> list[Json]:
    """The Composition.author references of one CDA author (a role, a device + organization, or an org)."""
    assigned = author.need("assignedAuthor")
    organization = built.organization(assigned.first("representedOrganization"))
    person, device = assigned.first("assignedPerson"), assigned.first("assignedAuthoringDevice")
    if device is not None:
        software = device.child_text("softwareName") or "device"
        found = built.add(
            {"resourceType": "Device", "deviceName": [{"name": software, "type": "user-friendly-name"}]}
        )
        return [found] + ([organization] if organization else [])
    if person is None:
        return [organization] if organization else []
    practitioner: Json = {"resourceType": "Practitioner"}
    ids = [i for i in (identifier(n) for n in assigned.all("id")) if i is not None]
    if ids:
        practitioner["identifier"] = ids
    name = _name(person.first("name"))
    if name:
        practitioner["name"] = [{"text": name["text"]}]
    role: Json = {"resourceType": "PractitionerRole", "practitioner": built.add(practitioner)}
    if organization:
        role["organization"] = organization
    specialty = read_concept(assigned.first("code"))
    if specialty:
        role["specialty"] = [specialty]
    return [built.add(role)]


def _narrative(lines: list[str], status: str) -> Json:
    items = "".join(f"<li>{html.escape(line, quote=False)}</li>" for line in lines)
    return {"status": status, "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><ul>{items}</ul></div>'}


def _lines(section: Node) -> list[str]:
    narrative = section.first("text")
    if narrative is None:
        return []
    items = [" ".join("".join(i.itertext()).split()) for i in narrative.element.iter(tag("item"))]
    items = [i for i in items if i]
    if items:
        return items
    whole = narrative.text()
    return [whole] if whole else []


def _section(section: Node, code: Section | None, built: _Document) -> Json:
    title = section.child_text("title")
    found: Json = {"title": title} if title else {}
    code_node = section.first("code")
    if code is not None:
        coding = {"system": codes.section_system(code), "code": code.value}
        found["code"] = {"coding": [coding]} | ({"text": title} if title else {})
    elif code_node is not None:
        found["code"] = read_concept(code_node)
    refs: list[Json] = []
    studies: list[Json] = []
    imaging: list[Json] = []
    for entry in section.all("entry"):
        resource = read_entry(entry, code)
        if resource is None:
            continue
        owner = "patient" if resource["resourceType"] == "AllergyIntolerance" else "subject"
        resource = {"resourceType": resource.pop("resourceType"), owner: dict(built.patient), **resource}
        ref = built.add(resource)
        refs.append(ref)
        stored = built.entries[-1]["resource"]
        if stored["resourceType"] == "ImagingStudy":
            studies.append(ref)
        elif stored["resourceType"] == "Observation" and code is Section.IMAGING_FINDINGS:
            imaging.append(stored)
    for observation in imaging:
        if studies:
            observation["derivedFrom"] = [dict(s) for s in studies]
    lines = _lines(section)
    if lines or not refs:
        found["text"] = _narrative(lines, "generated" if refs else "additional")
    return found | ({"entry": refs} if refs else {})


def _type(kind: DocumentKind) -> Json:
    codings = [{"system": codes.TEMPLATE_SYSTEM, "code": kind.template_code, "display": kind.korean}]
    if kind.loinc:
        codings.append({"system": codes.LOINC, "code": kind.loinc, "display": kind.display})
    return {"coding": codings, "text": kind.korean}


def cda_to_fhir(
    data: bytes | str | ET.Element, *, new_id: Callable[[], str] = lambda: str(uuid.uuid4())
) -> Json:
    """The FHIR document Bundle of a K-CDA document; ``CdaError`` (with every finding) when the XML
    is not acceptable (400) or breaks a template rule (422)."""
    root = data if isinstance(data, ET.Element) else parse_xml(data)
    doc = rules.document_node(root)
    kind = rules.check(doc)
    built = _Document(new_id)
    composition: Json = {"resourceType": "Composition"}
    built.add(composition)
    _patient(doc, built)
    custodian = built.organization(
        doc.first("custodian", "assignedCustodian", "representedCustodianOrganization")
    )
    authors = [ref for author in doc.all("author") for ref in _author(author, built)]
    recipients = [
        built.organization(r.first("intendedRecipient", "receivedOrganization"))
        for r in doc.all("informationRecipient")
    ]
    sections = [_section(section, code, built) for section, code in rules.sections(doc)]
    when = from_ts(doc.need("effectiveTime").attr("value") or "")
    composition_resource = built.entries[0]["resource"]
    composition_resource.update(
        status="final",
        type=_type(kind),
        subject=dict(built.patient),
        date=when,
        author=authors or ([custodian] if custodian else []),
        title=doc.child_text("title") or kind.korean,
        confidentiality=(doc.first("confidentialityCode") or doc).attr("code") or "N",
    )
    if custodian:
        composition_resource["custodian"] = custodian
    composition_resource["section"] = sections
    extensions = [{"url": INFORMATION_RECIPIENT_URL, "valueReference": r} for r in recipients if r]
    if extensions:
        composition_resource["extension"] = extensions
    doc_id = doc.need("id")
    root_oid, extension = doc_id.attr("root") or "", doc_id.attr("extension")
    document_identifier = (
        {"system": f"urn:oid:{root_oid}", "value": extension}
        if extension
        else {"system": URI_SYSTEM, "value": f"urn:oid:{root_oid}"}
    )
    return {
        "resourceType": "Bundle",
        "id": new_id(),
        "identifier": document_identifier,
        "type": "document",
        "timestamp": when,
        "entry": built.entries,
    }
