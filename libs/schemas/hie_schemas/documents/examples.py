"""One deterministic ITI-65 example per document type, for docs/fhir-profiles.md and its test.

The same builders as the demo and the tests, with a fixed clock and a fixed id sequence, so that the
published examples are exactly what the code produces (tests/hub/test_profile_docs.py compares them).
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass
from datetime import datetime

from hie_schemas.codes import DocumentType
from hie_schemas.documents.builders import KST, IdFactory, Json, build_document, build_submission
from hie_schemas.events import StudyRef

EXAMPLE_CREATED_AT = datetime(2025, 3, 4, 9, 30, tzinfo=KST)
# Shaped like a resident registration number (valid birth date), but made up for the examples.
EXAMPLE_RRN = "600315-1520418"
_NAMESPACE = uuid.UUID("0b7e3f4c-6a0e-4c1f-9d0b-7f5e2a9c1d33")

SEOUL_CLINIC, SEVERANCE, SNUBH = "11301001", "11100001", "31100002"
CHEST_CT = StudyRef(study_instance_uid="1.2.410.200001.1.3.20250304.1", accession_number="CT250304-0017")


@dataclass(frozen=True)
class Example:
    """Who writes the example document, for whom, and what it carries."""

    author_code: str
    author_name: str
    department: str
    recipient_code: str | None
    recipient_name: str | None
    studies: tuple[StudyRef, ...] = ()


EXAMPLES: dict[DocumentType, Example] = {
    DocumentType.REFERRAL: Example(
        SEOUL_CLINIC, "서울 연세가정의학과의원", "2300", SEVERANCE, "세브란스병원", (CHEST_CT,)
    ),
    DocumentType.RETURN: Example(SEVERANCE, "세브란스병원", "0100", SEOUL_CLINIC, "서울 연세가정의학과의원"),
    DocumentType.CONSULT_REPLY: Example(
        SEVERANCE, "세브란스병원", "0100", SEOUL_CLINIC, "서울 연세가정의학과의원"
    ),
    DocumentType.CARE_RECORD_SUMMARY: Example(SEVERANCE, "세브란스병원", "0100", None, None),
    DocumentType.IMAGING_REPORT: Example(SEVERANCE, "세브란스병원", "1600", None, None, (CHEST_CT,)),
    DocumentType.TRANSFER_OPINION: Example(SEVERANCE, "세브란스병원", "2400", SNUBH, "분당서울대학교병원"),
}


def sequential_ids(seed: str) -> IdFactory:
    """uuid5 ids numbered from ``seed``: the same every run."""
    counter = itertools.count(1)
    return lambda: str(uuid.uuid5(_NAMESPACE, f"{seed}/{next(counter)}"))


def example_submission(kind: DocumentType) -> Json:
    """The complete ITI-65 transaction that publishes the example document of ``kind``."""
    example = EXAMPLES[kind]
    ids = sequential_ids(kind.value)
    document = build_document(
        kind,
        author_code=example.author_code,
        author_name=example.author_name,
        patient_rrn=EXAMPLE_RRN,
        created_at=EXAMPLE_CREATED_AT,
        department=example.department,
        studies=example.studies,
        recipient_code=example.recipient_code,
        recipient_name=example.recipient_name,
        new_id=ids,
    )
    recipients = [example.recipient_code] if example.recipient_code else []
    return build_submission(
        [document],
        author_code=example.author_code,
        patient_rrn=EXAMPLE_RRN,
        recipients=recipients,
        submitted_at=EXAMPLE_CREATED_AT,
        new_id=ids,
    )
