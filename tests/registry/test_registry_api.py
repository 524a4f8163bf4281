"""The registry's token endpoint, JWKS and directory against a real NATS and SQLite."""

from __future__ import annotations

import httpx
import jwt
import pytest

from hie_schemas.auth import AUDIENCE


async def test_token_verifies_against_published_jwks(registry) -> None:  # type: ignore[no-untyped-def]
    token = await registry.token("31302001")
    async with httpx.AsyncClient() as http:
        jwks = (await http.get(f"{registry.url}/.well-known/jwks.json")).json()
    header = jwt.get_unverified_header(token)
    key = jwt.PyJWKSet.from_dict(jwks)[header["kid"]].key
    claims = jwt.decode(token, key, algorithms=["ES256"], audience=AUDIENCE)
    assert header["alg"] == "ES256"
    assert claims["inst"] == "31302001"
    assert claims["hub"] == "snubh"
    assert claims["kind"] == "clinic"
    assert claims["scope"] == "exchange"


@pytest.mark.parametrize(
    ("form", "status", "error"),
    [
        (
            {"grant_type": "client_credentials", "client_id": "11301001", "client_secret": "wrong"},
            401,
            "invalid_client",
        ),
        (
            {"grant_type": "password", "client_id": "11301001", "client_secret": "x"},
            400,
            "unsupported_grant_type",
        ),
        ({"grant_type": "client_credentials"}, 401, "invalid_client"),
    ],
)
async def test_token_refusals(registry, form: dict[str, str], status: int, error: str) -> None:  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{registry.url}/oauth2/token", data=form)
    assert response.status_code == status
    assert response.json()["error"] == error


async def test_directory_is_public_and_hubs_are_listed(registry) -> None:  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient() as http:
        inst = (await http.get(f"{registry.url}/institutions/11100001")).json()
        hubs = (await http.get(f"{registry.url}/hubs")).json()
        missing = await http.get(f"{registry.url}/institutions/12345678")
        malformed = await http.get(f"{registry.url}/institutions/abc")
    assert inst["name"] == "세브란스병원"
    assert inst["oid"] == "1.2.410.100110.10.11100001"
    assert "contacts" not in inst
    assert {h["slug"] for h in hubs} == {"severance", "snubh", "cnuh", "knuh", "pnuh", "cnuhh"}
    assert missing.status_code == 404
    assert missing.json()["resourceType"] == "OperationOutcome"
    assert malformed.status_code == 404


async def test_dicom_endpoint_needs_agency_scope(registry) -> None:  # type: ignore[no-untyped-def]
    clinic = await registry.token("11301001")
    agency = await registry.token("agency")
    body = {"ae_title": "SNUBHPACS", "host": "127.0.0.1", "port": 11112}
    async with httpx.AsyncClient() as http:
        refused = await http.put(
            f"{registry.url}/institutions/31100002/dicom",
            json=body,
            headers={"Authorization": f"Bearer {clinic}"},
        )
        anonymous = await http.put(f"{registry.url}/institutions/31100002/dicom", json=body)
        done = await http.put(
            f"{registry.url}/institutions/31100002/dicom",
            json=body,
            headers={"Authorization": f"Bearer {agency}"},
        )
        after = (await http.get(f"{registry.url}/institutions/31100002")).json()
    assert refused.status_code == 403
    assert anonymous.status_code == 401
    assert done.status_code == 200
    assert after["dicom"] == body
