"""The registry's public view of an institution, shared by the registry and its clients."""

from __future__ import annotations

from enum import StrEnum

from hie_schemas.model import FrozenModel


class InstitutionKind(StrEnum):
    HUB = "hub"  # 거점의료기관
    CLINIC = "clinic"  # 참여병의원
    PUBLIC_AGENCY = "public-agency"
    AGENCY = "agency"  # the operating agency (KHIS role)


class InstitutionState(StrEnum):
    APPLIED = "applied"
    UNDER_REVIEW = "under-review"
    AGREEMENT_SIGNED = "agreement-signed"
    APPROVED = "approved"
    ACTIVE = "active"
    SUSPENDED = "suspended"
    REVOKED = "revoked"
    REJECTED = "rejected"

    @property
    def in_good_standing(self) -> bool:
        return self is InstitutionState.ACTIVE


class DicomEndpointInfo(FrozenModel):
    ae_title: str
    host: str
    port: int


class InstitutionView(FrozenModel):
    """What the directory tells anyone about an institution (no contact details)."""

    code: str
    oid: str
    name: str
    name_en: str | None = None
    kind: InstitutionKind
    region: str | None = None
    state: InstitutionState
    hub: str | None = None  # slug of the hub it belongs to (its own slug for a hub hospital)
    departments: list[str] = []
    fhir_base: str | None = None
    dicom: DicomEndpointInfo | None = None  # the institution's PACS, or a hub's imaging gateway

    @property
    def in_good_standing(self) -> bool:
        return self.state.in_good_standing


class HubView(FrozenModel):
    """A hub as other nodes route to it: its slug, hospital, FHIR base and imaging gateway."""

    slug: str
    code: str
    name: str
    fhir_base: str | None = None
    gateway: DicomEndpointInfo | None = None
