"""What the example documents say: the sections of each kind and their default clinical content.

The medication codes are illustrative values in the shape of HIRA EDI codes, not a reference list.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

from hie_schemas.codes import DocumentType
from hie_schemas.codes import Section as S

DEFAULT_PROBLEMS: tuple[tuple[str, str], ...] = (("I10", "본태성(원발성) 고혈압"),)
DEFAULT_MEDICATIONS: tuple[tuple[str, str], ...] = (("645102950", "암로디핀베실산염 5mg 정"),)
DEFAULT_RESULTS: tuple[tuple[str, str, float, str], ...] = (("4548-4", "당화혈색소(HbA1c)", 6.8, "%"),)

# The sections each example document carries, in order (the required ones of codes.DOCUMENT_KINDS included).
SECTIONS_BY_KIND: dict[DocumentType, tuple[S, ...]] = {
    DocumentType.REFERRAL: (S.REASON_FOR_REFERRAL, S.PROBLEMS, S.MEDICATIONS, S.RESULTS),
    DocumentType.RETURN: (S.PROBLEMS, S.MEDICATIONS, S.PROCEDURES, S.PLAN_OF_CARE),
    DocumentType.CONSULT_REPLY: (S.PROBLEMS, S.PHYSICIAN_OPINION, S.PLAN_OF_CARE),
    DocumentType.CARE_RECORD_SUMMARY: (
        S.PROBLEMS,
        S.MEDICATIONS,
        S.ALLERGIES,
        S.RESULTS,
        S.PROCEDURES,
        S.PLAN_OF_CARE,
    ),
    DocumentType.IMAGING_REPORT: (S.IMAGING_FINDINGS,),
    DocumentType.TRANSFER_OPINION: (S.REASON_FOR_REFERRAL, S.PROBLEMS, S.MEDICATIONS, S.PHYSICIAN_OPINION),
}


class DocumentDetails(TypedDict, total=False):
    """What an example document says beyond who writes it for whom: the patient, the author's
    department (HIRA code, None for none) and practitioner, and each section's content."""

    patient_name: str
    birth_date: str
    gender: str
    department: str | None
    practitioner_name: str
    problems: Sequence[tuple[str, str]]  # (KCD-8 code, display)
    medications: Sequence[tuple[str, str]]  # (HIRA EDI code, display)
    allergies: Sequence[str]
    results: Sequence[tuple[str, str, float, str]]  # (LOINC code, display, value, UCUM unit)
    procedures: Sequence[str]
    reason: str
    plan_of_care: str
    opinion: str
    findings: str


DEFAULT_DETAILS: DocumentDetails = {
    "patient_name": "홍길동",
    "birth_date": "1960-03-15",
    "gender": "male",
    "department": "0100",
    "practitioner_name": "김민준",
    "problems": DEFAULT_PROBLEMS,
    "medications": DEFAULT_MEDICATIONS,
    "allergies": ("페니실린계 항생제",),
    "results": DEFAULT_RESULTS,
    "procedures": ("24시간 활동혈압 측정",),
    "reason": "조절되지 않는 고혈압에 대한 정밀 검사 및 치료 의뢰드립니다.",
    "plan_of_care": "3개월 후 외래 추적 관찰, 가정 혈압 기록 지참.",
    "opinion": "저염식 및 규칙적인 운동을 권고합니다. 기립성 저혈압에 주의하십시오.",
    "findings": "흉부 CT: 급성 병변은 보이지 않음. 우하엽의 4mm 비석회화 결절, 12개월 후 추적 권고.",
}
