"""Complete, valid example documents and ITI-65 submissions of the Korean exchange.

The demo, the tests and the docs build their FHIR JSON here so that there is one realistic shape of
each document; what the documents say by default is in ``content.py``.
"""

from __future__ import annotations

import copy
import html
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, Unpack

from hie_schemas import codes
from hie_schemas.codes import DOCUMENT_KINDS, DocumentKind, DocumentType
from hie_schemas.codes import Section as S
from hie_schemas.documents.content import DEFAULT_DETAILS, SECTIONS_BY_KIND, DocumentDetails
from hie_schemas.documents.profiles import INTENDED_RECIPIENT_URL, MHD_LIST_TYPES
from hie_schemas.events import StudyRef
from hie_schemas.fhir import FHIR_JSON
from hie_schemas.identifiers import KRNPI_SYSTEM, RRN_SYSTEM, institution_oid

Json = dict[str, Any]
IdFactory = Callable[[], str]
Written = tuple[list[str], list[Json]]  # a section's narrative lines and entry references

KST = timezone(timedelta(hours=9), "KST")
URI_SYSTEM = "urn:ietf:rfc:3986"
UCUM = "http://unitsofmeasure.org"
V2_IDENTIFIER_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"
IHE_SOURCE_ID_URL = "https://profiles.ihe.net/ITI/MHD/StructureDefinition/ihe-sourceId"
IHE_FORMAT_CODES = "http://ihe.net/fhir/ihe.formatcode.fhir/CodeSystem/formatcode"
MHD_PROVIDE_BUNDLE = (
    "https://profiles.ihe.net/ITI/MHD/StructureDefinition/IHE.MHD.Comprehensive.ProvideBundle"
)
# C-CDA on FHIR carries the CDA informationRecipient this way; K-CDA documents name their recipient too.
INFORMATION_RECIPIENT_URL = "http://hl7.org/fhir/ccda/StructureDefinition/InformationRecipientExtension"
_TERMINOLOGY = "http://terminology.hl7.org/CodeSystem"


def _concept(system: str, code: str, display: str) -> Json:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _status(system: str, code: str) -> Json:
    return {"coding": [{"system": f"{_TERMINOLOGY}/{system}", "code": code}]}


def narrative(lines: Sequence[str], status: str = "generated") -> Json:
    """A section's text: the lines as an XHTML list."""
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    return {"status": status, "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><ul>{items}</ul></div>'}


def section_code(section: S, title: str) -> Json:
    return {"coding": [{"system": codes.section_system(section), "code": section.value}], "text": title}


def document_type(kind: DocumentKind) -> Json:
    """Composition.type: the K-CDA template code, and the LOINC document code where there is one."""
    type_codings = [{"system": codes.TEMPLATE_SYSTEM, "code": kind.template_code, "display": kind.korean}]
    if kind.loinc:
        type_codings.append({"system": codes.LOINC, "code": kind.loinc, "display": kind.display})
    return {"coding": type_codings, "text": kind.korean}


def document_bundle(document_id: str, timestamp: str, entries: list[Json]) -> Json:
    """The FHIR document Bundle around a Composition and its entries."""
    return {
        "resourceType": "Bundle",
        "id": document_id,
        "identifier": {"system": URI_SYSTEM, "value": f"urn:uuid:{document_id}"},
        "type": "document",
        "timestamp": timestamp,
        "entry": entries,
    }


def _krnpi(code: str) -> list[Json]:
    return [{"use": "official", "system": KRNPI_SYSTEM, "value": code}]


def random_ids() -> str:
    return str(uuid.uuid4())


class _DocumentBuilder:
    """Accumulates the entries of one document Bundle; every resource gets a uuid id and urn:uuid fullUrl."""

    def __init__(self, kind: DocumentType, created_at: datetime, options: Json, new_id: IdFactory) -> None:
        self.kind = DOCUMENT_KINDS[kind]
        self.new_id = new_id
        self.when = created_at.isoformat()
        self.options = options
        self.entries: list[Json] = []
        self.patient: Json = {}
        self.studies: list[tuple[Json, str]] = []  # (reference, narrative label)

    def add(self, resource: Json) -> Json:
        """Add a resource and return a Reference to it."""
        resource_id = self.new_id()
        content = dict(resource)
        resource.clear()  # the same object: the Composition is filled in once its references exist
        resource.update({"resourceType": content.pop("resourceType"), "id": resource_id, **content})
        self.entries.append({"fullUrl": f"urn:uuid:{resource_id}", "resource": resource})
        return {"reference": f"urn:uuid:{resource_id}"}

    def record(self, resource_type: str, **fields: Any) -> Json:
        """Add a clinical resource about the patient."""
        return self.add({"resourceType": resource_type, "subject": dict(self.patient), **fields})

    def section(self, section: S) -> Json | None:
        title, writer = _SECTION_WRITERS[section]
        lines, entries = writer(self)
        if not lines and not entries:
            return None
        text = narrative(lines, "generated" if entries else "additional")
        return {"title": title, "code": section_code(section, title), "text": text} | (
            {"entry": entries} if entries else {}
        )

    def study_refs(self) -> list[Json]:
        return [dict(ref) for ref, _ in self.studies]

    def participants(self, patient_rrn: str, author_code: str, author_name: str) -> tuple[Json, Json]:
        """Add the Patient and the author (Organization, Practitioner, PractitionerRole); returns
        references to the Organization and the PractitionerRole."""
        patient_name: str = self.options["patient_name"]
        name = {
            "use": "official",
            "text": patient_name,
            "family": patient_name[:1],
            "given": [patient_name[1:]],
        }
        self.patient = self.add(
            {
                "resourceType": "Patient",
                "identifier": [{"use": "official", "system": RRN_SYSTEM, "value": patient_rrn}],
                "name": [name],
                "gender": self.options["gender"],
                "birthDate": self.options["birth_date"],
            }
        )
        organization = self.add(
            {
                "resourceType": "Organization",
                "identifier": _krnpi(author_code),
                "active": True,
                "name": author_name,
            }
        )
        practitioner = self.add(
            {"resourceType": "Practitioner", "name": [{"text": self.options["practitioner_name"]}]}
        )
        role: Json = {
            "resourceType": "PractitionerRole",
            "practitioner": practitioner,
            "organization": organization,
        }
        department: str | None = self.options["department"]
        if department is not None:
            label = codes.DEPARTMENTS.get(department, department)
            role["specialty"] = [_concept(codes.HIRA_DEPARTMENT, department, label)]
        return organization, self.add(role)

    def add_study(self, study: StudyRef) -> None:
        """An ImagingStudy entry (a CT) identified by its Study Instance UID and accession number."""
        identifiers: list[Json] = [
            {"system": codes.DICOM_UID, "value": f"urn:oid:{study.study_instance_uid}"}
        ]
        label = "CT 촬영"
        if study.accession_number:
            acsn = {"coding": [{"system": V2_IDENTIFIER_TYPE, "code": "ACSN"}]}
            identifiers.append({"type": acsn, "value": study.accession_number})
            label += f" (검사번호 {study.accession_number})"
        modality = [{"system": codes.DCM, "code": "CT"}]
        ref = self.record(
            "ImagingStudy", identifier=identifiers, status="available", modality=modality, started=self.when
        )
        self.studies.append((ref, label))

    def composition(self, kind: DocumentType, author: Json, organization: Json) -> Json:
        """The Composition's elements, with its sections (whose resources are added now)."""
        wanted = list(SECTIONS_BY_KIND[kind])
        if self.studies and S.RESULTS not in wanted and S.IMAGING_FINDINGS not in wanted:
            wanted.append(S.RESULTS)
        sections = [s for s in (self.section(section) for section in wanted) if s is not None]
        return {
            "status": "final",
            "type": document_type(self.kind),
            "subject": dict(self.patient),
            "date": self.when,
            "author": [author],
            "title": self.kind.korean,
            "confidentiality": "N",
            "custodian": organization,
            "section": sections,
        }

    def recipient(self, code: str, name: str | None) -> Json:
        """The informationRecipient extension naming (and adding) the recipient Organization."""
        organization = {"identifier": _krnpi(code), "name": name or f"요양기관 {code}"}
        recipient = self.add({"resourceType": "Organization", **organization})
        return {"url": INFORMATION_RECIPIENT_URL, "valueReference": recipient}

    # --- one writer per section ---

    def problems(self) -> Written:
        problems: Sequence[tuple[str, str]] = self.options["problems"]
        refs = [
            self.record(
                "Condition",
                clinicalStatus=_status("condition-clinical", "active"),
                verificationStatus=_status("condition-ver-status", "confirmed"),
                category=[_status("condition-category", "problem-list-item")],
                code=_concept(codes.KCD8, code, display),
                recordedDate=self.when,
            )
            for code, display in problems
        ]
        return [f"{display} ({code})" for code, display in problems], refs

    def medications(self) -> Written:
        medications: Sequence[tuple[str, str]] = self.options["medications"]
        refs = [
            self.record(
                "MedicationStatement",
                status="active",
                medicationCodeableConcept=_concept(codes.HIRA_EDI_MEDICATION, code, display),
                dateAsserted=self.when,
                dosage=[{"text": "1일 1회 1정 경구 투여"}],
            )
            for code, display in medications
        ]
        return [display for _, display in medications], refs

    def allergies(self) -> Written:
        allergies: Sequence[str] = self.options["allergies"]
        refs = [
            self.add(
                {
                    "resourceType": "AllergyIntolerance",
                    "clinicalStatus": _status("allergyintolerance-clinical", "active"),
                    "verificationStatus": _status("allergyintolerance-verification", "confirmed"),
                    "type": "allergy",
                    "category": ["medication"],
                    "code": {"text": substance},
                    "patient": dict(self.patient),
                    "recordedDate": self.when,
                }
            )
            for substance in allergies
        ]
        return list(allergies), refs

    def results(self) -> Written:
        results: Sequence[tuple[str, str, float, str]] = self.options["results"]
        refs = [
            self.record(
                "Observation",
                status="final",
                category=[_status("observation-category", "laboratory")],
                code=_concept(codes.LOINC, code, display),
                effectiveDateTime=self.when,
                valueQuantity={"value": value, "unit": unit, "system": UCUM, "code": unit},
            )
            for code, display, value, unit in results
        ]
        lines = [f"{display}: {value} {unit}" for _, display, value, unit in results]
        return lines + [label for _, label in self.studies], refs + self.study_refs()

    def procedures(self) -> Written:
        procedures: Sequence[str] = self.options["procedures"]
        refs = [
            self.record("Procedure", status="completed", code={"text": name}, performedDateTime=self.when)
            for name in procedures
        ]
        return list(procedures), refs

    def imaging_findings(self) -> Written:
        findings: str = self.options["findings"]
        derived = {"derivedFrom": self.study_refs()} if self.studies else {}
        observation = self.record(
            "Observation",
            status="final",
            category=[_status("observation-category", "imaging")],
            code=_concept(codes.LOINC, "18782-3", "Radiology Study observation (narrative)"),
            effectiveDateTime=self.when,
            valueString=findings,
            **derived,
        )
        return [findings], [observation, *self.study_refs()]


def _text_writer(option: str) -> Callable[[_DocumentBuilder], Written]:
    """A section that is narrative only (reason for referral, plan of care, opinion)."""

    def write(builder: _DocumentBuilder) -> Written:
        value: str = builder.options[option]
        return ([value] if value else []), []

    return write


_SECTION_WRITERS: dict[S, tuple[str, Callable[[_DocumentBuilder], Written]]] = {
    S.PROBLEMS: ("진단 및 문제 목록", _DocumentBuilder.problems),
    S.MEDICATIONS: ("투약 내역", _DocumentBuilder.medications),
    S.ALLERGIES: ("알레르기 및 약물 부작용", _DocumentBuilder.allergies),
    S.RESULTS: ("검사 결과", _DocumentBuilder.results),
    S.PROCEDURES: ("수술 및 처치", _DocumentBuilder.procedures),
    S.IMAGING_FINDINGS: ("영상 판독 소견", _DocumentBuilder.imaging_findings),
    S.REASON_FOR_REFERRAL: ("의뢰 사유", _text_writer("reason")),
    S.PLAN_OF_CARE: ("향후 진료 계획", _text_writer("plan_of_care")),
    S.PHYSICIAN_OPINION: ("의사 소견 및 주의사항", _text_writer("opinion")),
}


def build_document(
    kind: DocumentType,
    *,
    author_code: str,
    author_name: str,
    patient_rrn: str,
    created_at: datetime | None = None,
    studies: Sequence[StudyRef] = (),
    recipient_code: str | None = None,
    recipient_name: str | None = None,
    new_id: IdFactory = random_ids,
    **details: Unpack[DocumentDetails],
) -> Json:
    """A complete FHIR document Bundle of the given kind, written by the institution ``author_code``.

    ``created_at`` must be timezone-aware (default: now in KST). ``studies`` become ImagingStudy
    entries (in the findings section of an imaging report, else in the results section). ``new_id``
    makes every id (uuids by default; the docs pass a deterministic sequence). ``details`` override
    DEFAULT_DETAILS.
    """
    # Not rounded down: a document must not appear older than a consent recorded a moment before it.
    when = created_at or datetime.now(KST)
    if when.tzinfo is None:
        raise ValueError("created_at must be timezone-aware")
    doc = _DocumentBuilder(kind, when, {**DEFAULT_DETAILS, **details}, new_id)
    composition: Json = {"resourceType": "Composition"}
    doc.add(composition)  # the first entry; filled in below once the references exist
    organization, author = doc.participants(patient_rrn, author_code, author_name)
    for study in studies:
        doc.add_study(study)
    composition.update(doc.composition(kind, author, organization))
    if recipient_code is not None:
        composition["extension"] = [doc.recipient(recipient_code, recipient_name)]
    bundle = document_bundle(new_id(), doc.when, doc.entries)
    return copy.deepcopy(bundle)  # no shared sub-objects: callers may edit one element safely


def build_submission(
    documents: Sequence[Json],
    *,
    author_code: str,
    patient_rrn: str,
    recipients: Sequence[str] = (),
    submitted_at: datetime | None = None,
    new_id: IdFactory = random_ids,
    relates_to: Sequence[tuple[str, str]] = (),
) -> Json:
    """The IHE MHD ITI-65 transaction that publishes ``documents`` (SubmissionSet + DocumentReferences).

    ``relates_to`` ((code, DocumentReference id) pairs, e.g. ``("replaces", old_id)``) goes on every
    DocumentReference: a replacement document supersedes the one it names.
    """
    when = (submitted_at or datetime.now(KST)).isoformat()
    subject = {"type": "Patient", "identifier": {"system": RRN_SYSTEM, "value": patient_rrn}}
    author = {"type": "Organization", "identifier": {"system": KRNPI_SYSTEM, "value": author_code}}
    references: list[Json] = []
    bundles: list[Json] = []
    for document in documents:
        document_url = f"urn:uuid:{new_id()}"
        bundles.append(_transaction_entry(document_url, copy.deepcopy(document)))
        reference = _document_reference(document, document_url, subject, author, relates_to)
        references.append(_transaction_entry(f"urn:uuid:{new_id()}", reference))
    submission_set = _submission_set(author_code, recipients, subject, when, references, new_id)
    entries = [_transaction_entry(f"urn:uuid:{new_id()}", submission_set), *references, *bundles]
    return {
        "resourceType": "Bundle",
        "meta": {"profile": [MHD_PROVIDE_BUNDLE]},
        "type": "transaction",
        "entry": entries,
    }


def _document_reference(
    document: Json, url: str, subject: Json, author: Json, relates_to: Sequence[tuple[str, str]]
) -> Json:
    """The DocumentReference of one document Bundle submitted at ``url``, from its Composition."""
    composition = document["entry"][0]["resource"]
    title, date = composition["title"], composition["date"]
    attachment = {"contentType": FHIR_JSON, "language": "ko-KR", "url": url, "title": title}
    reference: Json = {
        "resourceType": "DocumentReference",
        "status": "current",
        "type": copy.deepcopy(composition["type"]),
        "subject": copy.deepcopy(subject),
        "date": date,
        "author": [copy.deepcopy(author)],
        "description": title,
        "content": [
            {
                "attachment": attachment | {"creation": date},
                "format": {"system": IHE_FORMAT_CODES, "code": "urn:ihe:iti:xds:2017:mimeTypeSufficient"},
            }
        ],
    }
    if "identifier" in document:
        reference["masterIdentifier"] = copy.deepcopy(document["identifier"])
    if relates_to:
        reference["relatesTo"] = [
            {"code": code, "target": {"reference": f"DocumentReference/{target}"}}
            for code, target in relates_to
        ]
    return reference


def _submission_set(
    author_code: str,
    recipients: Sequence[str],
    subject: Json,
    when: str,
    references: list[Json],
    new_id: IdFactory,
) -> Json:
    """The SubmissionSet (an MHD List): its source, its intended recipients and its DocumentReferences."""
    source = {"value": f"urn:oid:{institution_oid(author_code)}"}
    extensions: list[Json] = [{"url": IHE_SOURCE_ID_URL, "valueIdentifier": source}]
    for code in recipients:
        recipient = {"type": "Organization", "identifier": {"system": KRNPI_SYSTEM, "value": code}}
        extensions.append({"url": INTENDED_RECIPIENT_URL, "valueReference": recipient})
    return {
        "resourceType": "List",
        "extension": extensions,
        "identifier": [
            {"use": "official", "system": URI_SYSTEM, "value": f"urn:uuid:{new_id()}"},
            {"use": "usual", "system": URI_SYSTEM, "value": f"urn:uuid:{new_id()}"},
        ],
        "status": "current",
        "mode": "working",
        "title": "진료정보교류 제출",
        "code": {"coding": [{"system": MHD_LIST_TYPES, "code": "submissionset"}]},
        "subject": copy.deepcopy(subject),
        "date": when,
        "entry": [{"item": {"reference": entry["fullUrl"]}} for entry in references],
    }


def _transaction_entry(full_url: str, resource: Json) -> Json:
    return {
        "fullUrl": full_url,
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"]},
    }
