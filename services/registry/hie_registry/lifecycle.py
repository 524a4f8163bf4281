"""The participation lifecycle as an enforced state machine (who may take each step, from where).

Hub: applied → under-review → approved → active. Clinic: applied → under-review → agreement-signed
(by its hub) → approved → active. The agency may suspend (active → suspended), reinstate
(suspended → active), reject an application, and revoke (final) a participant.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from hie_schemas.directory import InstitutionKind, InstitutionState

S = InstitutionState


class Action(StrEnum):
    REVIEW = "review"
    SIGN_AGREEMENT = "sign-agreement"
    APPROVE = "approve"
    ACTIVATE = "activate"
    REJECT = "reject"
    SUSPEND = "suspend"
    REINSTATE = "reinstate"
    REVOKE = "revoke"


class Role(StrEnum):
    AGENCY = "agency"
    OWN_HUB = "own-hub"  # the hub hospital a clinic belongs to


@dataclass(frozen=True)
class Step:
    action: Action
    sources: frozenset[InstitutionState]
    target: InstitutionState
    roles: frozenset[Role]
    kinds: frozenset[InstitutionKind] | None = None  # None: any kind


_PARTICIPANTS = frozenset({InstitutionKind.HUB, InstitutionKind.CLINIC, InstitutionKind.PUBLIC_AGENCY})
_AGENCY = frozenset({Role.AGENCY})

STEPS: dict[Action, Step] = {
    s.action: s
    for s in (
        Step(Action.REVIEW, frozenset({S.APPLIED}), S.UNDER_REVIEW, _AGENCY),
        Step(
            Action.SIGN_AGREEMENT,
            frozenset({S.UNDER_REVIEW}),
            S.AGREEMENT_SIGNED,
            frozenset({Role.OWN_HUB, Role.AGENCY}),
            frozenset({InstitutionKind.CLINIC}),
        ),
        Step(
            Action.APPROVE,
            frozenset({S.UNDER_REVIEW}),
            S.APPROVED,
            _AGENCY,
            frozenset({InstitutionKind.HUB, InstitutionKind.PUBLIC_AGENCY}),
        ),
        Step(Action.ACTIVATE, frozenset({S.APPROVED}), S.ACTIVE, _AGENCY),
        Step(Action.REJECT, frozenset({S.APPLIED, S.UNDER_REVIEW, S.AGREEMENT_SIGNED}), S.REJECTED, _AGENCY),
        Step(Action.SUSPEND, frozenset({S.ACTIVE}), S.SUSPENDED, _AGENCY),
        Step(Action.REINSTATE, frozenset({S.SUSPENDED}), S.ACTIVE, _AGENCY),
        Step(Action.REVOKE, frozenset({S.APPROVED, S.ACTIVE, S.SUSPENDED}), S.REVOKED, _AGENCY),
    )
}
# A clinic is approved only after its hub signed the agreement.
_CLINIC_APPROVE = Step(
    Action.APPROVE, frozenset({S.AGREEMENT_SIGNED}), S.APPROVED, _AGENCY, frozenset({InstitutionKind.CLINIC})
)


class TransitionError(ValueError):
    """An action that the state machine does not allow; the message says why."""

    def __init__(self, action: Action, state: InstitutionState, reason: str, forbidden: bool = False) -> None:
        super().__init__(f"cannot {action.value} an institution that is {state.value}: {reason}")
        self.action = action
        self.state = state
        self.forbidden = forbidden


def step_for(action: Action, kind: InstitutionKind) -> Step:
    if action is Action.APPROVE and kind is InstitutionKind.CLINIC:
        return _CLINIC_APPROVE
    return STEPS[action]


def transition(
    action: Action, kind: InstitutionKind, state: InstitutionState, roles: set[Role]
) -> InstitutionState:
    """The state after ``action``, or TransitionError naming why it is not allowed."""
    if kind not in _PARTICIPANTS:
        raise TransitionError(action, state, f"a {kind.value} has no participation lifecycle")
    step = step_for(action, kind)
    if step.kinds is not None and kind not in step.kinds:
        raise TransitionError(action, state, f"this step is not for a {kind.value}")
    if state not in step.sources:
        allowed = ", ".join(sorted(s.value for s in step.sources))
        raise TransitionError(action, state, f"allowed only from {allowed}")
    if not roles & step.roles:
        raise TransitionError(action, state, "the caller may not take this step", forbidden=True)
    return step.target
