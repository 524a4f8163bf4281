"""What the attack tests share: a small federation of real services (nats-server, registry, consent,
two hub nodes, one imaging gateway) running on an event loop in a thread of its own, tokens from the
real registry, forged tokens, and a tap on the services' logs.

The services live on their own loop so that synchronous clients (schemathesis, pynetdicom, raw
sockets) can block the test thread while the services keep answering.

A module of its own name (not ``conftest``): when several test directories run together, the name
``conftest`` belongs to whichever directory's conftest.py was imported last.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hie_consent.app import create_app as create_consent
from hie_consent.config import ConsentSettings
from hie_hub.app import create_app as create_hub
from hie_hub.config import HubSettings
from hie_imaging.app import create_app as create_gateway
from hie_imaging.config import ImagingSettings
from hie_platform.natsd import NatsServer, free_port
from hie_registry.app import create_app as create_registry
from hie_registry.config import RegistrySettings
from hie_schemas.auth import AUDIENCE

T = TypeVar("T")

ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"
SEVERANCE_HUB, SNUBH_HUB = "severance", "snubh"
SEVERANCE, SNUBH = "11100001", "31100002"  # the hub hospitals of the seeded directory
SEVERANCE_CLINIC, SEVERANCE_CLINIC_2, SNUBH_CLINIC = "11301001", "11301002", "31302001"
SEVERANCE_CLINIC_3 = "11301003"  # suspended and reinstated by the replay test only
AGENCY = "agency"
GATEWAY_AE = "GW_SEVERANCE"  # as hie_registry.seed.hub_gateway_ae
CLINIC_AE = f"PACS{SEVERANCE_CLINIC}"  # the seeded PACS of the severance clinic: allowed to store
START_TIMEOUT = 180.0  # two cores shared with other suites: generous


def root_conftest(config: pytest.Config) -> Any:
    """tests/conftest.py as pytest registered it (its RunningApp runs a service under uvicorn)."""
    return config.pluginmanager.get_plugin(str(ROOT_CONFTEST))


# --- the services' logs ----------------------------------------------------------------------------


class LogTap(logging.Handler):
    """Every log record the services write, as a dict (structlog's event dict, or the stdlib message)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, dict):
            entry = dict(record.msg)
        else:
            try:
                entry = {"event": record.getMessage()}
            except Exception:
                entry = {"event": str(record.msg)}
        entry.setdefault("logger", record.name)
        entry["level"] = record.levelname.lower()
        with self._lock:
            self.records.append(entry)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.records)

    def wait_for(self, what: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> dict:
        """The first record that satisfies ``predicate``; fails at the deadline (the line is written
        before the response is sent, so this normally returns at once)."""
        deadline = time.monotonic() + timeout
        while True:
            for entry in self.snapshot():
                if predicate(entry):
                    return entry
            if time.monotonic() > deadline:
                pytest.fail(f"no log line for {what}; last lines: {self.snapshot()[-5:]}")
            time.sleep(0.02)

    def refusal(self, correlation: str, status: int, timeout: float = 20.0) -> dict[str, Any]:
        """The "request refused" line of the request sent with X-Correlation-ID ``correlation``."""
        return self.wait_for(
            f"request {correlation} refused with {status}",
            lambda e: (
                e.get("event") == "request refused"
                and e.get("correlation_id") == correlation
                and e.get("status") == status
            ),
            timeout,
        )


def correlation() -> str:
    return f"attack-{uuid.uuid4().hex[:16]}"


def refused(response: httpx.Response, status: int) -> str:
    """The diagnostics of an OperationOutcome answered with ``status``."""
    assert response.status_code == status, f"{response.status_code}: {response.text[:500]}"
    assert response.headers["content-type"].startswith("application/fhir+json"), response.headers
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    assert "Traceback" not in response.text
    return " ".join(issue.get("diagnostics", "") for issue in body["issue"])


# --- forged tokens ---------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    return jwt.get_unverified_header(token), jwt.decode(token, options={"verify_signature": False})


def hs256(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    """An HS256 JWT built by hand (PyJWT refuses an asymmetric key as an HMAC secret, an attacker won't)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def unsigned(claims: dict[str, Any], kid: str) -> str:
    """``alg: none``: no signature at all."""
    header = {"alg": "none", "typ": "JWT", "kid": kid}
    return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}."


def es256(claims: dict[str, Any], key: ec.EllipticCurvePrivateKey, kid: str) -> str:
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})


# --- the federation on its own loop --------------------------------------------------------------


@dataclass
class Service:
    name: str
    url: str
    settings: Any
    running: Any


@dataclass
class AttackFederation:
    """The registry, consent, the severance and snubh hubs and the severance imaging gateway."""

    data: Path
    config: pytest.Config
    nats: NatsServer | None = None
    services: dict[str, Service] = field(default_factory=dict)
    credentials: dict[str, str] = field(default_factory=dict)
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _thread: threading.Thread | None = None
    _tokens: dict[str, tuple[float, str]] = field(default_factory=dict)

    # -- running things on the services' loop --

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> AttackFederation:
        self._thread = threading.Thread(target=self.loop.run_forever, name="attack-federation", daemon=True)
        self._thread.start()
        self.nats = NatsServer(self.data / "js").start()
        try:
            self.run(self._start(), timeout=START_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        return self

    async def _serve(self, name: str, app: Any, settings: Any) -> None:
        running = await root_conftest(self.config).RunningApp(app, settings.port).start(timeout=START_TIMEOUT)
        self.services[name] = Service(name, running.url, settings, running)

    async def _start(self) -> None:
        assert self.nats is not None
        nats_url = self.nats.url
        gateway_dicom = free_port()
        topology = {
            "hubs": {
                SEVERANCE_HUB: {
                    "gateway": {"ae_title": GATEWAY_AE, "host": "127.0.0.1", "port": gateway_dicom}
                }
            }
        }
        (self.data / "topology.json").write_text(json.dumps(topology))
        port = free_port()
        registry = RegistrySettings(
            database_url=f"sqlite+aiosqlite:///{self.data / 'registry.db'}",
            nats_url=nats_url,
            port=port,
            registry_url=f"http://127.0.0.1:{port}",
            seed_demo=True,
            credentials_file=self.data / "credentials.json",
            topology_file=self.data / "topology.json",
            node="attack-registry",
        )
        await self._serve("registry", create_registry(registry), registry)
        self.credentials = json.loads((self.data / "credentials.json").read_text())
        consent = ConsentSettings(
            database_url=f"sqlite+aiosqlite:///{self.data / 'consent.db'}",
            nats_url=nats_url,
            registry_url=registry.registry_url,
            port=free_port(),
            node="attack-consent",
        )
        await self._serve("consent", create_consent(consent), consent)
        for slug in (SEVERANCE_HUB, SNUBH_HUB):
            hub = HubSettings(
                hub=slug,
                port=free_port(),
                database_url=f"sqlite+aiosqlite:///{self.data / f'hub-{slug}.db'}",
                nats_url=nats_url,
                registry_url=registry.registry_url,
                node=f"attack-{slug}",
                consent_timeout_seconds=5.0,
            )
            await self._serve(slug, create_hub(hub), hub)
        gateway = ImagingSettings(
            hub=SEVERANCE_HUB,
            ae_title=GATEWAY_AE,
            port=free_port(),
            dicom_host="127.0.0.1",
            dicom_port=gateway_dicom,
            spool_dir=self.data / "spool",
            database_url=f"sqlite+aiosqlite:///{self.data / 'imaging.db'}",
            nats_url=nats_url,
            registry_url=registry.registry_url,
            node="attack-imaging",
        )
        await self._serve("imaging", create_gateway(gateway), gateway)

    def stop(self) -> None:
        for service in reversed(list(self.services.values())):
            try:
                self.run(service.running.stop(), timeout=60)
            except Exception as exc:  # keep stopping the rest
                print(f"stopping {service.name}: {type(exc).__name__}: {exc}")
        self.services.clear()
        if self._thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
            self._thread = None
        if not self.loop.is_running() and not self.loop.is_closed():
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()
        if self.nats is not None:
            self.nats.stop()
            self.nats = None

    # -- what the tests use --

    def url(self, service: str) -> str:
        return self.services[service].url

    @property
    def registry_db(self) -> Path:
        return self.data / "registry.db"

    @property
    def issuer(self) -> str:
        settings: RegistrySettings = self.services["registry"].settings
        return settings.issuer

    def token(self, client_id: str, *, fresh: bool = False) -> str:
        """A real access token from the registry's token endpoint (re-used for two minutes)."""
        cached = self._tokens.get(client_id)
        if fresh or cached is None or time.monotonic() - cached[0] > 120:
            response = httpx.post(
                f"{self.url('registry')}/oauth2/token",
                data={
                    "grant_type": "client_credentials",
                    "client_id": client_id,
                    "client_secret": self.credentials[client_id],
                },
                timeout=30,
            )
            response.raise_for_status()
            cached = (time.monotonic(), response.json()["access_token"])
            self._tokens[client_id] = cached
        return cached[1]

    def signing_key(self, kid: str) -> ec.EllipticCurvePrivateKey:
        """The registry's own private key of ``kid``, read from its database: to mint tokens that are
        correctly signed but wrong in one claim (expired, another audience, another issuer)."""
        with sqlite3.connect(self.registry_db) as db:
            row = db.execute("SELECT private_pem FROM signing_keys WHERE kid = ?", (kid,)).fetchone()
        assert row is not None, f"no signing key {kid} in the registry database"
        key = serialization.load_pem_private_key(row[0].encode(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key

    def jwks(self) -> dict[str, Any]:
        response = httpx.get(f"{self.url('registry')}/.well-known/jwks.json", timeout=30)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def http(self, service: str) -> httpx.Client:
        return httpx.Client(base_url=self.url(service), timeout=60)


def claims_like(token: str, **changes: Any) -> dict[str, Any]:
    """The claims of a real token with some changed (None removes a claim)."""
    _, claims = unverified(token)
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def fresh_claims(inst: str, hub: str | None, issuer: str, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": inst,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
        "inst": inst,
        "kind": "clinic",
        "hub": hub,
        "scope": "exchange",
    }
    claims.update(changes)
    return claims


# --- patients and documents ------------------------------------------------------------------------


def new_rrn() -> str:
    """A fresh, well-formed resident registration number (a different patient for every test)."""
    n = uuid.uuid4().int
    birth = f"{40 + n % 60:02d}{1 + (n >> 8) % 12:02d}{1 + (n >> 16) % 28:02d}"
    return f"{birth}-{1 + (n >> 24) % 2}{(n >> 32) % 10**6:06d}"


def publish_summary(fed: AttackFederation, hub: str, author: str, rrn: str) -> str:
    """A care record summary by ``author`` (addressed to no one) published at ``hub``: its document id."""
    from hie_schemas.codes import DocumentType
    from hie_schemas.documents.builders import build_document, build_submission

    doc = build_document(
        DocumentType.CARE_RECORD_SUMMARY,
        author_code=author,
        author_name=f"요양기관 {author}",
        patient_rrn=rrn,
    )
    body = build_submission([doc], author_code=author, patient_rrn=rrn)
    with fed.http(hub) as http:
        response = http.post(
            "/fhir",
            json=body,
            headers={"Authorization": f"Bearer {fed.token(author)}", "Content-Type": "application/fhir+json"},
        )
    assert response.status_code == 200, response.text
    locations = [e["response"]["location"] for e in response.json()["entry"]]
    (document_id,) = [loc.split("/")[1] for loc in locations if loc.startswith("DocumentReference/")]
    return document_id


def audit_records(fed: AttackFederation, hub: str) -> list[dict[str, Any]]:
    """The hub's audit trail, straight from its database."""
    with sqlite3.connect(fed.data / f"hub-{hub}.db") as db:
        rows = db.execute("SELECT record FROM audit_log ORDER BY sequence").fetchall()
    return [json.loads(row[0]) if isinstance(row[0], str) else row[0] for row in rows]
