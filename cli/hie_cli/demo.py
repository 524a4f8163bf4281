"""`hie demo`: the referral–return scenario of 진료정보교류 against a running federation.

A patient consents at a clinic of hub 1; the clinic refers them to the hub hospital of hub 2 with a
care record summary and a CT series; the hospital finds the referral in its inbox, reads it, gets the
CT at its PACS, accepts and returns a note; the patient's history lists both. Then a patient who never
consented is refused and none of their images leave hub 1.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
from pydicom import Dataset

from hie_cli.dicom_samples import make_ct_series, pixel_bytes
from hie_cli.federation import Federation, HubEntry, InstitutionEntry
from hie_cli.pacs import DemoPacs, send_series
from hie_schemas.codes import DocumentType
from hie_schemas.consent import ConsentPolicy
from hie_schemas.consent_fhir import fhir_consent
from hie_schemas.documents.builders import build_document, build_submission
from hie_schemas.events import StudyRef
from hie_schemas.fhir import FHIR_JSON
from hie_schemas.identifiers import KRNPI_SYSTEM, RRN_SYSTEM

T = TypeVar("T")


class DemoError(RuntimeError):
    """A step of the scenario did not do what it must; the message says which and why."""


@dataclass
class Step:
    name: str
    seconds: float
    detail: str = ""


@dataclass
class DemoResult:
    steps: list[Step] = field(default_factory=list)
    referral_task_id: str = ""
    documents_read: int = 0
    instances_sent: int = 0
    instances_identical: int = 0
    history_kinds: list[str] = field(default_factory=list)
    refused_status: int = 0
    refused_outcome: dict[str, Any] = field(default_factory=dict)
    refused_found_at_hub2: int = -1
    refused_instances_at_pacs: int = -1
    refused_study_relayed: int = -1
    rrn: str = ""  # the demo patient's (made up), to sign in to the portal and see the history

    def print_timeline(self) -> None:
        total = sum(s.seconds for s in self.steps)
        print("HIE demo — referral and return across two hubs")
        for number, step in enumerate(self.steps, start=1):
            print(f"  {number:>2}. {step.name:<58} {step.seconds * 1000:>8.0f} ms  {step.detail}")
        print(f"  total {total:.2f}s")


def demo_rrn(rng: random.Random) -> str:
    """A syntactically valid, made-up resident registration number for the demo patient."""
    year, month, day = rng.randint(50, 99), rng.randint(1, 12), rng.randint(1, 28)
    return f"{year:02d}{month:02d}{day:02d}-{rng.choice('12')}{rng.randint(0, 999999):06d}"


class Api:
    """HTTP with a cached access token per institution, fetched again shortly before it expires."""

    REFRESH_MARGIN_SECONDS = 30.0

    def __init__(self, federation: Federation, http: httpx.AsyncClient) -> None:
        self.federation = federation
        self.http = http
        self._tokens: dict[str, tuple[str, float]] = {}  # client id -> (token, monotonic expiry)

    async def token(self, inst: InstitutionEntry) -> str:
        cached = self._tokens.get(inst.client_id)
        if cached is not None and time.monotonic() < cached[1]:
            return cached[0]
        response = await self.http.post(
            f"{self.federation.registry_url}/oauth2/token",
            data={
                "grant_type": "client_credentials",
                "client_id": inst.client_id,
                "client_secret": inst.client_secret,
            },
        )
        body = _expect(response, 200, f"token for {inst.code}")
        lifetime = float(body.get("expires_in", 300))
        expiry = time.monotonic() + max(lifetime - self.REFRESH_MARGIN_SECONDS, lifetime / 2)
        self._tokens[inst.client_id] = (body["access_token"], expiry)
        return str(body["access_token"])

    async def call(self, method: str, url: str, inst: InstitutionEntry, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {await self.token(inst)}", "Accept": FHIR_JSON}
        if "json" in kwargs:
            headers["Content-Type"] = FHIR_JSON
        return await self.http.request(method, url, headers=headers, **kwargs)


def _expect(response: httpx.Response, status: int, what: str) -> dict[str, Any]:
    if response.status_code != status:
        raise DemoError(f"{what}: expected HTTP {status}, got {response.status_code}: {response.text[:400]}")
    data: dict[str, Any] = response.json() if response.content else {}
    return data


async def _until(what: str, probe: Callable[[], Awaitable[T | None]], timeout: float = 60.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.1)


# A 1×1 PNG standing in for the patient's signature captured on the sign pad.
SIGNATURE_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="


def consent_resource(rrn: str, institution: str, policy: ConsentPolicy) -> dict[str, Any]:
    """The Consent a clinic's EMR records at the desk, signed on the sign pad now."""
    consent = fhir_consent({"system": RRN_SYSTEM, "value": rrn}, institution, policy.value)
    return consent | {
        "dateTime": datetime.now(UTC).isoformat(),
        "sourceAttachment": {"contentType": "image/png", "data": SIGNATURE_PNG},
    }


def _locations(bundle: dict[str, Any], resource_type: str) -> list[str]:
    ids = []
    for entry in bundle.get("entry", []):
        location = entry.get("response", {}).get("location", "")
        if location.startswith(f"{resource_type}/"):
            ids.append(location.split("/")[1])
    return ids


class Scenario:
    """The scenario's steps in order; each returns the one-line detail printed in the timeline."""

    def __init__(self, federation: Federation, api: Api, instances: int) -> None:
        if len(federation.hubs) < 2:
            raise DemoError("the demo needs two hubs (hie up --hubs 2)")
        self.f = federation
        self.api = api
        self.hub1: HubEntry = federation.hubs[0]
        self.hub2: HubEntry = federation.hubs[1]
        self.clinic = next(
            i for i in federation.institutions if i.kind == "clinic" and i.hub == self.hub1.slug
        )
        self.hospital = federation.institution(self.hub2.code)
        self.agency = federation.agency
        self.result = DemoResult()
        self.rng = random.Random()
        self.instances = instances
        self.pacs = DemoPacs("DEMO_PACS")
        # The scenario's patient and CT series, drawn when it runs (a test seeds self.rng before).
        self.rrn = ""
        self.series: list[Dataset] = []
        self.sent_pixels: dict[str, bytes] = {}
        self.study_uid = ""
        self.docrefs: list[str] = []
        self.returned: list[str] = []

    async def step(self, name: str, action: Callable[[], Awaitable[str]]) -> None:
        started = time.perf_counter()
        detail = await action()
        self.result.steps.append(Step(name, time.perf_counter() - started, detail))

    async def referral(self, rrn: str, series: list[Dataset]) -> httpx.Response:
        study = StudyRef(
            study_instance_uid=str(series[0].StudyInstanceUID),
            accession_number=str(series[0].AccessionNumber),
        )
        clinic = self.clinic
        documents = [
            build_document(
                DocumentType.REFERRAL,
                author_code=clinic.code,
                author_name=clinic.name,
                patient_rrn=rrn,
                recipient_code=self.hospital.code,
                studies=[study],
            ),
            build_document(
                DocumentType.CARE_RECORD_SUMMARY,
                author_code=clinic.code,
                author_name=clinic.name,
                patient_rrn=rrn,
            ),
        ]
        submission = build_submission(
            documents, author_code=self.clinic.code, patient_rrn=rrn, recipients=[self.hospital.code]
        )
        return await self.api.call("POST", self.hub1.fhir_base, self.clinic, json=submission)

    async def gateway_status(self, hub: HubEntry, study_uid: str) -> dict[str, Any] | None:
        response = await self.api.call("GET", f"{hub.gateway.status_url}/studies/{study_uid}", self.agency)
        return response.json() if response.status_code == 200 else None

    async def push(self, series: list[Dataset]) -> dict[str, int]:
        """C-STORE a series from the clinic's PACS to hub 1's gateway; the status of each instance."""
        gateway = self.hub1.gateway
        ae_title = self.clinic.dicom_ae or "DEMO_SCU"
        return await asyncio.to_thread(
            send_series, series, gateway.host, gateway.port, gateway.ae_title, ae_title
        )

    async def documents_at_hub2(self, rrn: str) -> dict[str, Any]:
        """ITI-67 at hub 2 as the hospital: the patient's DocumentReference search Bundle."""
        response = await self.api.call(
            "GET",
            f"{self.hub2.fhir_base}/DocumentReference",
            self.hospital,
            params={"patient.identifier": f"{RRN_SYSTEM}|{rrn}"},
        )
        return _expect(response, 200, "searching hub 2 (ITI-67)")

    async def run(self) -> DemoResult:
        await asyncio.to_thread(self.pacs.start)
        try:
            await self._run(self.pacs)
        finally:
            await asyncio.to_thread(self.pacs.stop)
        return self.result

    async def _run(self, pacs: DemoPacs) -> None:
        """Every step in order, with `pacs` (started) as the hospital's PACS."""
        self.pacs = pacs
        self.rrn = self.result.rrn = demo_rrn(self.rng)
        self.series = make_ct_series(self.instances)
        self.sent_pixels = pixel_bytes(self.series)
        self.study_uid = str(self.series[0].StudyInstanceUID)
        for name, action in self.steps():
            await self.step(name, action)

    def steps(self) -> list[tuple[str, Callable[[], Awaitable[str]]]]:
        return [
            ("agency registers the hospital's PACS", self.register_pacs),
            ("patient consents at the clinic (hub 1)", self.consent),
            ("clinic publishes referral + care record summary", self.refer),
            ("clinic PACS pushes the CT series to its hub gateway", self.push_ct),
            ("referral appears in the hospital's inbox (hub 2)", self.inbox),
            ("hospital finds and retrieves the documents", self.read),
            ("CT series arrives at the hospital's PACS", self.ct_arrives),
            ("hospital accepts the referral", lambda: self.set_task("accepted")),
            ("hospital sends the return note", self.give_return),
            ("hospital completes the referral", lambda: self.set_task("completed", self.returned)),
            ("patient's exchange history lists both", self.history),
            ("referral without consent is refused, no image leaves", self.refused),
        ]

    # --- the steps -------------------------------------------------------------------------------

    async def register_pacs(self) -> str:
        response = await self.api.call(
            "PUT",
            f"{self.f.registry_url}/institutions/{self.hospital.code}/dicom",
            self.agency,
            json={"ae_title": self.pacs.ae_title, "host": "127.0.0.1", "port": self.pacs.port},
        )
        _expect(response, 200, "registering the hospital's PACS")
        return f"{self.hospital.name} PACS at 127.0.0.1:{self.pacs.port}"

    async def consent(self) -> str:
        body = consent_resource(self.rrn, self.clinic.code, ConsentPolicy.ENTIRE_CONSENT)
        response = await self.api.call("POST", f"{self.f.consent_url}/fhir/Consent", self.clinic, json=body)
        _expect(response, 201, "recording consent")
        return f"ENTIRE_CONSENT at {self.clinic.name}"

    async def refer(self) -> str:
        response = await self.referral(self.rrn, self.series)
        bundle = _expect(response, 200, "publishing the referral (ITI-65)")
        self.docrefs = _locations(bundle, "DocumentReference")
        return f"{len(self.docrefs)} documents to {self.hospital.name}"

    async def push_ct(self) -> str:
        statuses = await self.push(self.series)
        failed = [s for s in statuses.values() if s != 0]
        if failed:
            raise DemoError(f"C-STORE to the hub 1 gateway failed for {len(failed)} instances")
        self.result.instances_sent = len(statuses)
        return f"{len(statuses)} CT instances C-STOREd to {self.hub1.gateway.ae_title}"

    async def inbox(self) -> str:
        owner = f"{KRNPI_SYSTEM}|{self.hospital.code}"

        async def probe() -> dict[str, Any] | None:
            response = await self.api.call(
                "GET",
                f"{self.hub2.fhir_base}/Task",
                self.hospital,
                params={"owner": owner, "status": "received"},
            )
            for entry in response.json().get("entry", []) if response.status_code == 200 else []:
                task: dict[str, Any] = entry["resource"]
                if task.get("focus", {}).get("reference", "").split("/")[-1] in self.docrefs:
                    return task
            return None

        task = await _until("the referral in the hospital's inbox", probe)
        self.result.referral_task_id = task["id"]
        return f"Task/{task['id']} status {task['status']}"

    async def read(self) -> str:
        r = self.result
        for entry in (await self.documents_at_hub2(self.rrn)).get("entry", []):
            url = entry["resource"]["content"][0]["attachment"]["url"]
            doc = await self.api.call("GET", f"{self.hub2.fhir_base}/{url}", self.hospital)
            _expect(doc, 200, f"retrieving {url} (ITI-68)")
            r.documents_read += 1
        if r.documents_read < 2:
            raise DemoError(f"expected the referral and the CRS at hub 2, found {r.documents_read}")
        return f"{r.documents_read} documents found and retrieved"

    async def ct_arrives(self) -> str:
        expected = len(self.sent_pixels)

        async def probe() -> int | None:
            got = self.pacs.received_for(self.study_uid)
            return len(got) if len(got) >= expected else None

        try:
            await _until("the CT series at the hospital's PACS", probe)
        except DemoError as exc:
            # Say where the study stands at each gateway, and why it is stuck.
            where = [
                f"{h.slug}: {await self.gateway_status(h, self.study_uid)}" for h in (self.hub1, self.hub2)
            ]
            there = len(self.pacs.received_for(self.study_uid))
            raise DemoError(f"{exc}; {there} there; {'; '.join(where)}") from None
        received = self.pacs.received_for(self.study_uid)
        identical = sum(1 for uid, px in received.items() if self.sent_pixels.get(uid) == px)
        self.result.instances_identical = identical
        if identical != expected:
            raise DemoError(f"only {identical}/{expected} instances arrived identical")
        return f"{identical}/{expected} instances, pixel data identical"

    async def set_task(self, status: str, output: list[str] | None = None) -> str:
        url = f"{self.hub2.fhir_base}/Task/{self.result.referral_task_id}"
        task = _expect(await self.api.call("GET", url, self.hospital), 200, "reading the Task")
        task["status"] = status
        if output:
            task["output"] = [
                {
                    "type": {"text": "return note"},
                    "valueReference": {"reference": f"DocumentReference/{doc_id}"},
                }
                for doc_id in output
            ]
        _expect(await self.api.call("PUT", url, self.hospital, json=task), 200, f"setting the Task {status}")
        return f"Task/{self.result.referral_task_id} {status}"

    async def give_return(self) -> str:
        doc = build_document(
            DocumentType.RETURN,
            author_code=self.hospital.code,
            author_name=self.hospital.name,
            patient_rrn=self.rrn,
            recipient_code=self.clinic.code,
        )
        submission = build_submission(
            [doc], author_code=self.hospital.code, patient_rrn=self.rrn, recipients=[self.clinic.code]
        )
        response = await self.api.call("POST", self.hub2.fhir_base, self.hospital, json=submission)
        self.returned = _locations(_expect(response, 200, "publishing the return note"), "DocumentReference")
        return f"return note to {self.clinic.name}"

    async def history(self) -> str:
        async def probe() -> list[str] | None:
            response = await self.api.call(
                "GET",
                f"{self.f.consent_url}/exchange-history",
                self.agency,
                params={"patient.identifier": f"{RRN_SYSTEM}|{self.rrn}"},
            )
            entries = response.json() if response.status_code == 200 else []
            # One line per exchange (status updates of the same exchange repeat its kind).
            kinds = list({e["exchange_id"]: e["kind"] for e in reversed(entries)}.values())
            return kinds if {"referral", "return"} <= set(kinds) else None

        self.result.history_kinds = await _until("the exchange history", probe)
        return ", ".join(self.result.history_kinds)

    async def refused(self) -> str:
        """A patient without consent: the referral is refused and their CT is held at hub 1."""
        r = self.result
        rrn, series = demo_rrn(self.rng), make_ct_series(3)
        response = await self.referral(rrn, series)
        r.refused_status = response.status_code
        r.refused_outcome = response.json() if response.content else {}
        if response.status_code != 403:
            raise DemoError(f"a referral without consent was answered {response.status_code}, not 403")
        await self.push(series)
        study_uid = str(series[0].StudyInstanceUID)
        status = await _until(
            "the gateway to register the held study",
            lambda: self.gateway_status(self.hub1, study_uid),
            timeout=30,
        )
        r.refused_study_relayed = int(status.get("relayed", 0))
        r.refused_found_at_hub2 = len((await self.documents_at_hub2(rrn)).get("entry", []))
        r.refused_instances_at_pacs = len(self.pacs.received_for(study_uid))
        return (
            f"403 {r.refused_outcome.get('issue', [{}])[0].get('diagnostics', '')[:60]}; "
            f"held at hub 1 ({status.get('state')}), 0 relayed"
        )


async def run_demo(federation: Federation, instances: int = 20) -> DemoResult:
    async with httpx.AsyncClient(timeout=30.0) as http:
        return await Scenario(federation, Api(federation, http), instances).run()
