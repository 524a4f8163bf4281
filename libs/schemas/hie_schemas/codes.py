"""Code systems and the document types of the Korean exchange (domain.md), as pure data."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

LOINC = "http://loinc.org"
KCD8 = "http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8"
HIRA_EDI_MEDICATION = "http://www.hl7korea.or.kr/CodeSystem/hira-edi-medication"
HIRA_DEPARTMENT = "http://www.hl7korea.or.kr/CodeSystem/hira-department"
ATC = "http://www.whocc.no/atc"
DICOM_UID = "urn:dicom:uid"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
# KHIS consent policy codes (code system OID 1.2.410.100110.40.2.2).
CONSENT_POLICY_SYSTEM = "urn:oid:1.2.410.100110.40.2.2"
# K-CDA document template OIDs live under this root. Composition.type carries the template as its first
# coding (system = the root as a URN, code = the last arc) and the LOINC document code, where one is
# well established, as a second coding; the template coding is what the hub matches on.
TEMPLATE_ROOT = "1.2.410.100110.40.2.1"
TEMPLATE_SYSTEM = f"urn:oid:{TEMPLATE_ROOT}"
# The 17 시도 (first-level divisions) in the order of their administrative codes (서울 11 … 제주 50):
# the values an institution's region (Organization.address.state in the directory) is written with.
REGIONS: tuple[str, ...] = (
    "서울",
    "부산",
    "대구",
    "인천",
    "광주",
    "대전",
    "울산",
    "세종",
    "경기",
    "강원",
    "충북",
    "충남",
    "전북",
    "전남",
    "경북",
    "경남",
    "제주",
)


class DocumentType(StrEnum):
    REFERRAL = "referral"  # 진료의뢰서
    RETURN = "return"  # 진료회송서
    CONSULT_REPLY = "consult-reply"  # 진료회신서
    CARE_RECORD_SUMMARY = "care-record-summary"  # 진료기록요약지
    IMAGING_REPORT = "imaging-report"  # 영상의학판독소견서
    TRANSFER_OPINION = "transfer-opinion"  # 전원소견서


class Section(StrEnum):
    """LOINC section codes of the Korean documents."""

    PROBLEMS = "11450-4"
    MEDICATIONS = "10160-0"
    RESULTS = "30954-2"
    PROCEDURES = "47519-4"
    VITAL_SIGNS = "8716-3"
    IMMUNIZATIONS = "11369-6"
    ALLERGIES = "48765-2"
    PLAN_OF_CARE = "18776-5"
    REASON_FOR_REFERRAL = "42349-1"
    PHYSICIAN_OPINION = "51848-0"
    KEY_RESULTS = "10187-3"
    SOCIAL_HISTORY = "29762-2"
    NOTIFIABLE_DISEASE = "56838-6"
    PAST_HISTORY = "11348-0"
    DISCHARGE_MEDICATIONS = "10183-2"
    IMAGING_FINDINGS = "121070"  # DICOM (DCM) code, not LOINC


@dataclass(frozen=True)
class DocumentKind:
    type: DocumentType
    loinc: str | None
    display: str
    korean: str
    template_code: str
    required_sections: tuple[Section, ...]
    needs_recipient: bool

    @property
    def template_oid(self) -> str:
        return f"{TEMPLATE_ROOT}.{self.template_code}"


DOCUMENT_KINDS: dict[DocumentType, DocumentKind] = {
    k.type: k
    for k in (
        DocumentKind(
            DocumentType.REFERRAL,
            "57133-1",
            "Referral note",
            "진료의뢰서",
            "1",
            (Section.PROBLEMS,),
            True,
        ),
        DocumentKind(
            DocumentType.RETURN,
            None,
            "Return note",
            "진료회송서",
            "2",
            (Section.PROBLEMS,),
            True,
        ),
        DocumentKind(
            DocumentType.CONSULT_REPLY,
            "11488-4",
            "Consult note",
            "진료회신서",
            "3",
            (Section.PROBLEMS,),
            True,
        ),
        DocumentKind(
            DocumentType.CARE_RECORD_SUMMARY,
            "34133-9",
            "Summary of episode note",
            "진료기록요약지",
            "4",
            (Section.PROBLEMS,),
            False,
        ),
        DocumentKind(
            DocumentType.IMAGING_REPORT,
            "18748-4",
            "Diagnostic imaging study",
            "영상의학판독소견서",
            "5",
            (Section.IMAGING_FINDINGS,),
            False,
        ),
        DocumentKind(
            DocumentType.TRANSFER_OPINION,
            "18761-7",
            "Transfer summary note",
            "전원소견서",
            "6",
            (Section.PROBLEMS,),
            False,
        ),
    )
}

_BY_TEMPLATE = {k.template_code: k for k in DOCUMENT_KINDS.values()}
_BY_LOINC = {k.loinc: k for k in DOCUMENT_KINDS.values() if k.loinc}


def document_kind_by_coding(system: str | None, code: str | None) -> DocumentKind | None:
    """Find a document kind from one Composition.type / DocumentReference.type coding."""
    if code is None:
        return None
    if system == TEMPLATE_SYSTEM:
        return _BY_TEMPLATE.get(code)
    if system == LOINC:
        return _BY_LOINC.get(code)
    return None


def section_system(section: Section) -> str:
    return DCM if section is Section.IMAGING_FINDINGS else LOINC


# HIRA department codes (진료과목 코드) used in the seed data and exclusions.
DEPARTMENTS: dict[str, str] = {
    "0100": "내과 (internal medicine)",
    "0200": "신경과 (neurology)",
    "0300": "정신건강의학과 (psychiatry)",
    "0400": "외과 (surgery)",
    "0500": "정형외과 (orthopaedics)",
    "0600": "신경외과 (neurosurgery)",
    "1000": "산부인과 (obstetrics and gynaecology)",
    "1100": "소아청소년과 (paediatrics)",
    "1200": "안과 (ophthalmology)",
    "1300": "이비인후과 (otorhinolaryngology)",
    "1400": "피부과 (dermatology)",
    "1500": "비뇨의학과 (urology)",
    "1600": "영상의학과 (radiology)",
    "2300": "가정의학과 (family medicine)",
    "2400": "응급의학과 (emergency medicine)",
}
