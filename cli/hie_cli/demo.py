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
from hie_schemas.codes import CONSENT_POLICY_SYSTEM, DocumentType
from hie_schemas.consent import ConsentPolicy
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
    return {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"identifier": {"system": RRN_SYSTEM, "value": rrn}},
        "dateTime": datetime.now(UTC).isoformat(),
        "organization": [{"identifier": {"system": KRNPI_SYSTEM, "value": institution}}],
        "policyRule": {"coding": [{"system": CONSENT_POLICY_SYSTEM, "code": policy.value}]},
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
    def __init__(self, federation: Federation, api: Api, instances: int) -> None:
        if len(federation.hubs) < 2:
            raise DemoError("the demo needs two hubs (hie up --hubs 2)")
        self.f = federation
        self.api = api
        self.instances = instances
        self.hub1: HubEntry = federation.hubs[0]
        self.hub2: HubEntry = federation.hubs[1]
        self.clinic = next(
            i for i in federation.institutions if i.kind == "clinic" and i.hub == self.hub1.slug
        )
        self.hospital = federation.institution(self.hub2.code)
        self.agency = federation.agency
        self.result = DemoResult()
        self.rng = random.Random()

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

    async def run(self) -> DemoResult:
        r = self.result
        pacs = DemoPacs("DEMO_PACS")
        await asyncio.to_thread(pacs.start)
        try:
            await self._run(pacs)
        finally:
            await asyncio.to_thread(pacs.stop)
        return r

    async def _run(self, pacs: DemoPacs) -> None:
        r = self.result
        rrn = r.rrn = demo_rrn(self.rng)
        series = make_ct_series(self.instances)
        sent_pixels = pixel_bytes(series)
        study_uid = str(series[0].StudyInstanceUID)
        state: dict[str, Any] = {}

        async def register_pacs() -> str:
            response = await self.api.call(
                "PUT",
                f"{self.f.registry_url}/institutions/{self.hospital.code}/dicom",
                self.agency,
                json={"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port},
            )
            _expect(response, 200, "registering the hospital's PACS")
            return f"{self.hospital.name} PACS at 127.0.0.1:{pacs.port}"

        async def consent() -> str:
            body = consent_resource(rrn, self.clinic.code, ConsentPolicy.ENTIRE_CONSENT)
            response = await self.api.call(
                "POST", f"{self.f.consent_url}/fhir/Consent", self.clinic, json=body
            )
            _expect(response, 201, "recording consent")
            return f"ENTIRE_CONSENT at {self.clinic.name}"

        async def refer() -> str:
            response = await self.referral(rrn, series)
            bundle = _expect(response, 200, "publishing the referral (ITI-65)")
            state["docrefs"] = _locations(bundle, "DocumentReference")
            return f"{len(state['docrefs'])} documents to {self.hospital.name}"

        async def push_ct() -> str:
            statuses = await asyncio.to_thread(
                send_series,
                series,
                self.hub1.gateway.host,
                self.hub1.gateway.port,
                self.hub1.gateway.ae_title,
                self.clinic.dicom_ae or "DEMO_SCU",
            )
            failed = [s for s in statuses.values() if s != 0]
            if failed:
                raise DemoError(f"C-STORE to the hub 1 gateway failed for {len(failed)} instances")
            r.instances_sent = len(statuses)
            return f"{len(statuses)} CT instances C-STOREd to {self.hub1.gateway.ae_title}"

        async def inbox() -> str:
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
                    focus = task.get("focus", {}).get("reference", "")
                    if focus.split("/")[-1] in state["docrefs"]:
                        return task
                return None

            task = await _until("the referral in the hospital's inbox", probe)
            r.referral_task_id = task["id"]
            return f"Task/{task['id']} status {task['status']}"

        async def read() -> str:
            response = await self.api.call(
                "GET",
                f"{self.hub2.fhir_base}/DocumentReference",
                self.hospital,
                params={"patient.identifier": f"{RRN_SYSTEM}|{rrn}"},
            )
            bundle = _expect(response, 200, "finding the documents (ITI-67)")
            for entry in bundle.get("entry", []):
                url = entry["resource"]["content"][0]["attachment"]["url"]
                doc = await self.api.call("GET", f"{self.hub2.fhir_base}/{url}", self.hospital)
                _expect(doc, 200, f"retrieving {url} (ITI-68)")
                r.documents_read += 1
            if r.documents_read < 2:
                raise DemoError(f"expected the referral and the CRS at hub 2, found {r.documents_read}")
            return f"{r.documents_read} documents found and retrieved"

        async def ct_arrives() -> str:
            async def probe() -> int | None:
                got = pacs.received_for(study_uid)
                return len(got) if len(got) >= len(sent_pixels) else None

            try:
                await _until("the CT series at the hospital's PACS", probe)
            except DemoError as exc:
                # Say where the study stands at each gateway, and why it is stuck.
                where = [
                    f"{h.slug}: {await self.gateway_status(h, study_uid)}" for h in (self.hub1, self.hub2)
                ]
                raise DemoError(
                    f"{exc}; {len(pacs.received_for(study_uid))} there; {'; '.join(where)}"
                ) from None
            received = pacs.received_for(study_uid)
            r.instances_identical = sum(1 for uid, px in received.items() if sent_pixels.get(uid) == px)
            if r.instances_identical != len(sent_pixels):
                raise DemoError(
                    f"only {r.instances_identical}/{len(sent_pixels)} instances arrived identical"
                )
            return f"{r.instances_identical}/{len(sent_pixels)} instances, pixel data identical"

        async def set_task(status: str, output: list[str] | None = None) -> str:
            url = f"{self.hub2.fhir_base}/Task/{r.referral_task_id}"
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
            _expect(
                await self.api.call("PUT", url, self.hospital, json=task), 200, f"setting the Task {status}"
            )
            return f"Task/{r.referral_task_id} {status}"

        async def give_return() -> str:
            doc = build_document(
                DocumentType.RETURN,
                author_code=self.hospital.code,
                author_name=self.hospital.name,
                patient_rrn=rrn,
                recipient_code=self.clinic.code,
            )
            submission = build_submission(
                [doc], author_code=self.hospital.code, patient_rrn=rrn, recipients=[self.clinic.code]
            )
            response = await self.api.call("POST", self.hub2.fhir_base, self.hospital, json=submission)
            state["return"] = _locations(
                _expect(response, 200, "publishing the return note"), "DocumentReference"
            )
            return f"return note to {self.clinic.name}"

        async def history() -> str:
            async def probe() -> list[str] | None:
                response = await self.api.call(
                    "GET",
                    f"{self.f.consent_url}/exchange-history",
                    self.agency,
                    params={"patient.identifier": f"{RRN_SYSTEM}|{rrn}"},
                )
                entries = response.json() if response.status_code == 200 else []
                # One line per exchange (status updates of the same exchange repeat its kind).
                kinds = list({e["exchange_id"]: e["kind"] for e in reversed(entries)}.values())
                return kinds if {"referral", "return"} <= set(kinds) else None

            r.history_kinds = await _until("the exchange history", probe)
            return ", ".join(r.history_kinds)

        async def refused() -> str:
            rrn2 = demo_rrn(self.rng)
            series2 = make_ct_series(3)
            response = await self.referral(rrn2, series2)
            r.refused_status = response.status_code
            r.refused_outcome = response.json() if response.content else {}
            if response.status_code != 403:
                raise DemoError(f"a referral without consent was answered {response.status_code}, not 403")
            await asyncio.to_thread(
                send_series,
                series2,
                self.hub1.gateway.host,
                self.hub1.gateway.port,
                self.hub1.gateway.ae_title,
                self.clinic.dicom_ae or "DEMO_SCU",
            )
            uid2 = str(series2[0].StudyInstanceUID)
            status = await _until(
                "the gateway to register the held study",
                lambda: self.gateway_status(self.hub1, uid2),
                timeout=30,
            )
            r.refused_study_relayed = int(status.get("relayed", 0))
            search = await self.api.call(
                "GET",
                f"{self.hub2.fhir_base}/DocumentReference",
                self.hospital,
                params={"patient.identifier": f"{RRN_SYSTEM}|{rrn2}"},
            )
            r.refused_found_at_hub2 = len(_expect(search, 200, "searching hub 2").get("entry", []))
            r.refused_instances_at_pacs = len(pacs.received_for(uid2))
            return (
                f"403 {r.refused_outcome.get('issue', [{}])[0].get('diagnostics', '')[:60]}; "
                f"held at hub 1 ({status.get('state')}), 0 relayed"
            )

        await self.step("agency registers the hospital's PACS", register_pacs)
        await self.step("patient consents at the clinic (hub 1)", consent)
        await self.step("clinic publishes referral + care record summary", refer)
        await self.step("clinic PACS pushes the CT series to its hub gateway", push_ct)
        await self.step("referral appears in the hospital's inbox (hub 2)", inbox)
        await self.step("hospital finds and retrieves the documents", read)
        await self.step("CT series arrives at the hospital's PACS", ct_arrives)
        await self.step("hospital accepts the referral", lambda: set_task("accepted"))
        await self.step("hospital sends the return note", give_return)
        await self.step("hospital completes the referral", lambda: set_task("completed", state["return"]))
        await self.step("patient's exchange history lists both", history)
        await self.step("referral without consent is refused, no image leaves", refused)


async def run_demo(federation: Federation, instances: int = 20) -> DemoResult:
    async with httpx.AsyncClient(timeout=30.0) as http:
        return await Scenario(federation, Api(federation, http), instances).run()
