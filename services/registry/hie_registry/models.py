"""Registry tables: institutions, hubs, client credentials, signing keys (+ the platform tables)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from hie_platform.db import platform_tables


class Base(DeclarativeBase):
    pass


class Institution(Base):
    __tablename__ = "institutions"

    code: Mapped[str] = mapped_column(String(8), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    name_en: Mapped[str | None] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(20), index=True)
    region: Mapped[str | None] = mapped_column(String(40), index=True)
    state: Mapped[str] = mapped_column(String(20), index=True)
    hub: Mapped[str | None] = mapped_column(String(40), index=True)
    departments: Mapped[list[str]] = mapped_column(JSON, default=list)
    fhir_base: Mapped[str | None] = mapped_column(String(300))
    dicom_ae: Mapped[str | None] = mapped_column(String(16))
    dicom_host: Mapped[str | None] = mapped_column(String(255))
    dicom_port: Mapped[int | None] = mapped_column(Integer)
    contacts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Hub(Base):
    """A hub (거점의료기관) as other nodes route to it."""

    __tablename__ = "hubs"

    slug: Mapped[str] = mapped_column(String(40), primary_key=True)
    institution_code: Mapped[str] = mapped_column(ForeignKey("institutions.code"), unique=True)
    fhir_base: Mapped[str | None] = mapped_column(String(300))
    gateway_ae: Mapped[str | None] = mapped_column(String(16))
    gateway_host: Mapped[str | None] = mapped_column(String(255))
    gateway_port: Mapped[int | None] = mapped_column(Integer)


class Client(Base):
    """OAuth2 client credentials of an institution; only a salted hash of the secret is kept."""

    __tablename__ = "clients"

    client_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    institution_code: Mapped[str] = mapped_column(ForeignKey("institutions.code"), index=True)
    secret_hash: Mapped[str] = mapped_column(String(200))
    scopes: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class SigningKey(Base):
    __tablename__ = "signing_keys"

    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    private_pem: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class InstitutionEvent(Base):
    """One lifecycle step: who took it, when, why, with what evidence. Append-only."""

    __tablename__ = "institution_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    code: Mapped[str] = mapped_column(ForeignKey("institutions.code"), index=True)
    action: Mapped[str] = mapped_column(String(30))
    from_state: Mapped[str | None] = mapped_column(String(20))
    to_state: Mapped[str] = mapped_column(String(20))
    actor: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)
    evidence: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class LocatorEntry(Base):
    """Record locator: a hub holds documents for a patient key (no clinical content)."""

    __tablename__ = "locator"

    patient_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    hub: Mapped[str] = mapped_column(String(40), primary_key=True)
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ExchangeCount(Base):
    """Exchanges per month and kind, for the agency's statistics."""

    __tablename__ = "exchange_counts"

    month: Mapped[str] = mapped_column(String(7), primary_key=True)
    kind: Mapped[str] = mapped_column(String(30), primary_key=True)
    count: Mapped[int] = mapped_column(Integer, default=0)


PLATFORM = platform_tables(Base.metadata)
