"""Hub node: publish throughput, cross-hub delivery, walk-in search, ITI-67 at scale.

A real local federation (``hie up``'s launcher: nats-server, registry, consent service, three hubs
with their gateways, each a separate process, on SQLite) plus, for the scale figures, a fourth hub
process over a database seeded directly with N DocumentReferences. Baselines in the same run: the
bare fhir.resources parse-and-validate rate of the very transaction that is published, local publish
latency next to cross-hub delivery, a single-hub walk-in search next to the three-hub one. During the
CRS publishes the CPU time of every process of the federation is read from /proc, so the report
shows what the registry and the consent service spend per publish beside the hub, and how busy the
machine was: all of them share its cores here.

``HIE_BENCH_HUB_LARGE`` sets the large seed (default 1,000,000 DocumentReferences).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, insert

from bench.common import Figure, Report, Timing, percentile, run_concurrently
from hie_cli.demo import consent_resource
from hie_cli.launcher import Launcher, LaunchOptions
from hie_hub.core.bundles import created_tasks
from hie_hub.models import Document
from hie_platform.migrations import upgrade
from hie_platform.natsd import free_port, wait_for_port
from hie_schemas.codes import DocumentType
from hie_schemas.consent import ConsentPolicy
from hie_schemas.documents.builders import build_document, build_submission
from hie_schemas.fhir import parse_resource
from hie_schemas.identifiers import KRNPI_SYSTEM, PATIENT_KEY_SYSTEM, RRN_SYSTEM

NAME = "hub"
MIGRATIONS = Path(__file__).parents[1] / "services/hub-node/hie_hub/migrations"
SEVERANCE_CLINIC, SNUBH_CLINIC, CNUH_CLINIC = "11301001", "31302001", "25303001"
SNUBH, CNUH = "31100002", "25100003"
KNUH_CLINIC = "23304001"  # a clinic of the fourth hub (knuh), whose database is seeded directly
SCALES = (10_000, int(os.environ.get("HIE_BENCH_HUB_LARGE", "1000000")))
DOCS_PER_PATIENT = 10
CONCURRENCY = 8
LATENCY_ROUNDS = 3  # interleaved rounds of local publishes and cross-hub deliveries


def new_rrn(rng: random.Random) -> str:
    birth = f"{rng.randrange(40, 99):02d}{rng.randrange(1, 13):02d}{rng.randrange(1, 29):02d}"
    return f"{birth}-1{rng.randrange(10**6):06d}"


class Federation:
    """The running federation and tokens for its institutions."""

    def __init__(self, launched: Any, http: httpx.AsyncClient) -> None:
        self.launched = launched
        self.http = http
        # Every seeded institution's secret (the launcher lists only those of the hubs it started).
        self.secrets: dict[str, str] = json.loads((Path(launched.data_dir) / "credentials.json").read_text())
        self.fhir = {hub.slug: hub.fhir_base for hub in launched.hubs}
        self._tokens: dict[str, str] = {}

    async def token(self, code: str) -> str:
        if code not in self._tokens:
            response = await self.http.post(
                f"{self.launched.registry_url}/oauth2/token",
                data={
                    "grant_type": "client_credentials",
                    "client_id": code,
                    "client_secret": self.secrets[code],
                },
            )
            response.raise_for_status()
            self._tokens[code] = response.json()["access_token"]
        return self._tokens[code]

    async def call(self, method: str, url: str, as_: str, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {await self.token(as_)}", **kw.pop("headers", {})}
        return await self.http.request(method, url, headers=headers, **kw)

    async def consent(self, rrn: str) -> None:
        body = consent_resource(rrn, SEVERANCE_CLINIC, ConsentPolicy.ENTIRE_CONSENT)
        response = await self.call(
            "POST", f"{self.launched.consent_url}/fhir/Consent", SEVERANCE_CLINIC, json=body
        )
        response.raise_for_status()

    async def publish(self, hub: str, author: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self.call("POST", self.fhir[hub], author, json=body)
        if response.status_code != 200:
            raise RuntimeError(f"publish at {hub}: {response.status_code} {response.text[:300]}")
        data: dict[str, Any] = response.json()
        return data


def submission(kind: DocumentType, author: str, rrn: str, recipients: list[str]) -> dict[str, Any]:
    doc = build_document(
        kind,
        author_code=author,
        author_name=f"요양기관 {author}",
        patient_rrn=rrn,
        created_at=datetime.now(UTC),
        recipient_code=recipients[0] if recipients else None,
    )
    return build_submission([doc], author_code=author, patient_rrn=rrn, recipients=recipients)


def bare_validation_rate(body: dict[str, Any], seconds: float = 3.0) -> float:
    """fhir.resources (R4B models) parse-and-validate of the transaction, per second, one core."""
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        parse_resource(body)
        count += 1
    return count / (time.perf_counter() - started)


def located(response: dict[str, Any], resource_type: str) -> str:
    if resource_type == "Task":  # named on the DocumentReference's entry (one entry per request entry)
        return created_tasks(response)[0]
    locations = [str(e["response"]["location"]) for e in response["entry"]]
    return next(loc.split("/")[1] for loc in locations if loc.startswith(f"{resource_type}/"))


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of every CPU so far (/proc/stat's first line; idle and iowait are idle)."""
    ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


async def publishing(fed: Federation, report: Report, rng: random.Random, pids: dict[str, int]) -> None:
    rrns = [new_rrn(rng) for _ in range(40)]
    await asyncio.gather(*(fed.consent(rrn) for rrn in rrns))
    sample = submission(DocumentType.CARE_RECORD_SUMMARY, SEVERANCE_CLINIC, rrns[0], [])
    bare = bare_validation_rate(sample)
    report.add(Figure(NAME, "fhir.resources parse+validate of the ITI-65 transaction", bare, "docs/s"))
    await publish_throughput(fed, report, rrns, bare, pids)
    local, delivery = await latency_rounds(fed, rrns)
    report.add(Figure(NAME, "ITI-65 local publish p50 (1 client)", local.p50_ms, "ms"))
    report.add(Figure(NAME, "ITI-65 local publish p99 (1 client)", local.p99_ms, "ms"))
    for q in (50, 99):
        local_ms = local.p50_ms if q == 50 else local.p99_ms
        at_other_hub = percentile(delivery, q) * 1000
        report.add(
            Figure(
                NAME,
                f"referral delivered at the other hub p{q}",
                at_other_hub,
                "ms",
                f"local publish p{q}",
                local_ms,
            )
        )

    # After the latency figures: a burst of referrals leaves a delivery backlog behind it.
    async def referral(i: int) -> None:
        body = submission(DocumentType.REFERRAL, SEVERANCE_CLINIC, rrns[i % 40], [SNUBH])
        await fed.publish("severance", SEVERANCE_CLINIC, body)

    referrals = await run_concurrently(referral, 200, CONCURRENCY)
    report.add(
        Figure(
            NAME,
            "ITI-65 referral publish throughput (consent + delivery)",
            referrals.per_second,
            "docs/s",
            "bare parse+validate",
            bare,
        )
    )


def crs_publish(fed: Federation, rrns: list[str]) -> Callable[[int], Awaitable[None]]:
    """The i-th CRS publish at severance (for run_concurrently)."""

    async def summary(i: int) -> None:
        await fed.publish(
            "severance",
            SEVERANCE_CLINIC,
            submission(DocumentType.CARE_RECORD_SUMMARY, SEVERANCE_CLINIC, rrns[i % len(rrns)], []),
        )

    return summary


async def latency_rounds(fed: Federation, rrns: list[str]) -> tuple[Timing, list[float]]:
    """One client's CRS publishes (the baseline) and cross-hub referral deliveries, in
    ``LATENCY_ROUNDS`` interleaved rounds of 100 each, pooled: both p99s are then read off 300
    samples taken in the same stretch of time (until 2026-12-07: 150 publishes, then 100 deliveries,
    so each p99 was the second-largest sample of one stretch)."""
    summary = crs_publish(fed, rrns)
    local, delivery = Timing(0, 0.0, []), []
    for _ in range(LATENCY_ROUNDS):
        timing = await run_concurrently(summary, 100, 1)
        local.count, local.seconds = local.count + timing.count, local.seconds + timing.seconds
        local.latencies += timing.latencies
        delivery += await delivered(fed, rrns, 100)
    return local, delivery


async def publish_throughput(
    fed: Federation, report: Report, rrns: list[str], bare: float, pids: dict[str, int]
) -> None:
    """CRS publishes by 8 clients: docs/s and the CPU per request of the hub and the federation."""
    summary = crs_publish(fed, rrns)
    await run_concurrently(summary, 40, CONCURRENCY)  # warm up
    before = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
    busy_before = machine_busy()
    timing = await run_concurrently(summary, 400, CONCURRENCY)
    busy, total = (a - b for a, b in zip(machine_busy(), busy_before, strict=True))
    cpu_ms = {name: (process_cpu_seconds(pid) - before[name]) / 400 * 1000 for name, pid in pids.items()}
    name = "ITI-65 publish throughput (CRS, 8 clients)"
    report.add(Figure(NAME, name, timing.per_second, "docs/s", "bare parse+validate", bare))
    name = "ITI-65 publish: hub CPU per request (CRS, 8 clients)"
    report.add(Figure(NAME, name, cpu_ms["hub-severance"], "ms", "bare parse+validate, ms", 1000 / bare))
    # Where else the machine's CPU went during those publishes: every service of the federation runs
    # on the same cores here, so their work per publish bounds the throughput too.
    for service in ("registry", "consent"):
        name = f"ITI-65 publish: {service} CPU per request (its event consumers and RPCs)"
        report.add(Figure(NAME, name, cpu_ms[service], "ms", "hub CPU per request", cpu_ms["hub-severance"]))
    name = "ITI-65 publish: every process of the federation (not the bench's clients), CPU per request"
    report.add(Figure(NAME, name, sum(cpu_ms.values()), "ms", "hub CPU per request", cpu_ms["hub-severance"]))
    report.add(Figure(NAME, "ITI-65 publish: machine busy during the publishes", 100 * busy / total, "%"))


async def delivered(fed: Federation, rrns: list[str], count: int) -> list[float]:
    """From the POST of a referral at severance until SNUBH's EMR sees its Task received.

    The EMR long-polls its inbox as docs/fhir-profiles.md tells one to: a poll is always outstanding
    (`Prefer: wait`), and the next `_since` is the largest meta.lastUpdated received. (Until
    2026-12-07 each referral opened a new poll with `_since` one second back, so every first poll
    re-read the ~25 Tasks delivered in that second: work no documented client does, at the hub that
    was receiving the next delivery.)"""
    inbox = f"{fed.fhir['snubh']}/Task"
    seen: dict[str, float] = {}
    arrived = asyncio.Event()

    async def poll() -> None:
        since = datetime.now(UTC)
        while True:
            response = await fed.call(
                "GET",
                inbox,
                SNUBH,
                headers={"Prefer": "wait=10"},
                params={
                    "owner": f"{KRNPI_SYSTEM}|{SNUBH}",
                    "_since": since.isoformat(),
                    "status": "received",
                },
            )
            at = time.perf_counter()
            tasks = [e["resource"] for e in response.json().get("entry", [])]
            for task in tasks:
                seen.setdefault(task["id"], at)
            since = max((datetime.fromisoformat(t["meta"]["lastUpdated"]) for t in tasks), default=since)
            arrived.set()

    poller = asyncio.create_task(poll())
    latencies: list[float] = []
    try:
        for i in range(count):
            started = time.perf_counter()
            body = submission(DocumentType.REFERRAL, SEVERANCE_CLINIC, rrns[i % len(rrns)], [SNUBH])
            task_id = located(await fed.publish("severance", SEVERANCE_CLINIC, body), "Task")
            while task_id not in seen:
                if poller.done():
                    poller.result()  # the poll failed: raise its error rather than wait forever
                arrived.clear()
                async with asyncio.timeout(30):
                    await arrived.wait()
            latencies.append(seen[task_id] - started)
    finally:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
    return latencies


async def walk_in(fed: Federation, report: Report, rng: random.Random) -> None:
    everywhere = [new_rrn(rng) for _ in range(20)]
    here_only = [new_rrn(rng) for _ in range(20)]
    await asyncio.gather(*(fed.consent(rrn) for rrn in everywhere + here_only))
    for rrn in everywhere:
        for hub, clinic in (("severance", SEVERANCE_CLINIC), ("snubh", SNUBH_CLINIC), ("cnuh", CNUH_CLINIC)):
            await fed.publish(hub, clinic, submission(DocumentType.CARE_RECORD_SUMMARY, clinic, rrn, []))
    for rrn in here_only:
        await fed.publish(
            "cnuh", CNUH_CLINIC, submission(DocumentType.CARE_RECORD_SUMMARY, CNUH_CLINIC, rrn, [])
        )

    async def search(rrn: str, federated: bool) -> int:
        params = {"patient.identifier": f"{RRN_SYSTEM}|{rrn}"} | ({"_federated": "true"} if federated else {})
        response = await fed.call("GET", f"{fed.fhir['cnuh']}/DocumentReference", CNUH, params=params)
        response.raise_for_status()
        return len(response.json().get("entry", []))

    deadline = time.monotonic() + 60
    while await search(everywhere[-1], True) < 3:  # the record locator hears the hubs' events
        if time.monotonic() > deadline:
            raise RuntimeError("the record locator did not learn of the three hubs")
        await asyncio.sleep(0.2)

    async def three(i: int) -> None:
        await search(everywhere[i % 20], True)

    async def one(i: int) -> None:
        await search(here_only[i % 20], True)

    await run_concurrently(three, 40, 4)
    single: Timing = await run_concurrently(one, 300, 4)
    across: Timing = await run_concurrently(three, 300, 4)
    for q in (50, 99):
        s, a = percentile(single.latencies, q) * 1000, percentile(across.latencies, q) * 1000
        report.add(Figure(NAME, f"walk-in search over 3 hubs p{q}", a, "ms", f"single hub p{q}", s))
    report.add(
        Figure(
            NAME,
            "walk-in search over 3 hubs throughput",
            across.per_second,
            "req/s",
            "single hub",
            single.per_second,
        )
    )


def seed(url: str, total: int, rng: random.Random) -> list[str]:
    """``total`` DocumentReferences of ``total / 10`` patients by one clinic; returns patient keys."""
    upgrade(MIGRATIONS, url)
    engine = create_engine(url.replace("+aiosqlite", ""))
    keys = [uuid.uuid4().hex + uuid.uuid4().hex for _ in range(total // DOCS_PER_PATIENT)]
    now = datetime.now(UTC)
    batch: list[dict[str, Any]] = []
    with engine.begin() as conn:
        for n in range(total):
            key = keys[n % len(keys)]
            document_id = str(uuid.UUID(int=rng.getrandbits(128)))
            created = now - timedelta(minutes=n)
            batch.append(
                {
                    "document_id": document_id,
                    "author_institution": KNUH_CLINIC,
                    "author_department": "0100",
                    "patient_key": key,
                    "document_type": "care-record-summary",
                    "created_at": created,
                    "status": "current",
                    "docref": docref(document_id, key, created),
                    "bundle": {"resourceType": "Bundle", "id": document_id, "type": "document"},
                    "recipients": [],
                    "origin": "local",
                    "exchange_id": None,
                    "published_at": now,
                }
            )
            if len(batch) == 20_000:
                conn.execute(insert(Document), batch)
                batch = []
        if batch:
            conn.execute(insert(Document), batch)
    engine.dispose()
    return keys


def docref(document_id: str, key: str, created: datetime) -> dict[str, Any]:
    return {
        "resourceType": "DocumentReference",
        "id": document_id,
        "status": "current",
        "type": {"coding": [{"system": "urn:oid:1.2.410.100110.40.2.1", "code": "4"}]},
        "subject": {"identifier": {"system": PATIENT_KEY_SYSTEM, "value": key}},
        "date": created.isoformat(),
        "author": [{"identifier": {"system": KRNPI_SYSTEM, "value": KNUH_CLINIC}}],
        "content": [{"attachment": {"contentType": "application/fhir+json", "url": f"Bundle/{document_id}"}}],
    }


async def measure_scale(
    fed: Federation, base: str, keys: list[str], total: int, report: Report, rng: random.Random
) -> None:
    """ITI-67 for random seeded patients (ten documents each, by the searching clinic)."""

    async def find(_: int) -> None:
        key = rng.choice(keys)
        params = {"patient.identifier": f"{PATIENT_KEY_SYSTEM}|{key}"}
        response = await fed.call("GET", base, KNUH_CLINIC, params=params)
        if response.status_code != 200 or len(response.json()["entry"]) != DOCS_PER_PATIENT:
            raise RuntimeError(f"ITI-67 at scale: {response.status_code} {response.text[:200]}")

    await run_concurrently(find, 50, CONCURRENCY)
    timing = await run_concurrently(find, 1000, CONCURRENCY)
    label = f"{total:,} DocumentReferences"
    report.add(Figure(NAME, f"ITI-67 p50 with {label}", timing.p50_ms, "ms"))
    report.add(Figure(NAME, f"ITI-67 p99 with {label}", timing.p99_ms, "ms"))
    report.add(Figure(NAME, f"ITI-67 throughput with {label}", timing.per_second, "req/s"))


async def at_scale(fed: Federation, data: Path, report: Report, rng: random.Random) -> None:
    nats_url, registry_url = fed.launched.nats_url_for("hub-knuh"), fed.launched.registry_url
    for total in SCALES:
        url = f"sqlite+aiosqlite:///{data / f'knuh-{total}.db'}"
        started = time.perf_counter()
        keys = await asyncio.to_thread(seed, url, total, rng)
        print(f"hub: seeded {total} DocumentReferences in {time.perf_counter() - started:.0f}s", flush=True)
        port = free_port()
        env = {
            **os.environ,
            "HIE_HUB_HUB": "knuh",
            "HIE_HUB_PORT": str(port),
            "HIE_HUB_NODE": f"bench-knuh-{total}",
            "HIE_HUB_DATABASE_URL": url,
            "HIE_HUB_NATS_URL": nats_url,
            "HIE_HUB_REGISTRY_URL": registry_url,
            "HIE_HUB_LOG_LEVEL": "WARNING",
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "hie_hub"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_for_port("127.0.0.1", port, 120, process)
            await measure_scale(
                fed, f"http://127.0.0.1:{port}/fhir/DocumentReference", keys, total, report, rng
            )
        finally:
            process.terminate()
            process.wait(30)
            (data / f"knuh-{total}.db").unlink(missing_ok=True)


async def run(report: Report) -> None:
    rng = random.Random(11)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        launcher = Launcher(
            LaunchOptions(data_dir=data / "federation", hubs=3, extra_env={"HIE_HUB_LOG_LEVEL": "WARNING"})
        )
        print("hub: starting a federation of three hubs…", flush=True)
        launched = await asyncio.to_thread(launcher.start)
        try:
            async with httpx.AsyncClient(timeout=60.0, limits=httpx.Limits(max_connections=32)) as http:
                fed = Federation(launched, http)
                pids = {c.name: c.process.pid for c in launcher.children}
                if launcher.nats is not None and launcher.nats.process is not None:
                    pids["nats-server"] = launcher.nats.process.pid
                await publishing(fed, report, rng, pids)
                await walk_in(fed, report, rng)
                await at_scale(fed, data, report, rng)
        finally:
            await asyncio.to_thread(launcher.stop)


if __name__ == "__main__":
    r = Report()
    asyncio.run(run(r))
    r.write("hub")
