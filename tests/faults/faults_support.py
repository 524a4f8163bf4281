"""What the fault tests share: the federation as real processes that a test can SIGKILL and restart,
a 3-node NATS cluster with JetStream, a private PostgreSQL cluster, and the referral traffic.

A module of its own name (not ``conftest``): when several test directories run together, the name
``conftest`` belongs to whichever directory's conftest.py was imported last.

Everything listens on 127.0.0.1 on free ports; every wait has a deadline and fails the test with
what it was waiting for (no bare sleeps, no timing assertions).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import pytest

from hie_platform.natsd import free_port
from hie_registry import seed
from hie_schemas import codes
from hie_schemas.consent import ConsentPolicy
from hie_schemas.identifiers import KRNPI_SYSTEM, RRN_SYSTEM

if TYPE_CHECKING:
    from fault_referrals import Referral

T = TypeVar("T")
HOST = "127.0.0.1"
# The two hubs of every fault federation: referrals go from a clinic of the first to the second's hospital.
SOURCE_HUB, DESTINATION_HUB = "severance", "snubh"
CLINIC = next(c.code for c in seed.CLINICS if c.hub == SOURCE_HUB)
HOSPITAL = next(h.code for h in seed.HUBS if h.hub == DESTINATION_HUB)


# The smallest valid PNG, as the patient's signature on the sign pad.
SIGNATURE = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgAAIAAAUAAXpeqz8AAAAASUVORK5CYII="


async def eventually(check: Callable[[], Awaitable[T | None]], what: str, timeout: float = 60.0) -> T:
    """Poll ``check`` until it returns something truthy; fail at the deadline with ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.2)


def new_rrn() -> str:
    n = uuid.uuid4().int
    birth = f"{40 + n % 60:02d}{1 + (n >> 8) % 12:02d}{1 + (n >> 16) % 28:02d}"
    return f"{birth}-{1 + (n >> 24) % 2}{(n >> 32) % 10**6:06d}"


# --- child processes ------------------------------------------------------------------------------


@dataclass
class Child:
    """One service as its own process (``python -m <module>``), restartable with the same settings."""

    name: str
    module: str
    env: dict[str, str]
    log: Path
    url: str | None = None
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Child:
        with open(self.log, "ab") as out:
            out.write(f"--- start {time.strftime('%H:%M:%S')} ---\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module],
                env={**os.environ, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def wait_ready(self, timeout: float = 120.0) -> None:
        assert self.url is not None
        assert self.process is not None
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=3.0) as http:
            while True:
                if self.process.poll() is not None:
                    pytest.fail(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")
                try:
                    if (await http.get(f"{self.url}/readyz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"{self.name} not ready after {timeout:.0f} s:\n{self.tail()}")
                await asyncio.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, nothing is flushed, in-flight requests are cut."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


# --- the federation -------------------------------------------------------------------------------


@dataclass
class FaultFederation:
    """Registry, consent service and hub nodes as processes on one NATS (server or cluster)."""

    data: Path
    nats_url: str
    hubs: tuple[str, ...] = (SOURCE_HUB, DESTINATION_HUB)
    hub_databases: dict[str, str] = field(default_factory=dict)  # slug -> database URL (else SQLite)
    extra_env: dict[str, str] = field(default_factory=dict)  # HIE_* settings for every service
    children: dict[str, Child] = field(default_factory=dict)
    credentials: dict[str, str] = field(default_factory=dict)
    _tokens: dict[str, str] = field(default_factory=dict)

    def _env(self, prefix: str, name: str, port: int, **extra: str) -> dict[str, str]:
        values = {
            "NATS_URL": self.nats_url,
            "HOST": HOST,
            "PORT": str(port),
            "NODE": name,
            "ENVIRONMENT": "development",
            "REGISTRY_URL": self.registry_url,
            "DATABASE_URL": f"sqlite+aiosqlite:///{self.data / 'db' / (name + '.db')}",
            **self.extra_env,
            **extra,
        }
        return {f"{prefix}{k}": v for k, v in values.items()}

    def _child(self, name: str, module: str, env: dict[str, str], port: int) -> Child:
        child = Child(name, module, env, self.data / "logs" / f"{name}.log", f"http://{HOST}:{port}")
        self.children[name] = child
        return child

    async def start(self) -> FaultFederation:
        for folder in (self.data, self.data / "logs", self.data / "db"):
            folder.mkdir(parents=True, exist_ok=True)
        registry_port = free_port(HOST)
        self.registry_url = f"http://{HOST}:{registry_port}"
        ports = {slug: free_port(HOST) for slug in self.hubs}
        topology = {
            "hubs": {
                slug: {
                    "fhir_base": f"http://{HOST}:{port}/fhir",
                    "gateway": {"ae_title": seed.hub_gateway_ae(slug), "host": HOST, "port": free_port(HOST)},
                }
                for slug, port in ports.items()
            }
        }
        (self.data / "topology.json").write_text(json.dumps(topology))
        registry = self._child(
            "registry",
            "hie_registry",
            self._env(
                "HIE_REGISTRY_",
                "registry",
                registry_port,
                SEED_DEMO="true",
                CREDENTIALS_FILE=str(self.data / "credentials.json"),
                TOPOLOGY_FILE=str(self.data / "topology.json"),
            ),
            registry_port,
        ).start()
        await registry.wait_ready()
        self.credentials = json.loads((self.data / "credentials.json").read_text())
        consent_port = free_port(HOST)
        self.consent_url = f"http://{HOST}:{consent_port}"
        started = [
            self._child(
                "consent", "hie_consent", self._env("HIE_CONSENT_", "consent", consent_port), consent_port
            ).start()
        ]
        for slug, port in ports.items():
            extra = {"HUB": slug}
            if slug in self.hub_databases:
                extra["DATABASE_URL"] = self.hub_databases[slug]
            started.append(
                self._child(
                    f"hub-{slug}", "hie_hub", self._env("HIE_HUB_", f"hub-{slug}", port, **extra), port
                ).start()
            )
        await asyncio.gather(*(child.wait_ready() for child in started))
        return self

    def hub(self, slug: str) -> Child:
        return self.children[f"hub-{slug}"]

    def fhir(self, slug: str) -> str:
        url = self.hub(slug).url
        assert url is not None
        return f"{url}/fhir"

    @property
    def consent(self) -> Child:
        return self.children["consent"]

    async def restart(self, name: str) -> None:
        child = self.children[name]
        if child.alive:
            child.stop()
        await child.start().wait_ready()

    def stop(self) -> None:
        for child in reversed(list(self.children.values())):
            child.stop()

    def logs_with(self, needle: str, names: Iterable[str] | None = None) -> dict[str, str]:
        """The services whose log holds ``needle`` (a few lines around its first occurrence)."""
        found: dict[str, str] = {}
        for name, child in self.children.items():
            if names is not None and name not in names:
                continue
            text = child.text()
            at = text.find(needle)
            if at >= 0:
                found[name] = text[max(0, at - 500) : at + 1500]
        return found

    # --- calls --------------------------------------------------------------------------------------

    async def token(self, http: httpx.AsyncClient, code: str) -> str:
        if code not in self._tokens:
            response = await http.post(
                f"{self.registry_url}/oauth2/token",
                data={
                    "grant_type": "client_credentials",
                    "client_id": code,
                    "client_secret": self.credentials[code],
                },
            )
            response.raise_for_status()
            self._tokens[code] = response.json()["access_token"]
        return self._tokens[code]

    async def headers(self, http: httpx.AsyncClient, code: str) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {await self.token(http, code)}",
            "Accept": "application/fhir+json",
            "Content-Type": "application/fhir+json",
        }

    async def consent_to_exchange(self, http: httpx.AsyncClient, rrn: str) -> None:
        """The patient signs ENTIRE_CONSENT at the clinic (recorded at the consent service)."""
        resource = {
            "resourceType": "Consent",
            "status": "active",
            "scope": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                        "code": "patient-privacy",
                    }
                ]
            },
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "patient": {"identifier": {"system": RRN_SYSTEM, "value": rrn}},
            "organization": [{"identifier": {"system": KRNPI_SYSTEM, "value": CLINIC}}],
            "policyRule": {
                "coding": [
                    {"system": codes.CONSENT_POLICY_SYSTEM, "code": ConsentPolicy.ENTIRE_CONSENT.value}
                ]
            },
            "sourceAttachment": {"contentType": "image/png", "data": SIGNATURE},
        }
        response = await http.post(
            f"{self.consent_url}/fhir/Consent", json=resource, headers=await self.headers(http, CLINIC)
        )
        assert response.status_code == 201, response.text

    async def publish(self, http: httpx.AsyncClient, referral: Referral) -> httpx.Response:
        return await http.post(
            self.fhir(SOURCE_HUB), json=referral.body, headers=await self.headers(http, CLINIC)
        )

    async def destination_tasks(self, http: httpx.AsyncClient) -> list[dict[str, Any]]:
        """Every Task in the hospital's inbox at the destination hub (one page holds them all)."""
        response = await http.get(
            f"{self.fhir(DESTINATION_HUB)}/Task",
            params={"owner": f"{KRNPI_SYSTEM}|{HOSPITAL}", "_count": "1000"},
            headers=await self.headers(http, HOSPITAL),
        )
        assert response.status_code == 200, response.text
        return [entry["resource"] for entry in response.json().get("entry", [])]

    async def source_tasks(self, http: httpx.AsyncClient) -> list[dict[str, Any]]:
        """Every Task the clinic sent, as the source hub keeps it."""
        response = await http.get(
            f"{self.fhir(SOURCE_HUB)}/Task",
            params={"requester": f"{KRNPI_SYSTEM}|{CLINIC}", "_count": "1000"},
            headers=await self.headers(http, CLINIC),
        )
        assert response.status_code == 200, response.text
        return [entry["resource"] for entry in response.json().get("entry", [])]

    async def destination_documents(self, http: httpx.AsyncClient, rrn: str) -> list[str]:
        """The DocumentReference ids the hospital finds for the patient at the destination hub (ITI-67)."""
        ids: list[str] = []
        url: str | None = f"{self.fhir(DESTINATION_HUB)}/DocumentReference"
        params: dict[str, str] | None = {"patient.identifier": f"{RRN_SYSTEM}|{rrn}", "_count": "1000"}
        while url:
            response = await http.get(url, params=params, headers=await self.headers(http, HOSPITAL))
            assert response.status_code == 200, response.text
            bundle = response.json()
            ids += [entry["resource"]["id"] for entry in bundle.get("entry", [])]
            url = next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)
            params = None
        return ids
