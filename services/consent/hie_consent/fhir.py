"""The FHIR R4 Consent this service accepts and returns (IHE PCF style, KHIS policy codes).

Accepted (everything else in the resource is kept as sent, except as noted):

- ``status`` = ``active``. A withdrawal is an active Consent record whose policy is a withdrawal.
- ``patient.identifier``: ``{system: RRN_SYSTEM | PATIENT_KEY_SYSTEM, value}``. The RRN is turned into
  the patient key at once; the stored and returned resource carries only the key (``patient.display``
  and the narrative ``text`` are dropped: names live only inside clinical documents).
- ``policyRule.coding``: a coding with system ``urn:oid:1.2.410.100110.40.2.2``, code a ConsentPolicy.
- ``dateTime``: when the consent takes effect, with time and timezone; absent means now.
- ``organization[0].identifier``: ``{system: KRNPI_SYSTEM, value: 요양기관기호}``, the recording institution.
- Exclusions (PARTIAL_CONSENT / PARTIAL_WITHDRAWAL only) as ``provision.provision[]`` with ``type: deny``:
  ``actor[].reference.identifier`` (KRNPI_SYSTEM) excludes institutions, ``code[].coding[]`` with the
  HIRA department system excludes departments; one sub-provision names institutions or departments, not
  both (FHIR would read both as "this department at this institution", which KHIS does not offer). Each
  sub-provision carries the patient's reason as the extension ``EXCLUSION_REASON_EXTENSION``
  (``valueString``). Any other restriction is refused rather than silently dropped, since dropping it
  would change what the patient agreed to.
- Channel: the extension ``CHANNEL_EXTENSION`` with ``valueCode`` (a ConsentChannel); ``paper`` when absent.
  An extension and not ``category``: R4 makes ``category`` the kind of consent (e.g. LOINC 59284-0),
  which says nothing about how it was collected.
- Signer relationship: the extension ``SIGNER_EXTENSION`` with ``valueCode`` (a SignerRelationship); when
  absent, ``performer[0]`` referring to a RelatedPerson means ``other`` (``self`` when its relationship is
  v3 ``ONESELF``), anything else ``self``. The signer's name and contact come from the contained resource
  ``performer[0]`` points to (``#id``): ``name[0]`` and ``telecom[0].value``; required unless the patient
  signed.
- The signature image (required for every desk channel): ``sourceAttachment`` with ``contentType``
  image/png or image/jpeg and the image inline as ``data``. It is kept beside the resource; the stored
  resource refers to it by ``url`` with its ``size`` and ``hash`` instead of repeating the bytes.

An RRN anywhere in the resource other than an identifier is refused, and error messages are redacted,
so the number is never stored, logged or echoed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from hie_consent import provisions
from hie_consent.schemas import ConsentChannel, Exclusion, ExclusionKind, Signer, SignerRelationship
from hie_consent.signature import SignatureImage, signature_image
from hie_platform.errors import BadRequest, Unprocessable
from hie_schemas import codes
from hie_schemas.consent import ConsentPolicy
from hie_schemas.consent_fhir import fhir_consent
from hie_schemas.fhir import FhirParseError, parse_resource, to_json_dict
from hie_schemas.identifiers import (
    KRNPI_SYSTEM,
    PATIENT_KEY_SYSTEM,
    RRN_SYSTEM,
    InvalidIdentifierError,
    patient_key_from_identifier,
    patient_key_from_rrn,
    validate_institution_code,
)

CHANNEL_EXTENSION = "https://hie-federation.kr/fhir/StructureDefinition/consent-channel"
SIGNER_EXTENSION = "https://hie-federation.kr/fhir/StructureDefinition/consent-signer-relationship"
ROLE_CODE = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"
PARTIAL_POLICIES = frozenset({ConsentPolicy.PARTIAL_CONSENT, ConsentPolicy.PARTIAL_WITHDRAWAL})
_RRN_SHAPE = re.compile(r"\d{6}-?\d{7}")


@dataclass(frozen=True)
class ConsentSubmission:
    """What a posted Consent says, with the RRN already replaced by the patient key."""

    patient_key: str
    policy: ConsentPolicy
    effective_at: datetime | None
    organization: str
    exclusions: tuple[Exclusion, ...]
    channel: ConsentChannel
    signer: Signer
    signature: SignatureImage | None
    resource: dict[str, Any]

    @property
    def excluded_institutions(self) -> tuple[str, ...]:
        return tuple(e.code for e in self.exclusions if e.kind is ExclusionKind.INSTITUTION)

    @property
    def excluded_departments(self) -> tuple[str, ...]:
        return tuple(e.code for e in self.exclusions if e.kind is ExclusionKind.DEPARTMENT)


def redact(text: str, secrets: list[str]) -> str:
    """Remove RRNs from a message that may quote the input (pydantic errors do)."""
    for value in secrets:
        for form in {value, value.replace("-", "")}:
            if form:
                text = text.replace(form, "<redacted>")
    return _RRN_SHAPE.sub("<redacted>", text)


def _rrn_values(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [str(node["value"])] if node.get("system") == RRN_SYSTEM and "value" in node else []
        return found + [v for child in node.values() for v in _rrn_values(child)]
    if isinstance(node, list):
        return [v for child in node for v in _rrn_values(child)]
    return []


def _pseudonymize(node: Any, secret: bytes) -> Any:
    """Replace every RRN identifier (the patient's or a signer's) by the matching patient key."""
    if isinstance(node, dict):
        if node.get("system") == RRN_SYSTEM:
            try:
                key = patient_key_from_rrn(str(node.get("value", "")), secret)
            except InvalidIdentifierError as exc:
                raise BadRequest(f"invalid identifier: {exc.reason}") from None
            return {**node, "system": PATIENT_KEY_SYSTEM, "value": key}
        return {k: _pseudonymize(v, secret) for k, v in node.items()}
    if isinstance(node, list):
        return [_pseudonymize(v, secret) for v in node]
    return node


def _extension_code(resource: dict[str, Any], url: str) -> str | None:
    for ext in resource.get("extension", []):
        if ext.get("url") == url:
            code = ext.get("valueCode") or (ext.get("valueCoding") or {}).get("code")
            if not isinstance(code, str):
                raise BadRequest(f"extension {url} needs a valueCode", expression=["Consent.extension"])
            return code
    return None


def _patient_key(resource: dict[str, Any], secret: bytes) -> str:
    identifier = (resource.get("patient") or {}).get("identifier") or {}
    system, value = identifier.get("system"), identifier.get("value")
    if not system or not value:
        raise BadRequest(
            "Consent.patient.identifier (system and value) is required",
            expression=["Consent.patient.identifier"],
        )
    try:
        return patient_key_from_identifier(system, value, secret)
    except InvalidIdentifierError as exc:
        raise BadRequest(
            f"Consent.patient.identifier: {exc}", expression=["Consent.patient.identifier"]
        ) from None


def _policy(resource: dict[str, Any]) -> ConsentPolicy:
    for coding in (resource.get("policyRule") or {}).get("coding", []):
        if coding.get("system") == codes.CONSENT_POLICY_SYSTEM:
            try:
                return ConsentPolicy(coding.get("code"))
            except ValueError:
                raise BadRequest(
                    f"unknown consent policy code {coding.get('code')!r}", expression=["Consent.policyRule"]
                ) from None
    raise BadRequest(
        f"Consent.policyRule needs a coding from {codes.CONSENT_POLICY_SYSTEM}",
        expression=["Consent.policyRule"],
    )


def _effective_at(model: Any) -> datetime | None:
    value = model.dateTime
    if value is None:
        return None
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise BadRequest("Consent.dateTime needs a time and a timezone", expression=["Consent.dateTime"])
    return value


def _organization(resource: dict[str, Any]) -> str:
    organizations = resource.get("organization") or []
    identifier = (organizations[0].get("identifier") or {}) if organizations else {}
    if identifier.get("system") != KRNPI_SYSTEM or not identifier.get("value"):
        raise BadRequest(
            f"Consent.organization[0].identifier with system {KRNPI_SYSTEM} is required",
            expression=["Consent.organization"],
        )
    try:
        return validate_institution_code(identifier["value"])
    except InvalidIdentifierError as exc:
        raise BadRequest(f"Consent.organization: {exc.reason}", expression=["Consent.organization"]) from None


def _contained_signer(resource: dict[str, Any]) -> dict[str, Any] | None:
    performers = resource.get("performer") or []
    reference = str((performers[0] if performers else {}).get("reference", ""))
    if not reference.startswith("#"):
        return None
    for contained in resource.get("contained", []):
        if contained.get("id") == reference[1:]:
            found: dict[str, Any] = contained
            return found
    raise BadRequest(
        "Consent.performer[0] refers to a contained resource that is not there",
        expression=["Consent.performer"],
    )


def _person_name(person: dict[str, Any]) -> str | None:
    names = person.get("name") or []
    if not names:
        return None
    name = names[0]
    text = name.get("text") or " ".join([*name.get("family", "").split(), *name.get("given", [])])
    return str(text).strip() or None


def _relationship(resource: dict[str, Any], person: dict[str, Any] | None) -> SignerRelationship:
    code = _extension_code(resource, SIGNER_EXTENSION)
    if code is not None:
        try:
            return SignerRelationship(code)
        except ValueError:
            raise BadRequest(
                f"unknown signer relationship {code!r}", expression=["Consent.extension"]
            ) from None
    performers = resource.get("performer") or []
    reference = performers[0] if performers else {}
    related = (person or {}).get("resourceType") == "RelatedPerson"
    if related:
        roles = {
            c.get("code")
            for concept in (person or {}).get("relationship", [])
            for c in concept.get("coding", [])
            if c.get("system") == ROLE_CODE
        }
        return SignerRelationship.SELF if "ONESELF" in roles else SignerRelationship.OTHER
    if reference.get("type") == "RelatedPerson" or str(reference.get("reference", "")).startswith(
        "RelatedPerson/"
    ):
        return SignerRelationship.OTHER
    return SignerRelationship.SELF


def _signer(resource: dict[str, Any]) -> Signer:
    person = _contained_signer(resource)
    relationship = _relationship(resource, person)
    telecom = (person or {}).get("telecom") or []
    try:
        return Signer(
            relationship=relationship,
            name=_person_name(person) if person else None,
            contact=telecom[0].get("value") if telecom else None,
        )
    except ValidationError as exc:
        message = exc.errors(include_input=False)[0].get("msg", "invalid signer")
        raise Unprocessable(
            f"the signer: {message.removeprefix('Value error, ')}", expression=["Consent.performer"]
        ) from None


def _channel(resource: dict[str, Any]) -> ConsentChannel:
    code = _extension_code(resource, CHANNEL_EXTENSION)
    if code is None:
        return ConsentChannel.PAPER
    try:
        return ConsentChannel(code)
    except ValueError:
        raise BadRequest(f"unknown consent channel {code!r}", expression=["Consent.extension"]) from None


def parse_consent(raw: Any, secret: bytes, max_signature_bytes: int) -> ConsentSubmission:
    """Validate a posted Consent and read what the rule needs; raise 4xx without quoting an RRN."""
    rrns = _rrn_values(raw)
    try:
        model = parse_resource(raw, "Consent")
    except FhirParseError as exc:
        raise BadRequest(f"not a valid R4 Consent: {redact(str(exc), rrns)}") from None
    resource = to_json_dict(model)
    if resource.get("status") != "active":
        raise Unprocessable(
            "only active Consent records are accepted; withdraw with a withdrawal policy",
            expression=["Consent.status"],
        )
    patient_key = _patient_key(resource, secret)
    policy = _policy(resource)
    exclusions = provisions.parse(resource)
    check_exclusions(policy, exclusions)
    channel = _channel(resource)
    signature = (
        signature_image(resource.get("sourceAttachment"), max_signature_bytes)
        if channel.at_institution
        else None
    )
    kept = {k: v for k, v in resource.items() if k not in ("text", "sourceAttachment")}
    stored = _pseudonymize(kept, secret)
    stored["patient"] = {"identifier": {"system": PATIENT_KEY_SYSTEM, "value": patient_key}}
    text = json.dumps(stored, ensure_ascii=False)
    if any(form and form in text for value in rrns for form in {value, value.replace("-", "")}):
        raise BadRequest("the resident registration number may appear only as an identifier")
    return ConsentSubmission(
        patient_key=patient_key,
        policy=policy,
        effective_at=_effective_at(model),
        organization=_organization(resource),
        exclusions=exclusions,
        channel=channel,
        signer=_signer(resource),
        signature=signature,
        resource=stored,
    )


def check_exclusions(policy: ConsentPolicy, exclusions: tuple[Exclusion, ...]) -> None:
    """Partial policies name at least one exclusion; entire ones none."""
    if policy in PARTIAL_POLICIES and not exclusions:
        raise Unprocessable(
            f"{policy.value} needs at least one excluded institution or department",
            expression=["Consent.provision"],
        )
    if policy not in PARTIAL_POLICIES and exclusions:
        raise Unprocessable(f"{policy.value} takes no exclusions", expression=["Consent.provision"])


def stored_resource(
    resource: dict[str, Any],
    resource_id: str,
    version: int,
    effective_at: datetime,
    recorded_at: datetime,
    signature: SignatureImage | None = None,
    signature_url: str | None = None,
) -> dict[str, Any]:
    """The Consent as it is kept and returned: our id and version, the effective time always present,
    and the signature image by reference (it is kept beside the resource)."""
    stored = {
        **resource,
        "id": resource_id,
        "meta": {"versionId": str(version), "lastUpdated": recorded_at.isoformat()},
        "dateTime": effective_at.isoformat(),
    }
    if signature is not None:
        stored["sourceAttachment"] = {
            "contentType": signature.content_type,
            "url": signature_url,
            "size": len(signature.data),
            "hash": signature.fhir_hash,
            "title": "signature",
        }
    return stored


def build_consent(
    patient_key: str,
    policy: ConsentPolicy,
    organization: str,
    channel: ConsentChannel,
    signer: Signer,
    exclusions: tuple[Exclusion, ...],
) -> dict[str, Any]:
    """The FHIR Consent of a version recorded by the portal or the call centre (no desk sent one)."""
    patient = {"system": PATIENT_KEY_SYSTEM, "value": patient_key}
    resource = fhir_consent(patient, organization, policy.value)
    resource["extension"] = [
        {"url": CHANNEL_EXTENSION, "valueCode": channel.value},
        {"url": SIGNER_EXTENSION, "valueCode": signer.relationship.value},
    ]
    if signer.name or signer.contact:
        person: dict[str, Any] = {
            "resourceType": "RelatedPerson",
            "id": "signer",
            "patient": {"identifier": {"system": PATIENT_KEY_SYSTEM, "value": patient_key}},
        }
        if signer.name:
            person["name"] = [{"text": signer.name}]
        if signer.contact:
            person["telecom"] = [{"system": "phone", "value": signer.contact}]
        resource["contained"] = [person]
        resource["performer"] = [{"reference": "#signer"}]
    if exclusions:
        resource["provision"] = {"type": "permit", "provision": [provisions.deny(e) for e in exclusions]}
    return resource


def searchset(base_url: str, resources: list[dict[str, Any]]) -> dict[str, Any]:
    """A searchset Bundle; no self link, since the query may carry an RRN."""
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "entry": [
            {
                "fullUrl": f"{base_url}/fhir/Consent/{r['id']}/_history/{r['meta']['versionId']}",
                "resource": r,
                "search": {"mode": "match"},
            }
            for r in resources
        ],
    }
