"""The participation lifecycle: every legal and illegal step, through the API, with its history."""

from __future__ import annotations

import random
from typing import Any

import httpx
import pytest

from hie_registry.lifecycle import STEPS, Action, Role, TransitionError, step_for, transition
from hie_schemas.directory import InstitutionKind, InstitutionState

PARTICIPANTS = (InstitutionKind.HUB, InstitutionKind.CLINIC, InstitutionKind.PUBLIC_AGENCY)


@pytest.mark.parametrize("kind", PARTICIPANTS)
@pytest.mark.parametrize("state", list(InstitutionState))
@pytest.mark.parametrize("action", list(Action))
def test_state_machine_allows_exactly_the_documented_steps(
    kind: InstitutionKind, state: InstitutionState, action: Action
) -> None:
    step = step_for(action, kind)
    legal = state in step.sources and (step.kinds is None or kind in step.kinds)
    if legal:
        assert transition(action, kind, state, {Role.AGENCY} | {Role.OWN_HUB}) is step.target
    else:
        with pytest.raises(TransitionError):
            transition(action, kind, state, {Role.AGENCY, Role.OWN_HUB})


def test_only_the_agency_approves_and_the_own_hub_may_sign_the_agreement() -> None:
    with pytest.raises(TransitionError) as info:
        transition(Action.APPROVE, InstitutionKind.HUB, InstitutionState.UNDER_REVIEW, {Role.OWN_HUB})
    assert info.value.forbidden
    signed = transition(
        Action.SIGN_AGREEMENT, InstitutionKind.CLINIC, InstitutionState.UNDER_REVIEW, {Role.OWN_HUB}
    )
    assert signed is InstitutionState.AGREEMENT_SIGNED
    assert STEPS[Action.REVOKE].target is InstitutionState.REVOKED


def new_code() -> str:
    return f"77{random.randint(0, 999999):06d}"


class Registry:
    def __init__(self, handle: Any, http: httpx.AsyncClient) -> None:
        self.handle = handle
        self.http = http

    async def as_(self, client_id: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {await self.handle.token(client_id)}"}

    async def step(
        self, code: str, action: str, who: str = "agency", reason: str = "decided in review"
    ) -> httpx.Response:
        return await self.http.post(
            f"{self.handle.url}/institutions/{code}/{action}",
            json={"reason": reason},
            headers=await self.as_(who),
        )


@pytest.fixture
async def reg(registry: Any) -> Any:
    async with httpx.AsyncClient() as http:
        yield Registry(registry, http)


def clinic_application(
    code: str, hub: str = "snubh", samples: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    return {
        "code": code,
        "name": "테스트의원",
        "kind": "clinic",
        "region": "경기",
        "hub": hub,
        "departments": ["2300"],
        "contacts": {"person": "김담당", "phone": "031-000-0000"},
        "samples": samples or [],
    }


async def test_a_clinic_joins_gets_credentials_is_suspended_reinstated_and_revoked(reg: Registry) -> None:
    from hie_schemas.codes import DocumentType
    from hie_schemas.documents.builders import build_document

    code = new_code()
    sample = build_document(
        DocumentType.CARE_RECORD_SUMMARY,
        author_code=code,
        author_name="테스트의원",
        patient_rrn="800101-1234567",
    )
    url = reg.handle.url
    applied = await reg.http.post(
        f"{url}/institutions",
        json=clinic_application(code, samples=[sample]),
        headers=await reg.as_("agency"),
    )
    assert applied.status_code == 201, applied.text
    assert applied.json()["state"] == "applied"

    reviewed = await reg.step(code, "review")
    assert reviewed.status_code == 200, reviewed.text
    evidence = reviewed.json()["evidence"]
    assert evidence["samples"][0]["passed"] is True
    assert evidence["samples"][0]["type"] == "care-record-summary"

    # Approval before the hub signed the agreement is refused; another hub may not sign it.
    assert (await reg.step(code, "approve")).status_code == 409
    assert (await reg.step(code, "sign-agreement", who="11100001")).status_code == 403
    signed = await reg.step(code, "sign-agreement", who="31100002", reason="agreement signed on paper")
    assert signed.json()["institution"]["state"] == "agreement-signed"

    approved = await reg.step(code, "approve")
    credentials = approved.json()["credentials"]
    assert credentials["client_id"] == code
    token_form = {"grant_type": "client_credentials", **credentials}
    # Approved is not yet operating: no token until activation.
    assert (await reg.http.post(f"{url}/oauth2/token", data=token_form)).status_code == 401
    assert (await reg.step(code, "activate")).json()["institution"]["state"] == "active"
    token = (await reg.http.post(f"{url}/oauth2/token", data=token_form)).json()["access_token"]
    mine = {"Authorization": f"Bearer {token}"}
    assert (await reg.http.get(f"{url}/institutions/{code}/history", headers=mine)).status_code == 200

    assert (await reg.step(code, "suspend", reason="failed to report a breach")).status_code == 200
    assert (await reg.http.post(f"{url}/oauth2/token", data=token_form)).status_code == 401
    refused = await reg.http.get(f"{url}/institutions/{code}/history", headers=mine)
    assert refused.status_code == 403  # the still-valid token of a suspended institution
    assert refused.json()["resourceType"] == "OperationOutcome"

    assert (await reg.step(code, "reinstate", reason="breach reported")).status_code == 200
    assert (await reg.http.get(f"{url}/institutions/{code}/history", headers=mine)).status_code == 200
    assert (await reg.step(code, "revoke", reason="left the exchange")).status_code == 200
    again = await reg.step(code, "approve")
    assert again.status_code == 409
    assert "revoked" in again.json()["issue"][0]["diagnostics"]

    history = (
        await reg.http.get(f"{url}/institutions/{code}/history", headers=await reg.as_("agency"))
    ).json()
    assert [h["action"] for h in history] == [
        "apply",
        "review",
        "sign-agreement",
        "approve",
        "activate",
        "suspend",
        "reinstate",
        "revoke",
    ]
    assert history[5]["reason"] == "failed to report a breach"
    assert history[2]["actor"] == "31100002"
    directory = (await reg.http.get(f"{url}/institutions/{code}")).json()
    assert directory["state"] == "revoked"
    assert "contacts" not in directory


@pytest.mark.parametrize(
    ("change", "status", "fragment"),
    [
        ({"code": "1234"}, 422, "8 digits"),
        ({"code": "11100001"}, 409, "already applied"),
        ({"hub": "nohub"}, 422, "not a hub"),
        ({"departments": ["9999"]}, 422, "department"),
    ],
)
async def test_bad_applications_are_refused_and_change_nothing(
    reg: Registry, change: dict[str, Any], status: int, fragment: str
) -> None:
    body = clinic_application(new_code()) | change
    before = (await reg.http.get(f"{reg.handle.url}/institutions")).json()
    response = await reg.http.post(
        f"{reg.handle.url}/institutions", json=body, headers=await reg.as_("agency")
    )
    assert response.status_code == status, response.text
    assert fragment in response.json()["issue"][0]["diagnostics"]
    assert (await reg.http.get(f"{reg.handle.url}/institutions")).json() == before


async def test_lifecycle_steps_need_the_agency_and_a_reason(reg: Registry) -> None:
    code = new_code()
    body = clinic_application(code)
    assert (
        await reg.http.post(f"{reg.handle.url}/institutions", json=body, headers=await reg.as_("11301001"))
    ).status_code == 403
    assert (await reg.http.post(f"{reg.handle.url}/institutions", json=body)).status_code == 401
    assert (
        await reg.http.post(f"{reg.handle.url}/institutions", json=body, headers=await reg.as_("agency"))
    ).status_code == 201
    assert (await reg.step(code, "review", who="11301001")).status_code == 403
    no_reason = await reg.http.post(
        f"{reg.handle.url}/institutions/{code}/review", json={}, headers=await reg.as_("agency")
    )
    assert no_reason.status_code == 400
    unknown_action = await reg.step(code, "promote")
    assert unknown_action.status_code == 400
    state = (await reg.http.get(f"{reg.handle.url}/institutions/{code}")).json()["state"]
    assert state == "applied"
