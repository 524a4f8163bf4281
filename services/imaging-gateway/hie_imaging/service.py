"""Gateway rules: what a received instance becomes, how an exchange claims studies, study status."""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import AsyncSession

from hie_imaging import repository
from hie_imaging.dicom.spool import InvalidUidError, validate_uid
from hie_imaging.models import NO_EXCHANGE, Instance, Role, State, StudyLink
from hie_imaging.schemas import StudyStatus
from hie_platform.outbox import Outbox
from hie_schemas import subjects
from hie_schemas.auth import SCOPE_AGENCY, TokenClaims
from hie_schemas.events import ExchangeSent, RelayJob


@dataclass(frozen=True)
class Caller:
    """An allowed calling AE: a PACS of one of this hub's institutions, or another hub's gateway."""

    ae_title: str
    role: Role
    institution: str | None = None  # 요양기관기호 of a local institution
    hub: str | None = None  # slug of a calling gateway's hub


@dataclass(frozen=True, slots=True)
class Arrival:
    """A received instance, durable in the spool and answered, waiting to be recorded (no bytes)."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    size: int
    calling_ae: str
    caller: Caller
    received_at: datetime
    tag: str  # its entry in the spool's incoming journal


def link_role(link: StudyLink, hub: str) -> Role | None:
    """Which of our received instances an exchange claims: ours to send, or ours to deliver."""
    if link.from_hub == hub:
        return Role.ORIGIN
    if link.to_hub == hub:
        return Role.DESTINATION
    return None


# pg_advisory_xact_lock(class, key): the class names "a study at this gateway" among our locks.
_STUDY_LOCK_CLASS = 7243002


async def lock_studies(session: AsyncSession, study_uids: Iterable[str]) -> None:
    """Serialize, per study, the arrival of instances with the arrival of the exchange that claims them.

    Each side reads what the other writes (arrivals read the links, a new link reads the instances).
    On PostgreSQL under READ COMMITTED two such transactions would each miss the other's rows, and
    the instance would stay held although its exchange is known; a transaction-scoped advisory lock
    per study, taken before reading, orders them. Keys are taken in ascending order (no deadlock).
    On SQLite the single writer connection already serializes them.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    keys = sorted(
        {int.from_bytes(hashlib.sha256(uid.encode()).digest()[:4], "big", signed=True) for uid in study_uids}
    )
    for key in keys:
        await session.execute(
            text("SELECT pg_advisory_xact_lock(:cls, :key)"), {"cls": _STUDY_LOCK_CLASS, "key": key}
        )


async def _queue(session: AsyncSession, outbox: Outbox, hub: str, sop_uid: str, study_uid: str) -> None:
    """A relay job, written with the other deferred outbox rows in one INSERT at commit (Outbox.add)."""
    job = RelayJob(sop_instance_uid=sop_uid, study_instance_uid=study_uid)
    await outbox.add(session, subjects.hub_imaging_jobs(hub), job, defer=True)


async def record_instances(
    session: AsyncSession,
    outbox: Outbox,
    hub: str,
    arrivals: Sequence[Arrival],
    now: datetime,
) -> list[State | None]:
    """Record spooled instances; queue those an exchange claims, hold the rest.

    Returns each one's new state, or None when its SOP Instance UID was already here (a retry or a
    resend: stores are idempotent, nothing is queued twice). A purged instance sent again starts
    afresh. A few statements for the whole batch, not a few per instance: this runs for every
    C-STORE the gateway answers.
    """
    await lock_studies(session, {a.study_instance_uid for a in arrivals})
    existing = await repository.instances_of_many(session, {a.sop_instance_uid for a in arrivals})
    links = await repository.links_of_studies(session, {a.study_instance_uid for a in arrivals})
    fresh = _fresh(arrivals, existing)
    purged = [row for uid in fresh for row in existing.get(uid, [])]
    for row in purged:
        await session.delete(row)
    if purged:
        await session.flush()
    states: dict[str, State] = {}
    rows: list[dict[str, object]] = []
    for uid, arrival in fresh.items():
        role = arrival.caller.role
        claims = [
            link.exchange_id
            for link in links.get(arrival.study_instance_uid, [])
            if link_role(link, hub) is role
        ]
        states[uid] = State.QUEUED if claims else State.HELD
        rows += (_new_row(arrival, exchange, states[uid], now) for exchange in claims or [NO_EXCHANGE])
        if claims:
            await _queue(session, outbox, hub, uid, arrival.study_instance_uid)
    if rows:
        # One executemany INSERT, not an ORM unit of work per row (this runs for every C-STORE).
        await session.execute(insert(Instance), rows)
    return [states[a.sop_instance_uid] if fresh.get(a.sop_instance_uid) is a else None for a in arrivals]


def _fresh(arrivals: Sequence[Arrival], existing: dict[str, list[Instance]]) -> dict[str, Arrival]:
    """The first arrival of each SOP Instance UID not already here (or here only as purged)."""
    fresh: dict[str, Arrival] = {}
    for arrival in arrivals:
        rows = existing.get(arrival.sop_instance_uid, [])
        if arrival.sop_instance_uid not in fresh and all(row.state == State.PURGED for row in rows):
            fresh[arrival.sop_instance_uid] = arrival
    return fresh


# The columns an instance keeps whichever exchange it goes to.
_INSTANCE_COLUMNS = (
    "sop_instance_uid",
    "study_instance_uid",
    "series_instance_uid",
    "sop_class_uid",
    "transfer_syntax_uid",
    "size",
    "calling_ae",
    "received_at",
)


def _new_row(arrival: Arrival, exchange_id: str, state: State, now: datetime) -> dict[str, object]:
    """The column values of a received instance's row for one exchange (or NO_EXCHANGE, held)."""
    columns: dict[str, object] = {column: getattr(arrival, column) for column in _INSTANCE_COLUMNS}
    origin = {"sender_institution": arrival.caller.institution, "role": arrival.caller.role.value}
    return (
        columns
        | origin
        | {"exchange_id": exchange_id, "state": state.value, "attempts": 0, "updated_at": now}
    )


def _for_exchange(row: Instance, exchange_id: str, now: datetime) -> Instance:
    """A queued row of the same instance for another exchange, with no attempts yet."""
    columns = {column: getattr(row, column) for column in (*_INSTANCE_COLUMNS, "sender_institution", "role")}
    return Instance(**columns, exchange_id=exchange_id, state=State.QUEUED.value, attempts=0, updated_at=now)


async def link_exchange(
    session: AsyncSession, outbox: Outbox, hub: str, sent: ExchangeSent, now: datetime
) -> list[str]:
    """Record which studies an exchange refers to and queue what we already hold of them.

    Returns the studies whose instances were queued. Idempotent: a study already linked to the
    exchange, and an instance already queued for it, are left as they are.
    """
    touched: list[str] = []
    study_uids: list[str] = []
    for ref in sent.studies:
        try:
            study_uids.append(validate_uid(ref.study_instance_uid.strip()))
        except InvalidUidError:
            continue  # a malformed reference cannot match any instance
    await lock_studies(session, study_uids)
    for study_uid in dict.fromkeys(study_uids):
        link = await repository.link(session, study_uid, sent.exchange_id)
        if link is None:
            link = StudyLink(
                study_instance_uid=study_uid,
                exchange_id=sent.exchange_id,
                kind=sent.kind.value,
                from_institution=sent.from_institution,
                to_institution=sent.to_institution,
                from_hub=sent.from_hub,
                to_hub=sent.to_hub,
                patient_key=sent.patient_key,
                document_created_at=sent.document_created_at,
                purpose=sent.purpose.value,
                justification=sent.justification,
                linked_at=now,
            )
            session.add(link)
        role = link_role(link, hub)
        if role is not None and await _claim(session, outbox, hub, link, role, now):
            touched.append(study_uid)
    return touched


async def _claim(
    session: AsyncSession, outbox: Outbox, hub: str, link: StudyLink, role: Role, now: datetime
) -> bool:
    """Queue the instances of the linked study that came in the right role for this exchange."""
    by_sop: dict[str, list[Instance]] = {}
    for row in await repository.study_instances(session, link.study_instance_uid, role.value):
        by_sop.setdefault(row.sop_instance_uid, []).append(row)
    queued = False
    for sop_uid, rows in by_sop.items():
        if any(row.exchange_id == link.exchange_id for row in rows):
            continue
        held = next((row for row in rows if row.state == State.HELD), None)
        template: Instance | None
        if held is not None:
            # The primary key changes: replace the held row by the linked one.
            await session.delete(held)
            await session.flush()
            template = held
        else:
            template = next((row for row in rows if row.state != State.PURGED), None)
            if template is None:
                continue  # purged: the file is gone; the PACS must send it again
        session.add(_for_exchange(template, link.exchange_id, now))
        await _queue(session, outbox, hub, sop_uid, link.study_instance_uid)
        queued = True
    return queued


def study_state(by_state: dict[str, int]) -> str:
    """One word for a study: work still pending wins, then trouble, then where it ended up."""
    for state in (State.QUEUED, State.FAILED, State.BLOCKED, State.HELD):
        if by_state.get(state.value):
            return state.value
    if by_state.get(State.RELAYED.value):
        return State.RELAYED.value
    if by_state.get(State.DELIVERED.value):
        return State.DELIVERED.value
    return State.PURGED.value


async def study_status(session: AsyncSession, study_uid: str) -> StudyStatus | None:
    return (await studies_status(session, [study_uid])).get(study_uid)


async def studies_status(session: AsyncSession, study_uids: Collection[str]) -> dict[str, StudyStatus]:
    """The status of each of these studies that has instances at this gateway."""
    counted = await repository.studies_counts(session, study_uids)
    return {study_uid: _status(study_uid, counts) for study_uid, counts in counted.items()}


def _status(study_uid: str, counts: repository.StudyCounts) -> StudyStatus:
    by_state = counts.by_state
    return StudyStatus(
        study_instance_uid=study_uid,
        exchange_id=counts.exchange_ids[0] if counts.exchange_ids else None,
        exchanges=counts.exchange_ids,
        received=counts.received,
        queued=by_state.get(State.QUEUED.value, 0),
        held=by_state.get(State.HELD.value, 0),
        relayed=by_state.get(State.RELAYED.value, 0),
        delivered=by_state.get(State.DELIVERED.value, 0),
        blocked=by_state.get(State.BLOCKED.value, 0),
        failed=by_state.get(State.FAILED.value, 0),
        purged=by_state.get(State.PURGED.value, 0),
        attempts=counts.attempts,
        last_error=counts.last_error,
        state=study_state(by_state),
    )


async def may_see_study(session: AsyncSession, actor: TokenClaims, study_uid: str) -> bool:
    """The agency, a party to an exchange of the study, or the institution that sent its instances."""
    if SCOPE_AGENCY in actor.scopes:
        return True
    parties = {
        code
        for link in await repository.links_of_study(session, study_uid)
        for code in (link.from_institution, link.to_institution)
    }
    return actor.inst in parties or actor.inst in await repository.senders_of_study(session, study_uid)


async def requeue_pending(session: AsyncSession, outbox: Outbox, hub: str) -> int:
    """Publish a job again for every queued instance (at start-up: jobs are idempotent, losses are not)."""
    pending = await repository.queued_instances(session)
    for sop_uid, study_uid in pending:
        await _queue(session, outbox, hub, sop_uid, study_uid)
    return len(pending)
