"""What the hub tests share: real hub nodes under uvicorn with their own databases, a consent desk
that answers the decision subject with the real rule, the federation of hubs the tests call, and
helpers to build submissions and read answers. The fixtures live in conftest.py.

A module of its own name (not ``conftest``): when several test directories run together, the name
``conftest`` belongs to whichever directory's conftest.py was imported last.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from sqlalchemy import select

from hie_hub.app import create_app
from hie_hub.config import HubSettings
from hie_hub.core.bundles import created_tasks
from hie_hub.models import Base
from hie_platform.bus import Bus
from hie_platform.db import Database
from hie_platform.natsd import free_port
from hie_schemas import subjects
from hie_schemas.codes import DocumentType
from hie_schemas.consent import ConsentPolicy, ConsentState, FlowQuery, decide
from hie_schemas.documents.builders import build_document, build_submission
from hie_schemas.events import DecisionReply, DecisionRequest
from hie_schemas.identifiers import KRNPI_SYSTEM, PATIENT_KEY_SYSTEM, RRN_SYSTEM, patient_key_from_rrn

ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"
SEVERANCE, SNUBH, CNUH = "11100001", "31100002", "25100003"  # hub hospitals of the seeded directory
SEVERANCE_CLINIC, SEVERANCE_CLINIC_2, SNUBH_CLINIC = "11301001", "11301002", "31302001"
CNUH_CLINIC = "25303001"
AGENCY_CLIENT = "agency"  # the operating agency's client in the seeded registry
HUBS = ("severance", "snubh", "cnuh")
CRS, REFERRAL = DocumentType.CARE_RECORD_SUMMARY, DocumentType.REFERRAL
# FHIR search under "Prefer: handling=strict": an unknown or unsupported parameter is refused, not ignored.
STRICT = {"Prefer": "handling=strict"}
HUB_TABLES = (
    "documents",
    "tasks",
    "submission_sets",
    "federated_grants",
    "subscriptions",
    "webhook_deliveries",
    "outbox",
    "audit_log",
    "processed_events",
)
T = TypeVar("T")


def root_conftest(config: pytest.Config) -> Any:
    """tests/conftest.py as pytest registered it (a second ``conftest`` module shadows its name here)."""
    return config.pluginmanager.get_plugin(str(ROOT_CONFTEST))


def new_rrn() -> str:
    """A fresh, well-formed resident registration number (a different patient for every test)."""
    n = uuid.uuid4().int
    birth = f"{40 + n % 60:02d}{1 + (n >> 8) % 12:02d}{1 + (n >> 16) % 28:02d}"
    return f"{birth}-{1 + (n >> 24) % 2}{(n >> 32) % 10**6:06d}"


def rrn_forms(rrn: str) -> tuple[str, str]:
    digits = rrn.replace("-", "")
    return digits, f"{digits[:6]}-{digits[6:]}"


def krnpi(code: str) -> str:
    return f"{KRNPI_SYSTEM}|{code}"


async def eventually(check: Callable[[], Awaitable[T | None]], what: str, timeout: float = 20.0) -> T:
    """Poll ``check`` until it returns something truthy; fail at the deadline (no bare sleeps)."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


class ConsentDesk:
    """Answers ``hie.rpc.consent.decide`` with the real rule over consent histories the test controls."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.histories: dict[str, list[ConsentState]] = {}
        self.asked: list[FlowQuery] = []
        self.available = True
        self.bus: Bus | None = None

    def key(self, rrn: str) -> str:
        return patient_key_from_rrn(rrn, self.secret)

    def _add(self, rrn: str, policy: ConsentPolicy, at: datetime | None, excluded: tuple[str, ...]) -> None:
        history = self.histories.setdefault(self.key(rrn), [])
        history.append(
            ConsentState(
                version=len(history) + 1,
                policy=policy,
                effective_at=at or datetime.now(UTC) - timedelta(days=30),
                excluded_institutions=frozenset(excluded),
            )
        )

    def grant(self, rrn: str, at: datetime | None = None) -> None:
        self._add(rrn, ConsentPolicy.ENTIRE_CONSENT, at, ())

    def exclude(self, rrn: str, *institutions: str, at: datetime | None = None) -> None:
        self._add(rrn, ConsentPolicy.PARTIAL_WITHDRAWAL, at or datetime.now(UTC), institutions)

    def withdraw(self, rrn: str, at: datetime | None = None) -> None:
        self._add(rrn, ConsentPolicy.ENTIRE_WITHDRAWAL, at or datetime.now(UTC), ())

    async def _answer(self, request: DecisionRequest) -> DecisionReply:
        if not self.available:
            raise RuntimeError("the consent desk is closed")
        self.asked.append(request.query)
        return DecisionReply(
            decision=decide(self.histories.get(request.query.patient_key, []), request.query)
        )

    async def start(self, nats_url: str) -> ConsentDesk:
        self.bus = await Bus.connect(nats_url, name="test-consent-desk")
        await self.bus.serve(subjects.CONSENT_DECIDE, "consent", DecisionRequest, self._answer)
        return self

    async def stop(self) -> None:
        if self.bus is not None:
            await self.bus.close()


@dataclass
class Hub:
    slug: str
    settings: HubSettings
    running: Any  # conftest.RunningApp

    @property
    def fhir(self) -> str:
        return f"{self.running.url}/fhir"

    async def rows(self, table: str) -> list[dict[str, Any]]:
        db = Database(self.settings.database_url, self.settings.database_schema)
        try:
            async with db.read_sessions() as session:
                result = await session.execute(select(Base.metadata.tables[table]))
                return [dict(row) for row in result.mappings()]
        finally:
            await db.dispose()

    async def dump(self) -> str:
        """Every row of every hub table as text (outbox payloads decoded)."""
        parts: list[str] = []
        for table in HUB_TABLES:
            for row in await self.rows(table):
                parts.append(repr({k: v.decode() if isinstance(v, bytes) else v for k, v in row.items()}))
        return "\n".join(parts)


async def start_hub(
    config: pytest.Config,
    slug: str,
    nats_url: str,
    registry_url: str,
    database_url: str,
    schema: str | None = None,
    port: int | None = None,
) -> Hub:
    port = port or free_port()
    settings = HubSettings(
        hub=slug,
        port=port,
        database_url=database_url,
        database_schema=schema,
        nats_url=nats_url,
        registry_url=registry_url,
        node=f"test-{slug}",
        consent_timeout_seconds=2.0,
        # Quick retries, so that a test sees a failed webhook delivery retried within a second.
        webhook_backoff_seconds=0.2,
        webhook_poll_seconds=0.2,
    )
    running = await root_conftest(config).RunningApp(create_app(settings), port).start()
    return Hub(slug, settings, running)


class LogTap(logging.Handler):
    """Keeps every log line the services write, to prove that no RRN is ever logged."""

    def __init__(self, test_client_urls: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.test_client_urls = test_client_urls

    def emit(self, record: logging.LogRecord) -> None:
        line = f"{record.msg!r} {record.args!r} {record.exc_text or ''}"
        # The test's own httpx client logs the URLs it calls (a search URL carries the RRN by design).
        if record.name == "httpx" and any(url in line for url in self.test_client_urls):
            return
        self.lines.append(line)


@dataclass
class Federation:
    """Two hubs, the registry and the consent desk, and an HTTP client that remembers every answer."""

    registry: Any
    desk: ConsentDesk
    hubs: dict[str, Hub]
    http: httpx.AsyncClient
    log: LogTap
    responses: list[str] = field(default_factory=list)
    _tokens: dict[str, tuple[float, str]] = field(default_factory=dict)

    async def token(self, code: str) -> str:
        cached = self._tokens.get(code)
        if cached is None or time.monotonic() - cached[0] > 120:
            cached = (time.monotonic(), await self.registry.token(code))
            self._tokens[code] = cached
        return cached[1]

    async def call(
        self,
        method: str,
        hub: str,
        path: str,
        *,
        as_: str | None,
        headers: dict[str, str] | None = None,
        **kw: Any,
    ) -> httpx.Response:
        headers = dict(headers or {})
        if as_ is not None:
            headers["Authorization"] = f"Bearer {await self.token(as_)}"
        response = await self.http.request(method, f"{self.hubs[hub].fhir}{path}", headers=headers, **kw)
        self.responses.append(response.text)
        return response

    async def publish(self, hub: str, as_: str, submission: dict[str, Any]) -> httpx.Response:
        return await self.call(
            "POST", hub, "", as_=as_, json=submission, headers={"Content-Type": "application/fhir+json"}
        )

    async def search(self, hub: str, as_: str, rrn: str, **params: str) -> httpx.Response:
        return await self.call(
            "GET",
            hub,
            "/DocumentReference",
            as_=as_,
            params={"patient.identifier": f"{RRN_SYSTEM}|{rrn}", **params},
        )

    async def inbox(self, hub: str, as_: str, status: str | None = None) -> list[dict[str, Any]]:
        params = {"owner": krnpi(as_)} | ({"status": status} if status else {})
        response = await self.call("GET", hub, "/Task", as_=as_, params=params)
        assert response.status_code == 200, response.text
        return [e["resource"] for e in response.json().get("entry", [])]

    async def task_arrives(self, hub: str, owner: str, task_id: str, status: str) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            return next(
                (t for t in await self.inbox(hub, owner) if t["id"] == task_id and t["status"] == status),
                None,
            )

        return await eventually(check, f"Task {task_id} {status} at {hub}")

    async def task_status(self, hub: str, as_: str, task_id: str, status: str) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            response = await self.call("GET", hub, f"/Task/{task_id}", as_=as_)
            body: dict[str, Any] = response.json()
            return body if response.status_code == 200 and body["status"] == status else None

        return await eventually(check, f"Task {task_id} {status} at {hub}")

    async def referral_received(self, rrn: str) -> str:
        """A consented patient's referral from a severance clinic to SNUBH; the Task's id once SNUBH's
        inbox holds it (received)."""
        self.desk.grant(rrn)
        published = await self.publish(
            "severance", SEVERANCE_CLINIC, submit(REFERRAL, SEVERANCE_CLINIC, rrn, [SNUBH])
        )
        [task_id] = located(published, "Task")
        await self.task_arrives("snubh", SNUBH, task_id, "received")
        return task_id

    async def patient_rows(self, hub: str, key: str) -> list[dict[str, Any]]:
        rows = await self.hubs[hub].rows("documents") + await self.hubs[hub].rows("tasks")
        return [row for row in rows if row["patient_key"] == key]


def pseudonymised(value: Any, key: str) -> Any:
    """What the hub must store for a sent resource: every RRN identifier replaced by the patient key."""
    if isinstance(value, dict):
        if value.get("system") == RRN_SYSTEM:
            use = {"use": value["use"]} if "use" in value else {}
            return {**use, "system": PATIENT_KEY_SYSTEM, "value": key}
        return {k: pseudonymised(v, key) for k, v in value.items()}
    if isinstance(value, list):
        return [pseudonymised(v, key) for v in value]
    return value


# --- helpers of the MHD, federation and notification tests ------------------------------------------


def submit(
    kind: DocumentType,
    author: str,
    rrn: str,
    recipients: list[str] | tuple[str, ...] = (),
    *,
    created_at: datetime | None = None,
    department: str | None = "0100",
    **options: Any,
) -> dict[str, Any]:
    """An ITI-65 transaction with one document of ``kind`` by ``author`` (builder defaults otherwise)."""
    relates_to = options.pop("relates_to", ())
    extensions = options.pop("extensions", ())
    doc = build_document(
        kind,
        author_code=author,
        author_name=f"요양기관 {author}",
        patient_rrn=rrn,
        created_at=created_at,
        department=department,
        recipient_code=recipients[0] if recipients else None,
        **options,
    )
    body = build_submission(
        [doc], author_code=author, patient_rrn=rrn, recipients=list(recipients), relates_to=relates_to
    )
    body["entry"][0]["resource"]["extension"] += list(extensions)
    return body


def located(response: httpx.Response, resource_type: str) -> list[str]:
    """Ids of the resources of one type a transaction-response names: the entries' locations
    (``Type/id/_history/n``), or for Task the created-task extensions on the DocumentReference's
    entry (FHIR R4: one response entry per request entry)."""
    assert response.status_code == 200, response.text
    if resource_type == "Task":
        return created_tasks(response.json())
    found = [e["response"]["location"] for e in response.json()["entry"]]
    return [loc.split("/")[1] for loc in found if loc.startswith(f"{resource_type}/")]


def refused(response: httpx.Response, status: int) -> str:
    """The diagnostics of an OperationOutcome answered with ``status``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    return " ".join(issue.get("diagnostics", "") for issue in body["issue"])


def matches(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    return [e["resource"] for e in response.json().get("entry", []) if e["search"]["mode"] == "match"]


def outcomes(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    return [e["resource"] for e in response.json().get("entry", []) if e["search"]["mode"] == "outcome"]


def hub_outcomes(response: httpx.Response) -> list[dict[str, Any]]:
    """The outcomes that name a hub: without the record locator's own note that it had not yet taken
    in every publication, which any search may carry while other events are still in flight."""
    return [o for o in outcomes(response) if "details" in o["issue"][0]]
