"""The patient's history: exchanges (from the exchange stream) and accesses (from every node's audit
records), each event stored once however often it is delivered."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from hie_consent import repository
from hie_consent.models import AccessEntry, ExchangeEntry
from hie_consent.repository import as_utc
from hie_consent.schemas import AccessHistoryEntry, ExchangeHistoryEntry, PatientHistory
from hie_platform.bus import PermanentEventError, RefusedMessage, first_time
from hie_platform.runtime import Runtime
from hie_schemas.auth import TokenClaims
from hie_schemas.consent import Purpose, Rule
from hie_schemas.contract import Role
from hie_schemas.envelope import Envelope, EventPayload
from hie_schemas.events import (
    EXCHANGE_EMERGENCY_PERMITTED,
    AuditRecorded,
    DocumentPublished,
    EmergencyAccessPermitted,
    ExchangeSent,
    TaskUpdated,
)

P = TypeVar("P", bound=EventPayload)
# Audit actions that are not accesses to the patient's records: a decision discloses nothing, and a
# consent being recorded is already in the patient's consent history.
NOT_ACCESSES = frozenset({"decide", "consent-record"})
# What a holder's hub records for another hub's institution that asked it over the bus.
ANSWERED_FOR_OTHER_HUBS = frozenset({"federated.search", "federated.retrieve"})
CENTRAL_SENDERS = frozenset({Role.CONSENT.value, Role.REGISTRY.value})


def _payload(envelope: Envelope, model: type[P]) -> P:
    try:
        return envelope.payload(model)
    except (ValidationError, ValueError) as exc:
        raise PermanentEventError(f"{envelope.type}: malformed payload") from exc


Entry = ExchangeEntry | AccessEntry


async def _sent(session: AsyncSession, envelope: Envelope) -> Entry | None:
    sent = _payload(envelope, ExchangeSent)
    types = [t.value for t in sent.document_types]
    await repository.index_documents(session, dict(zip(sent.document_ids, types, strict=False)))
    return ExchangeEntry(
        event_id=envelope.id,
        patient_key=sent.patient_key,
        exchange_id=sent.exchange_id,
        kind=sent.kind.value,
        from_institution=sent.from_institution,
        to_institution=sent.to_institution,
        document_types=types,
        occurred_at=as_utc(sent.sent_at),
        status="sent",
        purpose=sent.purpose.value,
    )


async def _task_updated(session: AsyncSession, envelope: Envelope) -> Entry | None:
    update = _payload(envelope, TaskUpdated)
    # A status line repeats what the exchange was, when its 'sent' line is known.
    origin = await repository.sent_entry(session, update.exchange_id)
    return ExchangeEntry(
        event_id=envelope.id,
        patient_key=update.patient_key,
        exchange_id=update.exchange_id,
        kind=origin.kind if origin else None,
        from_institution=origin.from_institution if origin else update.by_institution,
        to_institution=origin.to_institution if origin else None,
        document_types=list(origin.document_types) if origin else [],
        occurred_at=as_utc(update.updated_at),
        status=update.status,
        purpose=origin.purpose if origin else None,
    )


async def _published(session: AsyncSession, envelope: Envelope) -> Entry | None:
    published = _payload(envelope, DocumentPublished)
    # Audit records name documents by id only; this is how the patient later sees their types.
    types = [t.value for t in published.document_types]
    await repository.index_documents(session, dict(zip(published.document_ids, types, strict=False)))
    return None


async def _emergency_permitted(_session: AsyncSession, envelope: Envelope) -> Entry | None:
    permitted = _payload(envelope, EmergencyAccessPermitted)
    return AccessEntry(
        event_id=envelope.id,
        patient_key=permitted.patient_key,
        node=permitted.decided_by[:100],
        action="emergency-access-permitted",
        institution=permitted.recipient,
        document_ids=[],
        purpose=Purpose.EMERGENCY.value,
        outcome="permit",
        rule=Rule.PERMIT_EMERGENCY.value,
        consent_version=permitted.consent_version,
        flagged=True,
        justification=permitted.justification,
        occurred_at=as_utc(permitted.decided_at),
    )


# Other exchange facts (denied) reach the patient through the holder's audit record.
_EXCHANGE_FACTS: dict[str, Callable[[AsyncSession, Envelope], Awaitable[Entry | None]]] = {
    ExchangeSent.event_type: _sent,
    TaskUpdated.event_type: _task_updated,
    DocumentPublished.event_type: _published,
    EXCHANGE_EMERGENCY_PERMITTED: _emergency_permitted,
}


async def record_exchange_event(
    session: AsyncSession, runtime: Runtime, consumer: str, envelope: Envelope
) -> None:
    """Store an exchange fact once: exchanges and their Task statuses, document types, emergency permits."""
    handler = _EXCHANGE_FACTS.get(envelope.type)
    entry = await handler(session, envelope) if handler is not None else None
    if entry is not None and await first_time(session, runtime.tables.processed, consumer, envelope.id):
        await repository.add_entry(session, entry)


async def record_audit_event(
    session: AsyncSession, runtime: Runtime, consumer: str, envelope: Envelope, sender: str | None
) -> None:
    """Keep one node's audit record as an access in the patient's history, when it is one, and when
    the hub that sent it (its subject's last token) may have recorded that access."""
    record = _payload(envelope, AuditRecorded)
    if record.patient_key is None or record.actor_institution is None or record.action in NOT_ACCESSES:
        return  # no patient, the patient's own action, or not an access
    await _check_recorder(runtime, record, sender)
    if not await first_time(session, runtime.tables.processed, consumer, envelope.id):
        return
    emergency = record.purpose == Purpose.EMERGENCY.value or record.rule == Rule.PERMIT_EMERGENCY.value
    await repository.add_entry(
        session,
        AccessEntry(
            event_id=envelope.id,
            patient_key=record.patient_key,
            node=record.node[:100],
            action=record.action[:64],
            institution=record.actor_institution,
            document_ids=list(record.document_ids),
            purpose=record.purpose,
            outcome=record.outcome,
            rule=record.rule,
            consent_version=record.consent_version,
            flagged=emergency,
            occurred_at=as_utc(record.recorded_at),
        ),
    )


async def _check_recorder(runtime: Runtime, record: AuditRecorded, sender: str | None) -> None:
    """A hub records what its own institutions did at it, and what it disclosed to another hub's
    institution that asked it (federated search and retrieve): a record that names another hub as its
    writer, or an access by another hub's institution outside those, is refused (the Bus counts and
    logs it; it never reaches the history). The central services' records are theirs by name."""
    if sender in CENTRAL_SENDERS:
        return
    if sender is None or record.hub != sender:
        raise RefusedMessage("sender-mismatch", "the record names another hub as its writer")
    if record.action in ANSWERED_FOR_OTHER_HUBS:
        return
    actor_hub = await runtime.registry.hub_of(str(record.actor_institution))
    if actor_hub is not None and actor_hub != sender:
        raise RefusedMessage("sender-mismatch", "an access by another hub's institution")


def _exchange_lines(rows: list[ExchangeEntry]) -> list[ExchangeHistoryEntry]:
    """One line per stored event, each status line completed from its exchange's 'sent' line.

    The exchange stream does not order one hub's ExchangeSent before another hub's TaskUpdated, so
    a status line may have been stored before the exchange it belongs to was known. What the
    exchange was (kind, parties, types, purpose) is therefore taken from the 'sent' line when the
    history is read, never frozen at the moment a status line arrived.
    """
    sent = {r.exchange_id: r for r in rows if r.status == "sent"}
    lines = []
    for r in rows:
        origin = sent.get(r.exchange_id, r)
        lines.append(
            ExchangeHistoryEntry(
                exchange_id=r.exchange_id,
                kind=origin.kind or r.kind,
                from_institution=origin.from_institution or r.from_institution,
                to_institution=origin.to_institution or r.to_institution,
                document_types=list(origin.document_types or r.document_types),
                occurred_at=as_utc(r.occurred_at),
                status=r.status,
                purpose=origin.purpose or r.purpose,
            )
        )
    return lines


async def exchange_history(
    session: AsyncSession, runtime: Runtime, actor: TokenClaims, patient_key: str
) -> list[ExchangeHistoryEntry]:
    """The agency's view of a patient's exchanges (the read is audited)."""
    rows = await repository.exchange_history(session, patient_key)
    await runtime.audit.record_read(
        session, "exchange-history-read", actor, patient_key, {"entries": len(rows)}
    )
    return _exchange_lines(rows)


async def patient_history_read(
    session: AsyncSession, runtime: Runtime, patient_key: str, *, via: str | None = None
) -> PatientHistory:
    """The patient's own read of their history (portal API, or ``via`` the web portal), audited."""
    found = await patient_history(session, patient_key)
    counts = {"exchanges": len(found.exchanges), "accesses": len(found.accesses)}
    via_web = {"via": via} if via else {}
    await runtime.audit.record_read(session, "portal.history-read", None, patient_key, counts | via_web)
    return found


async def patient_history(session: AsyncSession, patient_key: str) -> PatientHistory:
    """What the patient sees: every exchange and every access, newest first, emergencies flagged."""
    exchanges = await repository.exchange_history(session, patient_key)
    accesses = await repository.access_history(session, patient_key)
    types = await repository.document_types(session, (d for a in accesses for d in a.document_ids))
    return PatientHistory(
        exchanges=_exchange_lines(exchanges),
        accesses=[
            AccessHistoryEntry(
                occurred_at=as_utc(a.occurred_at),
                institution=a.institution,
                action=a.action,
                document_ids=list(a.document_ids),
                document_types=list(dict.fromkeys(types[d] for d in a.document_ids if d in types)),
                purpose=a.purpose,
                outcome=a.outcome,
                rule=a.rule,
                consent_version=a.consent_version,
                flagged=a.flagged,
                justification=a.justification,
            )
            for a in accesses
        ],
    )
