"""The K-CDA template rules, checked on the XML so that each finding names the CDA element.

CDA R2 structure as far as the hub reads it (typeId, one of the six templates, id, effectiveTime,
recordTarget, an author institution), then the template rules of domain.md: referral, return and
consult reply need at least one recipient and the problems section; the care record summary needs
problems; the imaging report needs the reading. Problems must be KCD-8 coded and medications HIRA EDI
or ATC coded, as in the FHIR profile (hie_schemas.documents.profiles.SECTION_RULES).
"""

from __future__ import annotations

from collections.abc import Iterator
from xml.etree.ElementTree import Element

from hie_schemas import codes
from hie_schemas.cda.vocabulary import (
    CDA_TYPE_ID,
    from_ts,
    institution_code,
    is_oid,
    kind_by_template,
    section_by_code,
    system_oid,
)
from hie_schemas.cda.xml import CdaError, Node, tag
from hie_schemas.codes import DocumentKind, Section

ROOT = "/ClinicalDocument"
_CODED = {
    Section.PROBLEMS: (("observation", "value"), (codes.KCD8,)),
    Section.MEDICATIONS: (
        ("substanceAdministration", "consumable", "manufacturedProduct", "manufacturedMaterial", "code"),
        (codes.HIRA_EDI_MEDICATION, codes.ATC),
    ),
}
_CODED[Section.DISCHARGE_MEDICATIONS] = _CODED[Section.MEDICATIONS]


def document_node(root_element: Element) -> Node:
    """The document's root as a Node; 400 when it is not a CDA ClinicalDocument."""
    if root_element.tag != tag("ClinicalDocument"):
        found = root_element.tag[:80]
        message = f"the root element must be ClinicalDocument in namespace urn:hl7-org:v3 (got {found})"
        raise CdaError(message, "/", code="structure", status=400)
    return Node(root_element, ROOT)


def template_of(doc: Node) -> DocumentKind:
    """The document kind named by a K-CDA templateId; CdaError when there is none."""
    roots = [n.attr("root") for n in doc.all("templateId")]
    kinds = [k for k in (kind_by_template(r) for r in roots) if k is not None]
    if len(kinds) != 1:
        found = ", ".join(r for r in roots if r) or "none"
        message = f"exactly one K-CDA document template (1.2.410.100110.40.2.1.1-.6) is needed; found {found}"
        raise CdaError(message, f"{ROOT}/templateId", code="code-invalid")
    return kinds[0]


def sections(doc: Node) -> Iterator[tuple[Node, Section | None]]:
    body = doc.first("component", "structuredBody")
    for component in body.all("component") if body is not None else ():
        section = component.first("section")
        if section is not None:
            yield section, section_by_code((section.first("code") or section).attr("code"))


def institution_of(org: Node | None) -> str | None:
    for node in org.all("id") if org is not None else ():
        code = institution_code(node.attr("root"))
        if code is not None:
            return code
    return None


def _header(doc: Node) -> Iterator[CdaError]:
    type_id = doc.first("typeId")
    if type_id is None or (type_id.attr("root"), type_id.attr("extension")) != CDA_TYPE_ID:
        yield CdaError("typeId must be 2.16.840.1.113883.1.3 / POCD_HD000040 (CDA R2)", f"{ROOT}/typeId")
    doc_id = doc.first("id")
    if doc_id is None or not is_oid(doc_id.attr("root")):
        yield CdaError("the document id needs an OID root", f"{ROOT}/id", code="required")
    when = doc.first("effectiveTime")
    value = when.attr("value") if when is not None else None
    stamp = from_ts(value) if value else None
    if stamp is None or "T" not in stamp:
        message = "effectiveTime needs a date and time with a timezone (YYYYMMDDHHMMSS+ZZZZ)"
        yield CdaError(message, f"{ROOT}/effectiveTime", code="required")
    role = doc.first("recordTarget", "patientRole")
    ids = list(role.all("id")) if role is not None else []
    if not any(n.attr("root") and n.attr("extension") for n in ids):
        message = "the patient needs an id (root OID and extension)"
        yield CdaError(message, f"{ROOT}/recordTarget/patientRole/id", code="required")
    authors = [a.first("assignedAuthor", "representedOrganization") for a in doc.all("author")]
    custodian = doc.first("custodian", "assignedCustodian", "representedCustodianOrganization")
    if custodian is None:
        yield CdaError("custodian is required", f"{ROOT}/custodian", code="required")
    if all(institution_of(org) is None for org in [custodian, *authors]):
        message = "the custodian or author organization needs an id 1.2.410.100110.10.<요양기관기호>"
        yield CdaError(
            message,
            f"{ROOT}/custodian/assignedCustodian/representedCustodianOrganization/id",
            code="required",
        )


def _recipients(doc: Node, kind: DocumentKind) -> Iterator[CdaError]:
    if not kind.needs_recipient:
        return
    received = [r.first("intendedRecipient", "receivedOrganization") for r in doc.all("informationRecipient")]
    if not any(institution_of(org) for org in received):
        message = (
            f"a {kind.korean} needs at least one informationRecipient institution "
            "(1.2.410.100110.10.<요양기관기호>)"
        )
        yield CdaError(message, f"{ROOT}/informationRecipient", code="required")


def _has_reading(section: Node, code: Section) -> bool:
    if section.child_text("text"):
        return True
    entries = list(section.all("entry"))
    if code is Section.IMAGING_FINDINGS:
        return any((e.first("observation") or e).attr("classCode") == "OBS" for e in entries)
    return bool(entries)


def _sections(doc: Node, kind: DocumentKind) -> Iterator[CdaError]:
    if doc.first("component", "structuredBody") is None:
        yield CdaError(
            "K-CDA documents have a structuredBody", f"{ROOT}/component/structuredBody", code="required"
        )
        return
    present = list(sections(doc))
    for required in kind.required_sections:
        matching = [s for s, code in present if code is required]
        if not matching:
            message = f"a {kind.korean} needs the section {required.value} ({required.name.lower()})"
            yield CdaError(message, f"{ROOT}/component/structuredBody", code="required")
        elif not any(_has_reading(s, required) for s in matching):
            message = f"the section {required.value} ({required.name.lower()}) is empty"
            yield CdaError(message, matching[0].path, code="required")
    for section, code in present:
        yield from _codes(section, code)


def _codes(section: Node, code: Section | None) -> Iterator[CdaError]:
    rule = _CODED.get(code) if code is not None else None
    if rule is None:
        return
    path, systems = rule
    allowed = {system_oid(s) for s in systems}
    for entry in section.all("entry"):
        coded = entry.first(*path)
        if coded is None:
            continue
        found = [coded, *coded.all("translation")]
        if not any(n.attr("codeSystem") in allowed and n.attr("code") for n in found):
            names = " or ".join(systems)
            yield CdaError(
                f"needs a code from {names} (codeSystem {' or '.join(sorted(allowed))})",
                coded.path,
                code="code-invalid",
            )


def check(doc: Node) -> DocumentKind:
    """The kind of a K-CDA document that keeps every rule; else CdaError with every finding."""
    kind = template_of(doc)
    problems = [*_header(doc), *_recipients(doc, kind), *_sections(doc, kind)]
    if problems:
        first, *rest = problems
        raise CdaError(first.message, first.location, code=first.code, status=first.status, more=tuple(rest))
    return kind
