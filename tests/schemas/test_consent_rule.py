"""The decision rule of domain.md, case by case (property tests against a reference model: issue 4)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from hie_schemas.consent import ConsentPolicy, ConsentState, FlowQuery, Purpose, Rule, decide

T0 = datetime(2026, 1, 1, tzinfo=UTC)
H, R, OTHER = "11301001", "31100002", "21100005"


def state(
    version: int, policy: ConsentPolicy, days: int, inst: tuple[str, ...] = (), dept: tuple[str, ...] = ()
) -> ConsentState:
    return ConsentState(
        version=version,
        policy=policy,
        effective_at=T0 + timedelta(days=days),
        excluded_institutions=frozenset(inst),
        excluded_departments=frozenset(dept),
    )


def query(created: int, at: int, **kw: object) -> FlowQuery:
    base: dict[str, object] = {
        "patient_key": "k" * 64,
        "holder": H,
        "holder_department": "0100",
        "recipient": R,
        "document_created_at": T0 + timedelta(days=created),
        "at": T0 + timedelta(days=at),
    }
    base.update(kw)
    return FlowQuery.model_validate(base)


CONSENT = state(1, ConsentPolicy.ENTIRE_CONSENT, 10)


@pytest.mark.parametrize(
    ("history", "q", "permit", "rule"),
    [
        ([], query(20, 21), False, Rule.DENY_NO_CONSENT),
        ([CONSENT], query(20, 21), True, Rule.PERMIT_CONSENT),
        ([CONSENT], query(5, 21), False, Rule.DENY_NOT_COVERED_AT_CREATION),  # forward only
        ([CONSENT, state(2, ConsentPolicy.ENTIRE_WITHDRAWAL, 30)], query(20, 31), False, Rule.DENY_WITHDRAWN),
        ([CONSENT, state(2, ConsentPolicy.ENTIRE_WITHDRAWAL, 30)], query(20, 25), True, Rule.PERMIT_CONSENT),
        (
            [CONSENT, state(2, ConsentPolicy.PARTIAL_WITHDRAWAL, 30, inst=(R,))],
            query(20, 31),
            False,
            Rule.DENY_RECIPIENT_EXCLUDED,
        ),
        (
            [CONSENT, state(2, ConsentPolicy.PARTIAL_WITHDRAWAL, 30, inst=(OTHER,))],
            query(20, 31),
            True,
            Rule.PERMIT_CONSENT,
        ),
        (
            [CONSENT, state(2, ConsentPolicy.PARTIAL_WITHDRAWAL, 30, inst=(H,))],
            query(20, 31),
            False,
            Rule.DENY_HOLDER_EXCLUDED,
        ),
        (
            [CONSENT, state(2, ConsentPolicy.PARTIAL_WITHDRAWAL, 30, dept=("0100",))],
            query(20, 31),
            False,
            Rule.DENY_DEPARTMENT_EXCLUDED,
        ),
        # excluded when created, re-included later: still not covered at creation
        (
            [
                state(1, ConsentPolicy.PARTIAL_WITHDRAWAL, 10, inst=(H,)),
                state(2, ConsentPolicy.ENTIRE_CONSENT, 30),
            ],
            query(20, 31),
            False,
            Rule.DENY_NOT_COVERED_AT_CREATION,
        ),
        # withdrawn then re-consented: documents from the gap stay out, new ones flow
        (
            [
                CONSENT,
                state(2, ConsentPolicy.ENTIRE_WITHDRAWAL, 30),
                state(3, ConsentPolicy.ENTIRE_CONSENT, 40),
            ],
            query(35, 41),
            False,
            Rule.DENY_NOT_COVERED_AT_CREATION,
        ),
        (
            [
                CONSENT,
                state(2, ConsentPolicy.ENTIRE_WITHDRAWAL, 30),
                state(3, ConsentPolicy.ENTIRE_CONSENT, 40),
            ],
            query(41, 42),
            True,
            Rule.PERMIT_CONSENT,
        ),
        (
            [],
            query(20, 21, purpose=Purpose.EMERGENCY, justification="unconscious, no guardian"),
            True,
            Rule.PERMIT_EMERGENCY,
        ),
        (
            [],
            query(20, 21, purpose=Purpose.EMERGENCY, justification="  "),
            False,
            Rule.DENY_EMERGENCY_WITHOUT_JUSTIFICATION,
        ),
        ([], query(20, 21, purpose=Purpose.PATIENT_REQUEST), True, Rule.PERMIT_PATIENT_REQUEST),
        ([CONSENT], query(20, 21, recipient_in_good_standing=False), False, Rule.DENY_NOT_PARTICIPANT),
        (
            [],
            query(20, 21, purpose=Purpose.EMERGENCY, justification="x", holder_in_good_standing=False),
            False,
            Rule.DENY_NOT_PARTICIPANT,
        ),
    ],
)
def test_rule(history: list[ConsentState], q: FlowQuery, permit: bool, rule: Rule) -> None:
    decision = decide(history, q)
    assert (decision.permit, decision.rule) == (permit, rule)


def test_decision_names_the_consent_version_it_used() -> None:
    history = [CONSENT, state(2, ConsentPolicy.PARTIAL_WITHDRAWAL, 30, inst=(OTHER,))]
    assert decide(history, query(20, 31)).consent_version == 2
    assert decide(history, query(20, 25)).consent_version == 1


def test_emergency_access_is_flagged_for_the_patient() -> None:
    decision = decide([], query(20, 21, purpose=Purpose.EMERGENCY, justification="unconscious"))
    assert decision.flagged
