"""Applications and lifecycle steps: the rules, the history, the events and the credentials."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from hie_platform.errors import Conflict, Forbidden, NotFound, Unprocessable
from hie_platform.outbox import Outbox
from hie_registry import repository
from hie_registry.conformance import review_evidence
from hie_registry.lifecycle import Action, Role, TransitionError, transition
from hie_registry.models import Hub, Institution, InstitutionEvent
from hie_registry.schemas import Application, Credentials, HistoryEntry
from hie_registry.service import publish_change, set_client_secret
from hie_schemas.auth import SCOPE_AGENCY, SCOPE_EXCHANGE, TokenClaims
from hie_schemas.codes import DEPARTMENTS
from hie_schemas.directory import InstitutionKind, InstitutionState
from hie_schemas.identifiers import InvalidIdentifierError, validate_institution_code


def roles_of(actor: TokenClaims, inst: Institution) -> set[Role]:
    roles: set[Role] = set()
    if SCOPE_AGENCY in actor.scopes:
        roles.add(Role.AGENCY)
    if actor.kind is InstitutionKind.HUB and inst.kind == InstitutionKind.CLINIC and actor.hub == inst.hub:
        roles.add(Role.OWN_HUB)
    return roles


def _record(
    session: AsyncSession,
    inst: Institution,
    action: str,
    from_state: str | None,
    actor: TokenClaims,
    reason: str,
    evidence: dict[str, Any] | None = None,
) -> None:
    row = InstitutionEvent(
        code=inst.code,
        action=action,
        from_state=from_state,
        to_state=inst.state,
        actor=actor.sub,
        reason=reason,
        evidence=evidence or {},
        at=datetime.now(UTC),
    )
    repository.add_event(session, row)


async def _check_hub(session: AsyncSession, body: Application) -> None:
    """A clinic joins through a hub in good standing; a hub brings a new, unused slug."""
    if body.kind is InstitutionKind.CLINIC:
        hub = await repository.hub(session, body.hub) if body.hub else None
        hub_inst = await repository.institution(session, hub.institution_code) if hub else None
        if hub_inst is None or hub_inst.kind != InstitutionKind.HUB:
            raise Unprocessable(
                f"{body.hub!r} is not a hub; a clinic joins through its regional hub", expression=["hub"]
            )
        if not InstitutionState(hub_inst.state).in_good_standing:
            raise Unprocessable(f"hub {body.hub} is not in good standing", expression=["hub"])
    elif body.kind is InstitutionKind.HUB and (not body.hub or await repository.hub(session, body.hub)):
        raise Unprocessable("a hub needs a new, unused slug in 'hub'", expression=["hub"])


async def _checked_code(session: AsyncSession, body: Application) -> str:
    """The applicant's code once the application is one the registry may accept."""
    try:
        code = validate_institution_code(body.code)
    except InvalidIdentifierError as exc:
        raise Unprocessable(f"code: {exc.reason}", expression=["code"]) from None
    if body.kind is InstitutionKind.AGENCY:
        raise Unprocessable("the operating agency does not apply to participate", expression=["kind"])
    unknown = [d for d in body.departments if d not in DEPARTMENTS]
    if unknown:
        raise Unprocessable(
            f"unknown HIRA department codes: {', '.join(unknown)}", expression=["departments"]
        )
    if await repository.institution(session, code) is not None:
        raise Conflict(f"institution {code} has already applied")
    await _check_hub(session, body)
    return code


def _applicant(code: str, body: Application) -> Institution:
    now = datetime.now(UTC)
    dicom = body.dicom
    return Institution(
        code=code,
        name=body.name,
        name_en=body.name_en,
        kind=body.kind.value,
        region=body.region,
        state=InstitutionState.APPLIED.value,
        hub=body.hub if body.kind is not InstitutionKind.PUBLIC_AGENCY else None,
        departments=body.departments,
        fhir_base=body.fhir_base,
        dicom_ae=dicom.ae_title if dicom else None,
        dicom_host=dicom.host if dicom else None,
        dicom_port=dicom.port if dicom else None,
        contacts=body.contacts.model_dump(exclude_none=True),
        created_at=now,
        updated_at=now,
    )


async def apply(session: AsyncSession, outbox: Outbox, body: Application, actor: TokenClaims) -> Institution:
    code = await _checked_code(session, body)
    inst = _applicant(code, body)
    await repository.add_institution(session, inst)
    if body.kind is InstitutionKind.HUB and body.hub:
        repository.add_hub(session, Hub(slug=body.hub, institution_code=code, fhir_base=body.fhir_base))
    samples = {"samples": len(body.samples), "samples_json": body.samples}
    _record(session, inst, "apply", None, actor, "application received", samples)
    await publish_change(session, outbox, inst, "applied")
    return inst


async def take_step(
    session: AsyncSession,
    outbox: Outbox,
    code: str,
    action: Action,
    actor: TokenClaims,
    reason: str,
) -> tuple[Institution, dict[str, Any], Credentials | None]:
    inst = await repository.institution(session, code, for_update=True)
    if inst is None:
        raise NotFound(f"no institution {code}")
    before = InstitutionState(inst.state)
    try:
        after = transition(action, InstitutionKind(inst.kind), before, roles_of(actor, inst))
    except TransitionError as exc:
        raise (Forbidden(str(exc)) if exc.forbidden else Conflict(str(exc))) from None
    evidence: dict[str, Any] = {}
    if action is Action.REVIEW:
        evidence = await review_evidence(inst, await _samples(session, code))
    credentials: Credentials | None = None
    if action is Action.APPROVE:
        secret = secrets.token_urlsafe(32)
        await set_client_secret(session, code, code, secret, SCOPE_EXCHANGE, reinstate=True)
        credentials = Credentials(client_id=code, client_secret=secret)
    now = datetime.now(UTC)
    if action is Action.REVOKE and (client := await repository.client(session, code)) is not None:
        client.revoked_at = now
    inst.state = after.value
    inst.updated_at = now
    _record(session, inst, action.value, before.value, actor, reason, evidence)
    await publish_change(session, outbox, inst, action.value)
    return inst, evidence, credentials


async def _samples(session: AsyncSession, code: str) -> list[dict[str, Any]]:
    applied = await repository.application(session, code)
    samples: list[dict[str, Any]] = applied.evidence.get("samples_json", []) if applied else []
    return samples


async def history(session: AsyncSession, code: str) -> list[HistoryEntry]:
    if await repository.institution(session, code) is None:
        raise NotFound(f"no institution {code}")
    return [
        HistoryEntry(
            action=r.action,
            from_state=r.from_state,
            to_state=r.to_state,
            actor=r.actor,
            reason=r.reason,
            evidence={k: v for k, v in r.evidence.items() if k != "samples_json"},
            at=r.at,
        )
        for r in await repository.events(session, code)
    ]
