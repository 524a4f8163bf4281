"""HTTP attacks on the services' APIs: a clinic reading another clinic's patient, oversized bodies,
path traversal in ids, injection-shaped search parameters. Each is refused with a 4xx
OperationOutcome (or answered with nothing), never a 5xx, never a file, never another patient's data."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from attacks_support import (
    SEVERANCE_CLINIC,
    SEVERANCE_CLINIC_2,
    SEVERANCE_HUB,
    SNUBH_CLINIC,
    SNUBH_HUB,
    AttackFederation,
    LogTap,
    audit_records,
    correlation,
    new_rrn,
    publish_summary,
    refused,
)

from hie_schemas.identifiers import RRN_SYSTEM, patient_key_from_rrn

SERVICES = ("registry", "consent", SEVERANCE_HUB, "imaging")


def _auth(fed: AttackFederation, client: str, cid: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {fed.token(client)}"}
    if cid is not None:
        headers["X-Correlation-ID"] = cid
    return headers


@pytest.fixture(scope="module")
def patient(attack_federation: AttackFederation) -> tuple[str, str]:
    """A patient with one document by the first severance clinic: (RRN, document id)."""
    rrn = new_rrn()
    return rrn, publish_summary(attack_federation, SEVERANCE_HUB, SEVERANCE_CLINIC, rrn)


# --- a clinic reading another clinic's patient -----------------------------------------------------


def test_a_clinic_cannot_find_or_read_another_clinics_patient(
    attack_federation: AttackFederation, log_tap: LogTap, patient: tuple[str, str]
) -> None:
    fed = attack_federation
    rrn, document_id = patient
    search = {"patient.identifier": f"{RRN_SYSTEM}|{rrn}"}
    with fed.http(SEVERANCE_HUB) as http:
        # The control: the author finds and reads its own document.
        own = http.get("/fhir/DocumentReference", params=search, headers=_auth(fed, SEVERANCE_CLINIC))
        assert [e["resource"]["id"] for e in own.json()["entry"]] == [document_id]
        assert (
            http.get(f"/fhir/Bundle/{document_id}", headers=_auth(fed, SEVERANCE_CLINIC)).status_code == 200
        )

        # Another clinic of the same hub, with no flow to it: the search finds nothing ...
        found = http.get("/fhir/DocumentReference", params=search, headers=_auth(fed, SEVERANCE_CLINIC_2))
        assert found.status_code == 200, found.text
        assert found.json()["total"] == 0
        assert not found.json().get("entry")
        assert document_id not in found.text
        # ... and reading by id gets the same 404 as an id that does not exist (no existence leak).
        unknown = str(uuid.uuid4())
        for path in ("/fhir/DocumentReference/{}", "/fhir/Bundle/{}"):
            cid = correlation()
            response = http.get(path.format(document_id), headers=_auth(fed, SEVERANCE_CLINIC_2, cid))
            diagnostics = refused(response, 404)
            assert diagnostics == f"no document {document_id} visible to institution {SEVERANCE_CLINIC_2}"
            other = http.get(path.format(unknown), headers=_auth(fed, SEVERANCE_CLINIC_2))
            assert refused(other, 404) == diagnostics.replace(document_id, unknown)
            line = log_tap.refusal(cid, 404)
            assert line["inst"] == SEVERANCE_CLINIC_2
            assert line["code"] == "not-found"
            assert rrn not in str(line)

    # A clinic of another hub asks through its own hub's federated search: nothing comes back either.
    with fed.http(SNUBH_HUB) as http:
        federated = http.get(
            "/fhir/DocumentReference",
            params=search | {"_federated": "true"},
            headers=_auth(fed, SNUBH_CLINIC),
        )
        assert federated.status_code == 200, federated.text
        assert document_id not in federated.text
        matches = [e for e in federated.json().get("entry", []) if e["search"]["mode"] == "match"]
        assert matches == []
        refused(http.get(f"/fhir/Bundle/{document_id}", headers=_auth(fed, SNUBH_CLINIC)), 404)

    # The hub's audit trail names the refused search: who, which patient key, nothing disclosed.
    key = patient_key_from_rrn(rrn, fed.services[SEVERANCE_HUB].settings.patient_key_bytes)
    searches = [
        r
        for r in audit_records(fed, SEVERANCE_HUB)
        if r["action"] == "document.search" and r["patient_key"] == key
    ]
    assert {r["actor_institution"] for r in searches} >= {SEVERANCE_CLINIC, SEVERANCE_CLINIC_2}
    assert all(r["document_ids"] == [] for r in searches if r["actor_institution"] == SEVERANCE_CLINIC_2)


# --- oversized bodies ------------------------------------------------------------------------------

# A write route of each service (the gateway has none: the limit applies before routing anyway).
WRITE_ROUTES = {
    "registry": "/oauth2/token",
    "consent": "/fhir/Consent",
    SEVERANCE_HUB: "/fhir",
    "imaging": "/studies/1.2.3",
}


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
@pytest.mark.parametrize("service", SERVICES)
def test_an_oversized_body_is_refused_with_413(
    attack_federation: AttackFederation, log_tap: LogTap, service: str, declared: bool
) -> None:
    fed = attack_federation
    limit = fed.services[service].settings.max_body_bytes
    body = b'{"resourceType": "Bundle", "x": "' + b"A" * limit + b'"}'

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must hold while reading
        for start in range(0, len(body), 1 << 20):
            yield body[start : start + (1 << 20)]

    cid = correlation()
    headers = _auth(fed, SEVERANCE_CLINIC, cid) | {"Content-Type": "application/fhir+json"}
    with fed.http(service) as http:
        response = http.post(WRITE_ROUTES[service], content=body if declared else chunks(), headers=headers)
    assert "exceeds" in refused(response, 413)
    line = log_tap.refusal(cid, 413)
    assert line["level"] == "warning"
    assert line["code"] == "too-long"
    # The service still answers.
    with fed.http(service) as http:
        assert http.get("/healthz").status_code == 200


# --- path traversal in ids -------------------------------------------------------------------------

TRAVERSALS = [
    "../../../../../../etc/passwd",
    "..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
    "%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "..%252f..%252f..%252fetc%252fpasswd",
    "....//....//....//etc/passwd",
    "..%5c..%5c..%5c..%5cetc%5cpasswd",
    "%c0%ae%c0%ae%2f%c0%ae%c0%ae%2fetc%2fpasswd",
    "..",
    "%2e%2e",
    "registry.db",
    "..%2fregistry.db",
    "%00",
    "a%00..%2f..%2fetc%2fpasswd",
]
ID_ROUTES = {
    "registry": [
        "/institutions/{}",
        "/fhir/Organization/{}",
        "/fhir/Endpoint/{}",
        "/institutions/{}/history",
    ],
    "consent": ["/fhir/Consent/{}", "/fhir/Consent/{}/_history/1/signature"],
    SEVERANCE_HUB: [
        "/fhir/DocumentReference/{}",
        "/fhir/Bundle/{}",
        "/fhir/Task/{}",
        "/fhir/List/{}",
        "/fhir/Subscription/{}",
    ],
    "imaging": ["/studies/{}"],
}


def raw_get(url: str, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """GET with the request target exactly as given (an HTTP client would normalise the dots)."""
    parts = urlsplit(url)
    lines = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection((parts.hostname, parts.port), timeout=60) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize("service", SERVICES)
def test_path_traversal_in_ids_never_reads_a_file(attack_federation: AttackFederation, service: str) -> None:
    fed = attack_federation
    client = "agency" if service == "registry" else SEVERANCE_CLINIC
    headers = _auth(fed, client)
    for route in ID_ROUTES[service]:
        for payload in TRAVERSALS:
            target = route.format(payload)
            status, body = raw_get(fed.url(service), target, headers)
            assert status in (400, 404, 405), f"{target}: {status} {body[:300]!r}"
            assert b"OperationOutcome" in body, f"{target}: {body[:300]!r}"
            for secret in (b"root:", b"SQLite format", b"BEGIN PRIVATE KEY", b"Traceback"):
                assert secret not in body, f"{target} leaked {secret!r}"


# --- injection-shaped search parameters ----------------------------------------------------------

INJECTIONS = [
    "' OR 1=1--",
    "' OR '1'='1",
    "1; DROP TABLE documents;--",
    '" OR ""="',
    "%' OR patient_key LIKE '%",
    "*",
    "%",
    "_",
    "\\",
    "'; SELECT pg_sleep(1);--",
    "홍길동",
    "😀" * 50,
    "\u202e\u0000\u200b",
    "a" * 4000,
    "99999999999999999999999999",
    "-1",
    "1e309",
    "NaN",
    "${jndi:ldap://x}",
    "{{7*7}}",
    "<script>alert(1)</script>",
]


def _hub_searches(value: str, rrn: str) -> list[dict[str, str]]:
    patient = f"{RRN_SYSTEM}|{rrn}"
    return [
        {"patient.identifier": value},
        {"patient.identifier": f"{RRN_SYSTEM}|{value}"},
        {"patient.identifier": f"https://hie-federation.kr/fhir/sid/patient-key|{value}"},
        {"patient.identifier": patient, "type": value},
        {"patient.identifier": patient, "status": value},
        {"patient.identifier": patient, "author": value},
        {"patient.identifier": patient, "date": value},
        {"patient.identifier": patient, "_count": value},
        {"patient.identifier": patient, "_cursor": value},
        {"patient.identifier": patient, "purpose": value, "_federated": "true"},
        {"patient.identifier": patient, value[:60]: "x"},
    ]


def test_injection_shaped_hub_searches_return_nothing_of_another_clinics_patient(
    attack_federation: AttackFederation, patient: tuple[str, str]
) -> None:
    """Searched by a clinic with no flow to the patient: 400, or 200 with no entries, never 5xx."""
    fed = attack_federation
    rrn, document_id = patient
    headers = _auth(fed, SEVERANCE_CLINIC_2)
    with fed.http(SEVERANCE_HUB) as http:
        for value in INJECTIONS:
            for params in _hub_searches(value, rrn):
                for route in ("/fhir/DocumentReference", "/fhir/Task", "/fhir/List", "/fhir/AuditEvent"):
                    response = http.get(route, params=params, headers=headers)
                    where = f"{route} {str(params)[:200]}"
                    assert response.status_code in (200, 400, 403), f"{where}: {response.text[:300]}"
                    if response.status_code == 200:
                        body = response.json()
                        assert body["resourceType"] == "Bundle", where
                        assert document_id not in response.text, where
                        if route == "/fhir/DocumentReference":
                            assert not [e for e in body.get("entry", []) if e["search"]["mode"] == "match"]
                    else:
                        refused(response, response.status_code)
                    assert rrn not in response.text, where
        # And nothing was changed: the author still finds exactly its document.
        own = http.get(
            "/fhir/DocumentReference",
            params={"patient.identifier": f"{RRN_SYSTEM}|{rrn}"},
            headers=_auth(fed, SEVERANCE_CLINIC),
        )
        assert [e["resource"]["id"] for e in own.json()["entry"]] == [document_id]


CENTRAL_SEARCHES = {
    "registry": (
        "agency",
        [
            ("/institutions", ["state", "hub", "kind"]),
            (
                "/fhir/Organization",
                ["name", "identifier", "partof", "active", "_count", "type", "address-city"],
            ),
            ("/fhir/Endpoint", ["organization", "identifier", "_count"]),
            ("/locator", ["patient_key"]),
        ],
    ),
    "consent": (
        "agency",
        [
            ("/fhir/Consent", ["patient"]),
            ("/exchange-history", ["patient"]),
            ("/consent-records", ["patient"]),
        ],
    ),
}


@pytest.mark.parametrize("service", list(CENTRAL_SEARCHES))
def test_injection_shaped_central_searches_are_refused_or_empty(
    attack_federation: AttackFederation, service: str
) -> None:
    fed = attack_federation
    client, routes = CENTRAL_SEARCHES[service]
    headers = _auth(fed, client)
    with fed.http(service) as http:
        baseline = http.get("/fhir/Organization", headers=headers).json() if service == "registry" else None
        for route, names in routes:
            for name in names:
                for value in INJECTIONS:
                    response = http.get(route, params={name: value}, headers=headers)
                    where = f"{route}?{name}={value[:80]!r}"
                    assert response.status_code < 500, f"{where}: {response.text[:300]}"
                    assert "Traceback" not in response.text, where
                    if response.status_code >= 400:
                        refused(response, response.status_code)
                    elif route == "/fhir/Organization" and baseline is not None:
                        # A filter never widens the directory beyond what no filter returns.
                        assert len(response.json().get("entry", [])) <= len(baseline.get("entry", [])), where
                    if service == "consent" and response.status_code == 200:
                        assert response.json().get("total", 0) == 0 or not response.json().get("entry"), where


def test_an_overlong_query_string_is_refused_cleanly(attack_federation: AttackFederation) -> None:
    """A query far beyond any real search: refused (4xx) or empty, and the hub keeps answering."""
    fed = attack_federation
    with fed.http(SEVERANCE_HUB) as http:
        for size in (10_000, 60_000):
            try:
                response = http.get(
                    "/fhir/DocumentReference",
                    params={"patient.identifier": f"{RRN_SYSTEM}|" + "9" * size},
                    headers=_auth(fed, SEVERANCE_CLINIC),
                )
            except httpx.RemoteProtocolError:
                continue  # the HTTP layer closed the connection on a line that long: refused too
            assert 400 <= response.status_code < 500, response.text[:300]
        assert http.get("/healthz").status_code == 200
