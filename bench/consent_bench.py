"""Consent at the hubs: local decisions per second, and how fast a withdrawal is in force everywhere.

Setup: nats-server, the registry (seeded) and the consent service as real processes on SQLite; three
hub replicas (``ConsentReplica`` + ``ConsentGate``, each with its own runtime, SQLite database and
durable consumer) in this process — the replica is what a hub node runs for consent, and three full
hub nodes would add their FHIR stacks and nothing to these figures.

- decisions per second at one hub: the local decision (replicated history + the registry client's
  standing, exactly what ``hie_hub.consent.ConsentGate`` does on the hot path), and, as the in-run
  baseline, the same questions through the central decision point (NATS request/reply).
- decisions per CPU-second of this process (``time.process_time``, one process, one decision
  awaited after the other, the median of three rounds): what one core gives the local decision
  (issue 13: >= 50,000/s per core), beside the central RPC's rate measured in the same run.
- withdrawal in force at all hubs: 100 entire withdrawals recorded one after another at the consent
  service; for each, the time from the consent service's 201 until every hub's own decision is
  ``deny-withdrawn`` (each hub polled every millisecond; denials are not confirmed centrally here).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx

from bench.common import Figure, Report, Timing, percentile, run_concurrently
from hie_hub.app import MIGRATIONS as HUB_MIGRATIONS
from hie_hub.config import HubSettings
from hie_hub.consent import ConsentGate
from hie_hub.consent_replica import ConsentReplica
from hie_hub.models import PLATFORM as HUB_TABLES
from hie_platform.natsd import NatsServer, free_port, wait_for_port
from hie_platform.runtime import start_runtime
from hie_platform.settings import DEV_PATIENT_KEY_SECRET, ReplicaSettings
from hie_schemas import codes
from hie_schemas.consent import FlowQuery
from hie_schemas.identifiers import KRNPI_SYSTEM, RRN_SYSTEM, patient_key_from_rrn

NAME = "consent"
PATIENTS = 200
PER_CORE_DECISIONS = 20_000
PER_CORE_ROUNDS = 3
WITHDRAWALS = 100
HUBS = 3
CLINIC, HOLDER, RECIPIENT = "11301001", "11100001", "31100002"
CHANNEL = "https://hie-federation.kr/fhir/StructureDefinition/consent-channel"
SIGNATURE = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
    )
).decode()


def _spawn(module: str, env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", module],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port("127.0.0.1", port, 60, process)
    return process


class Desk:
    """A clinic's EMR recording consents at the consent service."""

    def __init__(self, http: httpx.AsyncClient, registry: str, consent: str, secret: str) -> None:
        self.http = http
        self.registry = registry
        self.consent = consent
        self.secret = secret
        self._token: tuple[float, str] | None = None

    async def token(self) -> str:
        if self._token is None or time.monotonic() - self._token[0] > 120:
            response = await self.http.post(
                f"{self.registry}/oauth2/token",
                data={"grant_type": "client_credentials", "client_id": CLINIC, "client_secret": self.secret},
            )
            response.raise_for_status()
            self._token = (time.monotonic(), str(response.json()["access_token"]))
        return self._token[1]

    async def record(self, rrn: str, policy: str) -> None:
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
            "policyRule": {"coding": [{"system": codes.CONSENT_POLICY_SYSTEM, "code": policy}]},
            "extension": [{"url": CHANNEL, "valueCode": "sign-pad"}],
            "sourceAttachment": {"contentType": "image/png", "data": SIGNATURE},
        }
        response = await self.http.post(
            f"{self.consent}/fhir/Consent",
            json=resource,
            headers={
                "Authorization": f"Bearer {await self.token()}",
                "Content-Type": "application/fhir+json",
            },
        )
        if response.status_code != 201:
            raise RuntimeError(f"recording consent failed: {response.status_code} {response.text[:200]}")


@asynccontextmanager
async def hub_replicas(data: Path, nats_url: str, registry_url: str) -> AsyncIterator[list[ConsentGate]]:
    """Three hubs' consent replicas and gates, each with its own runtime and database."""
    async with AsyncExitStack() as stack:
        gates: list[ConsentGate] = []
        for n in range(HUBS):
            settings = HubSettings(
                hub=f"bench{n}",
                database_url=f"sqlite+aiosqlite:///{data / f'hub{n}.db'}",
                nats_url=nats_url,
                registry_url=registry_url,
                node=f"bench-hub-{n}",
                log_level="WARNING",
            )
            runtime = await stack.enter_async_context(
                start_runtime(settings, "hub-node", HUB_TABLES, HUB_MIGRATIONS)
            )
            replica = ConsentReplica(runtime, settings.hub, ReplicaSettings(consent_confirm_denials=False))
            await replica.start()
            stack.push_async_callback(replica.stop)
            gates.append(ConsentGate(runtime.bus, 2.0, replica, hub=settings.hub))
        yield gates


def _query(key: str, created: datetime) -> FlowQuery:
    return FlowQuery(
        patient_key=key,
        holder=HOLDER,
        holder_department="2300",
        recipient=RECIPIENT,
        document_created_at=created,
        at=datetime.now(UTC),
    )


async def _until_all(
    gates: list[ConsentGate], key: str, created: datetime, rule: str, timeout: float
) -> None:
    async def one(gate: ConsentGate) -> None:
        deadline = time.perf_counter() + timeout
        while (await gate.decide(_query(key, created))).rule.value != rule:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{rule} not reached within {timeout} s")
            await asyncio.sleep(0.001)

    await asyncio.gather(*(one(g) for g in gates))


async def measure(report: Report, desk: Desk, gates: list[ConsentGate]) -> None:
    rng = random.Random(11)
    rrns = [f"9{n // 10000 % 10}0{1 + n % 9}1{1 + n % 9}-1{n:06d}" for n in range(PATIENTS)]
    keys = [patient_key_from_rrn(r, DEV_PATIENT_KEY_SECRET.encode()) for r in rrns]
    print(f"consent: recording {PATIENTS} consents…", flush=True)
    for rrn in rrns:
        await desk.record(rrn, "ENTIRE_CONSENT")
    for gate in gates:
        assert gate.replica is not None
        if not await gate.replica.wait_current(30.0):
            raise RuntimeError("a hub replica never became current")
    created = datetime.now(UTC)
    await _until_all(gates, keys[-1], created, "permit-consent", 30.0)

    local, central = gates[0], ConsentGate(gates[0].bus, 2.0, hub=gates[0].hub)  # no replica: by RPC

    async def ask_local(_: int) -> None:
        decision = await local.decide(_query(rng.choice(keys), created))
        assert decision.permit, decision

    async def ask_central(_: int) -> None:
        decision = await central.decide(_query(rng.choice(keys), created))
        assert decision.permit, decision

    await run_concurrently(ask_local, 200, 4)  # warm up caches and connections
    await run_concurrently(ask_central, 200, 4)
    for concurrency in (1, 16):
        base = await run_concurrently(ask_central, 2000, concurrency)
        mine = await run_concurrently(ask_local, 5000, concurrency)
        _decision_figures(report, concurrency, mine, base)
        if concurrency == 1:
            await _per_core(report, local, [_query(rng.choice(keys), created) for _ in range(1000)], base)

    print(f"consent: {WITHDRAWALS} withdrawals, each until in force at {HUBS} hubs…", flush=True)
    from_commit: list[float] = []
    from_request: list[float] = []
    for rrn, key in zip(rrns[:WITHDRAWALS], keys[:WITHDRAWALS], strict=True):
        started = time.perf_counter()
        await desk.record(rrn, "ENTIRE_WITHDRAWAL")
        recorded = time.perf_counter()
        await _until_all(gates, key, created, "deny-withdrawn", 10.0)
        done = time.perf_counter()
        from_commit.append(done - recorded)
        from_request.append(done - started)
    for label, samples in (("after the 201", from_commit), ("after the request was sent", from_request)):
        for q in (50, 99):
            report.add(
                Figure(
                    NAME,
                    f"withdrawal in force at all {HUBS} hubs p{q}, {label}",
                    percentile(samples, q) * 1000,
                    "ms",
                )
            )
    report.add(
        Figure(
            NAME, f"withdrawal in force at all {HUBS} hubs max, after the 201", max(from_commit) * 1000, "ms"
        )
    )


async def _per_core(report: Report, gate: ConsentGate, queries: list[FlowQuery], base: Timing) -> None:
    """Decisions per CPU-second of this process: one decision awaited after the other."""
    rates: list[float] = []
    for _ in range(PER_CORE_ROUNDS):
        print(f"consent: load average {_loadavg()}", flush=True)
        started = time.process_time()
        for i in range(PER_CORE_DECISIONS):
            decision = await gate.decide(queries[i % len(queries)])
            if not decision.permit:
                raise RuntimeError(f"a consented flow was refused: {decision.rule.value}")
        rates.append(PER_CORE_DECISIONS / (time.process_time() - started))
    print(f"consent: per-core rounds {[round(r) for r in rates]} dec/CPU-s", flush=True)
    report.add(
        Figure(
            NAME,
            "hub-local decisions per CPU-second (1 process, median of 3)",
            statistics.median(rates),
            "dec/s",
            "central RPC dec/s (1 concurrent)",
            base.per_second,
        )
    )


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def _decision_figures(report: Report, concurrency: int, mine: Timing, base: Timing) -> None:
    where = f"{concurrency} concurrent"
    report.add(Figure(NAME, f"central RPC decisions/s ({where}, baseline)", base.per_second, "dec/s"))
    report.add(
        Figure(
            NAME, f"hub-local decisions/s ({where})", mine.per_second, "dec/s", "central RPC", base.per_second
        )
    )
    report.add(Figure(NAME, f"central RPC decision p99 ({where}, baseline)", base.p99_ms, "ms"))
    report.add(
        Figure(NAME, f"hub-local decision p99 ({where})", mine.p99_ms, "ms", "central RPC p99", base.p99_ms)
    )


async def run(report: Report) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        nats = NatsServer(data / "nats").start()
        registry_port, consent_port = free_port(), free_port()
        registry_url = f"http://127.0.0.1:{registry_port}"
        consent_url = f"http://127.0.0.1:{consent_port}"
        processes: list[subprocess.Popen[bytes]] = []
        try:
            processes.append(
                _spawn(
                    "hie_registry",
                    {
                        "HIE_REGISTRY_DATABASE_URL": f"sqlite+aiosqlite:///{data / 'registry.db'}",
                        "HIE_REGISTRY_PORT": str(registry_port),
                        "HIE_REGISTRY_NATS_URL": nats.url,
                        "HIE_REGISTRY_REGISTRY_URL": registry_url,
                        "HIE_REGISTRY_SEED_DEMO": "true",
                        "HIE_REGISTRY_CREDENTIALS_FILE": str(data / "credentials.json"),
                        "HIE_REGISTRY_LOG_LEVEL": "WARNING",
                    },
                    registry_port,
                )
            )
            processes.append(
                _spawn(
                    "hie_consent",
                    {
                        "HIE_CONSENT_DATABASE_URL": f"sqlite+aiosqlite:///{data / 'consent.db'}",
                        "HIE_CONSENT_PORT": str(consent_port),
                        "HIE_CONSENT_NATS_URL": nats.url,
                        "HIE_CONSENT_REGISTRY_URL": registry_url,
                        "HIE_CONSENT_LOG_LEVEL": "WARNING",
                    },
                    consent_port,
                )
            )
            secret: str = json.loads((data / "credentials.json").read_text())[CLINIC]
            print(f"consent: load average {_loadavg()} at the start", flush=True)
            started = time.perf_counter()
            async with (
                httpx.AsyncClient(timeout=30.0) as http,
                hub_replicas(data, nats.url, registry_url) as gates,
            ):
                await measure(report, Desk(http, registry_url, consent_url, secret), gates)
            print(f"consent: measured in {time.perf_counter() - started:.1f}s", flush=True)
            print(f"consent: load average {_loadavg()} at the end", flush=True)
        finally:
            for process in reversed(processes):
                process.terminate()
                process.wait(30)
            nats.stop()


if __name__ == "__main__":
    r = Report()
    asyncio.run(run(r))
    r.write("consent")
