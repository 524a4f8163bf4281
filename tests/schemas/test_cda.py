"""K-CDA in and out (issue 17): round trips over generated documents and the hostile XML cases.

FHIR -> K-CDA -> FHIR must give the same clinical content for each of the six kinds, K-CDA -> FHIR ->
K-CDA must keep every coded entry, and XML that could attack the parser (external entities, entity
expansion, deep nesting, oversize) or breaks a template rule is refused naming the element.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hie_schemas.cda import CdaError, cda_to_fhir, fhir_to_cda, parse_xml
from hie_schemas.cda.examples import example_xml
from hie_schemas.cda.pseudonym import pseudonymise_xml
from hie_schemas.cda.vocabulary import institution_code
from hie_schemas.codes import DOCUMENT_KINDS, DocumentType
from hie_schemas.documents import profiles
from hie_schemas.documents.builders import KST, build_document
from hie_schemas.documents.bundle import BundleIndex, codings, dicts, obj
from hie_schemas.events import StudyRef
from hie_schemas.identifiers import PATIENT_KEY_SYSTEM

V3 = "{urn:hl7-org:v3}"
Json = dict[str, Any]

words = st.from_regex(r"[가-힣A-Za-z0-9(),.%\-]{1,12}( [가-힣A-Za-z0-9(),.%\-]{1,12}){0,3}", fullmatch=True)
kcd = st.from_regex(r"[A-Z][0-9]{2}(\.[0-9]{1,2})?", fullmatch=True)
edi = st.from_regex(r"[0-9]{9}", fullmatch=True)
institutions = st.from_regex(r"[1-3][0-9]{7}", fullmatch=True)
studies = st.builds(
    StudyRef,
    study_instance_uid=st.from_regex(r"1\.2\.410\.[1-9][0-9]{0,5}\.[1-9][0-9]{0,8}", fullmatch=True),
    accession_number=st.one_of(st.none(), st.from_regex(r"CT[0-9]{6}-[0-9]{4}", fullmatch=True)),
)


@st.composite
def documents(draw: st.DrawFn) -> tuple[DocumentType, Json]:
    kind = draw(st.sampled_from(list(DocumentType)))
    needs_recipient = DOCUMENT_KINDS[kind].needs_recipient
    recipient = draw(institutions) if needs_recipient or draw(st.booleans()) else None
    minutes = draw(st.integers(min_value=0, max_value=10**6))
    document = build_document(
        kind,
        author_code=draw(institutions),
        author_name=draw(words),
        patient_rrn="600315-1520418",
        patient_name=draw(st.from_regex(r"[가-힣]{2,4}", fullmatch=True)),
        gender=draw(st.sampled_from(["male", "female", "other"])),
        created_at=datetime(2024, 1, 1, tzinfo=KST)
        + timedelta(minutes=minutes, microseconds=draw(st.integers(0, 999))),
        department=draw(st.sampled_from(["0100", "2300", "1600"])),
        practitioner_name=draw(st.from_regex(r"[가-힣]{2,4}", fullmatch=True)),
        studies=draw(st.lists(studies, max_size=2, unique_by=lambda s: s.study_instance_uid)),
        recipient_code=recipient,
        recipient_name=draw(words) if recipient else None,
        problems=draw(st.lists(st.tuples(kcd, words), min_size=1, max_size=3)),
        medications=draw(st.lists(st.tuples(edi, words), max_size=3)),
        allergies=draw(st.lists(words, max_size=2)),
        results=draw(
            st.lists(
                st.tuples(
                    st.sampled_from(["4548-4", "2345-7"]),
                    words,
                    st.decimals("0", "500", places=2).map(float),
                    st.sampled_from(["%", "mg/dL"]),
                ),
                max_size=2,
            )
        ),
        procedures=draw(st.lists(words, max_size=2)),
        reason=draw(words),
        plan_of_care=draw(words),
        opinion=draw(words),
        findings=draw(words),
    )
    return kind, document


def _concept(value: Any) -> Any:
    concept = obj(value)
    coded = sorted((c.get("system"), c.get("code"), c.get("display")) for c in codings(concept))
    return (tuple(coded), concept.get("text"))


def _instant(value: Any) -> Any:
    return datetime.fromisoformat(value) if isinstance(value, str) and "T" in value else value


def _resource(resource: Json, index: BundleIndex) -> tuple[Any, ...]:
    """What a clinician reads in one entry: type, codes, values, statuses and times (not ids)."""
    quantity = obj(resource.get("valueQuantity"))
    derived = [index.resolve(r) for r in dicts(resource.get("derivedFrom"))]
    return (
        resource.get("resourceType"),
        _concept(resource.get("code")),
        _concept(resource.get("medicationCodeableConcept")),
        _concept(resource.get("clinicalStatus")),
        tuple(_concept(c) for c in dicts(resource.get("category"))) or tuple(resource.get("category") or ()),
        resource.get("status"),
        (float(quantity["value"]), quantity.get("unit")) if quantity else None,
        resource.get("valueString"),
        tuple(d.get("text") for d in dicts(resource.get("dosage"))),
        tuple(
            _instant(resource.get(k))
            for k in ("recordedDate", "effectiveDateTime", "dateAsserted", "performedDateTime", "started")
        ),
        tuple(sorted(str(sorted(i.items())) for i in dicts(resource.get("identifier")))),
        tuple(sorted(str(d.resource.get("identifier")) for d in derived if d is not None)),
    )


def clinical_content(document: Json) -> Json:
    """The clinical content of a FHIR document, independent of resource ids and entry order."""
    composition = profiles.composition_of(document) or {}
    index = BundleIndex(document)
    patient = index.resolve(composition.get("subject"))
    assert patient is not None
    recipients = [index.resolve(e.get("valueReference")) for e in dicts(composition.get("extension"))]
    sections = []
    for section in dicts(composition.get("section")):
        targets = [index.resolve(e) for e in dicts(section.get("entry"))]
        items = re.findall(r"<li>(.*?)</li>", obj(section.get("text")).get("div", ""))
        sections.append(
            (
                profiles.section_of(section),
                section.get("title"),
                tuple(items),
                tuple(_resource(t.resource, index) for t in targets if t is not None),
            )
        )
    person = patient.resource
    return {
        "kind": profiles.kind_of(composition.get("type")),
        "patient": (
            person.get("identifier"),
            person["name"][0].get("text"),
            person.get("gender"),
            person.get("birthDate"),
        ),
        "date": _instant(composition.get("date")),
        "title": composition.get("title"),
        "author": (profiles.author_institution(document), profiles.author_department(document)),
        "recipients": sorted(str(r.resource.get("identifier")) for r in recipients if r is not None),
        "sections": sections,
    }


@settings(max_examples=60, deadline=None)
@given(documents())
def test_fhir_to_kcda_to_fhir_keeps_the_clinical_content(generated: tuple[DocumentType, Json]) -> None:
    kind, document = generated
    back = cda_to_fhir(fhir_to_cda(document))
    assert clinical_content(back) == clinical_content(document)
    recipients = [r for r in [_recipient(back)] if r]
    assert profiles.check_document(back, DOCUMENT_KINDS[kind], recipients) == []


def _recipient(document: Json) -> str | None:
    xml = parse_xml(fhir_to_cda(document))
    node = xml.find(f"{V3}informationRecipient/{V3}intendedRecipient/{V3}receivedOrganization/{V3}id")
    return institution_code(node.get("root")) if node is not None else None


def coded_entries(xml: bytes) -> list[tuple[str, str | None, str | None, str | None]]:
    """Every coded element inside a K-CDA entry: (element, code, codeSystem, value or extension)."""
    root = parse_xml(xml)
    found = []
    for entry in root.iter(f"{V3}entry"):
        for element in entry.iter():
            if element.get("code") or element.get("extension") or element.get("value"):
                found.append(
                    (
                        element.tag,
                        element.get("code"),
                        element.get("codeSystem"),
                        element.get("value") or element.get("extension"),
                    )
                )
    return found


@settings(max_examples=40, deadline=None)
@given(documents())
def test_kcda_to_fhir_to_kcda_keeps_every_coded_entry(generated: tuple[DocumentType, Json]) -> None:
    _, document = generated
    first = fhir_to_cda(document)
    again = fhir_to_cda(cda_to_fhir(first))
    assert coded_entries(again) == coded_entries(first)
    assert coded_entries(first)  # every generated document has coded entries (at least a problem or reading)
    ids = [parse_xml(x).find(f"{V3}id").get("root") for x in (first, again)]  # type: ignore[union-attr]
    assert ids[0] == ids[1]


def test_a_generated_document_id_follows_the_national_rule() -> None:
    document = build_document(
        DocumentType.REFERRAL,
        author_code="11301001",
        author_name="의원",
        patient_rrn="600315-1520418",
        recipient_code="11100001",
        created_at=datetime(2025, 3, 4, 9, 30, tzinfo=KST),
    )
    root = parse_xml(fhir_to_cda(document, rand=lambda: 42)).find(f"{V3}id")
    assert root is not None
    assert root.get("root") == "1.2.410.100110.40.2.1.1.11301001.20250304093000000042"


# --- hostile and broken XML ---------------------------------------------------------------------------


def _referral_xml() -> bytes:
    document = build_document(
        DocumentType.REFERRAL,
        author_code="11301001",
        author_name="의원",
        patient_rrn="600315-1520418",
        recipient_code="11100001",
        created_at=datetime(2025, 3, 4, 9, 30, tzinfo=KST),
    )
    return fhir_to_cda(document)


_XXE = b'<!DOCTYPE ClinicalDocument [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
_LOL = (
    b'<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
    b'<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>'
)
_OPEN = b'<ClinicalDocument xmlns="urn:hl7-org:v3">'
HOSTILE = {
    "external entity (XXE)": _XXE + _OPEN + b"<title>&xxe;</title></ClinicalDocument>",
    "billion laughs": _LOL + _OPEN + b"<title>&lol3;</title></ClinicalDocument>",
    "external DTD over the network": b'<!DOCTYPE ClinicalDocument SYSTEM "http://127.0.0.1:9/cda.dtd">'
    + _OPEN
    + b"</ClinicalDocument>",
    "parameter entity": b'<!DOCTYPE x [<!ENTITY % p SYSTEM "http://127.0.0.1:9/p.dtd"> %p;]>'
    + _OPEN
    + b"</ClinicalDocument>",
    "undeclared entity": _OPEN + b"<title>&xxe;</title></ClinicalDocument>",
    "not well-formed": _OPEN + b"<title>x</ClinicalDocument>",
    "deep nesting": _OPEN + b"<a>" * 200 + b"</a>" * 200 + b"</ClinicalDocument>",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_xml_is_refused_before_anything_is_expanded(name: str) -> None:
    with pytest.raises(CdaError) as caught:
        cda_to_fhir(HOSTILE[name])
    assert caught.value.status == 400
    assert caught.value.location.startswith("/")
    assert "root:" not in str(caught.value)  # nothing of /etc/passwd was read


def test_an_oversize_document_is_refused_unread() -> None:
    with pytest.raises(CdaError, match="larger than"):
        cda_to_fhir(
            b"<ClinicalDocument xmlns='urn:hl7-org:v3'>" + b" " * (6 * 1024 * 1024) + b"</ClinicalDocument>"
        )


def _edit(xml: bytes, change: Any) -> bytes:
    root = ET.fromstring(xml)  # our own generated XML, not input
    change(root)
    return ET.tostring(root)


def _drop(path: str) -> Any:
    def change(root: ET.Element) -> None:
        parent_path, _, name = path.rpartition("/")
        parent = root.find(parent_path) if parent_path else root
        assert parent is not None
        for child in parent.findall(name):
            parent.remove(child)

    return change


def _problems_section(root: ET.Element) -> None:
    body = root.find(f"{V3}component/{V3}structuredBody")
    assert body is not None
    for component in body.findall(f"{V3}component"):
        code = component.find(f"{V3}section/{V3}code")
        if code is not None and code.get("code") == "11450-4":
            body.remove(component)


def _wrong_template(root: ET.Element) -> None:
    template = root.find(f"{V3}templateId")
    assert template is not None
    template.set("root", "2.16.840.1.113883.10.20.22.1.1")


def _icd10_problem(root: ET.Element) -> None:
    for value in root.iter(f"{V3}value"):
        if value.get("code") == "I10":
            value.set("codeSystem", "2.16.840.1.113883.6.3")
            value.attrib.pop("codeSystemName", None)


@pytest.mark.parametrize(
    ("change", "location"),
    [
        (_wrong_template, "/ClinicalDocument/templateId"),
        (_drop(f"{V3}informationRecipient"), "/ClinicalDocument/informationRecipient"),
        (_problems_section, "/ClinicalDocument/component/structuredBody"),
        (_drop(f"{V3}recordTarget"), "/ClinicalDocument/recordTarget/patientRole/id"),
        (_drop(f"{V3}typeId"), "/ClinicalDocument/typeId"),
        (
            _icd10_problem,
            "/ClinicalDocument/component/structuredBody/component[2]/section/entry/observation/value",
        ),
    ],
)
def test_template_rules_name_the_element(change: Any, location: str) -> None:
    with pytest.raises(CdaError) as caught:
        cda_to_fhir(_edit(_referral_xml(), change))
    assert caught.value.status == 422
    assert location in [e.location for e in caught.value.all]


def test_an_imaging_report_needs_the_reading() -> None:
    document = build_document(
        DocumentType.IMAGING_REPORT,
        author_code="11100001",
        author_name="병원",
        patient_rrn="600315-1520418",
        created_at=datetime(2025, 3, 4, 9, 30, tzinfo=KST),
    )

    def empty_reading(root: ET.Element) -> None:
        section = root.find(f"{V3}component/{V3}structuredBody/{V3}component/{V3}section")
        assert section is not None
        for child in [*section.findall(f"{V3}entry"), *section.findall(f"{V3}text")]:
            section.remove(child)

    with pytest.raises(CdaError, match="empty") as caught:
        cda_to_fhir(_edit(fhir_to_cda(document), empty_reading))
    assert caught.value.location == "/ClinicalDocument/component/structuredBody/component/section"


DOC = Path(__file__).resolve().parents[2] / "docs" / "kcda.md"
GENERATED = re.compile(r"<!-- generated: cda (?P<kind>[\w-]+) -->\n```xml\n(?P<xml>.*?)\n```\n", re.DOTALL)


def test_the_documented_examples_are_what_the_code_writes_and_reads() -> None:
    found = {m["kind"]: m["xml"] for m in GENERATED.finditer(DOC.read_text())}
    assert found == {kind.value: example_xml(kind) for kind in DocumentType}
    for xml in found.values():
        assert profiles.composition_of(cda_to_fhir(xml.encode())) is not None


def test_the_kept_xml_names_the_patient_by_key_only() -> None:
    xml = _referral_xml()
    kept, found = pseudonymise_xml(xml, lambda raw: "k" * 64)
    assert found == ["600315-1520418"]
    assert b"600315-1520418" not in kept
    assert b"1520418" not in kept
    back = cda_to_fhir(kept)
    [patient] = [e["resource"] for e in back["entry"] if e["resource"]["resourceType"] == "Patient"]
    assert patient["identifier"] == [{"use": "official", "system": PATIENT_KEY_SYSTEM, "value": "k" * 64}]
