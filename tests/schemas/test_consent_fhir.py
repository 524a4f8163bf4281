"""The shared FHIR Consent skeleton is a valid R4 Consent once a channel adds its date."""

from __future__ import annotations

from datetime import UTC, datetime

from hie_schemas.consent import ConsentPolicy
from hie_schemas.consent_fhir import fhir_consent
from hie_schemas.fhir import parse_resource
from hie_schemas.identifiers import KRNPI_SYSTEM, RRN_SYSTEM


def test_the_consent_skeleton_parses_as_r4_with_its_patient_institution_and_policy() -> None:
    patient = {"system": RRN_SYSTEM, "value": "600315-1520418"}
    consent = fhir_consent(patient, "11301001", ConsentPolicy.PARTIAL_CONSENT.value)
    patient["value"] = "changed after the call"  # the resource keeps its own copy
    parsed = parse_resource(consent | {"dateTime": datetime.now(UTC).isoformat()}, "Consent")
    data = parsed.model_dump(mode="json", exclude_none=True)
    assert data["patient"]["identifier"] == {"system": RRN_SYSTEM, "value": "600315-1520418"}
    assert data["organization"][0]["identifier"] == {"system": KRNPI_SYSTEM, "value": "11301001"}
    assert data["policyRule"]["coding"][0]["code"] == "PARTIAL_CONSENT"
    assert data["status"] == "active"
