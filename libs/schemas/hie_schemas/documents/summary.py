"""A care record summary (진료기록요약지, CRS) generated on request from the documents a hub holds.

Pure: the hub chooses the documents (those the patient's consent lets flow to the asking
institution) and this module copies their problems, medications, allergies, results and procedures
into one new FHIR document, newest first and once per code, each entry naming the document it came
from in ``meta.source``. The result conforms to the CRS profile (``profiles.check_document``).
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from hie_schemas.codes import DOCUMENT_KINDS, DocumentType
from hie_schemas.codes import Section as S
from hie_schemas.documents.builders import document_bundle, document_type, narrative, section_code
from hie_schemas.documents.profiles import (
    SECTION_RULES,
    BundleIndex,
    Json,
    codings,
    composition_of,
    dicts,
    obj,
    text,
)
from hie_schemas.identifiers import KRNPI_SYSTEM

# The sections of a generated CRS and the resources each collects (domain.md: problems, medications,
# allergies, results, procedures).
COLLECTED: tuple[tuple[S, str, tuple[str, ...]], ...] = (
    (S.PROBLEMS, "진단 및 문제 목록", ("Condition",)),
    (S.MEDICATIONS, "투약 내역", ("MedicationStatement", "MedicationRequest")),
    (S.ALLERGIES, "알레르기 및 약물 부작용", ("AllergyIntolerance",)),
    (S.RESULTS, "검사 결과", ("Observation",)),
    (S.PROCEDURES, "수술 및 처치", ("Procedure",)),
)
_PATIENT_ELEMENTS = ("subject", "patient")
EMPTY_UNAVAILABLE = {
    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/list-empty-reason", "code": "unavailable"}]
}
GENERATED_TAG = {
    "system": "https://hie-federation.kr/fhir/CodeSystem/document-origin",
    "code": "generated-on-request",
}


@dataclass(frozen=True)
class SourceDocument:
    """One document the summary may draw on: its id (for meta.source), its time and its Bundle."""

    document_id: str
    created_at: datetime
    bundle: Json


def _key(resource: Json) -> str:
    """What makes two entries the same fact: the first coding of the resource's code, else its text."""
    concept = obj(resource.get("code") or resource.get("medicationCodeableConcept"))
    for coding in codings(concept):
        if text(coding.get("code")):
            return f"{resource.get('resourceType')}|{coding.get('system')}|{coding.get('code')}"
    return f"{resource.get('resourceType')}|text|{text(concept.get('text')) or uuid.uuid4()}"


def _fits(section: S, resource: Json, index: BundleIndex) -> bool:
    """A resource goes into a section only if it meets that section's coding rule (KCD-8 problems,
    HIRA EDI or ATC medications): the summary must pass the profile its sources passed."""
    rule = SECTION_RULES.get(section)
    if rule is None or not rule.code_systems:
        return True
    concept = obj(resource.get("code") or resource.get("medicationCodeableConcept"))
    target = index.resolve(resource.get("medicationReference"))
    if target is not None:
        concept = obj(target.resource.get("code"))
    return any(c.get("system") in rule.code_systems and text(c.get("code")) for c in codings(concept))


def _label(resource: Json) -> str:
    concept = obj(resource.get("code") or resource.get("medicationCodeableConcept"))
    coded = next((c for c in codings(concept) if text(c.get("display"))), {})
    return text(concept.get("text")) or text(coded.get("display")) or resource.get("resourceType", "")


def _copy(resource: Json, index: BundleIndex, patient: Json, new_id: Callable[[], str], source: str) -> Json:
    """The resource with a new id, its patient pointing at the summary's Patient, references it cannot
    keep removed (they point into the source document) and the source document in meta.source."""
    copied = copy.deepcopy(resource)
    reference = obj(copied.get("medicationReference"))
    if reference:
        target = index.resolve(reference)
        code = target.resource.get("code") if target is not None else None
        copied.pop("medicationReference")
        copied["medicationCodeableConcept"] = code if isinstance(code, dict) else {"text": "medication"}
    for element in _PATIENT_ELEMENTS:
        if element in copied:
            copied[element] = dict(patient)
    cleaned: Json = _drop_references(copied, keep={patient["reference"]})
    cleaned["id"] = new_id()
    cleaned["meta"] = {"source": source}
    return cleaned


def _drop_references(value: Any, keep: set[str]) -> Any:
    if isinstance(value, dict):
        result: dict[str, Any] = {}
        for k, v in value.items():
            if isinstance(v, dict) and isinstance(v.get("reference"), str) and v["reference"] not in keep:
                continue
            cleaned = _drop_references(v, keep)
            if cleaned != [] or v == []:
                result[k] = cleaned
        return result
    if isinstance(value, list):
        items = [
            _drop_references(v, keep)
            for v in value
            if not (
                isinstance(v, dict) and isinstance(v.get("reference"), str) and v["reference"] not in keep
            )
        ]
        return items
    return value


def _collected(sources: Iterable[SourceDocument]) -> Iterable[tuple[SourceDocument, BundleIndex, Json]]:
    for source in sources:
        index = BundleIndex(source.bundle)
        for entry in index.entries:
            yield source, index, entry.resource


class _Entries:
    """The entries of the summary Bundle; a resource keeps the id it has, else gets a new one."""

    def __init__(self, new_id: Callable[[], str]) -> None:
        self.new_id = new_id
        self.entries: list[Json] = []

    def add(self, resource: Json) -> Json:
        resource_id = resource.get("id") or self.new_id()
        resource["id"] = resource_id
        self.entries.append({"fullUrl": f"urn:uuid:{resource_id}", "resource": resource})
        return {"reference": f"urn:uuid:{resource_id}"}


def build_summary(
    sources: Sequence[SourceDocument],
    *,
    patient: Json,
    custodian_code: str,
    custodian_name: str,
    generator: str,
    created_at: datetime,
    source_url: Callable[[str], str],
    new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
) -> Json:
    """A CRS document Bundle from ``sources`` (newest first wins for a repeated code).

    ``patient`` is the Patient resource to put in the summary (from the newest source);
    ``source_url(document_id)`` is what each entry's meta.source says; the custodian is the hub
    hospital that generated it, the author the hub node (a Device named ``generator``).
    """
    kind = DOCUMENT_KINDS[DocumentType.CARE_RECORD_SUMMARY]
    bundle = _Entries(new_id)
    composition: Json = {"resourceType": "Composition", "id": new_id()}
    bundle.add(composition)
    patient_copy = {k: v for k, v in copy.deepcopy(patient).items() if k not in ("id", "meta")}
    subject = bundle.add({"resourceType": "Patient", **patient_copy})
    organization = bundle.add(
        {
            "resourceType": "Organization",
            "identifier": [{"use": "official", "system": KRNPI_SYSTEM, "value": custodian_code}],
            "name": custodian_name,
        }
    )
    device = bundle.add(
        {"resourceType": "Device", "deviceName": [{"name": generator, "type": "user-friendly-name"}]}
    )
    ordered = sorted(sources, key=lambda s: s.created_at, reverse=True)
    composition.update(
        meta={"tag": [GENERATED_TAG]},
        status="final",
        type=document_type(kind),
        subject=dict(subject),
        date=created_at.isoformat(),
        author=[device, organization],
        title=f"{kind.korean} (요청 시 생성)",
        confidentiality="N",
        custodian=organization,
        section=[_section(collected, ordered, bundle, subject, source_url) for collected in COLLECTED],
    )
    return document_bundle(new_id(), created_at.isoformat(), bundle.entries)


def _section(
    collected: tuple[S, str, tuple[str, ...]],
    sources: Sequence[SourceDocument],
    bundle: _Entries,
    subject: Json,
    source_url: Callable[[str], str],
) -> Json:
    """One section of the summary: the sources' resources of its types, once per code, newest first;
    a section with none says why (emptyReason "unavailable")."""
    section, title, resource_types = collected
    seen: set[str] = set()
    refs: list[Json] = []
    lines: list[str] = []
    for source, index, resource in _collected(sources):
        if resource.get("resourceType") not in resource_types or _key(resource) in seen:
            continue
        if not _fits(section, resource, index):
            continue
        seen.add(_key(resource))
        refs.append(
            bundle.add(_copy(resource, index, subject, bundle.new_id, source_url(source.document_id)))
        )
        lines.append(_label(resource))
    code = section_code(section, title)
    if refs:
        return {"title": title, "code": code, "text": narrative(lines), "entry": refs}
    text = narrative(["제공 가능한 기록 없음 (no record available to the requester)"])
    return {"title": title, "code": code, "text": text, "emptyReason": EMPTY_UNAVAILABLE}


def newest_patient(sources: Sequence[SourceDocument]) -> Json | None:
    """The Patient of the newest source document (its Composition.subject)."""
    for source in sorted(sources, key=lambda s: s.created_at, reverse=True):
        composition = composition_of(source.bundle) or {}
        target = BundleIndex(source.bundle).resolve(composition.get("subject"))
        if target is not None and target.resource_type == "Patient":
            return target.resource
        patients = [
            e
            for e in dicts(source.bundle.get("entry"))
            if obj(e.get("resource")).get("resourceType") == "Patient"
        ]
        if patients:
            return obj(patients[0].get("resource"))
    return None
