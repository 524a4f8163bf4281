"""Helpers of the gateway tests: a two-hub federation (NATS, registry), a consent desk, gateway apps.

A module of its own (not conftest.py): test modules import it by name, and ``conftest`` is ambiguous
once several directories have one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from hie_imaging.app import create_app
from hie_imaging.config import ImagingSettings
from hie_imaging.dicom import DicomEndpoint
from hie_imaging.gateway import ImagingGateway
from hie_imaging.models import Instance, StudyLink
from hie_platform.db import Database
from hie_schemas import subjects
from hie_schemas.codes import DocumentType
from hie_schemas.consent import ConsentPolicy, ConsentState, decide
from hie_schemas.contract import Kind, message, subject
from hie_schemas.envelope import Envelope, Source
from hie_schemas.events import (
    DecisionReply,
    DecisionRequest,
    ExchangeKind,
    ExchangeSent,
    StudyProgress,
    StudyRef,
)

T = TypeVar("T")

SEVERANCE, SNUBH = "severance", "snubh"  # the two hubs of the test federation
HUB_CODES = {SEVERANCE: "11100001", SNUBH: "31100002"}
HUB_GATEWAY_AE = {SEVERANCE: "GW_SEVERANCE", SNUBH: "GW_SNUBH"}  # as hie_registry.seed.hub_gateway_ae
CLINIC, CLINIC_AE = "11301001", "PACS11301001"  # a severance clinic and its PACS, as seeded
HOSPITAL = HUB_CODES[SNUBH]  # the referral's recipient, whose PACS the tests register


async def until(probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = 30.0) -> T:
    """Poll `probe` until it returns something other than None (or False); fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class Federation:
    """NATS and a registry whose hubs point at the gateways' DICOM ports (via its topology file)."""

    nats_url: str
    registry_url: str
    credentials: dict[str, str]
    dicom_ports: dict[str, int]
    _tokens: dict[str, str] = field(default_factory=dict)
    _fetched: dict[str, float] = field(default_factory=dict)

    async def token(self, client_id: str = "agency") -> str:
        # Fetched again well before the registry's 300 s lifetime: the federation lives the session.
        if client_id not in self._tokens or time.monotonic() - self._fetched[client_id] > 120:
            async with httpx.AsyncClient() as http:
                response = await http.post(
                    f"{self.registry_url}/oauth2/token",
                    data={
                        "grant_type": "client_credentials",
                        "client_id": client_id,
                        "client_secret": self.credentials[client_id],
                    },
                )
            response.raise_for_status()
            self._tokens[client_id] = response.json()["access_token"]
            self._fetched[client_id] = time.monotonic()
        return self._tokens[client_id]

    async def set_dicom(self, code: str, endpoint: DicomEndpoint) -> None:
        """The agency registers an institution's PACS (PUT /institutions/{code}/dicom)."""
        body = {"ae_title": endpoint.ae_title, "host": endpoint.host, "port": endpoint.port}
        headers = {"Authorization": f"Bearer {await self.token()}"}
        async with httpx.AsyncClient() as http:
            response = await http.put(
                f"{self.registry_url}/institutions/{code}/dicom", json=body, headers=headers
            )
        assert response.status_code == 200, response.text

    def gateway(self, hub: str) -> DicomEndpoint:
        return DicomEndpoint(HUB_GATEWAY_AE[hub], "127.0.0.1", self.dicom_ports[hub])


def topology(ports: dict[str, int]) -> str:
    hubs = {
        hub: {"gateway": {"ae_title": HUB_GATEWAY_AE[hub], "host": "127.0.0.1", "port": port}}
        for hub, port in ports.items()
    }
    return json.dumps({"hubs": hubs})


class ConsentDesk:
    """Answers the consent decision subject with the real rule over a history the test controls."""

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        self.histories: dict[str, list[ConsentState]] = {}
        self.asked = 0
        self._sub: Any = None

    async def start(self) -> ConsentDesk:
        async def on_request(msg: Msg) -> None:
            self.asked += 1
            query = DecisionRequest.model_validate_json(msg.data).query
            decision = decide(self.histories.get(query.patient_key, []), query)
            await msg.respond(DecisionReply(decision=decision).model_dump_json().encode())

        self._sub = await self.nc.subscribe(subjects.CONSENT_DECIDE, cb=on_request)
        return self

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    def consent(self, patient_key: str, since: timedelta = timedelta(days=1)) -> None:
        """The patient gave ENTIRE_CONSENT `since` ago (so it covers documents written today)."""
        state = ConsentState(
            version=1, policy=ConsentPolicy.ENTIRE_CONSENT, effective_at=datetime.now(UTC) - since
        )
        self.histories[patient_key] = [state]


class ProgressLog:
    """Collects the StudyProgress events the gateways publish (hie.imaging.study.progress)."""

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        self.events: list[StudyProgress] = []

    async def start(self) -> ProgressLog:
        async def on_event(msg: Msg) -> None:
            self.events.append(Envelope.from_bytes(msg.data).payload(StudyProgress))

        await self.nc.subscribe(message(Kind.STUDY_PROGRESS).pattern(), cb=on_event)
        return self

    def of(self, study_uid: str, hub: str) -> list[StudyProgress]:
        return [e for e in self.events if e.study_instance_uid == study_uid and e.hub == hub]


def new_patient_key() -> str:
    return hashlib.sha256(uuid.uuid4().bytes).hexdigest()


def referral(study_uid: str, patient_key: str, *, to_hub: str = SNUBH) -> ExchangeSent:
    """A referral from the severance clinic to the snubh hospital with one CT study attached."""
    now = datetime.now(UTC)
    return ExchangeSent(
        exchange_id=str(uuid.uuid4()),
        kind=ExchangeKind.REFERRAL,
        from_institution=CLINIC,
        from_hub=SEVERANCE,
        to_institution=HUB_CODES[to_hub],
        to_hub=to_hub,
        patient_key=patient_key,
        document_ids=[str(uuid.uuid4())],
        document_types=[DocumentType.REFERRAL],
        studies=[StudyRef(study_instance_uid=study_uid)],
        document_created_at=now - timedelta(minutes=5),
        sent_at=now,
    )


async def publish_exchange(nc: NatsClient, sent: ExchangeSent) -> None:
    """As a hub node does: the envelope, with Nats-Msg-Id = event id, on the exchange stream."""
    envelope = Envelope.wrap(sent, Source(service="hub-node", node=f"hub-{sent.from_hub}"))
    await nc.jetstream().publish(
        subject(Kind.EXCHANGE_SENT, sender=sent.from_hub),
        envelope.to_bytes(),
        headers={"Nats-Msg-Id": envelope.id},
    )


def study_of(files: Sequence[Path]) -> str:
    return str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def one_more_instance(files: Sequence[Path], out: Path) -> Path:
    """Another instance of the same series (a new SOP Instance UID), e.g. to mark the end of a flow."""
    ds = dcmread(files[0])
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = len(files) + 1
    ds.save_as(out)
    return out


class GatewayApp:
    """One hub's gateway app under a real uvicorn; stop() and start() again on the same settings."""

    def __init__(self, settings: ImagingSettings, running_app: type[Any], federation: Federation) -> None:
        self.settings = settings
        self.federation = federation
        self._running_app = running_app
        self.running: Any = None

    @property
    def gateway(self) -> ImagingGateway:
        gateway: ImagingGateway = self.running.server.config.app.state.gateway
        return gateway

    async def start(self) -> GatewayApp:
        from hie_platform.natsd import free_port

        self.settings.port = free_port()
        self.running = await self._running_app(create_app(self.settings), self.settings.port).start()
        return self

    async def stop(self) -> None:
        if self.running is not None:
            await self.running.stop()
            self.running = None

    async def status(self, study_uid: str, client_id: str = "agency") -> dict[str, Any] | None:
        """GET /studies/{uid}: the counts, or None on 404."""
        headers = {"Authorization": f"Bearer {await self.federation.token(client_id)}"}
        async with httpx.AsyncClient() as http:
            response = await http.get(f"{self.running.url}/studies/{study_uid}", headers=headers)
        if response.status_code == 404:
            assert response.json()["resourceType"] == "OperationOutcome"
            return None
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def metric(self, name: str, **labels: str) -> float:
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"{self.running.url}/metrics")).text
        wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith(f"{name}{{{wanted}}} ") or (not labels and line.startswith(f"{name} ")):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    async def rows(self, study_uid: str) -> dict[str, int]:
        """Straight from the gateway's database: instance rows of the study by state, and its links."""
        db = Database(self.settings.database_url, self.settings.database_schema)
        try:
            async with db.read_sessions() as session:
                where = Instance.study_instance_uid == study_uid
                query = select(Instance.state, func.count()).where(where).group_by(Instance.state)
                counts = {str(state): int(n) for state, n in (await session.execute(query)).all()}
                links = await session.scalar(
                    select(func.count()).where(StudyLink.study_instance_uid == study_uid)
                )
        finally:
            await db.dispose()
        return {**counts, "links": int(links or 0)}


def counts(status: dict[str, Any] | None, *keys: str) -> dict[str, Any]:
    """The chosen fields of a study status (which must exist)."""
    assert status is not None
    return {key: status[key] for key in keys}


async def until_count(app: GatewayApp, study: str, key: str, n: int, timeout: float = 30.0) -> dict[str, Any]:
    """Poll the gateway's study status until `key` reaches `n`; return that status."""

    async def probe() -> dict[str, Any] | None:
        status = await app.status(study)
        return status if status is not None and status[key] >= n else None

    return await until(probe, f"{key} >= {n} at {app.settings.hub}", timeout)


async def last_progress(progress: ProgressLog, study: str, hub: str, delivered: int) -> StudyProgress | None:
    events = progress.of(study, hub)
    return events[-1] if events and events[-1].delivered == delivered else None
