"""Hub tables: stored documents, referral Tasks, delivered imaging studies (+ the platform tables)."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Index,
    Integer,
    String,
    UniqueConstraint,
    event,
    false,
    inspect,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, InstanceState, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from hie_platform.db import platform_tables


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out; SQLite hands back naive values, which would not compare with
    the aware datetimes of consent histories."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return as_utc(value)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else as_utc(value)


def as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class DocumentStatus(StrEnum):
    CURRENT = "current"
    SUPERSEDED = "superseded"
    ENTERED_IN_ERROR = "entered-in-error"


class Origin(StrEnum):
    LOCAL = "local"  # published at this hub by one of its institutions
    DELIVERED = "delivered"  # pushed here by another hub (or by this hub to itself) in an exchange


class Base(DeclarativeBase):
    pass


class Document(Base):
    """One clinical document: its DocumentReference and the document Bundle (no RRN: the patient key)."""

    __tablename__ = "documents"
    # ITI-67 pages through one patient's documents newest first.
    __table_args__ = (Index("ix_documents_patient_created", "patient_key", "created_at", "document_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # The idempotency key of a publish: the same document id is stored once per hub.
    document_id: Mapped[str] = mapped_column(String(64), unique=True)
    author_institution: Mapped[str] = mapped_column(String(8), index=True)
    author_department: Mapped[str | None] = mapped_column(String(8))
    patient_key: Mapped[str] = mapped_column(String(64), index=True)
    document_type: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    status: Mapped[str] = mapped_column(String(20), default=DocumentStatus.CURRENT.value)
    docref: Mapped[dict[str, Any]] = mapped_column(JSON)
    bundle: Mapped[dict[str, Any]] = mapped_column(JSON)
    recipients: Mapped[list[str]] = mapped_column(JSON, default=list)
    origin: Mapped[str] = mapped_column(String(16))
    exchange_id: Mapped[str | None] = mapped_column(String(64))
    published_at: Mapped[datetime] = mapped_column(UtcDateTime)
    # The DocumentReference's meta.versionId (ETag), bumped on every change (bump_version below), and
    # when it last changed (meta.lastUpdated; published_at until the first change).
    version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    updated_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class Task(Base):
    """A referral/return workflow Task; the requester's and the owner's hubs each keep a copy."""

    __tablename__ = "tasks"
    # A search reads the exchanges of one patient sent to the reader (core.disclosure); the index
    # also serves every other read by patient (it begins with patient_key).
    __table_args__ = (Index("ix_tasks_patient_owner", "patient_key", "owner"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    exchange_id: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(20), index=True)
    requester: Mapped[str] = mapped_column(String(8), index=True)
    requester_hub: Mapped[str] = mapped_column(String(64))
    owner: Mapped[str] = mapped_column(String(8), index=True)
    owner_hub: Mapped[str] = mapped_column(String(64))
    patient_key: Mapped[str] = mapped_column(String(64))
    focus: Mapped[list[str]] = mapped_column(JSON)
    task: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")  # meta.versionId (ETag)


class StudyStatus(Base):
    """Where a study of an exchange stands at this hub's imaging gateway, as it last reported
    (StudyProgress). The gateway answers the sending PACS Success once an instance is safe on disk
    (store-and-forward), so this is where the sending institution sees whether its study went on,
    waits, or was kept back by consent (GET {hub}/imaging/studies/{uid})."""

    __tablename__ = "study_status"

    study_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    exchange_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    requester: Mapped[str] = mapped_column(String(8))
    owner: Mapped[str] = mapped_column(String(8))
    received: Mapped[int] = mapped_column(Integer)
    relayed: Mapped[int] = mapped_column(Integer)
    delivered: Mapped[int] = mapped_column(Integer)
    failed: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)  # the gateway's clock, of the newest report


class DeliveredStudy(Base):
    """An imaging study delivered to the PACS of one of this hub's institutions in an exchange, as the
    hub's imaging gateway reported it (StudyProgress): what makes it findable here (IHE XDS-I.b)."""

    __tablename__ = "imaging_studies"
    __table_args__ = (
        UniqueConstraint("study_instance_uid", "exchange_id", name="uq_imaging_studies_study_exchange"),
        Index("ix_imaging_studies_patient_recorded", "patient_key", "recorded_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the ImagingStudy id
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    exchange_id: Mapped[str] = mapped_column(String(64))
    task_id: Mapped[str] = mapped_column(String(64))
    patient_key: Mapped[str] = mapped_column(String(64))
    from_institution: Mapped[str] = mapped_column(String(8))
    to_institution: Mapped[str] = mapped_column(String(8))
    # The exchanged document that names the study: reading the study asks consent as reading it would.
    document_id: Mapped[str] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(64))
    instances: Mapped[int] = mapped_column(Integer)  # the most instances ever reported delivered
    state: Mapped[str] = mapped_column(String(16))  # the gateway's word for the study, as last reported
    first_update_at: Mapped[datetime] = mapped_column(UtcDateTime)  # the gateway's clock
    last_update_at: Mapped[datetime] = mapped_column(UtcDateTime)
    recorded_at: Mapped[datetime] = mapped_column(UtcDateTime)  # this hub's clock; never changes (paging)


class SubmissionSet(Base):
    """An ITI-65 SubmissionSet List as stored (IHE ITI-66 finds it); entries name its documents."""

    __tablename__ = "submission_sets"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    patient_key: Mapped[str] = mapped_column(String(64), index=True)
    author_institution: Mapped[str] = mapped_column(String(8), index=True)
    submitted_at: Mapped[datetime] = mapped_column(UtcDateTime)
    status: Mapped[str] = mapped_column(String(20))
    document_ids: Mapped[list[str]] = mapped_column(JSON)
    recipients: Mapped[list[str]] = mapped_column(JSON, default=list)
    resource: Mapped[dict[str, Any]] = mapped_column(JSON)


class FederatedGrant(Base):
    """A document another hub disclosed to one of this hub's institutions in a federated search:
    where to retrieve it from (ITI-68 through this hub) and under which purpose."""

    __tablename__ = "federated_grants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    document_id: Mapped[str] = mapped_column(String(64), index=True)
    requester: Mapped[str] = mapped_column(String(8))
    holder_hub: Mapped[str] = mapped_column(String(64))
    patient_key: Mapped[str] = mapped_column(String(64))
    purpose: Mapped[str] = mapped_column(String(20))
    justification: Mapped[str | None] = mapped_column(String(500))
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)


class Subscription(Base):
    """A rest-hook Subscription of one institution (FHIR R4 Subscriptions Backport style)."""

    __tablename__ = "subscriptions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    institution: Mapped[str] = mapped_column(String(8), index=True)
    role: Mapped[str] = mapped_column(String(16))  # the Task element it follows: owner or requester
    status: Mapped[str] = mapped_column(String(16))
    endpoint: Mapped[str] = mapped_column(String(2000))
    secret: Mapped[str] = mapped_column(String(128))  # HMAC key of the payload signature
    content: Mapped[str] = mapped_column(String(16))  # full-resource | id-only
    headers: Mapped[list[str]] = mapped_column(JSON, default=list)
    events: Mapped[int] = mapped_column(Integer, default=0)  # events-since-subscription-start
    resource: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class WebhookDelivery(Base):
    """One notification to send (outbox-like): written with the Task change, sent with retries."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    subscription_id: Mapped[str] = mapped_column(String(64), index=True)
    event_number: Mapped[int] = mapped_column(Integer)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    next_attempt_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), index=True)  # pending | delivered | failed
    claimed_until: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_error: Mapped[str | None] = mapped_column(String(300))
    delivered_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class ConsentReplicaVersion(Base):
    """One consent version replicated from the consent feed (HIE_CONSENT), applied in version order;
    the hub decides locally over these rows (hie_hub.consent_replica)."""

    __tablename__ = "consent_replica"

    patient_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    policy: Mapped[str] = mapped_column(String(32))
    effective_at: Mapped[datetime] = mapped_column(UtcDateTime)
    excluded_institutions: Mapped[list[str]] = mapped_column(JSON, default=list)
    excluded_departments: Mapped[list[str]] = mapped_column(JSON, default=list)
    event_id: Mapped[str] = mapped_column(String(64))
    # The HIE_CONSENT sequence it came from: the replica's position, to rebuild after a lost database.
    stream_sequence: Mapped[int] = mapped_column(Integer, index=True)
    applied_at: Mapped[datetime] = mapped_column(UtcDateTime)
    # Set aside while its predecessor is missing: not part of the history (hie_platform.consent_versions).
    held: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


@event.listens_for(Document, "before_update")
@event.listens_for(Task, "before_update")
def bump_version(mapper: Any, connection: Any, target: Document | Task) -> None:
    """Every change of a document's status or of a Task, whoever makes it (entered-in-error,
    superseded, a status notice, a Task update), is a new FHIR version: meta.versionId and the ETag
    follow this counter. What the hub adds to a document it has just stored in the same transaction
    (its K-CDA original, its exchange, its recipients) is not a new version."""
    state: InstanceState[Any] = inspect(target)
    watched = ("status",) if isinstance(target, Document) else ("status", "task")
    if not any(state.attrs[name].history.has_changes() for name in watched):
        return
    target.version = (target.version or 1) + 1
    if isinstance(target, Document):
        target.updated_at = datetime.now(UTC)


PLATFORM = platform_tables(Base.metadata)
