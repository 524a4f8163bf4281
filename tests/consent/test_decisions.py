"""The decision point over HTTP and NATS: the rule is fed from the stored history and the registry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import nats
from consent_helpers import (
    SEVERANCE_HUB,
    SNUBH_CLINIC,
    SNUBH_HUB,
    ConsentService,
    flow,
    new_rrn,
)

from hie_platform.bus import Bus
from hie_schemas import subjects
from hie_schemas.events import DecisionReply, DecisionRequest


async def test_consented_patient_is_permitted_over_http(consent_service: ConsentService) -> None:
    rrn = new_rrn()
    await consent_service.consent(rrn)
    decision = await consent_service.decide_http(
        flow(consent_service.patient_key(rrn), SEVERANCE_HUB, SNUBH_HUB)
    )
    assert decision["permit"] is True
    assert decision["rule"] == "permit-consent"
    assert decision["consent_version"] == 1


async def test_consented_patient_is_permitted_over_nats_and_the_decision_is_audited(
    consent_service: ConsentService,
) -> None:
    rrn = new_rrn()
    await consent_service.consent(rrn)
    key = consent_service.patient_key(rrn)
    nc = await nats.connect(consent_service.nats_url)
    try:
        bus = Bus(nc)
        # The caller's standing flags are not trusted: the registry says both parties are in good standing.
        query = flow(
            key, SEVERANCE_HUB, SNUBH_HUB, holder_in_good_standing=False, recipient_in_good_standing=False
        )
        reply = await bus.request(
            subjects.consent_decide("severance"), DecisionRequest(query=query), DecisionReply, timeout=5
        )
        # ...and an institution the registry does not know is not a participant, whatever the caller says.
        stranger = await bus.request(
            subjects.consent_decide("severance"),
            DecisionRequest(query=flow(key, SEVERANCE_HUB, "12345678")),
            DecisionReply,
            timeout=5,
        )
    finally:
        await nc.close()
    assert reply.decision.permit is True
    assert reply.decision.rule == "permit-consent"
    assert reply.decision.consent_version == 1
    assert stranger.decision.permit is False
    assert stranger.decision.rule == "deny-not-participant"
    audited = [r["record"] for r in await consent_service.rows("audit_log")]
    decides = [r for r in audited if r["action"] == "decide" and r["patient_key"] == key]
    assert [(r["outcome"], r["rule"], r["consent_version"]) for r in decides] == [
        ("permit", "permit-consent", 1),
        ("deny", "deny-not-participant", 1),  # every decision names the version in force
    ]


async def test_patient_without_consent_is_denied(consent_service: ConsentService) -> None:
    key = consent_service.patient_key(new_rrn())
    decision = await consent_service.decide_http(flow(key, SEVERANCE_HUB, SNUBH_HUB))
    assert decision["permit"] is False
    assert decision["rule"] == "deny-no-consent"


async def test_records_created_before_consent_do_not_flow(consent_service: ConsentService) -> None:
    rrn = new_rrn()
    await consent_service.consent(rrn)
    last_year = datetime.now(UTC) - timedelta(days=365)
    decision = await consent_service.decide_http(
        flow(consent_service.patient_key(rrn), SEVERANCE_HUB, SNUBH_HUB, created=last_year)
    )
    assert decision["permit"] is False
    assert decision["rule"] == "deny-not-covered-at-creation"


async def test_entire_withdrawal_denies(consent_service: ConsentService) -> None:
    rrn = new_rrn()
    await consent_service.consent(rrn)
    created = datetime.now(UTC)
    await consent_service.consent(rrn, "ENTIRE_WITHDRAWAL")
    decision = await consent_service.decide_http(
        flow(consent_service.patient_key(rrn), SEVERANCE_HUB, SNUBH_HUB, created=created)
    )
    assert decision["permit"] is False
    assert decision["rule"] == "deny-withdrawn"
    assert decision["consent_version"] == 2


async def test_partial_withdrawal_excludes_only_the_chosen_institution(
    consent_service: ConsentService,
) -> None:
    rrn = new_rrn()
    await consent_service.consent(rrn)
    created = datetime.now(UTC)
    await consent_service.consent(rrn, "PARTIAL_WITHDRAWAL", exclude_institutions=(SNUBH_HUB,))
    key = consent_service.patient_key(rrn)
    excluded = await consent_service.decide_http(flow(key, SEVERANCE_HUB, SNUBH_HUB, created=created))
    other = await consent_service.decide_http(flow(key, SEVERANCE_HUB, SNUBH_CLINIC, created=created))
    assert excluded["permit"] is False
    assert excluded["rule"] == "deny-recipient-excluded"
    assert other["permit"] is True
    assert other["consent_version"] == 2


async def test_partial_consent_excludes_a_department(consent_service: ConsentService) -> None:
    rrn = new_rrn()
    await consent_service.consent(rrn, "PARTIAL_CONSENT", exclude_departments=("0300",))
    key = consent_service.patient_key(rrn)
    psychiatry = await consent_service.decide_http(
        flow(key, SEVERANCE_HUB, SNUBH_HUB, holder_department="0300")
    )
    surgery = await consent_service.decide_http(flow(key, SEVERANCE_HUB, SNUBH_HUB, holder_department="0400"))
    assert psychiatry["rule"] == "deny-department-excluded"
    assert surgery["rule"] == "permit-consent"
