"""Request and response bodies of the registry's lifecycle API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from hie_schemas.directory import DicomEndpointInfo, InstitutionKind, InstitutionView


class Contacts(BaseModel):
    model_config = ConfigDict(extra="forbid")

    person: str | None = Field(default=None, max_length=100)
    phone: str | None = Field(default=None, max_length=40)
    email: str | None = Field(default=None, max_length=200)


class Application(BaseModel):
    """An institution's application to participate, entered by the agency after prior consultation."""

    model_config = ConfigDict(extra="forbid")

    code: str = Field(description="요양기관기호, 8 digits")
    name: str = Field(min_length=1, max_length=200)
    name_en: str | None = Field(default=None, max_length=200)
    kind: InstitutionKind
    region: str = Field(min_length=1, max_length=40, description="시도")
    hub: str | None = Field(default=None, description="a clinic's hub (slug); a hub's own slug for a hub")
    departments: list[str] = Field(default_factory=list)
    fhir_base: str | None = Field(default=None, max_length=300)
    dicom: DicomEndpointInfo | None = None
    contacts: Contacts = Field(default_factory=Contacts)
    samples: list[dict[str, Any]] = Field(
        default_factory=list, description="sample FHIR documents for review"
    )


class StepRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=3, max_length=2000, description="why; recorded in the history")


class Credentials(BaseModel):
    client_id: str
    client_secret: str = Field(description="shown once; only a hash is kept")


class StepResult(BaseModel):
    institution: InstitutionView
    evidence: dict[str, Any] = Field(default_factory=dict)
    credentials: Credentials | None = None


class HistoryEntry(BaseModel):
    action: str
    from_state: str | None
    to_state: str
    actor: str
    reason: str
    evidence: dict[str, Any]
    at: datetime


class InstitutionDetail(InstitutionView):
    """The agency's view: the directory entry plus contacts."""

    contacts: dict[str, Any] = Field(default_factory=dict)
