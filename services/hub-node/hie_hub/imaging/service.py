"""Imaging studies delivered to this hub's institutions, findable as FHIR ImagingStudy (IHE XDS-I.b).

The hub's imaging gateway reports each study's counts as StudyProgress (HIE_IMAGING). The hub keeps
those of studies its gateway delivered in an exchange this hub received, one row per (study,
exchange), and serves them under the rule of document reads: only the two parties to the exchange
see them, consent is asked at the moment of reading (the question reading the exchanged document
that names the study would ask), and every search and read is audited.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from hie_hub.core.disclosure import (
    Access,
    Disclosure,
    Shown,
    by_access,
    decisions,
    exchange_access,
    newest_version,
    record_disclosure,
    record_search,
)
from hie_hub.core.params import DEFAULT_COUNT, Cursor, Found
from hie_hub.core.unit import UnitOfWork
from hie_hub.documents import repository as documents_repo
from hie_hub.imaging import repository
from hie_hub.imaging import status as study_status
from hie_hub.models import DeliveredStudy, Document, Task, as_utc
from hie_hub.node import HubNode
from hie_hub.tasks import repository as tasks_repo
from hie_platform.bus import Incoming, PermanentEventError, first_time
from hie_platform.db import raise_after_commit
from hie_platform.errors import Forbidden, NotFound, ServiceUnavailable
from hie_platform.logging import get_logger
from hie_schemas import contract, streams
from hie_schemas.auth import TokenClaims
from hie_schemas.codes import DICOM_UID
from hie_schemas.consent import Decision
from hie_schemas.directory import InstitutionView
from hie_schemas.documents import profiles
from hie_schemas.envelope import Envelope
from hie_schemas.events import StudyProgress
from hie_schemas.identifiers import KRNPI_SYSTEM, PATIENT_KEY_SYSTEM

log = get_logger(__name__)

# The Delivery of an exchange (HIE_HUB_INBOX) and its studies' progress (HIE_IMAGING) come on
# separate streams: after an outage of this node the progress may be read first. It is retried until
# the exchange arrives, for this long after the later of the event and this node's start.
EXCHANGE_PATIENCE = timedelta(minutes=10)
# ImagingStudy ids: one per (study, exchange), the same on every replica.
_STUDY_NS = uuid.UUID("0f6b7c2e-5d3a-4e8b-9a41-7c2d9e5b13a8")
_UID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))*$")
# The federation's code for a DICOM DIMSE endpoint, as the registry's Endpoint resources give it:
# HL7's endpoint-connection-type has DICOMweb codes only (dicom-wado-rs, -qido-rs, -stow-rs,
# -wado-uri), none for a PACS reached by C-STORE/C-MOVE, and the binding is extensible.
CONNECTION_SYSTEM = "https://hie-federation.kr/fhir/CodeSystem/endpoint-connection-type"
DIMSE = "dicom-dimse"
ACCESSION_TYPE = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}


class ExchangeNotReceivedYet(Exception):
    """Progress for an exchange whose Delivery this hub has not stored (yet): retried by the bus."""


def study_id(study_uid: str, exchange_id: str) -> str:
    return str(uuid.uuid5(_STUDY_NS, f"{study_uid}|{exchange_id}"))


# --- the feed ---------------------------------------------------------------------------------------


class StudyFeed:
    """Durable consumer of the gateways' StudyProgress; keeps the studies delivered to this hub."""

    def __init__(self, node: HubNode) -> None:
        self.node = node
        self.consumer = contract.durable(contract.Role.HUB, streams.IMAGING)
        self.durable = self.consumer.name(node.hub)
        self.started_at = datetime.now(UTC)

    def start(self) -> None:
        self.started_at = datetime.now(UTC)
        runtime = self.node.runtime
        runtime.bus.consume_kinds(
            self.durable,
            self.consumer,
            self.consumer.filter(self.node.hub),
            {contract.Kind.STUDY_PROGRESS: self._on_progress},
            runtime.registry.hub_of,
            one_transaction=runtime.db,  # every effect of a report is in its transaction
        )

    async def _on_progress(self, incoming: Incoming) -> None:
        """Its own gateway's reports (the filter, and the sender check: the subject's hub is the hub
        the report names)."""
        await self.handle(incoming.envelope)

    async def handle(self, envelope: Envelope) -> None:
        progress = _payload(envelope)
        # Reports of studies no exchange has claimed yet (held) name no exchange: nothing to keep.
        if progress.hub != self.node.hub or progress.exchange_id is None:
            return
        if not _storable(progress.study_instance_uid, progress.exchange_id):
            raise PermanentEventError("study progress with an invalid study or exchange id")
        runtime = self.node.runtime
        async with runtime.db.transaction() as session:
            if not await first_time(session, runtime.tables.processed, self.durable, envelope.id):
                return
            task = await tasks_repo.task_of_exchange(session, progress.exchange_id, self.node.hub)
            if task is not None:
                await study_status.record(session, task, progress)  # what its parties read
            if progress.delivered <= 0:
                return
            if task is None and self._waiting(envelope):
                raise ExchangeNotReceivedYet(f"exchange {progress.exchange_id} is not at this hub yet")
            if task is None or task.owner_hub != self.node.hub:
                log.warning(
                    "study progress for an exchange this hub did not receive; ignored",
                    exchange_id=progress.exchange_id,
                    known=task is not None,
                )
                return
            await record_delivery(session, task, progress, datetime.now(UTC))

    def _waiting(self, envelope: Envelope) -> bool:
        since = max(as_utc(envelope.occurred_at), self.started_at)
        return datetime.now(UTC) - since < EXCHANGE_PATIENCE


def _payload(envelope: Envelope) -> StudyProgress:
    try:
        return envelope.payload(StudyProgress)
    except (ValidationError, ValueError) as exc:
        raise PermanentEventError(f"malformed {envelope.type}: {type(exc).__name__}") from exc


def _storable(study_uid: str, exchange_id: str) -> bool:
    """A DICOM UID (PS3.5 §9.1) and an exchange id that fit their columns; anything else would fail
    the insert on every redelivery."""
    return len(study_uid) <= 64 and _UID.fullmatch(study_uid) is not None and len(exchange_id) <= 64


async def record_delivery(
    session: AsyncSession, task: Task, progress: StudyProgress, now: datetime
) -> DeliveredStudy:
    """Insert or update the study's row. Events may come twice or out of order: the count never goes
    down, and the state is the one of the newest report."""
    at = as_utc(progress.updated_at)
    state = progress.state[:16]
    row = await repository.delivered_study(session, progress.study_instance_uid, task.exchange_id, lock=True)
    if row is None:
        document_id, accession = await _naming_document(session, task, progress.study_instance_uid)
        row = DeliveredStudy(
            id=study_id(progress.study_instance_uid, task.exchange_id),
            study_instance_uid=progress.study_instance_uid,
            exchange_id=task.exchange_id,
            task_id=task.id,
            patient_key=task.patient_key,
            from_institution=task.requester,
            to_institution=task.owner,
            document_id=document_id,
            accession_number=accession,
            instances=progress.delivered,
            state=state,
            first_update_at=at,
            last_update_at=at,
            recorded_at=now,
        )
        repository.add_delivered_study(session, row)
        log.info("imaging study findable", exchange_id=task.exchange_id, instances=progress.delivered)
        return row
    row.instances = max(row.instances, progress.delivered)
    if at >= row.last_update_at:
        row.state, row.last_update_at = state, at
    row.first_update_at = min(row.first_update_at, at)
    return row


async def _naming_document(session: AsyncSession, task: Task, study_uid: str) -> tuple[str, str | None]:
    """The exchanged document that names the study (and the accession number it gives); else the
    Task's focus, the document that made the exchange."""
    held = await documents_repo.documents_by_id(session, task.focus)
    for document_id in task.focus:
        row = held.get(document_id)
        for ref in profiles.document_studies(row.bundle) if row is not None else ():
            if ref.study_instance_uid == study_uid:
                accession = ref.accession_number
                return document_id, accession if accession and len(accession) <= 64 else None
    reference = str((task.task.get("focus") or {}).get("reference") or "")
    return reference.rpartition("/")[2] or task.focus[0], None


# --- finding and reading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyQuery:
    """A search: the patient, ``identifier`` tokens (any of them), the page."""

    patient_key: str
    identifiers: Sequence[str] | None = None
    count: int = DEFAULT_COUNT
    cursor: Cursor | None = None


def party(row: DeliveredStudy, institution: str) -> bool:
    """Only the sender and the recipient of the exchange see the study (as its documents)."""
    return institution in (row.from_institution, row.to_institution)


def identified(row: DeliveredStudy, tokens: Sequence[str] | None) -> bool:
    """FHIR token search on ImagingStudy.identifier: ``urn:dicom:uid|urn:oid:<uid>`` (the prefix may
    be left out), ``|<accession number>`` (it has no system), or a bare value for either."""
    if tokens is None:
        return True
    for token in tokens:
        system, sep, value = token.rpartition("|")
        uid = value.removeprefix("urn:oid:")
        if system == DICOM_UID and uid == row.study_instance_uid:
            return True
        if sep and not system and value == row.accession_number:
            return True
        if not sep and value and (uid == row.study_instance_uid or value == row.accession_number):
            return True
    return False


def _page(rows: list[DeliveredStudy], query: StudyQuery) -> tuple[list[DeliveredStudy], Cursor | None]:
    """Keyset paging on (recorded_at, id), descending: a cursor names a position, not an offset."""
    if query.cursor is not None:
        at, key = query.cursor.at, query.cursor.key
        rows = [r for r in rows if (r.recorded_at, r.id) < (at, key)]
    returned = rows[: query.count]
    last = returned[-1] if len(rows) > query.count and returned else None
    return returned, Cursor(last.recorded_at, last.id) if last is not None else None


def _disclosed(rows: Sequence[DeliveredStudy]) -> dict[str, Any]:
    return {
        "imaging_studies": [r.id for r in rows],
        "exchanges": list(dict.fromkeys(r.exchange_id for r in rows)),
    }


async def search(
    node: HubNode, unit: UnitOfWork, actor: TokenClaims, query: StudyQuery
) -> Found[DeliveredStudy]:
    """The patient's delivered studies the caller may see now; refused ones are left out silently.
    Each study is decided for the purpose of the exchange that delivered it (as its documents are)."""
    async with unit.reading() as read:
        rows = [
            row
            for row in await repository.delivered_studies_of_patient(read, query.patient_key)
            if party(row, actor.inst) and identified(row, query.identifiers)
        ]
        documents = await documents_repo.documents_by_id(read, {row.document_id for row in rows})
        rows = [row for row in rows if row.document_id in documents]
        accesses = [await _access(node, read, row, actor) for row in rows]
    groups: dict[Access, list[int]] = {}
    for i, access in enumerate(accesses):
        groups.setdefault(access, []).append(i)
    decided: list[Decision | None] = [None] * len(rows)
    for access, indexes in groups.items():
        answers = await decisions(node, access, [documents[rows[i].document_id] for i in indexes])
        for i, answer in zip(indexes, answers, strict=True):
            decided[i] = answer
    shown = [i for i, d in enumerate(decided) if d is None or d.permit]
    visible = [rows[i] for i in shown]
    returned, next_cursor = _page(visible, query)
    counts = {"matched": len(visible), "withheld_by_consent": len(rows) - len(visible)}
    disclosed = Disclosed(returned, visible, [accesses[i] for i in shown], newest_version(decided))
    await _audit_search(node, unit.writing(), actor, query, disclosed, counts)
    return Found(returned, len(visible), next_cursor)


@dataclass(frozen=True)
class Disclosed:
    """What a search returned, what it found visible and for which access each, the newest consent
    version its decisions read."""

    returned: list[DeliveredStudy]
    visible: list[DeliveredStudy]
    accesses: list[Access]
    consent_version: int | None


async def _audit_search(
    node: HubNode,
    session: AsyncSession,
    actor: TokenClaims,
    query: StudyQuery,
    disclosed: Disclosed,
    counts: dict[str, int],
) -> None:
    """One record per purpose the returned studies were disclosed for, the search's own first
    (written even when it returned nothing)."""
    shown = {row.id for row in disclosed.returned}
    visible = zip(disclosed.visible, disclosed.accesses, strict=True)
    groups = by_access(actor.inst, ((row, access) for row, access in visible if row.id in shown))
    records = [
        (access, Shown([], disclosed.consent_version, _disclosed(group))) for access, group in groups.items()
    ]
    await record_search(node, session, "imaging.search", actor, query.patient_key, counts, records)


async def _access(node: HubNode, read: AsyncSession, row: DeliveredStudy, actor: TokenClaims) -> Access:
    """The recipient reads a delivered study for the purpose of the exchange that delivered it
    (its Task's purpose and justification); the sender, and a Task this hub does not hold, as
    treatment."""
    if actor.inst != row.to_institution:
        return Access(actor.inst)
    task = await tasks_repo.task_of_exchange(read, row.exchange_id, node.hub)
    if task is None or task.owner != actor.inst:
        return Access(actor.inst)
    return exchange_access(task)


async def read_study(node: HubNode, unit: UnitOfWork, actor: TokenClaims, study: str) -> DeliveredStudy:
    """One study; a consent refusal is raised after its audit record is committed
    (hie_platform.db.raise_after_commit)."""
    async with unit.reading() as read:
        row = await repository.delivered_study_by_id(read, study)
        document: Document | None = None
        if row is not None and party(row, actor.inst):
            document = await documents_repo.document(read, row.document_id)
        if row is None or document is None:
            raise NotFound(f"no ImagingStudy {study} visible to institution {actor.inst}")
        access = await _access(node, read, row, actor)
    decision = (await decisions(node, access, [document]))[0]
    disclosure = Disclosure(decision, access)
    session = unit.writing()
    await record_disclosure(
        node, session, "imaging.read", actor, row.patient_key, disclosure, detail=_disclosed([row])
    )
    if decision is not None and not decision.permit:
        refusal = Forbidden(
            f"consent refuses ImagingStudy {study} to {actor.inst}: rule {decision.rule.value}"
        )
        raise raise_after_commit(session, refusal)
    return row


# --- the resource -------------------------------------------------------------------------------------


async def resource(node: HubNode, row: DeliveredStudy) -> dict[str, Any]:
    """The ImagingStudy, with the recipient's PACS as the registry lists it now (left out when the
    registry cannot be asked: the study stays findable)."""
    try:
        recipient = await node.registry.institution(row.to_institution)
    except ServiceUnavailable:
        log.warning("registry unreachable; ImagingStudy served without its endpoint")
        recipient = None
    return imaging_study(row, recipient)


def imaging_study(row: DeliveredStudy, recipient: InstitutionView | None) -> dict[str, Any]:
    """FHIR R4 ImagingStudy of a delivered study (identifier per the DICOM UID convention of FHIR),
    its elements in the order of the specification."""
    identifiers: list[dict[str, Any]] = [{"system": DICOM_UID, "value": f"urn:oid:{row.study_instance_uid}"}]
    if row.accession_number:
        identifiers.append({"type": ACCESSION_TYPE, "value": row.accession_number})
    study: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": row.id,
        "meta": {"lastUpdated": row.last_update_at.isoformat()},
    }
    pacs = recipient.dicom if recipient is not None else None
    if recipient is not None and pacs is not None:
        study["contained"] = [
            {
                "resourceType": "Endpoint",
                "id": "pacs",
                "status": "active" if recipient.in_good_standing else "suspended",
                "connectionType": {"system": CONNECTION_SYSTEM, "code": DIMSE, "display": "DICOM DIMSE"},
                "name": pacs.ae_title,
                "managingOrganization": {
                    "type": "Organization",
                    "identifier": {"system": KRNPI_SYSTEM, "value": row.to_institution},
                },
                "payloadType": [{"text": "DICOM"}],
                "payloadMimeType": ["application/dicom"],
                "address": f"dicom://{quote(pacs.ae_title, safe='')}@{pacs.host}:{pacs.port}",
            }
        ]
    study |= {
        "identifier": identifiers,
        "status": "available",
        "subject": {
            "type": "Patient",
            "identifier": {"system": PATIENT_KEY_SYSTEM, "value": row.patient_key},
        },
        "basedOn": [{"reference": f"Task/{row.task_id}"}],
    }
    if "contained" in study:
        study["endpoint"] = [{"reference": "#pacs"}]
    study["numberOfInstances"] = row.instances
    return study
