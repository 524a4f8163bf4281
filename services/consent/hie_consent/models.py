"""Consent tables: append-only consent versions with their exclusions and signatures, one-time-code
challenges, ended portal sessions, and the patient's history of exchanges and accesses (+ the
platform tables)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from hie_platform.db import platform_tables


class Base(DeclarativeBase):
    pass


class ConsentVersion(Base):
    """One version of a patient's consent; rows are only ever inserted (the history is the record)."""

    __tablename__ = "consent_versions"
    __table_args__ = (UniqueConstraint("patient_key", "version", name="uq_consent_versions_patient_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # The FHIR logical id, shared by every version of one patient's consent (meta.versionId = version).
    resource_id: Mapped[str] = mapped_column(String(36), index=True)
    patient_key: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer)
    policy: Mapped[str] = mapped_column(String(32))
    effective_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    excluded_institutions: Mapped[list[str]] = mapped_column(JSON, default=list)
    excluded_departments: Mapped[list[str]] = mapped_column(JSON, default=list)
    recorded_by: Mapped[str] = mapped_column(String(8))
    channel: Mapped[str] = mapped_column(String(32))
    signer_relationship: Mapped[str] = mapped_column(String(32))
    # Who signed when it was not the patient (or the patient's own contact): personal data of the
    # consent record, never in an event or a log line.
    signer_name: Mapped[str | None] = mapped_column(String(100), default=None)
    signer_contact: Mapped[str | None] = mapped_column(String(100), default=None)
    # The FHIR Consent as stored: patient identifier = the patient key, never an RRN.
    resource: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ConsentExclusion(Base):
    """One excluded institution or department of a version, with the patient's reason (queryable)."""

    __tablename__ = "consent_exclusions"
    __table_args__ = (Index("ix_consent_exclusions_kind_code", "kind", "code"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    consent_version_id: Mapped[int] = mapped_column(ForeignKey("consent_versions.id"), index=True)
    patient_key: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))  # institution | department
    code: Mapped[str] = mapped_column(String(8))
    reason: Mapped[str] = mapped_column(String(500))


class ConsentSignature(Base):
    """The signature image of a desk consent (Consent.sourceAttachment), kept beside the resource."""

    __tablename__ = "consent_signatures"

    consent_version_id: Mapped[int] = mapped_column(ForeignKey("consent_versions.id"), primary_key=True)
    content_type: Mapped[str] = mapped_column(String(32))
    data: Mapped[bytes] = mapped_column(LargeBinary)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)


class IdentityChallenge(Base):
    """A one-time code sent to a patient: the portal's sign-in or the completion of a call-centre request.

    Only the code's keyed hash is kept. ``attempts`` counts wrong codes for the patient across the
    challenges of one lockout window (a new challenge carries the count over), so asking for a fresh
    code never buys more guesses.
    """

    __tablename__ = "identity_challenges"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    purpose: Mapped[str] = mapped_column(String(16))  # portal | call-centre
    patient_key: Mapped[str] = mapped_column(String(64), index=True)
    code_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    verified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    # Call centre: the agent's institution and what the patient asked for, recorded on completion.
    agent_institution: Mapped[str | None] = mapped_column(String(8), default=None)
    request: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    consent_version: Mapped[int | None] = mapped_column(Integer, default=None)


class EndedPortalSession(Base):
    """A patient session ended (signed out) before its token expires: every replica refuses its ``jti``
    until then. Rows are pruned once the token could no longer pass anyway."""

    __tablename__ = "ended_portal_sessions"

    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    # The token's exp plus the verifier's leeway and a margin for replicas' clocks: kept until then.
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    ended_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ExchangeEntry(Base):
    """One line of a patient's exchange history: an exchange sent, or a later status of its Task."""

    __tablename__ = "exchange_history"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    patient_key: Mapped[str] = mapped_column(String(64), index=True)
    exchange_id: Mapped[str] = mapped_column(String(100), index=True)
    kind: Mapped[str | None] = mapped_column(String(32))
    from_institution: Mapped[str | None] = mapped_column(String(8))
    to_institution: Mapped[str | None] = mapped_column(String(8))
    document_types: Mapped[list[str]] = mapped_column(JSON, default=list)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    status: Mapped[str] = mapped_column(String(32))
    purpose: Mapped[str | None] = mapped_column(String(32), default=None)


class AccessEntry(Base):
    """One access to the patient's records (an audit record of any node), or an emergency permit."""

    __tablename__ = "access_history"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    patient_key: Mapped[str] = mapped_column(String(64), index=True)
    node: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(64))
    institution: Mapped[str | None] = mapped_column(String(8))
    document_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    purpose: Mapped[str | None] = mapped_column(String(32))
    outcome: Mapped[str] = mapped_column(String(32))
    rule: Mapped[str | None] = mapped_column(String(64))
    consent_version: Mapped[int | None] = mapped_column(Integer)
    flagged: Mapped[bool] = mapped_column(Boolean, default=False)
    justification: Mapped[str | None] = mapped_column(Text, default=None)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DocumentIndex(Base):
    """Which type a document id has, learned from publish/exchange events (audit records carry only ids)."""

    __tablename__ = "document_index"

    document_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    document_type: Mapped[str] = mapped_column(String(32))


PLATFORM = platform_tables(Base.metadata)
