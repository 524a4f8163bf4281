"""The public FHIR directory: Organization and Endpoint search, paging, contacts only for the agency."""

from __future__ import annotations

from typing import Any

import httpx

from hie_schemas.fhir import parse_resource
from hie_schemas.identifiers import KRNPI_SYSTEM


async def search(registry: Any, params: dict[str, str], token: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{registry.url}/fhir/Organization", params=params, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    bundle: dict[str, Any] = response.json()
    return bundle


async def test_search_by_hub_region_kind_and_name(registry: Any) -> None:
    clinics = await search(registry, {"partof": "Organization/31100002"})
    # The seeded clinics of that hub; the registry is shared by the session, so clinics that other
    # tests applied for under the same hub may be listed too (every one of them is checked below).
    assert {"31302001", "31302002", "31302003"} <= {e["resource"]["id"] for e in clinics["entry"]}
    assert all(e["resource"]["partOf"]["reference"] == "Organization/31100002" for e in clinics["entry"])
    busan = await search(registry, {"address-state": "부산", "type": "hub"})
    assert [e["resource"]["name"] for e in busan["entry"]] == ["부산대학교병원"]
    by_name = await search(registry, {"name": "severance"})
    assert by_name["entry"][0]["resource"]["identifier"][0] == {"system": KRNPI_SYSTEM, "value": "11100001"}
    for entry in clinics["entry"] + busan["entry"]:
        parse_resource(entry["resource"], "Organization")
    parse_resource(clinics, "Bundle")


async def test_paging_walks_every_institution_once(registry: Any) -> None:
    first = await search(registry, {"_count": "5"})
    seen = [e["resource"]["id"] for e in first["entry"]]
    url = next((link["url"] for link in first["link"] if link["relation"] == "next"), None)
    async with httpx.AsyncClient() as http:
        while url:
            page = (await http.get(url)).json()
            seen += [e["resource"]["id"] for e in page["entry"]]
            url = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
    assert len(seen) == first["total"] == len(set(seen))
    assert len(seen) >= 25  # 6 hubs, 18 clinics, the agency


async def test_contacts_only_for_the_agency(registry: Any) -> None:
    code = "31302002"
    agency = await registry.token("agency")
    public = await search(registry, {"identifier": f"{KRNPI_SYSTEM}|{code}"})
    assert public["total"] == 1
    assert "contact" not in public["entry"][0]["resource"]
    clinic = await search(registry, {"identifier": code}, token=await registry.token("11301001"))
    assert "contact" not in clinic["entry"][0]["resource"]
    async with httpx.AsyncClient() as http:
        detail = await http.get(
            f"{registry.url}/institutions/{code}/detail", headers={"Authorization": f"Bearer {agency}"}
        )
    assert detail.status_code == 200
    assert "contacts" in detail.json()


async def test_bad_search_parameters(registry: Any) -> None:
    async with httpx.AsyncClient() as http:
        bad_count = await http.get(f"{registry.url}/fhir/Organization", params={"_count": "-1"})
        strict = await http.get(
            f"{registry.url}/fhir/Organization",
            params={"colour": "blue"},
            headers={"Prefer": "handling=strict"},
        )
        lenient = await http.get(
            f"{registry.url}/fhir/Organization", params={"colour": "blue", "_count": "1"}
        )
        missing = await http.get(f"{registry.url}/fhir/Organization/12345678")
    assert bad_count.status_code == 400
    assert strict.status_code == 400
    assert "colour" in strict.json()["issue"][0]["diagnostics"]
    assert lenient.status_code == 200
    assert missing.status_code == 404
    assert missing.json()["resourceType"] == "OperationOutcome"


async def test_dicom_endpoints_are_published(registry: Any) -> None:
    async with httpx.AsyncClient() as http:
        bundle = (await http.get(f"{registry.url}/fhir/Endpoint", params={"organization": "31302001"})).json()
    # Seeded clinics carry a PACS AE title; the DICOM endpoint is listed as dicom://AE@host:port.
    addresses = [e["resource"]["address"] for e in bundle["entry"]]
    assert addresses == ["dicom://PACS31302001@127.0.0.1:104"]
    parse_resource(bundle["entry"][0]["resource"], "Endpoint")


async def test_a_change_is_in_the_directory_as_soon_as_it_is_committed(registry: Any) -> None:
    """The directory is served from memory: every committed change must show on the very next read."""
    import random

    code = f"78{random.randint(0, 999999):06d}"
    name = f"새봄{code[-4:]}의원"
    agency = {"Authorization": f"Bearer {await registry.token('agency')}"}
    assert (await search(registry, {"name": name}))["total"] == 0  # the snapshot exists before the change
    async with httpx.AsyncClient(base_url=registry.url, headers=agency) as http:
        application = {
            "code": code,
            "name": name,
            "kind": "clinic",
            "region": "제주",
            "hub": "snubh",
            "departments": ["0100"],
            "contacts": {"person": "김담당", "phone": "064-000-0000"},
            "samples": [],
        }
        assert (await http.post("/institutions", json=application)).status_code == 201
        found = await search(registry, {"name": name})
        assert [e["resource"]["id"] for e in found["entry"]] == [code]
        assert found["total"] == 1
        # One- and two-character Korean terms still match (no trigram index would).
        assert code in {
            e["resource"]["id"] for e in (await search(registry, {"name": "봄", "_count": "200"}))["entry"]
        }
        assert code in {
            e["resource"]["id"]
            for e in (await search(registry, {"address-state": "제주", "active": "false", "_count": "200"}))[
                "entry"
            ]
        }
        dicom = {"ae_title": "NEWPACS", "host": "127.0.0.9", "port": 11112}
        assert (await http.put(f"/institutions/{code}/dicom", json=dicom)).status_code == 200
        endpoints = (await http.get("/fhir/Endpoint", params={"organization": code})).json()
        assert [e["resource"]["address"] for e in endpoints["entry"]] == ["dicom://NEWPACS@127.0.0.9:11112"]
        read = (await http.get(f"/fhir/Endpoint/{code}-dicom")).json()
        assert read["address"] == "dicom://NEWPACS@127.0.0.9:11112"
        organization = (await http.get(f"/fhir/Organization/{code}")).json()
        assert organization["name"] == name
        assert organization["endpoint"] == [{"reference": f"Endpoint/{code}-dicom"}]


async def test_a_public_read_is_the_searched_resource_and_the_agency_read_has_contacts(registry: Any) -> None:
    """Reads and searches serve one cached serialization to the public; the agency's is built fresh."""
    import random

    code = f"77{random.randint(0, 999999):06d}"
    agency = {"Authorization": f"Bearer {await registry.token('agency')}"}
    application = {
        "code": code,
        "name": f"바른{code[-4:]}의원",
        "kind": "clinic",
        "region": "부산",
        "hub": "snubh",
        "departments": ["0100"],
        "contacts": {"person": "박담당", "phone": "051-000-0000"},
        "samples": [],
    }
    async with httpx.AsyncClient(base_url=registry.url) as http:
        assert (await http.post("/institutions", json=application, headers=agency)).status_code == 201
        found = await search(registry, {"identifier": code})
        public = await http.get(f"/fhir/Organization/{code}")
        detail = (await http.get(f"/fhir/Organization/{code}", headers=agency)).json()
    assert public.headers["content-type"].startswith("application/fhir+json")
    assert public.json() == found["entry"][0]["resource"]
    assert "contact" not in public.json()
    assert detail["contact"][0]["telecom"] == [{"system": "phone", "value": "051-000-0000"}]
    parse_resource(public.json(), "Organization")


def test_indexed_search_answers_as_a_scan_of_every_institution() -> None:
    """Each criterion alone and in pairs, on a directory with hubs, clinics, both states and no region:
    the index (positions by code, region, kind, hub) must find what checking every row finds."""
    import itertools

    from hie_registry.directory_index import Entry, Snapshot

    empty = (None,) * (len(Entry._fields) - 7)  # no endpoints, no contacts
    rows = [
        (
            f"8{n:07d}",
            f"{r or '무'} {w}의원 {n}",
            "Sae Bom" if n % 7 == 0 else None,
            kind,
            r,
            state,
            hub,
            *empty,
        )
        for n, (r, w, kind, state, hub) in enumerate(
            itertools.product(
                ["서울", "제주", None],
                ["새봄", "튼튼"],
                ["clinic", "hub"],
                ["active", "suspended"],
                ["a", "b"],
            )
        )
    ]
    snapshot = Snapshot.build(rows, {"a": "80000001"})
    every: list[dict[str, str]] = [
        {"region": "서울"},
        {"kind": "hub"},
        {"hub": "a"},
        {"hub": "\x00"},
        {"active": "true"},
        {"active": "false"},
        {"code": "80000005"},
        {"name": "새봄"},
        {"name": "BOM"},
        {"name": "무"},
    ]

    def scan(c: dict[str, str]) -> list[str]:
        def ok(e: Entry) -> bool:
            names = (e.name + "|" + (e.name_en or "")).lower()
            return (
                c.get("region", e.region) == e.region
                and c.get("kind", e.kind) == e.kind
                and ("hub" not in c or (e.hub == c["hub"] and e.kind == "clinic"))
                and c.get("active", str(e.state == "active").lower()) == str(e.state == "active").lower()
                and c.get("code", e.code) == e.code
                and c.get("name", "").lower() in names
            )

        return [e.code for e in snapshot.institutions if ok(e)]

    for one, two in itertools.combinations_with_replacement(every, 2):
        criteria = {**one, **two}
        assert [e.code for e in snapshot.search(criteria)] == scan(criteria), criteria
    assert len(snapshot.search({"region": "서울"})) == len(rows) // 3
