"""Typed payloads of the federation's events; each names its envelope type. The subject each travels
on, and who may publish it, is declared in hie_schemas.contract."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar

from hie_schemas import subjects
from hie_schemas.codes import DocumentType
from hie_schemas.consent import ConsentPolicy, Decision, FlowQuery, Purpose
from hie_schemas.directory import InstitutionView
from hie_schemas.envelope import EventPayload
from hie_schemas.model import FrozenModel

# Envelope types (a hub's fact travels on ``<type>.<hub>``: hie_schemas.contract).
# The consent feed's liveness signal: core NATS, deliberately outside every stream (a stream bound to
# ``hie.consent.>`` would keep one message a second forever). Nothing is addressed or identified in it.
CONSENT_FEED_HEARTBEAT = subjects.fact("feed", "consent", "heartbeat")
# An emergency access permitted without consent (의료법 §21-2 exception); on the exchange stream, so
# the consent service shows it to the patient with its justification. The type, not the subject: the
# subject ends with the deciding hub (or "consent"), contract.subject(Kind.EMERGENCY_PERMITTED, ...).
EXCHANGE_EMERGENCY_PERMITTED = subjects.fact("exchange", "emergency", "permitted")


class ExchangeKind(StrEnum):
    REFERRAL = "referral"
    RETURN = "return"
    CONSULT_REPLY = "consult-reply"
    TRANSFER = "transfer"
    PATIENT_REQUEST = "patient-request"
    PUBLIC_AGENCY = "public-agency"


class StudyRef(FrozenModel):
    """An imaging study that belongs to an exchange (XDS-I.b: study UID and accession number)."""

    study_instance_uid: str
    accession_number: str | None = None


class InstitutionChanged(EventPayload):
    """The registry's view of one institution after a change (approval, suspension, endpoint...)."""

    event_type: ClassVar[str] = subjects.REGISTRY_INSTITUTION_CHANGED

    institution: InstitutionView
    change: str


class SigningKeyRetired(EventPayload):
    """The agency retired a registry signing key: every verifier refuses tokens with its kid at once."""

    event_type: ClassVar[str] = subjects.REGISTRY_KEY_RETIRED

    kid: str


class ConsentRecorded(EventPayload):
    """A new version of a patient's consent; replicas apply versions in order."""

    event_type: ClassVar[str] = subjects.CONSENT_RECORDED

    patient_key: str
    version: int
    policy: ConsentPolicy
    effective_at: datetime
    excluded_institutions: list[str] = []
    excluded_departments: list[str] = []
    recorded_by: str
    channel: str


class ConsentFeedHeartbeat(EventPayload):
    """The consent service is alive and has published every consent version up to ``stream_sequence``.

    ``stream_sequence`` is the HIE_CONSENT sequence of the last ConsentRecorded when the heartbeat was
    made; ``lag_seconds`` is the age of the oldest consent version still waiting in the outbox (0 when
    none). A replica that has applied the stream through ``stream_sequence`` knows every version
    recorded up to ``lag_seconds`` before it heard the heartbeat; durations, not clock readings, so
    the two nodes' clocks need not agree.
    """

    event_type: ClassVar[str] = CONSENT_FEED_HEARTBEAT

    stream_sequence: int
    lag_seconds: float = 0.0
    interval_seconds: float = 1.0
    sent_at: datetime


class EmergencyAccessPermitted(EventPayload):
    """Break-the-glass: a flow permitted without consent, with its justification (told to the patient)."""

    event_type: ClassVar[str] = EXCHANGE_EMERGENCY_PERMITTED

    patient_key: str
    holder: str
    holder_department: str | None = None
    recipient: str
    justification: str
    decided_by: str  # the node that decided (a hub, or the central decision point)
    consent_version: int | None = None
    decided_at: datetime


class DocumentPublished(EventPayload):
    """Documents stored at a hub for a patient: feeds the record locator (no clinical content)."""

    event_type: ClassVar[str] = "hie.exchange.document.published"

    hub: str
    patient_key: str
    author_institution: str
    document_ids: list[str]
    document_types: list[DocumentType]
    published_at: datetime


class ExchangeSent(EventPayload):
    """A referral, return or other exchange left its holder's hub with the consent decision it used."""

    event_type: ClassVar[str] = "hie.exchange.exchange.sent"

    exchange_id: str
    kind: ExchangeKind
    task_id: str | None = None
    from_institution: str
    from_hub: str
    to_institution: str
    to_hub: str
    patient_key: str
    document_ids: list[str]
    document_types: list[DocumentType]
    studies: list[StudyRef] = []
    document_created_at: datetime
    purpose: Purpose = Purpose.TREATMENT
    # An emergency's justification (의료법 §21-2): the gateways decide its images with it. Optional, so
    # events published before it travelled still parse.
    justification: str | None = None
    consent_version: int | None = None
    sent_at: datetime


class ExchangeDenied(EventPayload):
    """A flow refused by the data holder; kept so the agency and the patient can see refusals."""

    event_type: ClassVar[str] = "hie.exchange.exchange.denied"

    from_institution: str
    from_hub: str
    to_institution: str
    patient_key: str
    rule: str
    denied_at: datetime


class TaskUpdated(EventPayload):
    """A referral Task moved on (received, accepted, rejected, completed)."""

    event_type: ClassVar[str] = "hie.exchange.task.updated"

    task_id: str
    exchange_id: str
    status: str
    by_institution: str
    patient_key: str
    output_document_ids: list[str] = []
    updated_at: datetime


class DeliveredDocument(FrozenModel):
    document_reference: dict[str, Any]
    document: dict[str, Any]


class Delivery(EventPayload):
    """The documents of an exchange, pushed to the destination hub
    (hie.hub.<hub>.inbox.delivery.<sending hub>)."""

    event_type: ClassVar[str] = "hie.hub.inbox.delivery"

    exchange: ExchangeSent
    task: dict[str, Any]
    documents: list[DeliveredDocument]


class TaskStatusNotice(EventPayload):
    """A Task change sent back to the requester's hub so both copies agree."""

    event_type: ClassVar[str] = "hie.hub.inbox.task-status"

    update: TaskUpdated


class StudyProgress(EventPayload):
    """Counts for one study at one gateway: received, relayed, delivered, failed."""

    event_type: ClassVar[str] = "hie.imaging.study.progress"

    hub: str
    study_instance_uid: str
    exchange_id: str | None = None
    received: int
    relayed: int
    delivered: int
    failed: int
    state: str
    updated_at: datetime


class RelayJob(EventPayload):
    """One instance to move on from a gateway's spool (work queue hie.hub.<hub>.imaging.relay)."""

    event_type: ClassVar[str] = "hie.hub.imaging.relay"

    sop_instance_uid: str
    study_instance_uid: str


class AuditRecorded(EventPayload):
    """One appended audit record (who, institution, purpose, patient key, documents, decision)."""

    event_type: ClassVar[str] = subjects.AUDIT_RECORDED

    node: str
    # The hub (or central service) whose trail holds the record: its subject's sender token.
    hub: str | None = None
    sequence: int
    hash: str
    action: str
    actor_institution: str | None
    patient_key: str | None
    document_ids: list[str] = []
    purpose: str | None = None
    outcome: str
    rule: str | None = None
    consent_version: int | None = None
    recorded_at: datetime


class AuditCheckpoint(EventPayload):
    """A hub's signed statement of its audit chain's head, published on
    ``subjects.audit_checkpoint(hub)`` and kept in HIE_AUDIT, outside the hub's database: the head's
    sequence and hash, the record count, when, and an Ed25519 signature by the hub's checkpoint key
    (hie_platform.audit_anchor says what is signed)."""

    event_type: ClassVar[str] = "hie.audit.checkpoint"

    hub: str
    node: str
    sequence: int
    head_hash: str
    count: int
    issued_at: datetime
    key_id: str
    signature: str


class DecisionRequest(FrozenModel):
    """Request body of the consent decision RPC (hie.rpc.consent.decide) and POST /decisions."""

    query: FlowQuery


class DecisionReply(FrozenModel):
    decision: Decision


class LocateRequest(FrozenModel):
    """Record locator RPC (hie.rpc.registry.locate): which hubs hold documents for a patient key."""

    patient_key: str


class LocateReply(FrozenModel):
    hubs: list[str]
    # The locator's event feed had facts not yet taken in: a hub may hold documents not named here.
    behind: bool = False


# --- hub node: document status, federated search and retrieval (hie.hub.<hub>.…) -------------------


class DocumentStatusNotice(EventPayload):
    """The author changed documents' status (superseded by a replacement, or entered-in-error); sent to
    every hub that holds a copy (hie.hub.<hub>.inbox.document-status.<author's hub>) so that all
    copies agree."""

    event_type: ClassVar[str] = "hie.hub.inbox.document-status"

    document_ids: list[str]
    status: str
    by_institution: str
    patient_key: str
    replaced_by: str | None = None
    changed_at: datetime


class DocumentFilter(FrozenModel):
    """ITI-67 filters that travel with a federated search (instants are UTC bounds)."""

    types: list[str] | None = None
    statuses: list[str] | None = None
    authors: list[str] | None = None
    created_from: datetime | None = None
    created_before: datetime | None = None


class HubSearchRequest(FrozenModel):
    """Federated search (hie.hub.<hub>.rpc.search.<asking hub>): the holding hub answers as the data
    holder."""

    patient_key: str
    requester: str  # 요양기관기호 of the asking institution
    requester_hub: str
    purpose: Purpose = Purpose.TREATMENT
    justification: str | None = None
    filter: DocumentFilter = DocumentFilter()


class HubSearchReply(FrozenModel):
    """``outcome``: ok (documents may be empty), denied (the hub holds records that consent does not
    disclose), refused (the request itself was not acceptable); ``rule`` names the consent rule."""

    hub: str
    outcome: str
    document_references: list[dict[str, Any]] = []
    withheld: bool = False
    rule: str | None = None
    message: str = ""


class HubRetrieveRequest(FrozenModel):
    """Federated retrieve (hie.hub.<hub>.rpc.retrieve.<asking hub>): one document for the asking
    institution."""

    document_id: str
    requester: str
    requester_hub: str
    purpose: Purpose = Purpose.TREATMENT
    justification: str | None = None


class HubRetrieveReply(FrozenModel):
    hub: str
    outcome: str  # ok | denied | not-found | refused
    document_reference: dict[str, Any] | None = None
    document: dict[str, Any] | None = None
    rule: str | None = None
    message: str = ""
