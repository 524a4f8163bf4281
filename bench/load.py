"""`make load`: a sustained mixed workload across two hubs, then proof that all of it arrived.

A real local federation (``hie up``'s launcher: nats-server, registry, consent, two hubs with their
imaging gateways, each its own process, on SQLite) and a hospital PACS behind hub 2. ``HIE_LOAD_CLIENTS``
clients (default 8) loop for ``HIE_LOAD_SECONDS`` (default 300) over a weighted mix of:

- referral — a clinic of hub 1 publishes a referral (ITI-65) to the hospital of hub 2;
- search — the hospital finds a referred patient's documents at hub 2 (ITI-67);
- retrieve — the clinic reads one of its DocumentReferences and the document (ITI-68);
- consent — a patient of a separate pool withdraws or consents again at the consent service;
- imaging — a referral carrying a 4-instance CT study, and the study C-STOREd to hub 1's gateway.

Afterwards it waits until every referral is in the hospital's inbox at hub 2 and every CT instance
is at the PACS, and prints throughput and p50/p99 per operation. Any unexpected status, any referral
or instance missing at the end, is an error: the command then exits 1. Results go to
bench/results/load.{md,json}.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from bench.common import Figure, Report, percentile
from hie_cli.demo import Api, consent_resource, demo_rrn
from hie_cli.dicom_samples import make_ct_series
from hie_cli.federation import Federation
from hie_cli.launcher import Launcher, LaunchOptions
from hie_cli.pacs import DemoPacs, send_series
from hie_schemas.codes import DocumentType
from hie_schemas.consent import ConsentPolicy
from hie_schemas.documents.builders import build_document, build_submission
from hie_schemas.events import StudyRef
from hie_schemas.identifiers import KRNPI_SYSTEM, RRN_SYSTEM

NAME = "load"
DURATION = float(os.environ.get("HIE_LOAD_SECONDS", "300"))
CLIENTS = int(os.environ.get("HIE_LOAD_CLIENTS", "8"))
WEIGHTS = {"referral": 30, "search": 25, "retrieve": 20, "consent": 10, "imaging": 15}
INSTANCES_PER_STUDY = 4
SETTLE_SECONDS = 180.0


class Load:
    def __init__(self, federation: Federation, api: Api, pacs: DemoPacs, rng: random.Random) -> None:
        self.f = federation
        self.api = api
        self.pacs = pacs
        self.rng = rng
        self.hub1, self.hub2 = federation.hubs[0], federation.hubs[1]
        self.clinic = next(
            i for i in federation.institutions if i.kind == "clinic" and i.hub == self.hub1.slug
        )
        self.hospital = federation.institution(self.hub2.code)
        self.patients = [demo_rrn(rng) for _ in range(40)]
        self.churn = [demo_rrn(rng) for _ in range(10)]
        self.churn_withdrawn: dict[str, bool] = {}
        self.churn_busy: set[str] = set()
        self.referred: list[str] = []  # patients with at least one referral published
        self.documents: list[str] = []  # DocumentReference ids at hub 1
        self.referrals: set[str] = set()  # DocumentReference ids of the referrals themselves
        self.instances: dict[str, set[str]] = {}  # study UID → SOP instance UIDs sent
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, list[str]] = defaultdict(list)

    # --- setup ------------------------------------------------------------------------------------

    async def prepare(self) -> None:
        response = await self.api.call(
            "PUT",
            f"{self.f.registry_url}/institutions/{self.hospital.code}/dicom",
            self.f.agency,
            json={"ae_title": self.pacs.ae_title, "host": "127.0.0.1", "port": self.pacs.port},
        )
        self._require(response, 200, "registering the hospital's PACS")
        for rrn in self.patients + self.churn:
            body = consent_resource(rrn, self.clinic.code, ConsentPolicy.ENTIRE_CONSENT)
            response = await self.api.call(
                "POST", f"{self.f.consent_url}/fhir/Consent", self.clinic, json=body
            )
            self._require(response, 201, "recording consent")

    @staticmethod
    def _require(response: httpx.Response, status: int, what: str) -> dict[str, Any]:
        if response.status_code != status:
            raise RuntimeError(f"{what}: HTTP {response.status_code} {response.text[:300]}")
        data: dict[str, Any] = response.json() if response.content else {}
        return data

    # --- operations: each returns an error text, or None when the answer was the expected one --------

    async def _publish_referral(self, rrn: str, studies: list[StudyRef]) -> str | None:
        clinic = self.clinic
        document = build_document(
            DocumentType.REFERRAL,
            author_code=clinic.code,
            author_name=clinic.name,
            patient_rrn=rrn,
            recipient_code=self.hospital.code,
            studies=studies,
        )
        body = build_submission(
            [document], author_code=clinic.code, patient_rrn=rrn, recipients=[self.hospital.code]
        )
        response = await self.api.call("POST", self.hub1.fhir_base, clinic, json=body)
        if response.status_code != 200:
            return f"ITI-65 {response.status_code}: {response.text[:200]}"
        ids = [
            str(e["response"]["location"]).split("/")[1]
            for e in response.json()["entry"]
            if str(e["response"]["location"]).startswith("DocumentReference/")
        ]
        self.documents.extend(ids)
        self.referrals.update(ids)
        self.referred.append(rrn)
        return None

    async def referral(self) -> str | None:
        return await self._publish_referral(self.rng.choice(self.patients), [])

    async def search(self) -> str | None:
        if not self.referred:
            return await self.referral()
        rrn = self.rng.choice(self.referred)
        response = await self.api.call(
            "GET",
            f"{self.hub2.fhir_base}/DocumentReference",
            self.hospital,
            params={"patient.identifier": f"{RRN_SYSTEM}|{rrn}", "_count": "20"},
        )
        if response.status_code != 200:
            return f"ITI-67 {response.status_code}: {response.text[:200]}"
        return None

    async def retrieve(self) -> str | None:
        if not self.documents:
            return await self.referral()
        doc_id = self.rng.choice(self.documents)
        response = await self.api.call(
            "GET", f"{self.hub1.fhir_base}/DocumentReference/{doc_id}", self.clinic
        )
        if response.status_code != 200:
            return f"DocumentReference read {response.status_code}: {response.text[:200]}"
        url = response.json()["content"][0]["attachment"]["url"]
        document = await self.api.call("GET", f"{self.hub1.fhir_base}/{url}", self.clinic)
        if document.status_code != 200:
            return f"ITI-68 {document.status_code}: {document.text[:200]}"
        return None

    async def consent(self) -> str | None:
        # One change at a time per patient, as at a real desk: two clients toggling the same patient
        # at once would rightly get 409 (withdrawing what is already withdrawn, or a version older
        # than the one in force).
        free = [rrn for rrn in self.churn if rrn not in self.churn_busy]
        if not free:
            return None
        rrn = self.rng.choice(free)
        self.churn_busy.add(rrn)
        try:
            withdraw = not self.churn_withdrawn.get(rrn, False)
            policy = ConsentPolicy.ENTIRE_WITHDRAWAL if withdraw else ConsentPolicy.ENTIRE_CONSENT
            body = consent_resource(rrn, self.clinic.code, policy)
            response = await self.api.call(
                "POST", f"{self.f.consent_url}/fhir/Consent", self.clinic, json=body
            )
            if response.status_code != 201:
                return f"Consent {policy.value} {response.status_code}: {response.text[:200]}"
            self.churn_withdrawn[rrn] = withdraw
            return None
        finally:
            self.churn_busy.discard(rrn)

    async def imaging(self) -> str | None:
        rrn = self.rng.choice(self.patients)
        series = make_ct_series(INSTANCES_PER_STUDY, accession=f"L{self.rng.randrange(10**8):08d}")
        study = StudyRef(
            study_instance_uid=str(series[0].StudyInstanceUID),
            accession_number=str(series[0].AccessionNumber),
        )
        problem = await self._publish_referral(rrn, [study])
        if problem:
            return problem
        gateway = self.hub1.gateway
        statuses = await asyncio.to_thread(
            send_series,
            series,
            gateway.host,
            gateway.port,
            gateway.ae_title,
            self.clinic.dicom_ae or "DEMO_SCU",
        )
        self.instances[study.study_instance_uid] = set(statuses)
        failed = {uid: s for uid, s in statuses.items() if s != 0}
        return f"C-STORE failed: {failed}" if failed else None

    # --- the run ------------------------------------------------------------------------------------

    async def run(self, duration: float, clients: int) -> float:
        operations: dict[str, Callable[[], Awaitable[str | None]]] = {
            "referral": self.referral,
            "search": self.search,
            "retrieve": self.retrieve,
            "consent": self.consent,
            "imaging": self.imaging,
        }
        names, weights = list(WEIGHTS), list(WEIGHTS.values())
        deadline = time.monotonic() + duration

        async def client() -> None:
            while time.monotonic() < deadline:
                name = self.rng.choices(names, weights)[0]
                started = time.perf_counter()
                try:
                    problem = await operations[name]()
                except Exception as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                self.latency[name].append(time.perf_counter() - started)
                if problem:
                    self.errors[name].append(problem)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return time.perf_counter() - started

    def instances_sent(self) -> int:
        return sum(len(uids) for uids in self.instances.values())

    async def settle(self, timeout: float) -> tuple[int, int]:
        """Wait until every referral is in the hospital's inbox and every instance at the PACS."""
        deadline = time.monotonic() + timeout
        owner = f"{KRNPI_SYSTEM}|{self.hospital.code}"
        expected = self.instances_sent()
        tasks: set[str] = set()
        arrived = 0
        while True:
            url: str | None = f"{self.hub2.fhir_base}/Task"
            params: dict[str, str] | None = {"owner": owner, "_count": "200"}
            tasks = set()
            while url:
                response = await self.api.call("GET", url, self.hospital, params=params)
                bundle = self._require(response, 200, "reading the hospital's inbox")
                for entry in bundle.get("entry", []):
                    focus = entry["resource"].get("focus", {}).get("reference", "")
                    if focus.split("/")[-1] in self.referrals:
                        tasks.add(focus.split("/")[-1])
                url = next(
                    (link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None
                )
                params = None
            arrived = sum(
                len(uids & set(self.pacs.received_for(study))) for study, uids in self.instances.items()
            )
            if (len(tasks) >= len(self.referrals) and arrived >= expected) or time.monotonic() > deadline:
                return len(tasks), arrived
            await asyncio.sleep(2.0)


async def run(report: Report) -> int:
    rng = random.Random(2026)
    tmp = Path(tempfile.mkdtemp(prefix="hie-load-"))
    # The federation's data and logs are kept when the run fails, for reading.
    launcher = Launcher(
        LaunchOptions(
            data_dir=tmp / "federation",
            hubs=2,
            extra_env={
                "HIE_HUB_LOG_LEVEL": "WARNING",
                "HIE_IMAGING_LOG_LEVEL": "WARNING",
                "HIE_REGISTRY_LOG_LEVEL": "WARNING",
                "HIE_CONSENT_LOG_LEVEL": "WARNING",
            },
        )
    )
    print("load: starting a federation of two hubs…", flush=True)
    federation = await asyncio.to_thread(launcher.start)
    pacs = DemoPacs("LOAD_PACS")
    await asyncio.to_thread(pacs.start)
    try:
        async with httpx.AsyncClient(timeout=60.0, limits=httpx.Limits(max_connections=32)) as http:
            load = Load(federation, Api(federation, http), pacs, rng)
            await load.prepare()
            print(f"load: {CLIENTS} clients for {DURATION:.0f}s…", flush=True)
            elapsed = await load.run(DURATION, CLIENTS)
            print("load: waiting for every referral and instance to arrive…", flush=True)
            tasks, arrived = await load.settle(SETTLE_SECONDS)
    finally:
        await asyncio.to_thread(pacs.stop)
        await asyncio.to_thread(launcher.stop)

    report_load(report, load, elapsed, tasks, arrived)
    failures = count_failures(load, tasks, arrived)
    if failures:
        print(f"load: the federation's data and logs are kept in {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return failures


def report_load(report: Report, load: Load, elapsed: float, tasks: int, arrived: int) -> None:
    for name in WEIGHTS:
        samples = load.latency[name]
        if not samples:
            continue
        report.add(Figure(NAME, f"{name} throughput", len(samples) / elapsed, "ops/s"))
        report.add(Figure(NAME, f"{name} p50", percentile(samples, 50) * 1000, "ms"))
        report.add(Figure(NAME, f"{name} p99", percentile(samples, 99) * 1000, "ms"))
        report.add(Figure(NAME, f"{name} errors", len(load.errors[name]), "count"))
    expected = load.instances_sent()
    report.add(
        Figure(NAME, "referrals in the hospital's inbox", tasks, "count", "published", len(load.referrals))
    )
    report.add(Figure(NAME, "CT instances at the hospital's PACS", arrived, "count", "sent", expected))


def count_failures(load: Load, tasks: int, arrived: int) -> int:
    """Every error of an operation, and each of a referral or an instance missing at the end (printed)."""
    failures = 0
    for name, problems in load.errors.items():
        failures += len(problems)
        for problem in problems[:5]:
            print(f"load: {name}: {problem}", file=sys.stderr)
    if tasks < len(load.referrals):
        failures += 1
        print(f"load: only {tasks}/{len(load.referrals)} referrals reached the inbox", file=sys.stderr)
    expected = load.instances_sent()
    if arrived < expected:
        failures += 1
        print(f"load: only {arrived}/{expected} CT instances reached the PACS", file=sys.stderr)
    return failures


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # unwind and stop what was started
    result = Report()
    failed = asyncio.run(run(result))
    print(f"report: {result.write(NAME)}")
    sys.exit(1 if failed else 0)
