"""What a relay batch is made of, what became of each of its rows, and how its jobs are settled."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from nats.aio.msg import Msg

from hie_imaging.dicom import DicomEndpoint, is_stored
from hie_imaging.dicom.scu import SendResult
from hie_imaging.models import Instance, State, StudyLink


@dataclass
class Outcome:
    """What became of one queued row in this batch."""

    row: Instance
    link: StudyLink
    state: State  # QUEUED = try again
    error: str | None = None
    rule: str | None = None  # the consent rule that decided, for the audit record
    consent_version: int | None = None
    attempted: bool = True  # False when nothing was tried (consent unavailable): no attempt used


@dataclass
class Batch:
    jobs: dict[str, list[Msg]] = field(default_factory=dict)  # SOP Instance UID -> its job messages
    outcomes: list[Outcome] = field(default_factory=list)


def outcome_of(
    row: Instance,
    link: StudyLink,
    endpoint: DicomEndpoint,
    final: State,
    statuses: SendResult,
    missing: set[str],
    error: str | None,
) -> Outcome:
    """What one row's send came to: stored, missing, or to be tried again with the reason."""
    sop_uid = row.sop_instance_uid
    status = statuses.get(sop_uid)
    if sop_uid in missing:
        return Outcome(row, link, State.FAILED, "the spooled file is missing")
    if status is not None and is_stored(status):
        return Outcome(row, link, final)
    if sop_uid in statuses.untranscodable:
        why = statuses.untranscodable[sop_uid]
        reason = f"{endpoint} refused its transfer syntax and it cannot be decoded: {why}"
        return Outcome(row, link, State.QUEUED, reason[:300])  # last_error's size
    reason = f"{endpoint} answered 0x{status:04X}" if status is not None else f"{endpoint}: {error}"
    return Outcome(row, link, State.QUEUED, reason)


def deliveries(batch: Batch, outcome: Outcome) -> int:
    msgs = batch.jobs.get(outcome.row.sop_instance_uid) or []
    metadata = msgs[0].metadata if msgs else None
    return int(metadata.num_delivered) if metadata is not None else 1


async def finish(msgs: Sequence[Msg], nak_delay: float | None) -> None:
    """Ack (nak_delay None) or nak with a delay; a lost ack only means one idempotent redelivery."""
    for msg in msgs:
        with contextlib.suppress(Exception):
            if nak_delay is None:
                await msg.ack()
            else:
                await msg.nak(delay=nak_delay if nak_delay > 0 else None)
