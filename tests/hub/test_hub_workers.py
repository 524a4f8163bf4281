"""Several worker processes per hub node (issue 13 point 8): `python -m hie_hub` with HIE_HUB_WORKERS=2
on PostgreSQL, as a real process tree (uvicorn's supervisor and two workers behind one port).

The hub runs on the hub tests' own nats-server and registry (tests/hub/conftest.py), with a consent
desk on it: the consent decision subject is one for the whole federation (see conftest.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hub_support import (
    SEVERANCE_CLINIC,
    ConsentDesk,
    eventually,
    located,
    matches,
    new_rrn,
    root_conftest,
    submit,
)
from nats.js.api import ConsumerConfig, DeliverPolicy
from pydantic import ValidationError

from hie_hub.config import HubSettings
from hie_platform.audit_anchor import key_id, load_public_key
from hie_platform.bus import Bus
from hie_platform.natsd import free_port
from hie_schemas import subjects
from hie_schemas.codes import DocumentType
from hie_schemas.contract import Kind, subject
from hie_schemas.envelope import Envelope
from hie_schemas.events import AuditCheckpoint, DocumentPublished
from hie_schemas.identifiers import RRN_SYSTEM

HUB = "severance"
WORKERS = 2


def test_more_than_one_worker_on_sqlite_is_refused_at_settings() -> None:
    with pytest.raises(ValidationError) as refused:
        HubSettings(hub=HUB, workers=2, database_url="sqlite+aiosqlite:///./hub.db")
    assert "HIE_HUB_WORKERS=2 needs PostgreSQL" in str(refused.value)
    with pytest.raises(ValidationError):
        HubSettings(hub=HUB, workers=0)
    assert HubSettings(hub=HUB).workers == 1  # one process on SQLite, as before
    on_postgres = HubSettings(hub=HUB, workers=4, database_url="postgresql+asyncpg://hie@db/hub")
    assert on_postgres.workers == 4


# --- the process tree --------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    """The worker processes uvicorn's supervisor started (multiprocessing spawn, not its tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def _serving(port: int, workers: list[int]) -> set[int]:
    """The workers that hold an accepted connection on ``port`` (the server side of a client's)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port and fields[3] == "01":  # ESTABLISHED
            inodes.add(fields[9])
    holders = set()
    for pid in workers:
        with_fds = Path(f"/proc/{pid}/fd")
        for fd in with_fds.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                holders.add(pid)
    return holders


@dataclass
class HubProcess:
    process: subprocess.Popen[bytes]
    url: str
    port: int
    log: Path
    key_file: Path
    workers: list[int]


async def _start(env: dict[str, str], port: int, log: Path, key_file: Path) -> HubProcess:
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "hie_hub"], env=env, stdout=out, stderr=out)
    hub = HubProcess(process, f"http://127.0.0.1:{port}", port, log, key_file, [])

    async def up() -> bool:
        assert process.poll() is None, log.read_text()[-3000:]
        started = log.read_text().count("Application startup complete")
        hub.workers = _children(process.pid)
        return started == WORKERS and len(hub.workers) == WORKERS

    await eventually(up, "two hub workers to finish their start", timeout=120)
    return hub


def _stop(hub: HubProcess) -> None:
    hub.process.send_signal(signal.SIGTERM)
    try:
        hub.process.wait(60)
    except subprocess.TimeoutExpired:
        hub.process.kill()
        hub.process.wait()
        pytest.fail("the hub did not stop within 60 s of SIGTERM")
    # uvicorn's supervisor stops its workers (each runs its lifespan's shutdown), then exits.
    assert hub.process.returncode in (0, -signal.SIGTERM), hub.log.read_text()[-3000:]
    assert "Traceback" not in hub.log.read_text(), hub.log.read_text()[-3000:]


@pytest.fixture
async def hub_process(
    pytestconfig: pytest.Config, postgres_url: str, hub_nats: str, hub_registry: Any, tmp_path: Path
) -> AsyncIterator[HubProcess]:
    port = free_port()
    schema = f"t_workers_{uuid.uuid4().hex[:8]}"
    key_file = tmp_path / "keys" / "checkpoint.pem"  # created by whichever worker comes first
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIE_")} | {
        "HIE_HUB_HUB": HUB,
        "HIE_HUB_WORKERS": str(WORKERS),
        "HIE_HUB_PORT": str(port),
        "HIE_HUB_DATABASE_URL": postgres_url,
        "HIE_HUB_DATABASE_SCHEMA": schema,  # fresh: both workers migrate it at start
        "HIE_HUB_NATS_URL": hub_nats,
        "HIE_HUB_REGISTRY_URL": hub_registry.url,
        "HIE_HUB_NODE": f"test-{HUB}-workers",
        "HIE_HUB_AUDIT_CHECKPOINT_KEY_FILE": str(key_file),
        "HIE_HUB_AUDIT_CHECKPOINT_SECONDS": "0.5",
    }
    hub = await _start(env, port, tmp_path / "hub.log", key_file)
    try:
        yield hub
    finally:
        if hub.process.poll() is None:
            _stop(hub)
        await root_conftest(pytestconfig)._drop_schema(postgres_url, schema)


@pytest.fixture
async def desk(hub_nats: str) -> AsyncIterator[ConsentDesk]:
    desk = await ConsentDesk(HubSettings(hub=HUB).patient_key_bytes).start(hub_nats)
    yield desk
    await desk.stop()


# --- what the test reads from the stream -----------------------------------------------------------


async def _messages(bus: Bus, subject_filter: str) -> list[bytes]:
    """Every message the stream holds on ``subject_filter`` (an ephemeral consumer from the start)."""
    stream = await bus.js.find_stream_name_by_subject(subject_filter)
    info = await bus.js.stream_info(stream, subjects_filter=subject_filter)
    expected = sum((info.state.subjects or {}).values())
    if expected == 0:
        return []
    sub = await bus.js.pull_subscribe(
        subject_filter,
        stream=stream,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, filter_subject=subject_filter),
    )
    try:
        found: list[bytes] = []
        while len(found) < expected:
            found += [msg.data for msg in await sub.fetch(expected - len(found), timeout=5)]
        return found
    finally:
        await sub.unsubscribe()


async def _publish_until_both_answered(hub: HubProcess, auth: dict[str, str], rrn: str) -> list[str]:
    """Batches of concurrent ITI-65 publishes, each on its own connection, until both workers have
    answered some (the kernel hands each connection to whichever worker accepts it first)."""
    published: list[str] = []
    served: set[int] = set()
    clients: list[httpx.AsyncClient] = []

    async def publish() -> None:
        client = httpx.AsyncClient(base_url=f"{hub.url}/fhir", headers=auth, timeout=30)
        clients.append(client)
        body = submit(DocumentType.CARE_RECORD_SUMMARY, SEVERANCE_CLINIC, rrn)
        response = await client.post("", json=body, headers={"Content-Type": "application/fhir+json"})
        published.extend(located(response, "DocumentReference"))

    try:
        for _ in range(10):
            await asyncio.gather(*(publish() for _ in range(4)))
            served |= _serving(hub.port, hub.workers)  # the connections are still open here
            if served == set(hub.workers) and len(published) >= 8:
                break
    finally:
        for client in clients:
            await client.aclose()
    assert served == set(hub.workers), f"only {served} of {hub.workers} answered"
    return published


async def test_two_worker_processes_share_the_publishes_and_each_event_goes_out_once(
    hub_process: HubProcess, hub_registry: Any, hub_nats: str, desk: ConsentDesk
) -> None:
    hub, rrn = hub_process, new_rrn()
    desk.grant(rrn)
    token = await hub_registry.token(SEVERANCE_CLINIC)
    auth = {"Authorization": f"Bearer {token}"}
    published = await _publish_until_both_answered(hub, auth, rrn)
    assert len(published) == len(set(published)) >= 8

    # ITI-67: every document is readable, whichever worker stored it and whichever answers now.
    async with httpx.AsyncClient(base_url=f"{hub.url}/fhir", headers=auth, timeout=30) as http:
        found = await http.get(
            "/DocumentReference", params={"patient.identifier": f"{RRN_SYSTEM}|{rrn}", "_count": "100"}
        )
    assert sorted(r["id"] for r in matches(found)) == sorted(published)

    bus = await Bus.connect(hub_nats, name="test-workers-reader")
    try:
        fact = subject(Kind.DOCUMENT_PUBLISHED, sender=HUB)

        async def all_published() -> list[str] | None:
            ids = [
                doc
                for raw in await _messages(bus, fact)
                for doc in Envelope.from_bytes(raw).payload(DocumentPublished).document_ids
                if doc in published
            ]
            return ids if len(ids) >= len(published) else None

        # Both workers' relays read the same outbox: each event is in the stream once all the same.
        counted = Counter(await eventually(all_published, "every DocumentPublished in the stream"))
        assert set(counted) == set(published)
        assert set(counted.values()) == {1}

        # Audit checkpoints: one key for both workers (the first written wins), and the timers of
        # both workers anchor each head once; their final passes at the stop add no second one.
        _stop(hub)
        public = load_public_key(hub.key_file.with_name(hub.key_file.name + ".pub"))
        checkpoints = [
            Envelope.from_bytes(raw).payload(AuditCheckpoint)
            for raw in await _messages(bus, subjects.audit_checkpoint(HUB))
        ]
    finally:
        await bus.close()
    assert checkpoints, "no checkpoint was published"
    assert {c.key_id for c in checkpoints} == {key_id(public)}
    sequences = [c.sequence for c in checkpoints]
    assert len(sequences) == len(set(sequences)), f"a head checkpointed twice: {sorted(sequences)}"
