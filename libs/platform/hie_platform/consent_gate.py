"""Consent decisions over a local replica of the consent feed: the one decision code of every service
that decides consent (hub nodes: ``hie_hub.consent``; imaging gateways: ``hie_imaging.relay``).

With a current replica the service applies the rule (``hie_schemas.consent.decide``) itself, to the
replicated history and the parties' standing in the registry client's view: no call on the way of a
permit. A consent-based denial is checked with the central decision point when it answers (a consent
recorded a moment ago may not have arrived yet); if it does not answer, the local denial stands. A
stale replica refuses everything but emergency access (fail closed). While the replica is starting,
the central decision point answers (``consent_source=auto``), and any failure to get its answer
refuses the flow.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

from pydantic import ValidationError

from hie_platform.bus import Bus
from hie_platform.consent_replica import ConsentReplica, Freshness
from hie_platform.errors import RpcError, ServiceUnavailable
from hie_platform.logging import get_logger
from hie_platform.registry_client import RegistryClient
from hie_platform.settings import ConsentSource
from hie_schemas import contract, subjects
from hie_schemas.consent import Decision, FlowQuery, Purpose, Rule, decide_replicated
from hie_schemas.envelope import Envelope
from hie_schemas.events import (
    DecisionReply,
    DecisionRequest,
    EmergencyAccessPermitted,
)
from hie_schemas.identifiers import InvalidIdentifierError, validate_institution_code

log = get_logger(__name__)
# Denials a newer consent version could turn into a permit: worth asking the central point about.
CONSENT_DENIALS = frozenset(
    {
        Rule.DENY_NO_CONSENT,
        Rule.DENY_WITHDRAWN,
        Rule.DENY_NOT_COVERED_AT_CREATION,
        Rule.DENY_HOLDER_EXCLUDED,
        Rule.DENY_DEPARTMENT_EXCLUDED,
        Rule.DENY_RECIPIENT_EXCLUDED,
    }
)


class ConsentUnavailable(ServiceUnavailable):
    """No decision could be obtained; the hub fails closed (의료법 §21-2: no consent, no exchange)."""

    def __init__(self) -> None:
        super().__init__("the consent decision point did not answer; the exchange is refused (fail closed)")

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


async def _standing(registry: RegistryClient, queries: Sequence[FlowQuery]) -> dict[str, bool]:
    """Each party's standing in the registry client's view (its memory; HTTP only on a miss)."""
    standing: dict[str, bool] = {}
    for code in {q.holder for q in queries} | {q.recipient for q in queries}:
        try:
            validate_institution_code(code)
        except InvalidIdentifierError:
            standing[code] = False
            continue
        known = registry.known_standing(code)
        standing[code] = known if known is not None else await registry.in_good_standing(code)
    return standing


def _checked(query: FlowQuery, standing: dict[str, bool]) -> FlowQuery:
    """The query with the registry's view of standing, not the caller's (as the central decision
    point does), and aware times. Copied only when something differs: a model_copy costs 1.5 µs
    (timeit) of the ~8 µs a whole local decision costs (bench/consent_bench.py, per CPU-second)."""
    holder, recipient = standing[query.holder], standing[query.recipient]
    if (
        query.holder_in_good_standing is holder
        and query.recipient_in_good_standing is recipient
        and query.document_created_at.tzinfo is not None
        and query.at.tzinfo is not None
    ):
        return query
    return query.model_copy(
        update={
            "holder_in_good_standing": holder,
            "recipient_in_good_standing": recipient,
            "document_created_at": _aware(query.document_created_at),
            "at": _aware(query.at),
        }
    )


class ConsentGate:
    """The data holder's question: may this document flow to this recipient?

    Without a replica (or with ``consent_source=central``) every question goes to the central
    decision point, as before the replica existed. ``announce_emergency``: a permitted emergency
    access is published for the patient's history; a gateway relaying an exchange the hub already
    announced decides again per batch and says it once is enough (False).
    """

    def __init__(
        self,
        bus: Bus,
        timeout: float,
        replica: ConsentReplica | None = None,
        *,
        announce_emergency: bool = True,
        hub: str | None = None,
    ) -> None:
        self.bus = bus
        self.timeout = timeout
        self.replica = replica
        self.announce_emergency = announce_emergency
        # The hub it decides for: the sender token of its emergency permits and of its central
        # decision requests (contract).
        self.hub = hub

    async def decide(self, query: FlowQuery) -> Decision:
        return (await self.decide_all([query]))[0]

    async def decide_all(self, queries: Sequence[FlowQuery]) -> list[Decision]:
        """Decide each flow; one question the central point leaves unanswered refuses them all."""
        replica = self.replica
        if replica is None or replica.settings.consent_source is ConsentSource.CENTRAL:
            return list(await asyncio.gather(*(self._ask(q) for q in queries)))
        freshness = replica.freshness()
        starting = freshness is Freshness.STARTING and replica.settings.consent_source is ConsentSource.AUTO
        # Emergency access needs no consent history, so it is always decided here.
        central = [i for i, q in enumerate(queries) if starting and q.purpose is not Purpose.EMERGENCY]
        local = [i for i in range(len(queries)) if i not in set(central)]
        decided: dict[int, Decision] = {}
        if local:
            answers = await self._decide_locally(replica, [queries[i] for i in local], freshness)
            decided.update(zip(local, answers, strict=True))
        if central:
            answers = list(await asyncio.gather(*(self._ask(queries[i]) for i in central)))
            decided.update(zip(central, answers, strict=True))
        return [decided[i] for i in range(len(queries))]

    async def _decide_locally(
        self, replica: ConsentReplica, queries: Sequence[FlowQuery], freshness: Freshness
    ) -> list[Decision]:
        """The rule over the replica's memory and the registry client's views: no I/O on the way
        to a permit while both know the parties (bench/consent_bench.py measures it per core)."""
        standing = await _standing(replica.runtime.registry, queries)
        current = freshness is Freshness.CURRENT
        checked = [_checked(q, standing) for q in queries]
        decisions = [
            decide_replicated(
                replica.history(q.patient_key), q, feed_current=current and replica.whole(q.patient_key)
            )
            for q in checked
        ]
        if replica.settings.consent_confirm_denials:
            confirm = [
                i
                for i, d in enumerate(decisions)
                if d.rule in CONSENT_DENIALS and checked[i].purpose is not Purpose.EMERGENCY
            ]
            answers = await asyncio.gather(*(self._confirm(checked[i], decisions[i]) for i in confirm))
            for i, answer in zip(confirm, answers, strict=True):
                decisions[i] = answer
        for q, d in zip(checked, decisions, strict=True):
            if d.permit and q.purpose is Purpose.EMERGENCY and self.announce_emergency:
                await self._announce_emergency(replica, q, d)
        return decisions

    async def _confirm(self, query: FlowQuery, local: Decision) -> Decision:
        try:
            return await self._ask(query)
        except ConsentUnavailable:
            return local  # the central point is away: the local denial stands

    async def _announce_emergency(
        self, replica: ConsentReplica, query: FlowQuery, decision: Decision
    ) -> None:
        """The patient is told afterwards (의료법 §21-2 exception): shown in their history with the reason."""
        event = EmergencyAccessPermitted(
            patient_key=query.patient_key,
            holder=query.holder,
            holder_department=query.holder_department,
            recipient=query.recipient,
            justification=(query.justification or "").strip(),
            decided_by=replica.runtime.source.node,
            consent_version=decision.consent_version,
            decided_at=datetime.now(UTC),
        )
        try:
            await replica.runtime.bus.publish(
                contract.subject(contract.Kind.EMERGENCY_PERMITTED, sender=self.hub),
                Envelope.wrap(event, replica.runtime.source),
            )
        except Exception as exc:
            # The access itself is audited by the caller; the notice is best effort.
            log.warning("emergency access notice not published", error=type(exc).__name__)

    async def _ask(self, query: FlowQuery) -> Decision:
        if self.hub is None:
            log.warning("consent decision not asked: this gate names no hub to ask as")
            raise ConsentUnavailable
        try:
            reply = await self.bus.request(
                subjects.consent_decide(self.hub),
                DecisionRequest(query=query),
                DecisionReply,
                timeout=self.timeout,
            )
        except (RpcError, ValidationError) as exc:
            log.warning("consent decision unavailable", error=type(exc).__name__)
            raise ConsentUnavailable from exc
        return reply.decision
