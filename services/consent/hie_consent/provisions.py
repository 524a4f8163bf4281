"""Consent exclusions as FHIR deny sub-provisions: read from a submitted Consent, written into the
stored one. The accepted shape is described in hie_consent.fhir."""

from __future__ import annotations

from typing import Any

from hie_consent.schemas import Exclusion, ExclusionKind
from hie_platform.errors import BadRequest, Unprocessable
from hie_schemas import codes
from hie_schemas.identifiers import KRNPI_SYSTEM, InvalidIdentifierError, validate_institution_code

EXCLUSION_REASON_EXTENSION = "https://hie-federation.kr/fhir/StructureDefinition/consent-exclusion-reason"
PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
_EXCLUSION_KEYS = frozenset({"type", "actor", "code", "extension", "id"})


def _reason(sub: dict[str, Any], where: str) -> str:
    reasons = [e for e in sub.get("extension", []) if e.get("url") == EXCLUSION_REASON_EXTENSION]
    text = reasons[0].get("valueString") if len(reasons) == 1 else None
    if not isinstance(text, str) or not text.strip():
        raise Unprocessable(
            f"{where}: each exclusion needs the patient's reason "
            f"(one extension {EXCLUSION_REASON_EXTENSION} with valueString)",
            expression=[f"{where}.extension"],
        )
    if len(text.strip()) > 500:
        raise Unprocessable(f"{where}: the reason exceeds 500 characters", expression=[f"{where}.extension"])
    return text.strip()


_Found = dict[tuple[ExclusionKind, str], Exclusion]


def _add(found: _Found, kind: ExclusionKind, code: str, reason: str, where: str) -> None:
    if (kind, code) in found:
        raise Unprocessable(f"{where}: {kind.value} {code} is excluded twice", expression=[where])
    found[(kind, code)] = Exclusion(kind=kind, code=code, reason=reason)


def _excluded_institutions(sub: dict[str, Any], where: str, reason: str, found: _Found) -> None:
    for actor in sub.get("actor", []):
        identifier = (actor.get("reference") or {}).get("identifier") or {}
        if identifier.get("system") != KRNPI_SYSTEM:
            raise BadRequest(
                f"{where}.actor: an institution identifier ({KRNPI_SYSTEM}) is required",
                expression=[f"{where}.actor"],
            )
        try:
            code = validate_institution_code(str(identifier.get("value")))
        except InvalidIdentifierError as exc:
            raise BadRequest(f"{where}.actor: {exc.reason}", expression=[f"{where}.actor"]) from None
        _add(found, ExclusionKind.INSTITUTION, code, reason, f"{where}.actor")


def _excluded_departments(sub: dict[str, Any], where: str, reason: str, found: _Found) -> None:
    for coding in (c for concept in sub.get("code", []) for c in concept.get("coding", [])):
        if coding.get("system") != codes.HIRA_DEPARTMENT:
            raise BadRequest(
                f"{where}.code: only {codes.HIRA_DEPARTMENT} codes are understood",
                expression=[f"{where}.code"],
            )
        if coding.get("code") not in codes.DEPARTMENTS:
            raise Unprocessable(
                f"{where}.code: unknown department {coding.get('code')!r}", expression=[f"{where}.code"]
            )
        _add(found, ExclusionKind.DEPARTMENT, coding["code"], reason, f"{where}.code")


def _deny_provision(sub: dict[str, Any], where: str, found: _Found) -> None:
    """One deny sub-provision: institutions or departments, with the patient's reason."""
    unsupported = sorted(set(sub) - _EXCLUSION_KEYS)
    if sub.get("type") != "deny" or unsupported:
        detail = f"unsupported elements {unsupported}" if unsupported else "type must be deny"
        raise BadRequest(f"{where}: {detail}", expression=[where])
    if sub.get("actor") and sub.get("code"):
        raise Unprocessable(
            f"{where}: exclude institutions or departments in one sub-provision, not both",
            expression=[where],
        )
    reason = _reason(sub, where)
    _excluded_institutions(sub, where, reason, found)
    _excluded_departments(sub, where, reason, found)
    if not sub.get("actor") and not sub.get("code"):
        raise BadRequest(f"{where}: name an institution (actor) or a department (code)", expression=[where])


def parse(resource: dict[str, Any]) -> tuple[Exclusion, ...]:
    """The exclusions of a Consent's provision: a permit whose sub-provisions each deny institutions
    or departments, with the patient's reason; anything else is refused (see hie_consent.fhir)."""
    provision = resource.get("provision")
    if provision is None:
        return ()
    extra = set(provision) - {"type", "provision", "extension", "id"}
    if extra or provision.get("type", "permit") != "permit":
        raise BadRequest(
            "Consent.provision must be a permit whose exclusions are deny sub-provisions",
            expression=["Consent.provision"],
        )
    found: _Found = {}
    for i, sub in enumerate(provision.get("provision", [])):
        _deny_provision(sub, f"Consent.provision.provision[{i}]", found)
    return tuple(found.values())


def deny(exclusion: Exclusion) -> dict[str, Any]:
    """One exclusion as a deny sub-provision (the shape ``parse`` accepts)."""
    sub: dict[str, Any] = {
        "type": "deny",
        "extension": [{"url": EXCLUSION_REASON_EXTENSION, "valueString": exclusion.reason}],
    }
    if exclusion.kind is ExclusionKind.INSTITUTION:
        identifier = {"system": KRNPI_SYSTEM, "value": exclusion.code}
        role = {"coding": [{"system": PARTICIPATION_TYPE, "code": "IRCP"}]}
        sub["actor"] = [{"role": role, "reference": {"identifier": identifier}}]
    else:
        sub["code"] = [{"coding": [{"system": codes.HIRA_DEPARTMENT, "code": exclusion.code}]}]
    return sub
