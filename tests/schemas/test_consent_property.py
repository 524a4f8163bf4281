"""The consent rule against a small, independent reference model (hypothesis).

Random histories of consent, partial consent, partial and entire withdrawal and re-consent, with
random document creation times, parties, departments, purposes and standings. The reference below
reads domain.md literally and shares nothing with ``hie_schemas.consent`` but the vocabulary; it
must agree with ``decide`` on permit, rule and consent version for every generated case.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from hie_schemas.consent import (
    ConsentPolicy,
    ConsentState,
    FlowQuery,
    Purpose,
    Rule,
    decide,
    decide_replicated,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
HOLDERS = ("11301001", "21100005")
RECIPIENTS = ("31100002", "21100005")
INSTITUTIONS = ("11301001", "31100002", "21100005")
DEPARTMENTS = ("0100", "0300")
PARTIAL = (ConsentPolicy.PARTIAL_CONSENT, ConsentPolicy.PARTIAL_WITHDRAWAL)


def at(minute: int) -> datetime:
    return T0 + timedelta(minutes=minute)


# --- the reference model ------------------------------------------------------------------------


@dataclass(frozen=True)
class Version:
    number: int
    policy: ConsentPolicy
    minute: int
    institutions: frozenset[str]
    departments: frozenset[str]


def version_in_force(history: list[Version], minute: int) -> Version | None:
    """The latest version (by effective time, then number) that took effect at or before ``minute``."""
    started = [v for v in history if v.minute <= minute]
    return max(started, key=lambda v: (v.minute, v.number)) if started else None


def covers(v: Version | None, institutions: tuple[str, ...], department: str | None) -> bool:
    """Consent in force, none of the institutions and not the department excluded."""
    if v is None or v.policy is ConsentPolicy.ENTIRE_WITHDRAWAL:
        return False
    return not (set(institutions) & v.institutions) and (
        department is None or department not in v.departments
    )


@dataclass(frozen=True)
class Case:
    history: list[Version]
    created: int
    now: int
    holder: str
    department: str | None
    recipient: str
    purpose: Purpose
    justification: str | None
    holder_ok: bool
    recipient_ok: bool


def domain_permits(c: Case) -> bool:
    """domain.md, "a precise reading", as one boolean formula (standing applies to every purpose)."""
    if not (c.holder_ok and c.recipient_ok):
        return False
    if c.purpose is Purpose.EMERGENCY:
        return bool(c.justification and c.justification.strip())
    if c.purpose is Purpose.PATIENT_REQUEST:
        return True
    then = version_in_force(c.history, c.created)
    now = version_in_force(c.history, c.now)
    return covers(then, (c.holder,), c.department) and covers(now, (c.holder, c.recipient), c.department)


def reference_rule(c: Case) -> tuple[bool, Rule, int | None]:
    """Which rule names the outcome; the order of the checks is the documented precedence."""
    now = version_in_force(c.history, c.now)
    number = now.number if now else None
    if not (c.holder_ok and c.recipient_ok):
        return False, Rule.DENY_NOT_PARTICIPANT, number
    if c.purpose is Purpose.EMERGENCY:
        if c.justification and c.justification.strip():
            return True, Rule.PERMIT_EMERGENCY, number
        return False, Rule.DENY_EMERGENCY_WITHOUT_JUSTIFICATION, number
    if c.purpose is Purpose.PATIENT_REQUEST:
        return True, Rule.PERMIT_PATIENT_REQUEST, number
    if now is None:
        return False, Rule.DENY_NO_CONSENT, None
    if now.policy is ConsentPolicy.ENTIRE_WITHDRAWAL:
        return False, Rule.DENY_WITHDRAWN, number
    if c.holder in now.institutions:
        return False, Rule.DENY_HOLDER_EXCLUDED, number
    if c.department is not None and c.department in now.departments:
        return False, Rule.DENY_DEPARTMENT_EXCLUDED, number
    if c.recipient in now.institutions:
        return False, Rule.DENY_RECIPIENT_EXCLUDED, number
    if not covers(version_in_force(c.history, c.created), (c.holder,), c.department):
        return False, Rule.DENY_NOT_COVERED_AT_CREATION, number
    return True, Rule.PERMIT_CONSENT, number


# --- generators ---------------------------------------------------------------------------------


@st.composite
def histories(draw: st.DrawFn) -> list[Version]:
    steps = draw(st.integers(min_value=0, max_value=7))
    minute = 0
    found: list[Version] = []
    for number in range(1, steps + 1):
        minute += draw(st.integers(min_value=0, max_value=8))  # equal times happen: the later version wins
        policy = draw(st.sampled_from(list(ConsentPolicy)))
        institutions: frozenset[str] = frozenset()
        departments: frozenset[str] = frozenset()
        if policy in PARTIAL:
            institutions = draw(st.frozensets(st.sampled_from(INSTITUTIONS), max_size=2))
            departments = draw(st.frozensets(st.sampled_from(DEPARTMENTS), max_size=1))
        found.append(Version(number, policy, minute, institutions, departments))
    return found


@st.composite
def cases(draw: st.DrawFn) -> Case:
    history = draw(histories())
    horizon = (history[-1].minute if history else 0) + 10
    purpose = draw(st.sampled_from(list(Purpose)))
    return Case(
        history=history,
        created=draw(st.integers(min_value=-5, max_value=horizon)),
        now=draw(st.integers(min_value=-5, max_value=horizon)),
        holder=draw(st.sampled_from(HOLDERS)),
        department=draw(st.sampled_from((*DEPARTMENTS, None))),
        recipient=draw(st.sampled_from(RECIPIENTS)),
        purpose=purpose,
        justification=draw(st.sampled_from((None, "", "  ", "의식 없음, 보호자 없음"))),
        holder_ok=draw(st.booleans()) or draw(st.booleans()),  # mostly in good standing
        recipient_ok=draw(st.booleans()) or draw(st.booleans()),
    )


def states(c: Case) -> list[ConsentState]:
    return [
        ConsentState(
            version=v.number,
            policy=v.policy,
            effective_at=at(v.minute),
            excluded_institutions=v.institutions,
            excluded_departments=v.departments,
        )
        for v in c.history
    ]


def query(c: Case) -> FlowQuery:
    return FlowQuery(
        patient_key="k" * 64,
        holder=c.holder,
        holder_department=c.department,
        recipient=c.recipient,
        purpose=c.purpose,
        document_created_at=at(c.created),
        at=at(c.now),
        justification=c.justification,
        holder_in_good_standing=c.holder_ok,
        recipient_in_good_standing=c.recipient_ok,
    )


# --- properties ---------------------------------------------------------------------------------


@settings(max_examples=2000, deadline=None)
@given(cases())
def test_decide_agrees_with_the_reference_model(c: Case) -> None:
    decision = decide(states(c), query(c))
    assert (decision.permit, decision.rule, decision.consent_version) == reference_rule(c)
    assert decision.permit == domain_permits(c)
    assert decision.flagged == (decision.rule is Rule.PERMIT_EMERGENCY)


@settings(max_examples=500, deadline=None)
@given(cases(), st.randoms(use_true_random=False))
def test_the_order_versions_are_listed_in_does_not_matter(c: Case, rng: random.Random) -> None:
    shuffled = states(c)
    rng.shuffle(shuffled)
    assert decide(shuffled, query(c)) == decide(states(c), query(c))


@settings(max_examples=500, deadline=None)
@given(cases())
def test_records_created_before_any_consent_never_flow_on_consent(c: Case) -> None:
    first = min(
        (v.minute for v in c.history if v.policy is not ConsentPolicy.ENTIRE_WITHDRAWAL), default=None
    )
    decision = decide(states(c), query(c))
    if first is None or c.created < first:
        assert decision.rule is not Rule.PERMIT_CONSENT


@settings(max_examples=500, deadline=None)
@given(cases(), st.integers(min_value=0, max_value=10))
def test_a_withdrawal_never_turns_a_refusal_into_a_permit(c: Case, delay: int) -> None:
    """Appending an entire withdrawal (effective at or after the last version) only takes away."""
    last = c.history[-1].minute if c.history else 0
    withdrawal = Version(
        len(c.history) + 1, ConsentPolicy.ENTIRE_WITHDRAWAL, last + delay, frozenset(), frozenset()
    )
    after = Case(**{**c.__dict__, "history": [*c.history, withdrawal]})
    before, later = decide(states(c), query(c)), decide(states(after), query(after))
    if later.permit:
        assert before.permit
    if c.now >= withdrawal.minute and c.purpose in (Purpose.TREATMENT, Purpose.PUBLIC_AGENCY):
        assert not later.permit


@settings(max_examples=500, deadline=None)
@given(cases())
def test_a_re_consent_does_not_reach_back_into_the_gap(c: Case) -> None:
    """After withdrawal and re-consent, a record created while withdrawn still never flows on consent."""
    last = c.history[-1].minute if c.history else 0
    gap = [
        Version(len(c.history) + 1, ConsentPolicy.ENTIRE_WITHDRAWAL, last + 1, frozenset(), frozenset()),
        Version(len(c.history) + 2, ConsentPolicy.ENTIRE_CONSENT, last + 5, frozenset(), frozenset()),
    ]
    case = Case(**{**c.__dict__, "history": [*c.history, *gap], "created": last + 3, "now": last + 6})
    decision = decide(states(case), query(case))
    assert decision.rule is not Rule.PERMIT_CONSENT
    assert (decision.permit, decision.rule, decision.consent_version) == reference_rule(case)


@settings(max_examples=1000, deadline=None)
@given(cases(), st.booleans())
def test_a_stale_replica_refuses_everything_but_emergency(c: Case, current: bool) -> None:
    replicated = decide_replicated(states(c), query(c), feed_current=current)
    if current or c.purpose is Purpose.EMERGENCY:
        assert replicated == decide(states(c), query(c))
    else:
        now = version_in_force(c.history, c.now)
        assert (replicated.permit, replicated.rule) == (False, Rule.DENY_CONSENT_FEED_STALE)
        assert replicated.consent_version == (now.number if now else None)
