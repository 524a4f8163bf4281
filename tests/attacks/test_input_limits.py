"""Input that costs more than it says (issue 12, points 10 and 11).

Point 10: a body with 200,000 unknown keys held the consent service's event loop for seconds (one
validation issue built per key); JSON nested 100,000 deep or a 100,000-digit number answered 500
(RecursionError, CPython's 4,300-digit int limit). The shared HTTP shell now parses request JSON within
limits before any route sees it (hie_platform/json_limits.py) and lists at most 20 validation issues.

Point 11: an RRN written in Arabic-Indic or fullwidth digits passed ``\\d`` and ``int()`` and gave a
patient key of its own, splitting one patient in two. Every entry point refuses it with 400.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from typing import Any

import httpx
import pytest
from attacks_support import (
    AGENCY,
    SEVERANCE_CLINIC,
    SEVERANCE_HUB,
    AttackFederation,
    LogTap,
    correlation,
    new_rrn,
    refused,
)

from hie_schemas.codes import DocumentType
from hie_schemas.documents.builders import build_document, build_submission
from hie_schemas.identifiers import KRNPI_SYSTEM, RRN_SYSTEM

# A JSON route of each service (the limits apply before routing, so every route is covered).
JSON_ROUTES = {
    "registry": ("/institutions", AGENCY),
    "consent": ("/fhir/Consent", SEVERANCE_CLINIC),
    "portal": ("/portal/identity/challenges", None),  # the consent service, unauthenticated
    SEVERANCE_HUB: ("/fhir", SEVERANCE_CLINIC),
}
SERVICE_OF = {"portal": "consent"}
DEEP = 100_000
HOSTILE = {
    "nested arrays": b"[" * DEEP + b"]" * DEEP,
    "nested objects": b'{"a":' * DEEP + b"1" + b"}" * DEEP,
    "nested just past the limit": b'{"resourceType": "Bundle", "x": ' + b"[" * 64 + b"]" * 64 + b"}",
    "100,000-digit integer": b'{"resourceType": "Bundle", "total": ' + b"9" * 100_000 + b"}",
    "100,000-digit decimal": b'{"resourceType": "Bundle", "x": 0.' + b"1" * 100_000 + b"}",
    "100,000-digit exponent": b'{"resourceType": "Bundle", "x": 1e' + b"1" * 100_000 + b"}",
    "a number in an array": b'{"resourceType": "Bundle", "x": [1, 2, ' + b"7" * 5000 + b"]}",
}


def _headers(fed: AttackFederation, client: str | None, cid: str) -> dict[str, str]:
    headers = {"Content-Type": "application/fhir+json", "X-Correlation-ID": cid}
    if client is not None:
        headers["Authorization"] = f"Bearer {fed.token(client)}"
    return headers


def _unknown_keys(count: int) -> bytes:
    keys = {f"k{i}": 0 for i in range(count)}
    return json.dumps({"rrn": new_rrn(), "phone": "010-1234-5678", **keys}).encode()


class LoopProbe:
    """Asks the consent service's /healthz in a loop while an attack runs: the slowest answer is how
    long its event loop was held (printed, never asserted: no test asserts a time)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.slowest = 0.0
        self.answers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as http:
            while not self._stop.is_set():
                started = time.perf_counter()
                assert http.get("/healthz").status_code == 200
                self.slowest = max(self.slowest, time.perf_counter() - started)
                self.answers += 1
                time.sleep(0.005)

    def __enter__(self) -> LoopProbe:
        self._thread.start()
        while self.answers == 0:
            time.sleep(0.01)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(60)


def test_a_body_with_200000_unknown_keys_is_refused_at_once_with_a_short_outcome(
    attack_federation: AttackFederation, log_tap: LogTap
) -> None:
    fed = attack_federation
    body = _unknown_keys(200_000)
    cid = correlation()
    with LoopProbe(fed.url("consent")) as probe, fed.http("consent") as http:
        started = time.perf_counter()
        response = http.post("/portal/identity/challenges", content=body, headers=_headers(fed, None, cid))
        took = time.perf_counter() - started
    print(  # before the assertions, so that a run on the old code shows it too
        f"\n200,000 unknown keys ({len(body) / 1e6:.1f} MB): {response.status_code} in {took * 1000:.0f} ms, "
        f"{len(response.content)} bytes, {len(response.json().get('issue', []))} issues; the slowest "
        f"/healthz meanwhile took {probe.slowest * 1000:.0f} ms ({probe.answers} answers)"
    )
    diagnostics = refused(response, 400)
    assert "more than 1000 members" in diagnostics
    assert len(response.json()["issue"]) == 1
    assert len(response.content) < 1000
    log_tap.refusal(cid, 400)


def test_validation_issues_are_capped_at_20_and_the_rest_counted(attack_federation: AttackFederation) -> None:
    """Under the member limit, every unknown key is still a validation error: 20 are listed."""
    fed = attack_federation
    with fed.http("consent") as http:
        response = http.post(
            "/portal/identity/challenges",
            content=_unknown_keys(900),
            headers=_headers(fed, None, correlation()),
        )
    refused(response, 400)
    issues = response.json()["issue"]
    assert len(issues) == 21
    assert issues[-1]["diagnostics"] == "and 880 more issues not listed"
    assert all(i["code"] == "invalid" for i in issues)


@pytest.mark.parametrize("attack", list(HOSTILE))
@pytest.mark.parametrize("route", list(JSON_ROUTES))
def test_deep_nesting_and_huge_numbers_are_refused_with_400(
    attack_federation: AttackFederation, log_tap: LogTap, route: str, attack: str
) -> None:
    fed = attack_federation
    path, client = JSON_ROUTES[route]
    cid = correlation()
    with fed.http(SERVICE_OF.get(route, route)) as http:
        response = http.post(path, content=HOSTILE[attack], headers=_headers(fed, client, cid))
        diagnostics = refused(response, 400)
        assert "nested deeper than 64" in diagnostics or "longer than 64 characters" in diagnostics
        assert http.get("/healthz").status_code == 200  # and the service goes on
    line = log_tap.refusal(cid, 400)
    assert line["code"] == "invalid"


@pytest.mark.parametrize(
    ("service", "path", "client"),
    [
        (SEVERANCE_HUB, "/fhir/DocumentReference", SEVERANCE_CLINIC),
        (SEVERANCE_HUB, "/fhir/Task", SEVERANCE_CLINIC),
        ("registry", "/fhir/Organization", AGENCY),
    ],
)
def test_a_5000_digit_count_in_the_query_is_refused_with_400(
    attack_federation: AttackFederation, service: str, path: str, client: str
) -> None:
    """Past CPython's 4,300-digit int limit, ``int()`` raises ValueError wherever a route reads a number."""
    fed = attack_federation
    params = {"_count": "9" * 5000, "patient.identifier": f"{RRN_SYSTEM}|{new_rrn()}"}
    with fed.http(service) as http:
        response = http.get(path, params=params, headers=_headers(fed, client, correlation()))
    assert "too many digits" in refused(response, 400)


def test_json_within_the_limits_still_reaches_the_route(attack_federation: AttackFederation) -> None:
    """The control: a real ITI-65 publication (about 12 deep) and a number of 19 digits pass."""
    fed = attack_federation
    rrn = new_rrn()
    doc = build_document(
        DocumentType.CARE_RECORD_SUMMARY, author_code=SEVERANCE_CLINIC, author_name="clinic", patient_rrn=rrn
    )
    with fed.http(SEVERANCE_HUB) as http:
        response = http.post(
            "/fhir",
            json=build_submission([doc], author_code=SEVERANCE_CLINIC, patient_rrn=rrn),
            headers=_headers(fed, SEVERANCE_CLINIC, correlation()),
        )
    assert response.status_code == 200, response.text
    with fed.http("consent") as http:
        body = b'{"rrn": "' + new_rrn().encode() + b'", "phone": "010-1234-5678", "x": 1234567890123456789}'
        response = http.post(
            "/portal/identity/challenges", content=body, headers=_headers(fed, None, correlation())
        )
    assert "x: Extra inputs are not permitted" in refused(response, 400)


# --- point 11: one patient, one key ----------------------------------------------------------------

ARABIC_INDIC = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")
FULLWIDTH = str.maketrans("0123456789-", "０１２３４５６７８９－")


def _spellings(rrn: str) -> dict[str, str]:
    return {
        "arabic-indic": rrn.translate(ARABIC_INDIC),
        "fullwidth": rrn.translate(FULLWIDTH),
        "one fullwidth digit": rrn[:-1] + rrn[-1].translate(FULLWIDTH),
    }


def _split_key(spelling: str, secret: bytes) -> str:
    """The key the old code derived from a Unicode spelling: HMAC over the digits as written."""
    digits = "".join(c for c in spelling if c.isdecimal())
    return hmac.new(secret, digits.encode(), hashlib.sha256).hexdigest()


def _desk_consent(rrn: str) -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "status": "active",
        "patient": {"identifier": {"system": RRN_SYSTEM, "value": rrn}},
        "organization": [{"identifier": {"system": KRNPI_SYSTEM, "value": SEVERANCE_CLINIC}}],
        "policyRule": {"coding": [{"system": "urn:oid:1.2.410.100110.40.2.2", "code": "ENTIRE_CONSENT"}]},
        "scope": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
    }


def _entry_points(fed: AttackFederation, rrn: str) -> dict[str, httpx.Response]:
    """Every place that takes an RRN, given ``rrn``."""
    clinic = _headers(fed, SEVERANCE_CLINIC, correlation())
    search = {"patient.identifier": f"{RRN_SYSTEM}|{rrn}"}
    answers: dict[str, httpx.Response] = {}
    with fed.http(SEVERANCE_HUB) as hub:
        answers["hub search"] = hub.get("/fhir/DocumentReference", params=search, headers=clinic)
        doc = build_document(
            DocumentType.CARE_RECORD_SUMMARY,
            author_code=SEVERANCE_CLINIC,
            author_name="clinic",
            patient_rrn=rrn,
        )
        submission = build_submission([doc], author_code=SEVERANCE_CLINIC, patient_rrn=rrn)
        answers["hub ITI-65"] = hub.post("/fhir", json=submission, headers=clinic)
    with fed.http("consent") as consent:
        answers["consent search"] = consent.get("/fhir/Consent", params=search, headers=clinic)
        answers["consent desk"] = consent.post("/fhir/Consent", json=_desk_consent(rrn), headers=clinic)
        portal = {"rrn": rrn, "phone": "010-1234-5678"}
        answers["portal sign-in"] = consent.post("/portal/identity/challenges", json=portal)
        call = portal | {"policy": "ENTIRE_CONSENT"}
        agent = _headers(fed, AGENCY, correlation())
        answers["call centre"] = consent.post("/call-centre/requests", json=call, headers=agent)
    return answers


def test_an_rrn_in_unicode_digits_is_refused_everywhere_and_never_keyed(
    attack_federation: AttackFederation,
) -> None:
    fed = attack_federation
    rrn = new_rrn()
    secret = fed.services["consent"].settings.patient_key_bytes
    assert secret == fed.services[SEVERANCE_HUB].settings.patient_key_bytes
    for name, spelling in _spellings(rrn).items():
        for entry, response in _entry_points(fed, spelling).items():
            diagnostics = refused(response, 400)
            assert "ASCII 0-9" in diagnostics, (name, entry, diagnostics)
            assert spelling not in response.text, (name, entry)
        split = _split_key(spelling, secret)
        for database in ("consent.db", f"hub-{SEVERANCE_HUB}.db"):
            stored = b"".join(p.read_bytes() for p in fed.data.glob(f"{database}*"))
            assert split.encode() not in stored, (name, database)
    # The control: the ASCII number is accepted at the same entry points.
    accepted = _entry_points(fed, rrn)
    assert {k: r.status_code for k, r in accepted.items()} == {
        "hub search": 200,
        "hub ITI-65": 200,
        "consent search": 200,
        "consent desk": 422,  # a desk consent needs its signature image: past the identifier
        "portal sign-in": 201,
        "call centre": 201,
    }
