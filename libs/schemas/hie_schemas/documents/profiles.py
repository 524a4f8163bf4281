"""Profile checks of the Korean exchange documents (domain.md) on FHIR document Bundles.

The per-kind facts (required sections, whether a recipient is needed) live in
``hie_schemas.codes.DOCUMENT_KINDS``; what each section's entries must be lives in ``SECTION_RULES``
below. Every check reports all of its findings as ``Issue`` values with FHIRPath expressions relative
to the document Bundle; none raises.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from hie_schemas import codes
from hie_schemas.codes import DocumentKind, Section
from hie_schemas.documents.bundle import BundleIndex as BundleIndex
from hie_schemas.documents.bundle import Json as Json
from hie_schemas.documents.bundle import Located as Located
from hie_schemas.documents.bundle import codings as codings
from hie_schemas.documents.bundle import composition_of as composition_of
from hie_schemas.documents.bundle import dicts as dicts
from hie_schemas.documents.bundle import obj as obj
from hie_schemas.documents.bundle import text as text
from hie_schemas.events import StudyRef
from hie_schemas.identifiers import KRNPI_SYSTEM
from hie_schemas.issues import Issue

MHD_LIST_TYPES = "https://profiles.ihe.net/ITI/MHD/CodeSystem/MHDlistTypes"

INTENDED_RECIPIENT_URL = "https://profiles.ihe.net/ITI/MHD/StructureDefinition/ihe-intendedRecipient"
# Why a submission is sent (SubmissionSet extensions of the federation): the purpose of use in the
# consent rule (values = hie_schemas.consent.Purpose) and, for emergency access, its justification.
PURPOSE_EXTENSION_URL = "https://hie-federation.kr/fhir/StructureDefinition/exchange-purpose"
PURPOSE_SYSTEM = "https://hie-federation.kr/fhir/CodeSystem/exchange-purpose"
JUSTIFICATION_EXTENSION_URL = "https://hie-federation.kr/fhir/StructureDefinition/exchange-justification"
# Recipients travel on the SubmissionSet List, not in the document: issues about them use this
# expression, which parse_submission rebases onto the List entry of the transaction.
RECIPIENTS_EXPRESSION = f"List.extension.where(url='{INTENDED_RECIPIENT_URL}')"
COMPOSITION_PATH = "Bundle.entry[0].resource"
FINAL_STATUSES = frozenset({"final", "amended"})
CLOCK_SKEW = timedelta(minutes=5)  # how far in the future a Composition.date may be (clock drift)
_DICOM_UID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))*$")
_INSTITUTION_CODE = re.compile(r"^[0-9]{8}$")


@dataclass(frozen=True)
class SectionRule:
    """What the entries of one section must be, and which entries count as content besides narrative."""

    entry_types: tuple[str, ...] | None = None
    code_elements: tuple[str, ...] = ()
    code_systems: tuple[str, ...] = ()
    content_types: tuple[str, ...] | None = None


_MEDICATION_RULE = SectionRule(
    entry_types=("MedicationStatement", "MedicationRequest"),
    code_elements=("medicationCodeableConcept", "medicationReference"),
    code_systems=(codes.HIRA_EDI_MEDICATION, codes.ATC),
)

SECTION_RULES: dict[Section, SectionRule] = {
    Section.PROBLEMS: SectionRule(
        entry_types=("Condition",), code_elements=("code",), code_systems=(codes.KCD8,)
    ),
    Section.MEDICATIONS: _MEDICATION_RULE,
    Section.DISCHARGE_MEDICATIONS: _MEDICATION_RULE,
    # The reading itself: narrative text or an Observation; ImagingStudy entries alone are not a reading.
    Section.IMAGING_FINDINGS: SectionRule(content_types=("Observation",)),
}

_SECTION_BY_CODING = {(codes.section_system(s), s.value): s for s in Section}


def section_name(section: Section) -> str:
    return f"{section.value} ({section.name.lower().replace('_', ' ')})"


def kind_of(concept: Any) -> DocumentKind | None:
    """The document kind named by a CodeableConcept; the K-CDA template coding wins over LOINC."""
    for system in (codes.TEMPLATE_SYSTEM, codes.LOINC):
        for coding in codings(concept):
            code = text(coding.get("code"))
            if coding.get("system") == system and code is not None:
                kind = codes.document_kind_by_coding(system, code)
                if kind is not None:
                    return kind
    return None


def sections(composition: Json, path: str = COMPOSITION_PATH) -> Iterator[tuple[str, Json]]:
    """Every section with its FHIRPath, nested sections included."""
    for i, section in enumerate(dicts(composition.get("section"))):
        section_path = f"{path}.section[{i}]"
        yield section_path, section
        yield from sections(section, section_path)


def section_of(section: Json) -> Section | None:
    for coding in codings(section.get("code")):
        system, code = text(coding.get("system")), text(coding.get("code"))
        found = _SECTION_BY_CODING.get((system, code)) if system and code else None
        if found is not None:
            return found
    return None


def _krnpi(organization: Json) -> str | None:
    for identifier in dicts(organization.get("identifier")):
        if identifier.get("system") == KRNPI_SYSTEM:
            return text(identifier.get("value")) or ""
    return None


def _author_organizations(index: BundleIndex, composition: Json) -> list[Located]:
    """Organizations responsible for the document: the custodian first, then authors and their roles."""
    found: list[Located] = []
    candidates = [index.resolve(composition.get("custodian"))]
    for author in dicts(composition.get("author")):
        target = index.resolve(author)
        candidates.append(target)
        if target is not None and target.resource_type == "PractitionerRole":
            candidates.append(index.resolve(target.resource.get("organization")))
    for candidate in candidates:
        if candidate is not None and candidate.resource_type == "Organization" and candidate not in found:
            found.append(candidate)
    return found


def author_institution(document: Json) -> str | None:
    """요양기관기호 of the custodian or author Organization (KR Core hira-krnpi identifier)."""
    composition = composition_of(document) or {}
    for org in _author_organizations(BundleIndex(document), composition):
        code = _krnpi(org.resource)
        if code is not None and _INSTITUTION_CODE.fullmatch(code):
            return code
    return None


def author_department(document: Json) -> str | None:
    """HIRA department code (진료과목) of the author PractitionerRole, else of the author Organization."""
    composition = composition_of(document) or {}
    index = BundleIndex(document)
    authors = [a for a in (index.resolve(r) for r in dicts(composition.get("author"))) if a is not None]
    roles = [a.resource for a in authors if a.resource_type == "PractitionerRole"]
    concepts = [c for role in roles for c in dicts(role.get("specialty"))]
    concepts += [
        c for org in _author_organizations(index, composition) for c in dicts(org.resource.get("type"))
    ]
    for concept in concepts:
        for coding in codings(concept):
            if coding.get("system") == codes.HIRA_DEPARTMENT and text(coding.get("code")):
                return str(coding["code"])
    return None


# --- what the document says --------------------------------------------------------------------------


def composition_date(composition: Json) -> datetime | None:
    """Composition.date as an aware datetime; None when it is missing, a bare date or has no timezone."""
    raw = text(composition.get("date"))
    try:
        parsed = datetime.fromisoformat(raw) if raw and "T" in raw else None
    except ValueError:
        return None
    return parsed if parsed is not None and parsed.tzinfo is not None else None


def _study_identifiers(study: Json) -> tuple[str | None, str | None]:
    """(Study Instance UID, accession number) from ImagingStudy.identifier (XDS-I.b)."""
    uid: str | None = None
    accession: str | None = None
    for identifier in dicts(study.get("identifier")):
        value = text(identifier.get("value"))
        if identifier.get("system") == codes.DICOM_UID and value:
            uid = value.removeprefix("urn:oid:")
        elif value and any(c.get("code") == "ACSN" for c in codings(identifier.get("type"))):
            accession = value
    return uid, accession


def _valid_uid(uid: str | None) -> bool:
    return uid is not None and len(uid) <= 64 and _DICOM_UID.fullmatch(uid) is not None


def document_studies(document: Json) -> tuple[StudyRef, ...]:
    """The imaging studies a document refers to, once each, in document order."""
    found: dict[str, StudyRef] = {}
    for study in BundleIndex(document).of_type("ImagingStudy"):
        uid, accession = _study_identifiers(study.resource)
        if uid is not None and _valid_uid(uid) and uid not in found:
            found[uid] = StudyRef(study_instance_uid=uid, accession_number=accession)
    return tuple(found.values())


# --- the rules -------------------------------------------------------------------------------------


def _issue(message: str, expression: str, code: str = "invalid") -> Issue:
    return Issue(message, code=code, expression=(expression,))


@dataclass(frozen=True)
class _Context:
    document: Json
    index: BundleIndex
    composition: Json
    kind: DocumentKind
    intended_recipients: tuple[str, ...]
    now: datetime


def _check_type(ctx: _Context) -> list[Issue]:
    if kind_of(ctx.composition.get("type")) == ctx.kind:
        return []
    message = f"Composition.type must name the {ctx.kind.korean} template ({ctx.kind.template_oid})"
    return [_issue(message, f"{COMPOSITION_PATH}.type", "code-invalid")]


def _check_status(ctx: _Context) -> list[Issue]:
    if ctx.composition.get("status") in FINAL_STATUSES:
        return []
    return [_issue("only final or amended documents are exchanged", f"{COMPOSITION_PATH}.status")]


def _check_date(ctx: _Context) -> list[Issue]:
    created_at = composition_date(ctx.composition)
    if created_at is None:
        return [
            _issue("Composition.date must be a date and time with a timezone", f"{COMPOSITION_PATH}.date")
        ]
    if created_at > ctx.now + CLOCK_SKEW:
        return [_issue("Composition.date is in the future", f"{COMPOSITION_PATH}.date")]
    return []


def _check_subject(ctx: _Context) -> list[Issue]:
    patient = ctx.index.resolve(ctx.composition.get("subject"))
    if patient is not None and patient.resource_type == "Patient" and patient.resource.get("identifier"):
        return []
    message = "Composition.subject must reference a Patient in the document that carries an identifier"
    return [_issue(message, f"{COMPOSITION_PATH}.subject", "required")]


def _check_author(ctx: _Context) -> list[Issue]:
    authors = dicts(ctx.composition.get("author"))
    if not authors:
        return [_issue("Composition.author is required", f"{COMPOSITION_PATH}.author", "required")]
    return [
        _issue(
            "Composition.author must reference a resource in the document", f"{COMPOSITION_PATH}.author[{i}]"
        )
        for i, author in enumerate(authors)
        if ctx.index.resolve(author) is None
    ]


def _check_institution(ctx: _Context) -> list[Issue]:
    coded = [(org, _krnpi(org.resource)) for org in _author_organizations(ctx.index, ctx.composition)]
    coded = [(org, code) for org, code in coded if code is not None]
    if not coded:
        message = f"the custodian or author Organization must carry a 요양기관기호 ({KRNPI_SYSTEM})"
        return [_issue(message, f"{COMPOSITION_PATH}.custodian", "required")]
    return [
        _issue("요양기관기호 must be exactly 8 digits", f"{org.path}.identifier")
        for org, code in coded
        if not _INSTITUTION_CODE.fullmatch(code or "")
    ]


def _has_content(ctx: _Context, section: Json, rule: SectionRule | None) -> bool:
    if text(obj(section.get("text")).get("div")):
        return True
    entries = dicts(section.get("entry"))
    if rule is None or rule.content_types is None:
        return bool(entries)
    targets = (ctx.index.resolve(e) for e in entries)
    return any(t is not None and t.resource_type in rule.content_types for t in targets)


def _check_required_sections(ctx: _Context) -> list[Issue]:
    issues: list[Issue] = []
    present = [(path, s, section_of(s)) for path, s in sections(ctx.composition)]
    for required in ctx.kind.required_sections:
        matching = [(path, s) for path, s, found in present if found is required]
        rule = SECTION_RULES.get(required)
        if not matching:
            message = f"a {ctx.kind.korean} needs the section {section_name(required)}"
            issues.append(_issue(message, f"{COMPOSITION_PATH}.section", "required"))
        elif not any(_has_content(ctx, s, rule) for _, s in matching):
            wanted = " or ".join(rule.content_types) if rule and rule.content_types else "an entry"
            message = f"the section {section_name(required)} is empty: it needs narrative text or {wanted}"
            issues.append(_issue(message, matching[0][0], "required"))
    return issues


def _check_recipients(ctx: _Context) -> list[Issue]:
    if not ctx.kind.needs_recipient or ctx.intended_recipients:
        return []
    message = f"a {ctx.kind.korean} needs at least one intended recipient institution"
    return [_issue(message, RECIPIENTS_EXPRESSION, "required")]


def _coded_concept(ctx: _Context, resource: Json, elements: tuple[str, ...]) -> tuple[str, Json] | None:
    """The element name and CodeableConcept that codes a resource; a Reference is followed to its .code."""
    for element in elements:
        value = resource.get(element)
        if isinstance(value, dict) and "reference" in value:
            target = ctx.index.resolve(value)
            value = target.resource.get("code") if target is not None else None
        if isinstance(value, dict):
            return element, value
    return None


def _check_entry(ctx: _Context, section: Section, rule: SectionRule, target: Located) -> list[Issue]:
    if rule.entry_types is not None and target.resource_type not in rule.entry_types:
        message = f"entries of the section {section_name(section)} must be {' or '.join(rule.entry_types)}"
        return [_issue(message, target.path)]
    if not rule.code_systems:
        return []
    coded = _coded_concept(ctx, target.resource, rule.code_elements)
    allowed = " or ".join(rule.code_systems)
    if coded is None or not codings(coded[1]):
        element = coded[0] if coded else rule.code_elements[0]
        return [_issue(f"needs a code from {allowed}", f"{target.path}.{element}", "required")]
    element, concept = coded
    if any(c.get("system") in rule.code_systems and text(c.get("code")) for c in codings(concept)):
        return []
    message = f"{target.resource_type} in the section {section_name(section)} must be coded with {allowed}"
    return [_issue(message, f"{target.path}.{element}", "code-invalid")]


def _check_section_entries(ctx: _Context) -> list[Issue]:
    issues: list[Issue] = []
    for path, section in sections(ctx.composition):
        code = section_of(section)
        rule = SECTION_RULES.get(code) if code is not None else None
        for j, entry in enumerate(dicts(section.get("entry"))):
            target = ctx.index.resolve(entry)
            if target is None:
                message = "section entry does not resolve to a resource in the document"
                issues.append(_issue(message, f"{path}.entry[{j}]"))
            elif rule is not None and code is not None:
                issues.extend(_check_entry(ctx, code, rule, target))
    return issues


def _check_studies(ctx: _Context) -> list[Issue]:
    issues: list[Issue] = []
    for study in ctx.index.of_type("ImagingStudy"):
        uid, _ = _study_identifiers(study.resource)
        if not _valid_uid(uid):
            message = (
                f"ImagingStudy needs its Study Instance UID as an identifier of system {codes.DICOM_UID}"
            )
            issues.append(
                _issue(message, f"{study.path}.identifier", "required" if uid is None else "invalid")
            )
    return issues


_RULES: tuple[Callable[[_Context], list[Issue]], ...] = (
    _check_type,
    _check_status,
    _check_date,
    _check_subject,
    _check_author,
    _check_institution,
    _check_required_sections,
    _check_recipients,
    _check_section_entries,
    _check_studies,
)


def check_document(
    document: Json, kind: DocumentKind, intended_recipients: Sequence[str], *, now: datetime | None = None
) -> list[Issue]:
    """Every profile issue of one FHIR document of the given kind (empty when it conforms).

    ``now`` (timezone-aware, default the current time) is the clock for the future-date rule.
    """
    if document.get("resourceType") != "Bundle" or document.get("type") != "document":
        return [_issue("a FHIR document is a Bundle of type document", "Bundle.type")]
    composition = composition_of(document)
    if composition is None:
        return [_issue("the first entry of a document must be its Composition", COMPOSITION_PATH, "required")]
    recipients = tuple(intended_recipients)
    clock = now or datetime.now(UTC)
    ctx = _Context(document, BundleIndex(document), composition, kind, recipients, clock)
    return [issue for rule in _RULES for issue in rule(ctx)]
