"""Pydantic shapes and code lists of the consent API that are local to this service."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal, Self

from pydantic import ConfigDict, Field, SecretStr, StringConstraints, model_validator

from hie_schemas.consent import ConsentPolicy
from hie_schemas.model import FrozenModel


class ConsentChannel(StrEnum):
    """How the patient gave or withdrew consent (KHIS: at an institution, on the portal, by phone)."""

    PAPER = "paper"  # at a participating institution, signed on paper (scanned)
    SIGN_PAD = "sign-pad"  # at a participating institution, on a signature pad
    MOBILE = "mobile"  # at a participating institution, on the patient's phone
    PORTAL = "portal"  # online on the patient portal after identity verification
    PHONE = "phone"  # by phone with the call centre, completed by a text message

    @property
    def at_institution(self) -> bool:
        return self in (ConsentChannel.PAPER, ConsentChannel.SIGN_PAD, ConsentChannel.MOBILE)


class SignerRelationship(StrEnum):
    """Who signed, relative to the patient (KHIS records self, legal representative or other)."""

    SELF = "self"
    LEGAL_REPRESENTATIVE = "legal-representative"
    OTHER = "other"


class ExclusionKind(StrEnum):
    INSTITUTION = "institution"
    DEPARTMENT = "department"


Text100 = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
Reason = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)]
# Korean mobile numbers (SMS and identity verification go to a mobile phone): 010-1234-5678 or 01012345678.
# [0-9], not \d: pydantic's \d takes any Unicode digit (hie_schemas.identifiers: ASCII digits only).
MOBILE_PATTERN = r"^01[016789]-?[0-9]{3,4}-?[0-9]{4}$"
Mobile = Annotated[str, StringConstraints(strip_whitespace=True, pattern=MOBILE_PATTERN)]
Code = Annotated[str, StringConstraints(pattern=r"^[0-9]{6}$")]


class Exclusion(FrozenModel):
    """An institution or department the patient excluded, and why (KHIS: each exclusion has a reason)."""

    kind: ExclusionKind
    code: str
    reason: str


class Signer(FrozenModel):
    relationship: SignerRelationship = SignerRelationship.SELF
    name: Text100 | None = None
    contact: Text100 | None = None

    @model_validator(mode="after")
    def _someone_else_is_identified(self) -> Self:
        if self.relationship is not SignerRelationship.SELF and not (self.name and self.contact):
            raise ValueError("a signer other than the patient needs a name and a contact")
        return self


class ExchangeHistoryEntry(FrozenModel):
    """One line of what the patient sees: who sent what to whom, when, and what became of it."""

    exchange_id: str
    kind: str | None
    from_institution: str | None
    to_institution: str | None
    document_types: list[str]
    occurred_at: datetime
    status: str
    purpose: str | None = None


class AccessHistoryEntry(FrozenModel):
    """One access to the patient's records at any node; emergency accesses are flagged."""

    occurred_at: datetime
    institution: str | None
    action: str
    document_ids: list[str]
    document_types: list[str]
    purpose: str | None
    outcome: str
    rule: str | None
    consent_version: int | None
    flagged: bool
    justification: str | None = None


class ConsentVersionView(FrozenModel):
    """One version of the patient's consent as the patient (or the agency) sees it."""

    resource_id: str
    version: int
    policy: ConsentPolicy
    effective_at: datetime
    recorded_at: datetime
    recorded_by: str
    channel: ConsentChannel
    signer: Signer
    exclusions: list[Exclusion]
    has_signature_image: bool


class PatientHistory(FrozenModel):
    exchanges: list[ExchangeHistoryEntry]
    accesses: list[AccessHistoryEntry]


# --- portal and call centre ---------------------------------------------------------------------


class IdentityStart(FrozenModel):
    """The patient asks to prove who they are; the RRN is a secret so that no repr can print it."""

    model_config = ConfigDict(extra="forbid")

    rrn: SecretStr
    phone: Mobile


class CodeSubmission(FrozenModel):
    model_config = ConfigDict(extra="forbid")

    code: Code


class ChallengeOpened(FrozenModel):
    """A code is on its way; ``dev_code`` is present only when the service runs in development."""

    challenge_id: str
    expires_at: datetime
    attempts_left: int
    dev_code: str | None = None


class PatientSessionToken(FrozenModel):
    access_token: str
    token_type: Literal["Bearer"] = "Bearer"
    expires_in: int


class ExclusionRequest(FrozenModel):
    """Exclude one institution (요양기관기호) or one department (HIRA code), with the patient's reason."""

    model_config = ConfigDict(extra="forbid")

    institution: str | None = None
    department: str | None = None
    reason: Reason

    @model_validator(mode="after")
    def _one_target(self) -> Self:
        if (self.institution is None) == (self.department is None):
            raise ValueError("name exactly one of institution or department")
        return self

    def exclusion(self) -> Exclusion:
        if self.institution is not None:
            return Exclusion(kind=ExclusionKind.INSTITUTION, code=self.institution, reason=self.reason)
        assert self.department is not None
        return Exclusion(kind=ExclusionKind.DEPARTMENT, code=self.department, reason=self.reason)


class ConsentRequest(FrozenModel):
    """Consent, partial consent, entire or partial withdrawal, re-consent: the complete new version."""

    model_config = ConfigDict(extra="forbid")

    policy: ConsentPolicy
    exclusions: list[ExclusionRequest] = Field(default_factory=list, max_length=100)


class CallCentreRequest(ConsentRequest):
    """An agent takes the patient's request by phone; the patient completes it with a texted code."""

    rrn: SecretStr
    phone: Mobile
    signer: Signer = Signer()
