"""Registry at national scale: 10,000 institutions; directory search p50/p99 and tokens per second.

Baseline in the same run: GET /healthz on the same process (the HTTP stack's own floor).
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import create_async_engine

from bench.common import Figure, Report, Timing, run_concurrently
from hie_platform.migrations import upgrade
from hie_platform.natsd import NatsServer, free_port, wait_for_port
from hie_registry.models import Client, Institution
from hie_registry.seed import HUBS
from hie_registry.service import hash_secret
from hie_schemas.codes import REGIONS

NAME = "registry"
INSTITUTIONS = 10_000
CLIENTS = 200
WORDS = ["연세", "튼튼", "바른", "행복", "우리", "하나", "미래", "중앙", "새봄", "푸른", "온누리", "365"]
TYPES = ["내과의원", "가정의학과의원", "정형외과의원", "소아청소년과의원", "이비인후과의원", "영상의학과의원"]
MIGRATIONS = Path(__file__).parents[1] / "services/registry/hie_registry/migrations"


async def seed(url: str, rng: random.Random) -> dict[str, str]:
    await asyncio.to_thread(upgrade, MIGRATIONS, url)
    engine = create_async_engine(url)
    now = datetime.now(UTC)
    secrets: dict[str, str] = {}
    rows: list[dict[str, object]] = []
    clients: list[dict[str, object]] = []
    for n in range(INSTITUTIONS):
        code = f"8{n:07d}"
        region = rng.choice(REGIONS)
        hub = rng.choice(HUBS)
        rows.append(
            {
                "code": code,
                "name": f"{region} {rng.choice(WORDS)}{rng.choice(TYPES)} {n}",
                "name_en": None,
                "kind": "clinic",
                "region": region,
                "state": "active" if n % 10 else "suspended",
                "hub": hub.hub,
                "departments": ["0100"],
                "fhir_base": None,
                "dicom_ae": f"PACS{code}",
                "dicom_host": "10.0.0.1",
                "dicom_port": 104,
                "contacts": {"phone": "02-000-0000"},
                "created_at": now,
                "updated_at": now,
            }
        )
        if n % 10 and len(clients) < CLIENTS:
            secret = f"bench-secret-{n}"
            secrets[code] = secret
            clients.append(
                {
                    "client_id": code,
                    "institution_code": code,
                    "secret_hash": hash_secret(secret),
                    "scopes": "exchange",
                    "created_at": now,
                    "revoked_at": None,
                }
            )
    async with engine.begin() as conn:
        await conn.execute(insert(Institution), rows)
        await conn.execute(insert(Client), clients)
    await engine.dispose()
    return secrets


async def server_buckets(http: httpx.AsyncClient, route: str) -> dict[float, float]:
    """The registry's own latency histogram for GET ``route`` (cumulative counts by upper bound, in s)."""
    text = (await http.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        if family.name == "hie_http_request_seconds":
            return {
                float(sample.labels["le"]): sample.value
                for sample in family.samples
                if sample.name.endswith("_bucket")
                and sample.labels.get("route") == route
                and sample.labels.get("method") == "GET"
            }
    return {}


def server_p99_bound(before: dict[float, float], after: dict[float, float]) -> float:
    """The upper bound (ms) of the histogram bucket that holds the server-side p99 of the requests made
    between two reads of the histogram: what the registry itself took, without the client's share
    (on 2 cores the bench's own client, one Python process, made most of the client-side tail)."""
    counts = sorted((bound, after[bound] - before.get(bound, 0.0)) for bound in after)
    total = counts[-1][1] if counts else 0.0
    return next((bound * 1000 for bound, count in counts if count >= 0.99 * total), float("inf"))


class Calls:
    """The registry requests the benchmark makes, one method per operation."""

    def __init__(self, http: httpx.AsyncClient, secrets: dict[str, str], rng: random.Random) -> None:
        self.http = http
        self.secrets = secrets
        self.codes = list(secrets)
        self.rng = rng

    async def health(self, _: int) -> None:
        (await self.http.get("/healthz")).raise_for_status()

    async def by_name(self, _: int) -> None:
        r = await self.http.get("/fhir/Organization", params={"name": self.rng.choice(WORDS), "_count": "20"})
        r.raise_for_status()

    async def by_hub(self, _: int) -> None:
        hub = self.rng.choice(HUBS)
        r = await self.http.get(
            "/fhir/Organization", params={"partof": f"Organization/{hub.code}", "_count": "50"}
        )
        r.raise_for_status()

    async def by_region(self, _: int) -> None:
        r = await self.http.get(
            "/fhir/Organization",
            params={"address-state": self.rng.choice(REGIONS), "active": "true", "_count": "20"},
        )
        r.raise_for_status()

    async def read(self, _: int) -> None:
        (
            await self.http.get(f"/fhir/Organization/8{self.rng.randrange(INSTITUTIONS):07d}")
        ).raise_for_status()

    async def token(self, i: int) -> None:
        code = self.codes[i % len(self.codes)]
        r = await self.http.post(
            "/oauth2/token",
            data={"grant_type": "client_credentials", "client_id": code, "client_secret": self.secrets[code]},
        )
        r.raise_for_status()


def report_directory(report: Report, label: str, timing: Timing, bound: float, baseline: Timing) -> None:
    name = f"directory {label} p99 at the server (upper bound of its histogram bucket)"
    report.add(Figure(NAME, name, bound, "ms"))
    report.add(Figure(NAME, f"directory {label} p50", timing.p50_ms, "ms", "healthz p50", baseline.p50_ms))
    report.add(Figure(NAME, f"directory {label} p99", timing.p99_ms, "ms", "healthz p99", baseline.p99_ms))
    report.add(
        Figure(
            NAME, f"directory {label} throughput", timing.per_second, "req/s", "healthz", baseline.per_second
        )
    )


async def measure(base: str, secrets: dict[str, str], report: Report, rng: random.Random) -> None:
    async with httpx.AsyncClient(
        base_url=base, timeout=30.0, limits=httpx.Limits(max_connections=16)
    ) as http:
        calls = Calls(http, secrets, rng)
        for op in (calls.health, calls.by_name):  # warm up connections, caches and SQLite's page cache
            await run_concurrently(op, 50, 8)
        baseline = await run_concurrently(calls.health, 2000, 8)
        report.add(Figure(NAME, "GET /healthz throughput (baseline)", baseline.per_second, "req/s"))
        report.add(Figure(NAME, "GET /healthz p99 (baseline)", baseline.p99_ms, "ms"))
        for label, op, count, route in (
            ("search by name", calls.by_name, 500, "/fhir/Organization"),
            ("search by hub (partof)", calls.by_hub, 500, "/fhir/Organization"),
            ("search by region, active", calls.by_region, 500, "/fhir/Organization"),
            ("read Organization", calls.read, 1000, "/fhir/Organization/{code}"),
        ):
            before = await server_buckets(http, route)
            timing = await run_concurrently(op, count, 8)
            bound = server_p99_bound(before, await server_buckets(http, route))
            report_directory(report, label, timing, bound, baseline)
        tokens = await run_concurrently(calls.token, 1000, 8)
        report.add(
            Figure(NAME, "tokens issued", tokens.per_second, "tokens/s", "healthz", baseline.per_second)
        )
        report.add(Figure(NAME, "token p99", tokens.p99_ms, "ms", "healthz p99", baseline.p99_ms))


async def run(report: Report) -> None:
    rng = random.Random(7)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        url = f"sqlite+aiosqlite:///{data / 'registry.db'}"
        print(f"registry: seeding {INSTITUTIONS} institutions…", flush=True)
        secrets = await seed(url, rng)
        nats = NatsServer(data / "nats").start()
        port = free_port()
        env = {
            **os.environ,
            "HIE_REGISTRY_DATABASE_URL": url,
            "HIE_REGISTRY_PORT": str(port),
            "HIE_REGISTRY_NATS_URL": nats.url,
            "HIE_REGISTRY_REGISTRY_URL": f"http://127.0.0.1:{port}",
            "HIE_REGISTRY_LOG_LEVEL": "WARNING",
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "hie_registry"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port("127.0.0.1", port, 60, process)
            started = time.perf_counter()
            await measure(f"http://127.0.0.1:{port}", secrets, report, rng)
            print(f"registry: measured in {time.perf_counter() - started:.1f}s", flush=True)
        finally:
            process.terminate()
            process.wait(30)
            nats.stop()


if __name__ == "__main__":
    r = Report()
    asyncio.run(run(r))
    r.write("registry")
