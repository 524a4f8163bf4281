"""Imaging relay: CT series through three routers, measured in the same run, interleaved.

(a) DCMTK ``storescu`` → ``storescp`` direct: the native limit of the machine.
(b) Orthanc with a Lua auto-routing script (OnStoredInstance → SendToModality, then Delete): the
    router a hospital would deploy instead of ours, forwarding from ``storescu`` to ``storescp``.
(c) Our federation (``hie up``'s launcher, two hubs, each gateway its own process on SQLite):
    ``storescu`` → hub 1 gateway → hub 2 gateway → ``storescp``, for a referral with consent on file.

Two series sizes (issue 13): realistic CT, 512×512×16 bit (512 KB of pixels per instance, explicit
VR little endian), and pydicom's CT_small size, 128×128×16 bit (39 KB). For each size the three legs
take turns for ``HIE_BENCH_IMAGING_ROUNDS`` rounds (default 3; Orthanc and ours swap places every
round) and the MEDIAN of the rounds is reported, each round printed with the load average at its
start (/proc/loadavg). CPU per instance is each router's process CPU time (user + system, from
/proc/<pid>/stat) from the start of its leg to the start of the next leg, divided by the instances.

Every leg has TCP_NODELAY: DCMTK tools and Orthanc take ``TCP_NODELAY=1`` from the environment, the
gateways set it on every association socket. A leg ends when ``storescp`` has written the last
instance (one file per C-STORE, so a duplicate would show). Each router first relays a 50-instance
warm-up study. Before each leg the bench waits, untimed, until the sink takes an association again
(Orthanc keeps its Lua association to the sink open for 5 s, and storescp serves one at a time). The
gateways' peak RSS (VmHWM) is read after the warm-up and again at the end. When Orthanc's leg fails
(it has aborted a storescu association mid-series), its leg runs again, with a warning on the
console (at most twice); a failure of our own leg stops the bench.

``HIE_BENCH_IMAGING_INSTANCES`` sets the size of the measured series (default 300);
``HIE_BENCH_IMAGING_SIDES`` which series sizes run (``512,128`` by default: rows = columns);
``HIE_BENCH_IMAGING_VERBOSE=1`` also prints, per leg, when ``storescu`` finished and when the sink
was complete.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import statistics
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench.common import Figure, Report
from bench.dicom_peers import ORTHANC_AE, SCU_AE, SINK_AE, Orthanc, Series, Sink, make_series, relay
from hie_cli.demo import consent_resource
from hie_cli.federation import Federation
from hie_cli.launcher import Launcher, LaunchOptions
from hie_schemas.codes import DocumentType
from hie_schemas.consent import ConsentPolicy
from hie_schemas.documents.builders import build_document, build_submission
from hie_schemas.events import StudyRef

NAME = "imaging"
INSTANCES = int(os.environ.get("HIE_BENCH_IMAGING_INSTANCES", "300"))
WARM_UP = 50
ROUNDS = int(os.environ.get("HIE_BENCH_IMAGING_ROUNDS", "3"))
ALL_SIZES = {"CT 512 KB": 512, "CT 39 KB": 128}  # label -> rows = columns of 16-bit pixels
# HIE_BENCH_IMAGING_SIDES=512 measures only the 512 KB series (both by default).
SIDES = {int(side) for side in os.environ.get("HIE_BENCH_IMAGING_SIDES", "512,128").split(",")}
SIZES = {label: side for label, side in ALL_SIZES.items() if side in SIDES}
CLINIC, HOSPITAL = "11301001", "31100002"  # a severance clinic refers to the snubh hub hospital


# --- (c) our federation -----------------------------------------------------------------------------


class Hie:
    def __init__(self, launched: Federation, http: httpx.AsyncClient) -> None:
        self.f = launched
        self.http = http
        self.secrets: dict[str, str] = json.loads((Path(launched.data_dir) / "credentials.json").read_text())
        self._tokens: dict[str, str] = {}

    async def call(self, method: str, url: str, as_: str, **kw: Any) -> httpx.Response:
        if as_ not in self._tokens:
            response = await self.http.post(
                f"{self.f.registry_url}/oauth2/token",
                data={
                    "grant_type": "client_credentials",
                    "client_id": as_,
                    "client_secret": self.secrets[as_],
                },
            )
            response.raise_for_status()
            self._tokens[as_] = response.json()["access_token"]
        return await self.http.request(
            method, url, headers={"Authorization": f"Bearer {self._tokens[as_]}"}, **kw
        )

    async def refer(self, studies: list[Series], sink: Sink) -> None:
        """Register the sink as the hospital's PACS; consent; the clinic refers with the studies."""
        agency = self.f.agency.client_id
        body = {"ae_title": SINK_AE, "host": "127.0.0.1", "port": sink.port}
        response = await self.call(
            "PUT", f"{self.f.registry_url}/institutions/{HOSPITAL}/dicom", agency, json=body
        )
        response.raise_for_status()
        rrn = f"{random.randrange(40, 99):02d}0101-1{random.randrange(10**6):06d}"
        consent = consent_resource(rrn, CLINIC, ConsentPolicy.ENTIRE_CONSENT)
        response = await self.call("POST", f"{self.f.consent_url}/fhir/Consent", CLINIC, json=consent)
        response.raise_for_status()
        document = build_document(
            DocumentType.REFERRAL,
            author_code=CLINIC,
            author_name="bench clinic",
            patient_rrn=rrn,
            created_at=datetime.now(UTC),
            recipient_code=HOSPITAL,
            studies=[StudyRef(study_instance_uid=s.study_uid) for s in studies],
        )
        submission = build_submission([document], author_code=CLINIC, patient_rrn=rrn, recipients=[HOSPITAL])
        response = await self.call("POST", self.f.hubs[0].fhir_base, CLINIC, json=submission)
        if response.status_code != 200:
            raise RuntimeError(f"referral: {response.status_code} {response.text[:300]}")


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


Leg = Callable[[Series], Awaitable[float]]


@dataclass
class Rounds:
    """Seconds per leg and CPU seconds per router process, one entry per round."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    loads: list[str] = field(default_factory=list)


# Orthanc, the baseline, has aborted an association from storescu mid-series (one `make bench` of
# 2026-12-06 stopped there): its leg runs again, said on the console, at most this often.
BASELINE_RETRIES = 2


async def run_round(
    legs: dict[str, Leg], pids: dict[str, dict[str, int]], series: Series
) -> tuple[dict[str, float], dict[str, float]]:
    """Each leg once: seconds per leg, and each router's CPU seconds from the start of its leg to the
    start of the next. Orthanc's leg alone runs again when it fails (its Lua script deletes what it
    forwarded, so it takes the same series again; our gateways would rightly take it once: running
    the whole round again left our leg waiting for instances they had already relayed)."""
    names = list(legs)
    every = {proc: pid for procs in pids.values() for proc, pid in procs.items()}
    snaps = [{proc: cpu_seconds(pid) for proc, pid in every.items()}]
    seconds: dict[str, float] = {}
    for name in names:
        for attempt in range(BASELINE_RETRIES + 1 if name == "orthanc" else 1):
            try:
                seconds[name] = await legs[name](series)
                break
            except RuntimeError as error:
                if name != "orthanc" or attempt == BASELINE_RETRIES:
                    raise
                print(f"imaging: WARNING Orthanc's leg failed, it runs again: {str(error)[-200:]}")
                await asyncio.sleep(6)  # past Orthanc's DicomAssociationCloseDelay (5 s)
                snaps[-1] = {proc: cpu_seconds(pid) for proc, pid in every.items()}
        snaps.append({proc: cpu_seconds(pid) for proc, pid in every.items()})
    cpu = {
        proc: snaps[index + 1][proc] - snaps[index][proc]
        for index, name in enumerate(names)
        for proc in pids.get(name, {})
    }
    return seconds, cpu


async def one_round(
    legs: dict[str, Leg], pids: dict[str, dict[str, int]], series: Series, out: Rounds
) -> None:
    load = load_average()
    seconds, cpu = await run_round(legs, pids, series)
    out.loads.append(load)
    for name, value in seconds.items():
        out.seconds.setdefault(name, []).append(value)
    for proc, value in cpu.items():
        out.cpu.setdefault(proc, []).append(value)


async def measure_size(
    report: Report, label: str, legs: dict[str, Leg], pids: dict[str, dict[str, int]], rounds: list[Series]
) -> None:
    """Interleaved rounds of one series size (Orthanc and ours swap order each round); medians."""
    out = Rounds()
    for number, series in enumerate(rounds, 1):
        order = ["direct", "hie", "orthanc"] if number % 2 else ["direct", "orthanc", "hie"]
        await one_round({name: legs[name] for name in order}, pids, series, out)
        n = len(series.files)
        rates = ", ".join(f"{leg} {n / out.seconds[leg][-1]:.1f}/s" for leg in order)
        cpu = ", ".join(f"{proc} {out.cpu[proc][-1] / n * 1000:.1f}" for proc in sorted(out.cpu))
        print(f"imaging: {label} round {number} (load {out.loads[-1]}): {rates}; CPU ms/instance {cpu}")
    report_size(report, label, rounds[0], out)


def report_size(report: Report, label: str, series: Series, out: Rounds) -> None:
    median = {leg: statistics.median(values) for leg, values in out.seconds.items()}
    n = len(series.files)
    throughput(report, f"{label}: DCMTK storescu → storescp direct", series, median["direct"])
    throughput(report, f"{label}: Orthanc 1.10 Lua auto-routing → storescp", series, median["orthanc"])
    throughput(report, f"{label}: HIE storescu → gw 1 → gw 2 → storescp", series, median["hie"])
    throughput(
        report, f"{label}: HIE relay vs Orthanc", series, median["hie"], ("Orthanc", median["orthanc"])
    )
    throughput(report, f"{label}: HIE relay vs direct", series, median["hie"], ("direct", median["direct"]))
    for proc, values in sorted(out.cpu.items()):
        per_instance = statistics.median(values) / n * 1000
        report.add(Figure(NAME, f"{label}: {proc} CPU per instance (median)", per_instance, "ms"))
    for number, load in enumerate(out.loads, 1):
        report.add(Figure(NAME, f"{label}: round {number} load average (1 min)", float(load.split()[0]), ""))


def throughput(
    report: Report, label: str, series: Series, seconds: float, baseline: tuple[str, float] | None = None
) -> None:
    """instances/s and MB/s of one leg (median seconds); with a baseline, the ratios too."""
    rate, mbs = len(series.files) / seconds, series.bytes / seconds / 1e6
    if baseline is None:
        report.add(Figure(NAME, f"{label}: instances/s (median)", rate, "inst/s"))
        report.add(Figure(NAME, f"{label}: MB/s (median)", mbs, "MB/s"))
        return
    name, base = baseline
    report.add(Figure(NAME, f"{label}: instances/s", rate, "inst/s", name, len(series.files) / base))


async def run(report: Report) -> None:
    for tool in ("storescu", "storescp", "echoscu", "Orthanc"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed (apt-get install dcmtk orthanc)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        warm = make_series(root / "warm-up", WARM_UP, 1)
        ours_warm = make_series(root / "warm-up-hie", WARM_UP, 2)
        # Our gateways keep what they relayed (idempotent by SOP Instance UID), so every round sends
        # them a series of its own; the other legs take the same files again.
        sizes = {
            label: [make_series(root / f"{side}-{i}", INSTANCES, side * 100 + i, side) for i in range(ROUNDS)]
            for label, side in SIZES.items()
        }
        for label, rounds in sizes.items():
            print(
                f"imaging: {label}: {INSTANCES} instances, {rounds[0].bytes / 1e6:.1f} MB, median of {ROUNDS}"
            )
        sink = Sink(root)
        orthanc = Orthanc(root, sink)
        launcher = Launcher(
            LaunchOptions(
                data_dir=root / "federation",
                hubs=2,
                extra_env={"HIE_HUB_LOG_LEVEL": "WARNING", "HIE_IMAGING_LOG_LEVEL": "WARNING"},
            )
        )
        print("imaging: starting a federation of two hubs…", flush=True)
        launched = await asyncio.to_thread(launcher.start)
        try:
            async with httpx.AsyncClient(timeout=30.0) as http:
                hie = Hie(launched, http)
                await measure(report, hie, launcher, sink, orthanc, (warm, ours_warm), sizes)
        finally:
            await asyncio.to_thread(launcher.stop)
            orthanc.stop()
            sink.stop()


async def measure(
    report: Report,
    hie: Hie,
    launcher: Launcher,
    sink: Sink,
    orthanc: Orthanc,
    warm_up: tuple[Series, Series],
    sizes: dict[str, list[Series]],
) -> None:
    gateways = {c.name: c.process.pid for c in launcher.children if c.name.startswith("imaging-")}
    hub1 = hie.f.hubs[0].gateway
    clinic_ae = next(i.dicom_ae for i in hie.f.institutions if i.code == CLINIC)
    assert clinic_ae is not None
    warm, ours_warm = warm_up
    # One referral names every study; once the warm-up is delivered, all of them are linked at both
    # gateways (one event, one transaction each), so no measured series waits for its referral.
    await hie.refer([ours_warm, *(s for rounds in sizes.values() for s in rounds)], sink)

    async def direct(series: Series) -> float:
        return await relay(sink, series, "127.0.0.1", sink.port, SINK_AE, SCU_AE)

    async def routed(series: Series) -> float:
        return await relay(sink, series, "127.0.0.1", orthanc.dicom_port, ORTHANC_AE, SCU_AE)

    async def ours(series: Series) -> float:
        return await relay(sink, series, hub1.host, hub1.port, hub1.ae_title, clinic_ae)

    await direct(warm)
    await routed(warm)
    await ours(ours_warm)
    after_warm = {name: vm_hwm_kib(pid) for name, pid in gateways.items()}
    legs: dict[str, Leg] = {"direct": direct, "orthanc": routed, "hie": ours}
    pids = {"orthanc": {"orthanc": orthanc.process.pid}, "hie": gateways}
    for label, rounds in sizes.items():
        await measure_size(report, label, legs, pids, rounds)
    relayed = sum(len(s.files) for rounds in sizes.values() for s in rounds)
    for name in sorted(gateways):
        peak = vm_hwm_kib(gateways[name]) / 1024
        report.add(Figure(NAME, f"{name} peak RSS after {WARM_UP} instances", after_warm[name] / 1024, "MiB"))
        baseline = after_warm[name] / 1024
        report.add(
            Figure(NAME, f"{name} peak RSS after {relayed} more", peak, "MiB", f"after {WARM_UP}", baseline)
        )


if __name__ == "__main__":
    r = Report()
    asyncio.run(run(r))
    r.write("imaging")
