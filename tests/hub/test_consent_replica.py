"""Issue 4: every hub decides locally over its replica of the consent feed.

A real consent service and real hub nodes on a nats-server of this module: a withdrawal recorded at
the consent service is in force at the hub within a bounded poll (the time is measured and printed,
not asserted); a hub that stops hearing the feed refuses everything but emergency access; a restarted
hub keeps its replica and catches up, and a hub whose database was replaced rebuilds it.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from hub_support import SEVERANCE_CLINIC, SNUBH, Hub, eventually, new_rrn, root_conftest, start_hub

from hie_consent.app import create_app as create_consent_app
from hie_consent.config import ConsentSettings
from hie_consent.fhir import CHANNEL_EXTENSION
from hie_platform.bus import Bus
from hie_platform.consent_gate import ConsentGate
from hie_platform.consent_replica import ConsentReplica, Freshness
from hie_platform.db import Database
from hie_platform.natsd import free_port
from hie_schemas import codes, subjects
from hie_schemas.consent import ConsentPolicy, Decision, FlowQuery, Purpose
from hie_schemas.envelope import Envelope, Source
from hie_schemas.events import ConsentRecorded
from hie_schemas.identifiers import KRNPI_SYSTEM, RRN_SYSTEM, patient_key_from_rrn

# The smallest valid PNG signature: the magic bytes the consent service checks, then IHDR..IEND.
SIGNATURE = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
    )
).decode()


@dataclass
class Central:
    """The real consent service of this module (it also answers the central decision subject)."""

    settings: ConsentSettings
    running: Any
    registry: Any

    @property
    def url(self) -> str:
        return str(self.running.url)

    def key(self, rrn: str) -> str:
        return patient_key_from_rrn(rrn, self.settings.patient_key_bytes)

    async def record(self, rrn: str, policy: ConsentPolicy, *, at: datetime | None = None) -> int:
        resource: dict[str, Any] = {
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
            "organization": [{"identifier": {"system": KRNPI_SYSTEM, "value": SEVERANCE_CLINIC}}],
            "policyRule": {"coding": [{"system": codes.CONSENT_POLICY_SYSTEM, "code": policy.value}]},
            "extension": [{"url": CHANNEL_EXTENSION, "valueCode": "sign-pad"}],
            "sourceAttachment": {"contentType": "image/png", "data": SIGNATURE},
        }
        if at is not None:
            resource["dateTime"] = at.isoformat()
        token = await self.registry.token(SEVERANCE_CLINIC)
        async with httpx.AsyncClient(base_url=self.url, timeout=15.0) as http:
            response = await http.post(
                "/fhir/Consent",
                json=resource,
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"},
            )
        assert response.status_code == 201, response.text
        return int(response.json()["meta"]["versionId"])

    async def audit(self) -> list[dict[str, Any]]:
        db = Database(self.settings.database_url)
        try:
            async with db.read_sessions() as session:
                from hie_consent.models import PLATFORM

                result = await session.execute(PLATFORM.audit.select())
                return [dict(row.record) for row in result]
        finally:
            await db.dispose()

    async def stop(self) -> None:
        await self.running.stop()


async def start_central(config: pytest.Config, nats_url: str, registry: Any, data: Path) -> Central:
    port = free_port()
    settings = ConsentSettings(
        database_url=f"sqlite+aiosqlite:///{data / 'consent.db'}",
        nats_url=nats_url,
        registry_url=registry.url,
        port=port,
        node="test-consent",
    )
    running = await root_conftest(config).RunningApp(create_consent_app(settings), port).start()
    return Central(settings, running, registry)


def gate_of(hub: Hub) -> ConsentGate:
    gate: ConsentGate = hub.running.server.config.app.state.node.consent
    return gate


def replica_of(hub: Hub) -> ConsentReplica:
    replica = gate_of(hub).replica
    assert replica is not None
    return replica


def flow(key: str, *, created: datetime | None = None, **extra: Any) -> FlowQuery:
    now = datetime.now(UTC)
    return FlowQuery(
        patient_key=key,
        holder=SEVERANCE_CLINIC,
        holder_department="2300",
        recipient=SNUBH,
        document_created_at=created or now,
        at=now,
        **extra,
    )


async def replicated(hub: Hub, key: str, version: int) -> None:
    """Wait until the hub's replica holds ``version`` of the patient's consent."""

    async def probe() -> bool:
        history = (await replica_of(hub).histories([key]))[key]
        return bool(history) and history[-1].version >= version

    await eventually(probe, f"consent version {version} in the replica of {hub.slug}")


async def decision_until(
    hub: Hub, query: FlowQuery, rule: str, timeout: float = 15.0
) -> tuple[Decision, float]:
    """Poll the hub's own decision until it names ``rule``; return it and how long that took."""
    started = time.perf_counter()

    async def probe() -> Decision | None:
        decision = await gate_of(hub).decide(query.model_copy(update={"at": datetime.now(UTC)}))
        return decision if decision.rule.value == rule else None

    decision = await eventually(probe, f"rule {rule} at hub {hub.slug}", timeout=timeout)
    return decision, time.perf_counter() - started


@pytest.fixture(scope="module")
async def central(
    pytestconfig: pytest.Config, hub_nats: str, registry: Any, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Central]:
    service = await start_central(pytestconfig, hub_nats, registry, tmp_path_factory.mktemp("consent"))
    yield service
    await service.stop()


@pytest.fixture(scope="module")
async def severance(
    pytestconfig: pytest.Config,
    hub_nats: str,
    registry: Any,
    central: Central,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Hub]:
    data = tmp_path_factory.mktemp("severance")
    hub = await start_hub(
        pytestconfig, "severance", hub_nats, registry.url, f"sqlite+aiosqlite:///{data / 'h.db'}"
    )
    assert await replica_of(hub).wait_current(15.0), "the hub never heard the consent feed"
    yield hub
    await hub.running.stop()


async def test_withdrawal_at_the_consent_service_is_in_force_at_the_hub(
    severance: Hub, central: Central
) -> None:
    rrn = new_rrn()
    key = central.key(rrn)
    started = time.perf_counter()
    await central.record(rrn, ConsentPolicy.ENTIRE_CONSENT)
    await replicated(severance, key, 1)
    consent_took = time.perf_counter() - started
    created = datetime.now(UTC)
    permitted = await gate_of(severance).decide(flow(key, created=created))
    assert (permitted.rule.value, permitted.consent_version) == ("permit-consent", 1)

    withdrawn_at = time.perf_counter()
    await central.record(rrn, ConsentPolicy.ENTIRE_WITHDRAWAL)
    recorded = time.perf_counter() - withdrawn_at
    denied, took = await decision_until(severance, flow(key, created=created), "deny-withdrawn")
    print(
        f"\nconsent recorded and replicated in {consent_took * 1000:.1f} ms; withdrawal recorded in "
        f"{recorded * 1000:.1f} ms and in force at the hub {took * 1000:.1f} ms after that"
    )
    assert denied.consent_version == 2
    # No permit for this patient was asked of the central decision point: the hub decided them itself.
    central_permits = [
        r
        for r in await central.audit()
        if r["action"] == "decide" and r["patient_key"] == key and r["outcome"] == "permit"
    ]
    assert central_permits == []


async def test_versions_apply_in_order_and_once(severance: Hub, central: Central) -> None:
    key = uuid.uuid4().hex + uuid.uuid4().hex
    start = datetime.now(UTC) - timedelta(hours=1)
    source = Source(service="consent", node="test-feed")

    def event(version: int, policy: ConsentPolicy) -> Envelope:
        return Envelope.wrap(
            ConsentRecorded(
                patient_key=key,
                version=version,
                policy=policy,
                effective_at=start + timedelta(minutes=version),
                recorded_by=SEVERANCE_CLINIC,
                channel="sign-pad",
            ),
            source,
        )

    first, second = event(1, ConsentPolicy.ENTIRE_CONSENT), event(2, ConsentPolicy.ENTIRE_WITHDRAWAL)
    bus = await Bus.connect(severance.settings.nats_url, name="test-feed")
    replica = replica_of(severance)
    try:
        await bus.publish(subjects.CONSENT_RECORDED, second)  # the withdrawal overtakes the consent

        async def waiting() -> bool:
            return key in replica.gapped

        await eventually(waiting, "the early version held back")
        # While the patient's history has a hole, the hub does not guess: it fails closed for them.
        held = await gate_of(severance).decide(flow(key, created=start + timedelta(minutes=1, seconds=30)))
        assert (held.permit, held.rule.value) == (False, "deny-consent-feed-stale")
        await bus.publish(subjects.CONSENT_RECORDED, first)
        # A second copy with a new message id (JetStream cannot de-duplicate it): applied once.
        await bus.publish_raw(subjects.CONSENT_RECORDED, first.to_bytes(), f"{first.id}-again", None)
    finally:
        await bus.close()

    async def both() -> list[int] | None:
        versions = [s.version for s in (await replica.histories([key]))[key]]
        return versions if versions == [1, 2] and key not in replica.gapped else None

    await eventually(both, "both versions in the replica")
    rows = [r for r in await severance.rows("consent_replica") if r["patient_key"] == key]
    assert sorted(r["version"] for r in rows) == [1, 2]


async def test_a_stale_feed_denies_everything_but_emergency(
    pytestconfig: pytest.Config,
    hub_nats: str,
    registry: Any,
    central: Central,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    unique: str,
) -> None:
    monkeypatch.setenv("HIE_HUB_CONSENT_STALENESS_SECONDS", "3")
    rrn = new_rrn()
    key = central.key(rrn)
    await central.record(rrn, ConsentPolicy.ENTIRE_CONSENT)
    hub = await start_hub(
        pytestconfig, f"t{unique}", hub_nats, registry.url, f"sqlite+aiosqlite:///{tmp_path / 'h.db'}"
    )
    try:
        assert await replica_of(hub).wait_current(15.0)
        await decision_until(hub, flow(key), "permit-consent")
        await central.stop()  # the central services go away: no heartbeat, no decision point
        stale, took = await decision_until(hub, flow(key), "deny-consent-feed-stale")
        print(f"\nthe hub failed closed {took:.2f} s after the consent service stopped (bound 3 s)")
        assert replica_of(hub).freshness() is Freshness.STALE
        assert stale.consent_version == 1
        gate = gate_of(hub)
        emergency = await gate.decide(
            flow(key, purpose=Purpose.EMERGENCY, justification="의식 없음, 보호자 없음")
        )
        unjustified = await gate.decide(flow(key, purpose=Purpose.EMERGENCY))
        transfer = await gate.decide(flow(key, purpose=Purpose.PATIENT_REQUEST))
        assert (emergency.permit, emergency.rule.value, emergency.flagged) == (True, "permit-emergency", True)
        assert (unjustified.permit, unjustified.rule.value) == (False, "deny-emergency-without-justification")
        assert (transfer.permit, transfer.rule.value) == (False, "deny-consent-feed-stale")
        # The consent service comes back: the hub hears the feed again and decides as before.
        await restart(pytestconfig, central)
        await decision_until(hub, flow(key), "permit-consent")
    finally:
        await hub.running.stop()
        if central.running.task.done():
            await restart(pytestconfig, central)


async def restart(config: pytest.Config, central: Central) -> None:
    app = create_consent_app(central.settings)
    central.running = await root_conftest(config).RunningApp(app, central.settings.port).start()


async def test_a_restarted_hub_keeps_its_replica_and_a_new_database_rebuilds_it(
    pytestconfig: pytest.Config,
    hub_nats: str,
    registry: Any,
    central: Central,
    database: tuple[str, str | None],
    tmp_path: Path,
    unique: str,
) -> None:
    url, schema = database
    slug = f"r{unique}"
    rrn = new_rrn()
    key = central.key(rrn)
    await central.record(rrn, ConsentPolicy.ENTIRE_CONSENT)
    created = datetime.now(UTC)
    hub = await start_hub(pytestconfig, slug, hub_nats, registry.url, url, schema)
    await decision_until(hub, flow(key, created=created), "permit-consent")
    await hub.running.stop()

    await central.record(rrn, ConsentPolicy.ENTIRE_WITHDRAWAL)  # while the hub is down
    hub = await start_hub(pytestconfig, slug, hub_nats, registry.url, url, schema)
    try:
        assert [r["version"] for r in await hub.rows("consent_replica") if r["patient_key"] == key] in (
            [1],
            [1, 2],
        )
        assert await replica_of(hub).wait_current(15.0)
        await decision_until(hub, flow(key, created=created), "deny-withdrawn")
    finally:
        await hub.running.stop()

    # The same hub on an empty database: its consumer is ahead of the table, so the replica is rebuilt.
    fresh = f"sqlite+aiosqlite:///{tmp_path / 'replaced.db'}"
    hub = await start_hub(pytestconfig, slug, hub_nats, registry.url, fresh)
    try:
        assert await replica_of(hub).wait_current(15.0)
        await decision_until(hub, flow(key, created=created), "deny-withdrawn")
        assert sorted(r["version"] for r in await hub.rows("consent_replica") if r["patient_key"] == key) == [
            1,
            2,
        ]
    finally:
        await hub.running.stop()


async def test_emergency_access_at_a_hub_reaches_the_patients_history(
    severance: Hub, central: Central
) -> None:
    rrn = new_rrn()
    key = central.key(rrn)
    decision = await gate_of(severance).decide(
        flow(key, purpose=Purpose.EMERGENCY, justification="의식 없는 응급환자, 보호자 없음")
    )
    assert decision.permit
    assert decision.flagged
    async with httpx.AsyncClient(base_url=central.url, timeout=15.0) as http:
        opened = await http.post("/portal/identity/challenges", json={"rrn": rrn, "phone": "010-1234-5678"})
        assert opened.status_code == 201, opened.text
        challenge = opened.json()
        verified = await http.post(
            f"/portal/identity/challenges/{challenge['challenge_id']}/verify",
            json={"code": challenge["dev_code"]},
        )
        assert verified.status_code == 200, verified.text
        session = {"Authorization": f"Bearer {verified.json()['access_token']}"}

        async def flagged() -> list[dict[str, Any]] | None:
            accesses: list[dict[str, Any]] = (await http.get("/portal/me/history", headers=session)).json()[
                "accesses"
            ]
            return [a for a in accesses if a["flagged"]] or None

        [entry] = await eventually(flagged, "the emergency access in the patient's history")
    assert entry["justification"] == "의식 없는 응급환자, 보호자 없음"
    assert entry["institution"] == SNUBH
    assert entry["purpose"] == "emergency"
