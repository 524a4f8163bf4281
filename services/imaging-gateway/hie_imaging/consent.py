"""The gateway's consent decisions: the hubs' replica and decision code (design §4), bound to the gateway.

The gateway keeps its own replica of the consent feed (durable consumer ``imaging-<hub>-consent``,
table ``consent_replica`` in its database) and decides each relay batch locally, with the exchange's
purpose, as a hub node does; the relay asks the replica's watch between instances.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from hie_imaging.config import ImagingSettings
from hie_imaging.models import Base, StudyLink
from hie_platform.consent_gate import ConsentGate
from hie_platform.consent_replica import ConsentReplica, ConsentWatch, consent_replica_table
from hie_platform.errors import ServiceUnavailable
from hie_platform.logging import get_logger
from hie_platform.runtime import Runtime
from hie_schemas.consent import Decision, FlowQuery, Purpose

log = get_logger(__name__)

CONSENT_REPLICA = consent_replica_table(Base.metadata)
Decisions = dict[tuple[str, str], Decision]  # (exchange, study) -> its decision for this batch


def consent_replica(settings: ImagingSettings, runtime: Runtime) -> ConsentReplica:
    return ConsentReplica(runtime, settings.consent_consumer, CONSENT_REPLICA, settings)


def consent_gate(settings: ImagingSettings, runtime: Runtime, replica: ConsentReplica) -> ConsentGate:
    # The hub announced an emergency exchange when it sent it; the relay decides again per batch.
    return ConsentGate(
        runtime.bus, settings.consent_timeout_seconds, replica, announce_emergency=False, hub=settings.hub
    )


def decision_key(link: StudyLink) -> tuple[str, str]:
    return (link.exchange_id, link.study_instance_uid)


async def decide_links(gate: ConsentGate, links: Sequence[StudyLink]) -> Decisions | None:
    """May each exchange's study flow now (의료법 §21-2)? Holder, recipient, purpose and document date
    of the exchange, decided as the hub decides it; None when no answer could be had (fail closed)."""
    distinct = {decision_key(link): link for link in links}
    if not distinct:
        return {}
    now = datetime.now(UTC)
    queries = [
        FlowQuery(
            patient_key=link.patient_key,
            holder=link.from_institution,
            recipient=link.to_institution,
            purpose=Purpose(link.purpose),
            document_created_at=link.document_created_at,
            at=now,
            justification=link.justification,
        )
        for link in distinct.values()
    ]
    try:
        decisions = await gate.decide_all(queries)
    except ServiceUnavailable as exc:  # the central point (while starting) or the registry
        log.warning("consent decision unavailable; relay waits", error=exc.diagnostics)
        return None
    return dict(zip(distinct, decisions, strict=True))


def unchanged(watch: ConsentWatch, instances: Iterable[tuple[str, str]]) -> Callable[[str], bool]:
    """`send_files`'s `proceed` for (SOP Instance UID, patient key) pairs: go on while no consent of
    the instance's patient changed since the decision (asked in the association's thread)."""
    patients: dict[str, set[str]] = {}
    for sop_uid, patient_key in instances:
        patients.setdefault(sop_uid, set()).add(patient_key)

    def proceed(sop_uid: str) -> bool:
        return not any(watch.changed(key) for key in patients.get(sop_uid, ()))

    return proceed


def emergency_detail(link: StudyLink) -> dict[str, Any]:
    """An emergency's relay is audited flagged, with its justification, as the hubs audit its reads."""
    if link.purpose != Purpose.EMERGENCY.value:
        return {}
    return {"flagged": True, "justification": link.justification}
