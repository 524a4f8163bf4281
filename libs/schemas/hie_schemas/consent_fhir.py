"""The FHIR R4 Consent every channel records (desk EMR, portal, call centre): one skeleton to fill in."""

from __future__ import annotations

from typing import Any

from hie_schemas.codes import CONSENT_POLICY_SYSTEM
from hie_schemas.identifiers import KRNPI_SYSTEM

CONSENT_SCOPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentscope"
# LOINC 59284-0 "Patient Consent": the category the exchange's Consent resources carry.
CONSENT_CATEGORY = {"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}


def fhir_consent(patient: dict[str, str], organization: str, policy: str) -> dict[str, Any]:
    """An active privacy Consent of ``patient`` (an Identifier: system and value) recorded at the
    institution ``organization`` (its 요양기관 code) with KHIS ``policy``; the caller adds the date,
    the signature and any exclusions."""
    return {
        "resourceType": "Consent",
        "status": "active",
        "scope": {"coding": [{"system": CONSENT_SCOPE_SYSTEM, "code": "patient-privacy"}]},
        "category": [CONSENT_CATEGORY],
        "patient": {"identifier": dict(patient)},
        "organization": [{"identifier": {"system": KRNPI_SYSTEM, "value": organization}}],
        "policyRule": {"coding": [{"system": CONSENT_POLICY_SYSTEM, "code": policy}]},
    }
