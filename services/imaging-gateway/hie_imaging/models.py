"""Gateway tables: received instances with their relay state, and the studies linked to exchanges."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar

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


# Column types shared by the tables (SQLAlchemy's Annotated type map): a DICOM UID (PS3.5 §9.1, at
# most 64 characters), a 요양기관기호 (8 digits), a hub slug, and timestamps kept in UTC.
Uid = Annotated[str, 64]
Code = Annotated[str, 8]
Slug = Annotated[str, 40]


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        Uid: String(64),
        Code: String(8),
        Slug: String(40),
        datetime: UtcDateTime,
    }


class Instance(Base):
    """One received SOP instance on its way to one exchange's recipient.

    The key is (SOP Instance UID, exchange): a study that goes to two recipients (one referral with
    two recipients makes two exchanges) is relayed once per exchange from the same spooled file.
    An instance no exchange claims yet has the exchange NO_EXCHANGE and is held.
    """

    __tablename__ = "instances"

    sop_instance_uid: Mapped[Uid] = mapped_column(primary_key=True)
    exchange_id: Mapped[Uid] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[Uid]
    series_instance_uid: Mapped[Uid]
    sop_class_uid: Mapped[Uid]
    transfer_syntax_uid: Mapped[Uid]
    size: Mapped[int] = mapped_column(BigInteger)
    calling_ae: Mapped[str] = mapped_column(String(16))
    sender_institution: Mapped[Code | None]
    role: Mapped[str] = mapped_column(String(12))
    state: Mapped[str] = mapped_column(String(12))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(String(300))
    received_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    __table_args__ = (
        Index("ix_instances_study", "study_instance_uid"),
        Index("ix_instances_state_received", "state", "received_at"),
    )


class StudyLink(Base):
    """A study that an exchange refers to (XDS-I.b: the study UID in the document's references)."""

    __tablename__ = "study_links"

    study_instance_uid: Mapped[Uid] = mapped_column(primary_key=True)
    exchange_id: Mapped[Uid] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    from_institution: Mapped[Code]
    to_institution: Mapped[Code]
    from_hub: Mapped[Slug]
    to_hub: Mapped[Slug]
    patient_key: Mapped[str] = mapped_column(String(128))
    document_created_at: Mapped[datetime]
    purpose: Mapped[str] = mapped_column(String(20))
    # An emergency's justification as the hub sent it (ExchangeSent): decided with it at each batch.
    justification: Mapped[str | None] = mapped_column(Text, nullable=True)
    linked_at: Mapped[datetime]


PLATFORM = platform_tables(Base.metadata)
