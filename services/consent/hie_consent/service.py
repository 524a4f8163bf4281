"""Consent rules: recording versions from every channel, and answering decisions.

The decision rule itself is ``hie_schemas.consent.decide``; this module only feeds it the patient's
history from the database and the parties' standing from the registry. The patient's histories live
in ``history``; the portal's and the call centre's identity checks in ``identity``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from hie_consent import repository
from hie_consent.config import ConsentSettings
from hie_consent.fhir import build_consent, check_exclusions, parse_consent, stored_resource
from hie_consent.models import ConsentExclusion, ConsentSignature, ConsentVersion
from hie_consent.repository import as_utc
from hie_consent.schemas import (
    ConsentChannel,
    ConsentVersionView,
    Exclusion,
    ExclusionKind,
    Signer,
    SignerRelationship,
)
from hie_consent.signature import SignatureImage
from hie_platform.bus import RefusedMessage
from hie_platform.errors import Conflict, Forbidden, Unprocessable
from hie_platform.runtime import Runtime
from hie_schemas import codes, contract, subjects
from hie_schemas.auth import TokenClaims
from hie_schemas.consent import ConsentPolicy, ConsentState, Decision, FlowQuery, Purpose, decide
from hie_schemas.directory import InstitutionKind
from hie_schemas.events import ConsentRecorded, EmergencyAccessPermitted
from hie_schemas.identifiers import InvalidIdentifierError, validate_institution_code, validate_patient_key

WITHDRAWALS = frozenset({ConsentPolicy.ENTIRE_WITHDRAWAL, ConsentPolicy.PARTIAL_WITHDRAWAL})
DESK_KINDS = frozenset({InstitutionKind.HUB, InstitutionKind.CLINIC})


def consent_state(row: ConsentVersion) -> ConsentState:
    return ConsentState(
        version=row.version,
        policy=ConsentPolicy(row.policy),
        effective_at=as_utc(row.effective_at),
        excluded_institutions=frozenset(row.excluded_institutions),
        excluded_departments=frozenset(row.excluded_departments),
    )


# --- recording --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewVersion:
    """A version to append, whichever channel it came from."""

    patient_key: str
    policy: ConsentPolicy
    effective_at: datetime | None
    exclusions: tuple[Exclusion, ...]
    recorded_by: str
    channel: ConsentChannel
    signer: Signer
    resource: dict[str, Any] | None = None  # the desk's Consent (pseudonymised); built when None
    signature: SignatureImage | None = None

    @property
    def excluded_institutions(self) -> list[str]:
        return [e.code for e in self.exclusions if e.kind is ExclusionKind.INSTITUTION]

    @property
    def excluded_departments(self) -> list[str]:
        return [e.code for e in self.exclusions if e.kind is ExclusionKind.DEPARTMENT]


async def check_targets(runtime: Runtime, exclusions: tuple[Exclusion, ...]) -> None:
    """Excluded institutions must be in the registry, departments in the HIRA list (422 otherwise).

    Registry look-ups happen before the first SQL statement: no connection is held across them.
    """
    for e in exclusions:
        if e.kind is ExclusionKind.DEPARTMENT:
            if e.code not in codes.DEPARTMENTS:
                raise Unprocessable(f"unknown department {e.code!r}", expression=["exclusions"])
            continue
        try:
            validate_institution_code(e.code)
        except InvalidIdentifierError as exc:
            raise Unprocessable(f"excluded institution: {exc.reason}", expression=["exclusions"]) from None
        if await runtime.registry.institution(e.code) is None:
            raise Unprocessable(
                f"excluded institution {e.code} is not in the registry",
                expression=["Consent.provision.provision.actor"],
            )


async def check_version(
    session: AsyncSession, settings: ConsentSettings, new: NewVersion, now: datetime
) -> tuple[ConsentVersion | None, datetime]:
    """The checks that depend on the stored history; returns the latest version and the effective time."""
    check_exclusions(new.policy, new.exclusions)
    effective_at = as_utc(new.effective_at) if new.effective_at else now
    if effective_at > now + timedelta(seconds=settings.max_future_skew_seconds):
        raise Unprocessable("Consent.dateTime is in the future", expression=["Consent.dateTime"])
    history = await repository.versions(session, new.patient_key)
    latest = history[-1] if history else None
    if new.policy in WITHDRAWALS and (latest is None or not ConsentPolicy(latest.policy).is_active):
        raise Conflict(f"{new.policy.value}: the patient has no consent in force to withdraw")
    if latest is not None and effective_at < as_utc(latest.effective_at):
        # Versions take effect in order, so a later version never rewrites what an earlier one allowed.
        raise Conflict(
            "Consent.dateTime is earlier than the version in force", expression=["Consent.dateTime"]
        )
    return latest, effective_at


def _version_row(
    settings: ConsentSettings,
    new: NewVersion,
    latest: ConsentVersion | None,
    effective_at: datetime,
    now: datetime,
) -> ConsentVersion:
    """The next version of the patient's Consent (a new resource id for the first one)."""
    number = latest.version + 1 if latest else 1
    resource_id = latest.resource_id if latest else str(uuid.uuid4())
    base = new.resource or build_consent(
        new.patient_key, new.policy, new.recorded_by, new.channel, new.signer, new.exclusions
    )
    signature_url = f"{settings.base_url.rstrip('/')}/fhir/Consent/{resource_id}/_history/{number}/signature"
    return ConsentVersion(
        resource_id=resource_id,
        patient_key=new.patient_key,
        version=number,
        policy=new.policy.value,
        effective_at=effective_at,
        excluded_institutions=new.excluded_institutions,
        excluded_departments=new.excluded_departments,
        recorded_by=new.recorded_by,
        channel=new.channel.value,
        signer_relationship=new.signer.relationship.value,
        signer_name=new.signer.name,
        signer_contact=new.signer.contact,
        resource=stored_resource(base, resource_id, number, effective_at, now, new.signature, signature_url),
        created_at=now,
    )


def _add_exclusions_and_signature(session: AsyncSession, row: ConsentVersion, new: NewVersion) -> None:
    exclusions = [
        ConsentExclusion(
            consent_version_id=row.id,
            patient_key=row.patient_key,
            version=row.version,
            kind=e.kind.value,
            code=e.code,
            reason=e.reason,
        )
        for e in new.exclusions
    ]
    repository.add_exclusions(session, exclusions)
    if (image := new.signature) is not None:
        signature = ConsentSignature(
            consent_version_id=row.id,
            content_type=image.content_type,
            data=image.data,
            sha256=image.sha256,
            size=len(image.data),
        )
        repository.add_signature(session, signature)


async def _announce(
    session: AsyncSession,
    runtime: Runtime,
    row: ConsentVersion,
    actor: TokenClaims | None,
    audit_detail: dict[str, Any] | None,
) -> None:
    """The ConsentRecorded event and the audit record, in the version's transaction."""
    recorded = ConsentRecorded(
        patient_key=row.patient_key,
        version=row.version,
        policy=ConsentPolicy(row.policy),
        effective_at=row.effective_at,
        excluded_institutions=row.excluded_institutions,
        excluded_departments=row.excluded_departments,
        recorded_by=row.recorded_by,
        channel=row.channel,
    )
    await runtime.outbox.add(session, subjects.CONSENT_RECORDED, recorded)
    # The signer's name and contact stay out of the audit record and the event.
    await runtime.audit.record(
        session,
        action="consent-record",
        actor=actor,
        outcome="success",
        patient_key=row.patient_key,
        consent_version=row.version,
        detail={"policy": row.policy, "channel": row.channel, "signer": row.signer_relationship}
        | (audit_detail or {}),
    )


async def append_version(
    session: AsyncSession,
    runtime: Runtime,
    settings: ConsentSettings,
    new: NewVersion,
    *,
    actor: TokenClaims | None,
    audit_detail: dict[str, Any] | None = None,
) -> ConsentVersion:
    """Append a version, its exclusions, signature, event and audit record, in one transaction."""
    now = datetime.now(UTC)
    latest, effective_at = await check_version(session, settings, new, now)
    row = _version_row(settings, new, latest, effective_at, now)
    await repository.add_version(session, row)
    _add_exclusions_and_signature(session, row, new)
    await _announce(session, runtime, row, actor, audit_detail)
    return row


async def record_consent(
    session: AsyncSession, runtime: Runtime, settings: ConsentSettings, actor: TokenClaims, raw: Any
) -> ConsentVersion:
    """The desk channel: an EMR records a Consent signed at its institution (sign pad, paper, mobile)."""
    submission = parse_consent(raw, settings.patient_key_bytes, settings.max_signature_bytes)
    if actor.kind not in DESK_KINDS:
        raise Forbidden("consents are recorded at the desk of a participating hospital or clinic")
    if submission.organization != actor.inst:
        raise Forbidden(
            "Consent.organization must be the caller's own institution", expression=["Consent.organization"]
        )
    if not submission.channel.at_institution:
        # Portal and call-centre consents are recorded by the agency's own channels, not at a desk.
        raise Unprocessable(
            f"an institution records consents given at its desk, not by {submission.channel.value}",
            expression=["Consent.extension"],
        )
    await check_targets(runtime, submission.exclusions)
    new = NewVersion(
        patient_key=submission.patient_key,
        policy=submission.policy,
        effective_at=submission.effective_at,
        exclusions=submission.exclusions,
        recorded_by=actor.inst,
        channel=submission.channel,
        signer=submission.signer,
        resource=submission.resource,
        signature=submission.signature,
    )
    return await append_version(session, runtime, settings, new, actor=actor)


def may_read(actor: TokenClaims, row: ConsentVersion) -> bool:
    """A consent record (exclusions and their reasons, the signer's name and phone, the signature) is
    read by the institution that recorded it at its desk and by the agency; the patient reads their
    own through the portal. Nobody else, not even a hub: hubs decide from the replica and the decision
    RPC, which carry no reasons and no signer."""
    return actor.kind is InstitutionKind.AGENCY or row.recorded_by == actor.inst


async def _audit_read(
    session: AsyncSession,
    runtime: Runtime,
    actor: TokenClaims,
    row: ConsentVersion,
    *,
    allowed: bool,
    action: str = "consent-read",
) -> None:
    """The audit record of one version's read (its resource, or with ``action`` its signature image)."""
    await runtime.audit.record(
        session,
        action=action,
        actor=actor,
        outcome="success" if allowed else "deny",
        patient_key=row.patient_key,
        consent_version=row.version,
    )


async def consent_versions(
    session: AsyncSession, runtime: Runtime, actor: TokenClaims, patient_key: str
) -> list[dict[str, Any]]:
    """The patient's Consent versions the caller may read (``may_read``), newest first. Another
    institution gets an empty list, as for a patient with no consent: it cannot tell that a record
    exists (the read is audited, as refused when records were withheld)."""
    rows = await repository.versions(session, patient_key)
    visible = [row for row in rows if may_read(actor, row)]
    await runtime.audit.record(
        session,
        action="consent-read",
        actor=actor,
        outcome="success" if visible or not rows else "deny",
        patient_key=patient_key,
        detail={"versions": len(visible)},
    )
    return [row.resource for row in reversed(visible)]


async def consent_resource(
    session: AsyncSession, runtime: Runtime, actor: TokenClaims, resource_id: str, number: int | None
) -> dict[str, Any] | None:
    """One version (the current one when ``number`` is None), or None when there is no such version
    or the caller may not read it: both answer the same 404."""
    row = await repository.version(session, resource_id, number)
    if row is None:
        return None
    allowed = may_read(actor, row)
    await _audit_read(session, runtime, actor, row, allowed=allowed)
    return row.resource if allowed else None


async def signature(
    session: AsyncSession, runtime: Runtime, actor: TokenClaims, resource_id: str, number: int
) -> ConsentSignature | None:
    """The signature image of one version, for the institution that recorded it and for the agency;
    None (a 404) when there is none or the caller may not read it."""
    row = await repository.version(session, resource_id, number)
    image = await repository.signature(session, row.id) if row is not None else None
    if row is None or image is None:
        return None
    if not may_read(actor, row):
        await _audit_read(session, runtime, actor, row, allowed=False)
        return None
    await _audit_read(session, runtime, actor, row, allowed=True, action="consent-signature-read")
    return image


async def version_views(session: AsyncSession, patient_key: str) -> list[ConsentVersionView]:
    """The patient's versions, newest first, with signer, exclusions and their reasons."""
    rows = await repository.versions(session, patient_key)
    exclusions = await repository.exclusions(session, patient_key)
    signed = await repository.signed_versions(session, [r.id for r in rows])
    by_version: dict[int, list[Exclusion]] = {}
    for e in exclusions:
        by_version.setdefault(e.version, []).append(
            Exclusion(kind=ExclusionKind(e.kind), code=e.code, reason=e.reason)
        )
    return [
        ConsentVersionView(
            resource_id=r.resource_id,
            version=r.version,
            policy=ConsentPolicy(r.policy),
            effective_at=as_utc(r.effective_at),
            recorded_at=as_utc(r.created_at),
            recorded_by=r.recorded_by,
            channel=ConsentChannel(r.channel),
            # Constructed, not validated: the record is what was signed, even if rules changed since.
            signer=Signer.model_construct(
                relationship=SignerRelationship(r.signer_relationship),
                name=r.signer_name,
                contact=r.signer_contact,
            ),
            exclusions=by_version.get(r.version, []),
            has_signature_image=r.id in signed,
        )
        for r in reversed(rows)
    ]


# --- decisions --------------------------------------------------------------------------------------


async def _in_good_standing(runtime: Runtime, code: str) -> bool:
    try:
        validate_institution_code(code)
    except InvalidIdentifierError:
        return False
    return await runtime.registry.in_good_standing(code)


def _aware(value: datetime) -> datetime:
    # decide() compares with stored (aware) times; a caller's naive time is taken as UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


async def check_asker(runtime: Runtime, asker: str | None, query: FlowQuery) -> None:
    """Who may ask for an emergency decision: only the data holder's hub (the request subject's last
    token, which a hub's NATS user can only set to its own slug). An emergency permit is recorded in
    the patient's history as the holder's disclosure; any other hub asking is refused, and nothing is
    recorded. Other purposes record nothing and are answered to any hub (the receiving gateway and
    hub ask about documents another hub holds)."""
    if query.purpose is not Purpose.EMERGENCY:
        return
    try:
        holder_hub = await runtime.registry.hub_of(validate_institution_code(query.holder))
    except InvalidIdentifierError:
        holder_hub = None
    if asker is None or holder_hub != asker:
        raise RefusedMessage("sender-mismatch", "an emergency decision asked by a hub not the holder's")


async def decide_flow(
    session: AsyncSession, runtime: Runtime, query: FlowQuery, actor: TokenClaims | None, via: str
) -> Decision:
    """The consent service is the decision point: party standing comes from the registry, not the caller."""
    holder_ok = await _in_good_standing(runtime, query.holder)
    recipient_ok = await _in_good_standing(runtime, query.recipient)
    query = query.model_copy(
        update={
            "holder_in_good_standing": holder_ok,
            "recipient_in_good_standing": recipient_ok,
            "document_created_at": _aware(query.document_created_at),
            "at": _aware(query.at),
        }
    )
    try:
        patient_key: str | None = validate_patient_key(query.patient_key)
    except InvalidIdentifierError:
        patient_key = None  # not a key (perhaps an RRN by mistake): no history, and never audited as is
    rows = await repository.versions(session, patient_key) if patient_key else []
    decision = decide([consent_state(r) for r in rows], query)
    emergency = query.purpose is Purpose.EMERGENCY
    await runtime.audit.record(
        session,
        action="decide",
        actor=actor,
        outcome="permit" if decision.permit else "deny",
        patient_key=patient_key,
        purpose=query.purpose.value,
        rule=decision.rule.value,
        consent_version=decision.consent_version,
        detail={
            "via": via,
            "holder": query.holder,
            "holder_department": query.holder_department,
            "recipient": query.recipient,
            "justified": bool(query.justification),
        }
        # Break-the-glass is recorded with its justification (의료법 §21-2 exception, audited).
        | ({"justification": query.justification} if emergency else {}),
    )
    if emergency and decision.permit and patient_key is not None and query.justification:
        await runtime.outbox.add(
            session,
            contract.subject(contract.Kind.EMERGENCY_PERMITTED, sender=contract.Role.CONSENT.value),
            EmergencyAccessPermitted(
                patient_key=patient_key,
                holder=query.holder,
                holder_department=query.holder_department,
                recipient=query.recipient,
                justification=query.justification.strip(),
                decided_by=runtime.source.node,
                consent_version=decision.consent_version,
                decided_at=datetime.now(UTC),
            ),
        )
    return decision
