"""Who reads a patient's consent record (issue 12, point 4): the institution that recorded it at its
desk, the patient on the portal, and the agency. Another clinic, the clinic the patient excluded and a
hub find nothing: an empty searchset and the 404 of an unknown id, so that none of them learns a record
exists, and none ever sees the exclusion reasons, the signer's name or phone, or the signature."""

from __future__ import annotations

import base64
import json
import sqlite3
import struct
import uuid
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from attacks_support import (
    AGENCY,
    SEVERANCE,
    SEVERANCE_CLINIC,
    SEVERANCE_CLINIC_2,
    SNUBH,
    SNUBH_CLINIC,
    AttackFederation,
    new_rrn,
    refused,
)

from hie_schemas import codes
from hie_schemas.identifiers import KRNPI_SYSTEM, PATIENT_KEY_SYSTEM, RRN_SYSTEM, patient_key_from_rrn

EXT = "https://hie-federation.kr/fhir/StructureDefinition"
REASON = "정신과 진료 기록 비공개 희망 (attack-test reason)"
SIGNER_NAME = "김보호자"
SIGNER_PHONE = "010-9876-5432"
# Institutions that recorded nothing for this patient: another clinic of the recording clinic's hub,
# the clinic the patient excluded, and the two hub hospitals (a hub decides from its replica).
OUTSIDERS = {
    "another clinic": SEVERANCE_CLINIC_2,
    "the excluded clinic": SNUBH_CLINIC,
    "the recording clinic's hub": SEVERANCE,
    "another hub": SNUBH,
}
SECRETS = (REASON, SIGNER_NAME, SIGNER_PHONE)


def _png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00\x00"))
        + chunk(b"IEND", b"")
    )


SIGNATURE = _png()


def _desk_consent(rrn: str, policy: str, excluded: str | None = None) -> dict[str, Any]:
    """What the recording clinic's EMR sends: signed by the patient's legal representative."""
    resource: dict[str, Any] = {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"identifier": {"system": RRN_SYSTEM, "value": rrn}},
        "dateTime": datetime.now(UTC).isoformat(),
        "organization": [{"identifier": {"system": KRNPI_SYSTEM, "value": SEVERANCE_CLINIC}}],
        "policyRule": {"coding": [{"system": codes.CONSENT_POLICY_SYSTEM, "code": policy}]},
        "extension": [
            {"url": f"{EXT}/consent-channel", "valueCode": "sign-pad"},
            {"url": f"{EXT}/consent-signer-relationship", "valueCode": "legal-representative"},
        ],
        "contained": [
            {
                "resourceType": "RelatedPerson",
                "id": "signer",
                "patient": {"identifier": {"system": RRN_SYSTEM, "value": rrn}},
                "name": [{"text": SIGNER_NAME}],
                "telecom": [{"system": "phone", "value": SIGNER_PHONE}],
            }
        ],
        "performer": [{"reference": "#signer"}],
        "sourceAttachment": {"contentType": "image/png", "data": base64.b64encode(SIGNATURE).decode()},
    }
    if excluded is not None:
        actor = {
            "role": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}
                ]
            },
            "reference": {"identifier": {"system": KRNPI_SYSTEM, "value": excluded}},
        }
        deny = {
            "type": "deny",
            "extension": [{"url": f"{EXT}/consent-exclusion-reason", "valueString": REASON}],
        }
        resource["provision"] = {"type": "permit", "provision": [deny | {"actor": [actor]}]}
    return resource


@dataclass(frozen=True)
class Recorded:
    rrn: str
    key: str
    resource_id: str


def _auth(fed: AttackFederation, client: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {fed.token(client)}"}


@pytest.fixture(scope="module")
def recorded(attack_federation: AttackFederation) -> Recorded:
    """A consent and then a partial withdrawal excluding SNUBH_CLINIC, both at SEVERANCE_CLINIC's desk."""
    fed = attack_federation
    rrn = new_rrn()
    headers = _auth(fed, SEVERANCE_CLINIC) | {"Content-Type": "application/fhir+json"}
    with fed.http("consent") as http:
        for body in (
            _desk_consent(rrn, "ENTIRE_CONSENT"),
            _desk_consent(rrn, "PARTIAL_WITHDRAWAL", SNUBH_CLINIC),
        ):
            response = http.post("/fhir/Consent", json=body, headers=headers)
            assert response.status_code == 201, response.text
    key = patient_key_from_rrn(rrn, fed.services["consent"].settings.patient_key_bytes)
    return Recorded(rrn, key, response.json()["id"])


def _reads(record: Recorded) -> dict[str, tuple[str, dict[str, str]]]:
    """Every route that returns a Consent or a part of it: name -> (path, query)."""
    base = f"/fhir/Consent/{record.resource_id}"
    return {
        "search by RRN": ("/fhir/Consent", {"patient.identifier": f"{RRN_SYSTEM}|{record.rrn}"}),
        "search by key": ("/fhir/Consent", {"patient.identifier": f"{PATIENT_KEY_SYSTEM}|{record.key}"}),
        "read": (base, {}),
        "version 1": (f"{base}/_history/1", {}),
        "version 2": (f"{base}/_history/2", {}),
        "signature": (f"{base}/_history/2/signature", {}),
    }


def test_the_recording_clinic_and_the_agency_read_the_record(
    attack_federation: AttackFederation, recorded: Recorded
) -> None:
    fed = attack_federation
    with fed.http("consent") as http:
        for client in (SEVERANCE_CLINIC, AGENCY):
            for name, (path, params) in _reads(recorded).items():
                response = http.get(path, params=params, headers=_auth(fed, client))
                assert response.status_code == 200, (client, name, response.text)
                if name == "signature":
                    assert response.content == SIGNATURE
                elif name.startswith("search"):
                    assert response.json()["total"] == 2, (client, name)
                    assert all(s in response.text for s in (REASON, SIGNER_NAME, SIGNER_PHONE)), (
                        client,
                        name,
                    )
        records = http.get(
            "/consent-records",
            params={"patient.identifier": f"{PATIENT_KEY_SYSTEM}|{recorded.key}"},
            headers=_auth(fed, AGENCY),
        )
    assert records.status_code == 200, records.text
    assert [e["reason"] for e in records.json()[0]["exclusions"]] == [REASON]


def test_the_patient_reads_their_own_record_on_the_portal(
    attack_federation: AttackFederation, recorded: Recorded
) -> None:
    with attack_federation.http("consent") as http:
        opened = http.post(
            "/portal/identity/challenges", json={"rrn": recorded.rrn, "phone": "010-1234-5678"}
        )
        assert opened.status_code == 201, opened.text
        challenge = opened.json()
        verified = http.post(
            f"/portal/identity/challenges/{challenge['challenge_id']}/verify",
            json={"code": challenge["dev_code"]},
        )
        assert verified.status_code == 200, verified.text
        session = {"Authorization": f"Bearer {verified.json()['access_token']}"}
        mine = http.get("/portal/me/consents", headers=session)
    assert mine.status_code == 200, mine.text
    newest = mine.json()[0]
    assert newest["exclusions"] == [{"kind": "institution", "code": SNUBH_CLINIC, "reason": REASON}]
    assert newest["signer"]["name"] == SIGNER_NAME


@pytest.mark.parametrize("who", list(OUTSIDERS))
def test_an_institution_that_did_not_record_it_finds_nothing(
    attack_federation: AttackFederation, recorded: Recorded, who: str
) -> None:
    fed = attack_federation
    client = OUTSIDERS[who]
    unknown = Recorded(new_rrn(), "0" * 64, str(uuid.uuid4()))
    with fed.http("consent") as http:
        for name, (path, params) in _reads(recorded).items():
            response = http.get(path, params=params, headers=_auth(fed, client))
            assert not any(s in response.text for s in SECRETS), (who, name, response.text[:300])
            assert recorded.key not in response.text, (who, name)
            # Exactly what a patient without any record, or an id that does not exist, answers.
            other_path, other_params = _reads(unknown)[name]
            control = http.get(other_path, params=other_params, headers=_auth(fed, client))
            if name.startswith("search"):
                assert response.status_code == 200, (who, name, response.text)
                assert (
                    response.json()
                    == control.json()
                    == {"resourceType": "Bundle", "type": "searchset", "total": 0, "entry": []}
                )
            else:
                assert refused(response, 404) == refused(control, 404), (who, name)
    # The refused reads are audited (who asked about which patient), for the agency and the patient.
    reads = [
        r
        for r in _consent_audit(fed)
        if r["action"] == "consent-read"
        and r["patient_key"] == recorded.key
        and r["actor_institution"] == client
    ]
    assert len(reads) >= 5, reads
    assert {r["outcome"] for r in reads} == {"deny"}


def _consent_audit(fed: AttackFederation) -> list[dict[str, Any]]:
    with sqlite3.connect(fed.data / "consent.db") as db:
        rows = db.execute("SELECT record FROM audit_log ORDER BY sequence").fetchall()
    return [json.loads(row[0]) if isinstance(row[0], str) else row[0] for row in rows]


def _flow(record: Recorded, holder: str, recipient: str) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat()
    return {
        "patient_key": record.key,
        "holder": holder,
        "recipient": recipient,
        "document_created_at": now,
        "at": now,
    }


def test_an_outsider_cannot_learn_the_exclusions_from_the_decision_point_or_the_agency_views(
    attack_federation: AttackFederation, recorded: Recorded
) -> None:
    """A decision names its rule ("deny-recipient-excluded"): only a party to the flow, or the agency,
    asks for one; the agency's views of the record and of the exchanges stay the agency's."""
    fed = attack_federation
    by_key = {"patient.identifier": f"{PATIENT_KEY_SYSTEM}|{recorded.key}"}
    with fed.http("consent") as http:
        for client, holder, recipient in (
            (SEVERANCE_CLINIC_2, SEVERANCE_CLINIC, SNUBH_CLINIC),  # is SNUBH_CLINIC excluded?
            (SNUBH_CLINIC, SEVERANCE_CLINIC, SEVERANCE_CLINIC_2),
            (SNUBH, SEVERANCE_CLINIC, SNUBH_CLINIC),  # a hub asks through the replica and the RPC
        ):
            decision = http.post(
                "/decisions", json={"query": _flow(recorded, holder, recipient)}, headers=_auth(fed, client)
            )
            refused(decision, 403)
            assert "deny" not in decision.text
            for path in ("/consent-records", "/exchange-history"):
                refused(http.get(path, params=by_key, headers=_auth(fed, client)), 403)
        # A party to the flow is answered (the control): the excluded clinic learns it is refused.
        party = http.post(
            "/decisions",
            json={"query": _flow(recorded, SEVERANCE_CLINIC, SNUBH_CLINIC)},
            headers=_auth(fed, SNUBH_CLINIC),
        )
    assert party.status_code == 200, party.text
    assert party.json()["decision"]["rule"] == "deny-recipient-excluded"
