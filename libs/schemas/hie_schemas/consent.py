"""Consent policy codes, decision types and the decision rule of the exchange (의료법 §21-2, §21-3).

The rule (domain.md, "a precise reading"): a document may flow from holder H (department d) to
recipient R for purpose p at time t iff both parties are participants in good standing at t and
  1. the consent covered the document when it was created (active then; H and d not excluded), and
  2. the consent covers it at t (active; neither H, d nor R excluded);
or p is an emergency access with a recorded justification, or a patient-requested transfer.
Consent is forward-only: a record created before the patient consented never flows on consent.

Choices the domain leaves open: both parties must be in good standing for every purpose (emergency and
patient-requested transfers included); a submission to a public agency is consent-based like any other
flow (domain.md: "with the patient's consent"), the agency being the recipient; every version states its
complete set of exclusions (a new version replaces, not amends, the previous one); every decision names
the consent version in force at ``at`` (None only when no version was in force).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum

from pydantic import Field

from hie_schemas.model import FrozenModel


class ConsentPolicy(StrEnum):
    """KHIS policy codes (code system 1.2.410.100110.40.2.2)."""

    ENTIRE_CONSENT = "ENTIRE_CONSENT"
    PARTIAL_CONSENT = "PARTIAL_CONSENT"
    ENTIRE_WITHDRAWAL = "ENTIRE_WITHDRAWAL"
    PARTIAL_WITHDRAWAL = "PARTIAL_WITHDRAWAL"

    @property
    def is_active(self) -> bool:
        """Every policy but an entire withdrawal leaves the consent in force (with exclusions)."""
        return self is not ConsentPolicy.ENTIRE_WITHDRAWAL


class Purpose(StrEnum):
    TREATMENT = "treatment"  # referral, return, consult, walk-in care
    EMERGENCY = "emergency"  # break-the-glass: unconscious, no guardian (의료법 §21-2 exception)
    PATIENT_REQUEST = "patient-request"  # patient-requested transfer (의료법 §21-3)
    PUBLIC_AGENCY = "public-agency"  # submission to a public agency with the patient's consent


class Rule(StrEnum):
    """The rule that decided; every decision names one."""

    PERMIT_CONSENT = "permit-consent"
    PERMIT_EMERGENCY = "permit-emergency"
    PERMIT_PATIENT_REQUEST = "permit-patient-request"
    DENY_NOT_PARTICIPANT = "deny-not-participant"
    DENY_EMERGENCY_WITHOUT_JUSTIFICATION = "deny-emergency-without-justification"
    DENY_NO_CONSENT = "deny-no-consent"
    DENY_NOT_COVERED_AT_CREATION = "deny-not-covered-at-creation"
    DENY_WITHDRAWN = "deny-withdrawn"
    DENY_HOLDER_EXCLUDED = "deny-holder-excluded"
    DENY_DEPARTMENT_EXCLUDED = "deny-department-excluded"
    DENY_RECIPIENT_EXCLUDED = "deny-recipient-excluded"
    # A hub's replica of the consent feed is older than its staleness bound: fail closed.
    DENY_CONSENT_FEED_STALE = "deny-consent-feed-stale"


class ConsentState(FrozenModel):
    """One version of a patient's consent, in force from ``effective_at`` until the next version."""

    version: int
    policy: ConsentPolicy
    effective_at: datetime
    excluded_institutions: frozenset[str] = frozenset()
    excluded_departments: frozenset[str] = frozenset()


class FlowQuery(FrozenModel):
    """'May this flow happen?' — everything the rule needs, with no patient identity beyond the key."""

    patient_key: str
    holder: str
    holder_department: str | None = None
    recipient: str
    purpose: Purpose = Purpose.TREATMENT
    document_created_at: datetime
    at: datetime
    justification: str | None = None
    holder_in_good_standing: bool = True
    recipient_in_good_standing: bool = True


class Decision(FrozenModel):
    permit: bool
    rule: Rule
    consent_version: int | None = None
    reason: str = ""
    flagged: bool = Field(default=False, description="true for emergency access: shown to the patient")


def state_at(history: Sequence[ConsentState], at: datetime) -> ConsentState | None:
    """The consent version in force at ``at``: the latest one that took effect at or before it."""
    current: ConsentState | None = None
    for entry in sorted(history, key=lambda e: (e.effective_at, e.version)):
        if entry.effective_at <= at:
            current = entry
        else:
            break
    return current


def _exclusion(state: ConsentState, institutions: Sequence[str], department: str | None) -> Rule | None:
    holder = institutions[0]
    if holder in state.excluded_institutions:
        return Rule.DENY_HOLDER_EXCLUDED
    if department is not None and department in state.excluded_departments:
        return Rule.DENY_DEPARTMENT_EXCLUDED
    if len(institutions) > 1 and institutions[1] in state.excluded_institutions:
        return Rule.DENY_RECIPIENT_EXCLUDED
    return None


def decide(history: Sequence[ConsentState], query: FlowQuery) -> Decision:
    """Apply the rule (this module's docstring) to a patient's consent history; pure and deterministic.

    In order: both parties in good standing; an emergency with a justification, or the patient's own
    request, flows without consent; otherwise the consent in force at ``at`` must be active and exclude
    neither party nor the department, and the one in force when the record was created must have
    covered it (consent is forward-only)."""
    now = state_at(history, query.at)
    version = now.version if now else None
    if not (query.holder_in_good_standing and query.recipient_in_good_standing):
        return _deny(Rule.DENY_NOT_PARTICIPANT, version, "a party is not in good standing")
    if query.purpose in (Purpose.EMERGENCY, Purpose.PATIENT_REQUEST):
        return _without_consent(query, version)
    if now is None:
        return _deny(Rule.DENY_NO_CONSENT, None, "the patient has not consented")
    refusal = _refused_now(now, query)
    if refusal is None:
        refusal = _refused_at_creation(history, query, now.version)
    return refusal or Decision(
        permit=True, rule=Rule.PERMIT_CONSENT, consent_version=version, reason="covered by consent"
    )


def _deny(rule: Rule, version: int | None, reason: str) -> Decision:
    return Decision(permit=False, rule=rule, consent_version=version, reason=reason)


def _without_consent(query: FlowQuery, version: int | None) -> Decision:
    """Emergency access (의료법 §21-2 exception, flagged to the patient) and patient-requested
    transfers (§21-3) do not ask the consent; an emergency needs a recorded justification."""
    if query.purpose is Purpose.PATIENT_REQUEST:
        return Decision(
            permit=True,
            rule=Rule.PERMIT_PATIENT_REQUEST,
            consent_version=version,
            reason="transfer requested by the patient (의료법 §21-3)",
        )
    if not (query.justification and query.justification.strip()):
        reason = "emergency access needs a recorded justification"
        return _deny(Rule.DENY_EMERGENCY_WITHOUT_JUSTIFICATION, version, reason)
    return Decision(
        permit=True,
        rule=Rule.PERMIT_EMERGENCY,
        consent_version=version,
        flagged=True,
        reason="emergency access; the patient is told afterwards",
    )


def _refused_now(now: ConsentState, query: FlowQuery) -> Decision | None:
    """Point 2 of the rule: the consent in force now is active and excludes neither party nor d."""
    if not now.policy.is_active:
        return _deny(Rule.DENY_WITHDRAWN, now.version, "consent withdrawn")
    excluded = _exclusion(now, (query.holder, query.recipient), query.holder_department)
    return None if excluded is None else _deny(excluded, now.version, "excluded by the patient")


def _refused_at_creation(history: Sequence[ConsentState], query: FlowQuery, version: int) -> Decision | None:
    """Point 1 of the rule: the consent in force when the record was created covered it."""
    then = state_at(history, query.document_created_at)
    if then is None or not then.policy.is_active:
        reason = "the record was created while no consent was in force (consent is forward-only)"
        return _deny(Rule.DENY_NOT_COVERED_AT_CREATION, version, reason)
    if _exclusion(then, (query.holder,), query.holder_department) is not None:
        reason = "the holder or department was excluded when the record was created"
        return _deny(Rule.DENY_NOT_COVERED_AT_CREATION, version, reason)
    return None


def decide_replicated(history: Sequence[ConsentState], query: FlowQuery, *, feed_current: bool) -> Decision:
    """The rule at a data holder that decides over a replica of the consent feed.

    While the replica is current this is ``decide``. Once it is older than its staleness bound the
    holder cannot know about a withdrawal, so it fails closed: every flow is refused except emergency
    access, which does not depend on consent (의료법 §21-2 exception) and is still decided by the rule.
    """
    if feed_current or query.purpose is Purpose.EMERGENCY:
        return decide(history, query)
    now = state_at(history, query.at)
    reason = "this node has not heard the consent feed within its staleness bound (fail closed)"
    return _deny(Rule.DENY_CONSENT_FEED_STALE, now.version if now else None, reason)
