"""Gateway tables: received instances with their relay state, and the studies linked to exchanges."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import BigInteger, DateTime, Index, Integer, String, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from hie_platform.db import platform_tables

NO_EXCHANGE = ""  # exchange_id of an instance not (yet) linked to any exchange


class Role(StrEnum):
    """Why an instance is here: sent by one of our institutions, or relayed in by another gateway."""

    ORIGIN = "origin"
    DESTINATION = "destination"


class State(StrEnum):
    HELD = "held"  # no exchange refers to its study (yet)
    QUEUED = "queued"  # a relay job is pending
    RELAYED = "relayed"  # stored by the destination hub's gateway
    DELIVERED = "delivered"  # stored by the recipient institution's PACS
    BLOCKED = "blocked"  # the consent decision refused the flow
    FAILED = "failed"  # gave up after the maximum number of attempts (dead letter)
    PURGED = "purged"  # held too long; removed from the spool


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out (SQLite hands back naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else as_utc(value)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else as_utc(value)


def as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class Instance(Base):
    """One received SOP instance on its way to one exchange's recipient.

    The key is (SOP Instance UID, exchange): a study that goes to two recipients (one referral with
    two recipients makes two exchanges) is relayed once per exchange from the same spooled file.
    An instance no exchange claims yet has the exchange NO_EXCHANGE and is held.
    """

    __tablename__ = "instances"

    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    exchange_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    calling_ae: Mapped[str] = mapped_column(String(16))
    sender_institution: Mapped[str | None] = mapped_column(String(8))
    role: Mapped[str] = mapped_column(String(12))
    state: Mapped[str] = mapped_column(String(12))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(String(300))
    received_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)

    __table_args__ = (
        Index("ix_instances_study", "study_instance_uid"),
        Index("ix_instances_state_received", "state", "received_at"),
    )


class StudyLink(Base):
    """A study that an exchange refers to (XDS-I.b: the study UID in the document's references)."""

    __tablename__ = "study_links"

    study_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    exchange_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    from_institution: Mapped[str] = mapped_column(String(8))
    to_institution: Mapped[str] = mapped_column(String(8))
    from_hub: Mapped[str] = mapped_column(String(40))
    to_hub: Mapped[str] = mapped_column(String(40))
    patient_key: Mapped[str] = mapped_column(String(128))
    document_created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    purpose: Mapped[str] = mapped_column(String(20))
    # An emergency's justification as the hub sent it (ExchangeSent): decided with it at each batch.
    justification: Mapped[str | None] = mapped_column(Text, nullable=True)
    linked_at: Mapped[datetime] = mapped_column(UtcDateTime)


PLATFORM = platform_tables(Base.metadata)
