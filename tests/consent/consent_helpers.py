"""Helpers of the consent tests: FHIR Consent builders, a client of the running service, polling.

A module of its own (not conftest.py): test modules import it by name, and ``conftest`` is ambiguous
once several directories have one.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import struct
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

import httpx
import pytest
from sqlalchemy import select

from hie_consent.config import ConsentSettings
from hie_consent.fhir import CHANNEL_EXTENSION
from hie_consent.models import Base
from hie_consent.provisions import EXCLUSION_REASON_EXTENSION
from hie_platform.db import Database
from hie_schemas import codes
from hie_schemas.consent import FlowQuery
from hie_schemas.identifiers import KRNPI_SYSTEM, RRN_SYSTEM, patient_key_from_rrn

T = TypeVar("T")


class TokenSource(Protocol):
    """The registry fixture of tests/conftest.py, as far as these tests use it."""

    url: str

    async def token(self, client_id: str) -> str: ...


class RunningApp:
    """An ASGI app under a real uvicorn on a free port (as in tests/conftest.py, which cannot be imported
    from here: pytest registers each directory's conftest under the same module name)."""

    def __init__(self, app: Any, port: int) -> None:
        import uvicorn

        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on")
        )
        self.task: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 30.0) -> RunningApp:
        self.task = asyncio.create_task(self.server.serve())
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.server.started:
            if self.task.done():
                self.task.result()
                raise RuntimeError("server stopped during start-up")
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("server did not start")
            await asyncio.sleep(0.02)
        return self

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await self.task


SEVERANCE_CLINIC = "11301001"
SEVERANCE_CLINIC_2 = "11301002"
SEVERANCE_HUB = "11100001"
SNUBH_HUB = "31100002"
SNUBH_CLINIC = "31302001"


def png(width: int = 2, height: int = 1) -> bytes:
    """A real (tiny, grey) PNG, as a sign pad would produce."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


SIGNATURE = png()


def attachment(data: bytes = SIGNATURE, content_type: str = "image/png") -> dict[str, Any]:
    return {"contentType": content_type, "data": base64.b64encode(data).decode()}


def new_rrn() -> str:
    """A well-formed, random RRN (born 1990-05-17) so that every test has its own patient."""
    return f"900517-1{random.randrange(10**6):06d}"


def consent_json(
    patient: tuple[str, str],
    policy: str,
    organization: str = SEVERANCE_CLINIC,
    *,
    exclude_institutions: tuple[str, ...] = (),
    exclude_departments: tuple[str, ...] = (),
    date_time: datetime | None = None,
    reason: str = "환자 요청",
) -> dict[str, Any]:
    """An R4 Consent as an EMR at the desk would send it, with the signature from the sign pad."""
    system, value = patient
    resource: dict[str, Any] = {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"identifier": {"system": system, "value": value}},
        "organization": [{"identifier": {"system": KRNPI_SYSTEM, "value": organization}}],
        "policyRule": {"coding": [{"system": codes.CONSENT_POLICY_SYSTEM, "code": policy}]},
        "extension": [{"url": CHANNEL_EXTENSION, "valueCode": "sign-pad"}],
        "sourceAttachment": attachment(),
    }
    because = [{"url": EXCLUSION_REASON_EXTENSION, "valueString": reason}]
    if date_time is not None:
        resource["dateTime"] = date_time.isoformat()
    exclusions: list[dict[str, Any]] = [
        {
            "type": "deny",
            "extension": because,
            "actor": [
                {
                    "role": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                "code": "IRCP",
                            }
                        ]
                    },
                    "reference": {"identifier": {"system": KRNPI_SYSTEM, "value": code}},
                }
            ],
        }
        for code in exclude_institutions
    ]
    if exclude_departments:
        exclusions.append(
            {
                "type": "deny",
                "extension": because,
                "code": [
                    {"coding": [{"system": codes.HIRA_DEPARTMENT, "code": d}]} for d in exclude_departments
                ],
            }
        )
    if exclusions:
        resource["provision"] = {"type": "permit", "provision": exclusions}
    return resource


def flow(
    patient_key: str, holder: str, recipient: str, created: datetime | None = None, **extra: Any
) -> FlowQuery:
    now = datetime.now(UTC)
    return FlowQuery(
        patient_key=patient_key,
        holder=holder,
        recipient=recipient,
        document_created_at=created or now,
        at=now,
        **extra,
    )


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = 15.0) -> T:
    """Poll ``probe`` until it returns something, failing the test at the deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await probe()
        if result is not None:
            return result
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class ConsentService:
    url: str
    settings: ConsentSettings
    registry: TokenSource
    nats_url: str

    def patient_key(self, rrn: str) -> str:
        return patient_key_from_rrn(rrn, self.settings.patient_key_bytes)

    async def headers(self, client_id: str = SEVERANCE_CLINIC) -> dict[str, str]:
        return {"Authorization": f"Bearer {await self.registry.token(client_id)}"}

    async def record(self, resource: dict[str, Any], client_id: str = SEVERANCE_CLINIC) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.url) as http:
            return await http.post(
                "/fhir/Consent",
                json=resource,
                headers={**await self.headers(client_id), "Content-Type": "application/fhir+json"},
            )

    async def consent(self, rrn: str, policy: str = "ENTIRE_CONSENT", **kwargs: Any) -> dict[str, Any]:
        response = await self.record(consent_json((RRN_SYSTEM, rrn), policy, **kwargs))
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    async def decide_http(self, query: FlowQuery, client_id: str = SEVERANCE_HUB) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=self.url) as http:
            response = await http.post(
                "/decisions",
                content=f'{{"query": {query.model_dump_json()}}}',
                headers={**await self.headers(client_id), "Content-Type": "application/json"},
            )
        assert response.status_code == 200, response.text
        decision: dict[str, Any] = response.json()["decision"]
        return decision

    async def rows(self, table: str) -> list[dict[str, Any]]:
        """Every row of one of the service's tables, read straight from its database."""
        db = Database(self.settings.database_url, self.settings.database_schema)
        try:
            async with db.read_sessions() as session:
                result = await session.execute(select(Base.metadata.tables[table]))
                return [dict(row._mapping) for row in result]
        finally:
            await db.dispose()


PHONE = "010-1234-5678"
AGENCY = "agency"  # the call centre's client (the operating agency)


async def open_challenge(service: ConsentService, rrn: str, phone: str = PHONE) -> httpx.Response:
    async with httpx.AsyncClient(base_url=service.url) as http:
        return await http.post("/portal/identity/challenges", json={"rrn": rrn, "phone": phone})


async def answer(service: ConsentService, challenge_id: str, code: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=service.url) as http:
        return await http.post(f"/portal/identity/challenges/{challenge_id}/verify", json={"code": code})


def wrong(code: str) -> str:
    """A six-digit code that is certainly not ``code``."""
    return f"{(int(code) + 1) % 10**6:06d}"


async def sign_in(service: ConsentService, rrn: str) -> dict[str, str]:
    """The patient's session headers, through the development identity provider."""
    opened = await open_challenge(service, rrn)
    assert opened.status_code == 201, opened.text
    challenge = opened.json()
    verified = await answer(service, challenge["challenge_id"], challenge["dev_code"])
    assert verified.status_code == 200, verified.text
    return {"Authorization": f"Bearer {verified.json()['access_token']}"}


async def portal_consent(
    service: ConsentService,
    session: dict[str, str],
    policy: str,
    exclusions: list[dict[str, str]] | None = None,
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=service.url) as http:
        return await http.post(
            "/portal/me/consents", json={"policy": policy, "exclusions": exclusions or []}, headers=session
        )


async def portal_get(service: ConsentService, session: dict[str, str], path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=service.url) as http:
        return await http.get(path, headers=session)


async def expire(service: ConsentService, challenge_id: str) -> None:
    """Move a challenge's expiry into the past (the clock of a test does not wait five minutes)."""
    from hie_consent.models import IdentityChallenge

    db = Database(service.settings.database_url, service.settings.database_schema)
    try:
        async with db.transaction() as session:
            row = await session.get(IdentityChallenge, challenge_id)
            assert row is not None
            row.expires_at = datetime.now(UTC) - timedelta(seconds=1)
    finally:
        await db.dispose()


class LogTap(logging.Handler):
    """Every log line the service writes while attached (to prove what is and is not logged)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.msg!r} {record.args!r}")

    def __enter__(self) -> LogTap:
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeHandler(self)
