"""One hub on each database (SQLite and PostgreSQL): the repository, and a referral within the hub."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from hub_support import SEVERANCE, SEVERANCE_CLINIC, ConsentDesk, Hub, eventually, krnpi, start_hub
from sqlalchemy.exc import IntegrityError

from hie_hub.app import MIGRATIONS
from hie_hub.core.bundles import created_tasks
from hie_hub.documents import repository as documents_repo
from hie_hub.models import PLATFORM, Document, Task
from hie_hub.tasks import repository as tasks_repo
from hie_platform.audit import AuditTrail
from hie_platform.db import Database
from hie_platform.natsd import NatsServer
from hie_platform.outbox import Outbox
from hie_schemas.codes import DocumentType
from hie_schemas.documents.builders import build_document, build_submission
from hie_schemas.envelope import Source
from hie_schemas.identifiers import RRN_SYSTEM

KEY = "a" * 64


def document_row(
    document_id: str,
    *,
    doc_type: str = "referral",
    status: str = "current",
    created_at: datetime | None = None,
) -> Document:
    now = datetime.now(UTC)
    return Document(
        document_id=document_id,
        author_institution=SEVERANCE_CLINIC,
        author_department="0100",
        patient_key=KEY,
        document_type=doc_type,
        created_at=created_at or now,
        status=status,
        docref={"resourceType": "DocumentReference", "id": document_id},
        bundle={"resourceType": "Bundle"},
        recipients=[SEVERANCE],
        origin="local",
        exchange_id=None,
        published_at=now,
    )


@pytest.fixture
async def db(migrated_database: Callable[[Path], Awaitable[Database]]) -> Database:
    return await migrated_database(MIGRATIONS)


async def test_repository_keeps_documents_and_tasks(db: Database) -> None:
    older = datetime.now(UTC) - timedelta(days=2)
    async with db.transaction() as session:
        documents_repo.add_document(session, document_row("d-1", created_at=older))
        documents_repo.add_document(session, document_row("d-2", doc_type="care-record-summary"))
        documents_repo.add_document(session, document_row("d-3", status="entered-in-error"))
        tasks_repo.add_task(
            session,
            Task(
                id="t-1",
                exchange_id="x-1",
                status="requested",
                requester=SEVERANCE_CLINIC,
                requester_hub="severance",
                owner=SEVERANCE,
                owner_hub="severance",
                patient_key=KEY,
                focus=["d-1", "d-2"],
                task={"resourceType": "Task", "id": "t-1"},
                updated_at=datetime.now(UTC),
            ),
        )
    async with db.read_sessions() as session:
        newest_first = await documents_repo.documents_of_patient(session, KEY)
        assert [d.document_id for d in newest_first][-1] == "d-1"
        assert newest_first[-1].created_at.tzinfo is not None  # comparable with consent histories
        summaries = await documents_repo.documents_of_patient(session, KEY, types=["care-record-summary"])
        assert [d.document_id for d in summaries] == ["d-2"]
        current = await documents_repo.documents_of_patient(session, KEY, statuses=["current"])
        assert {d.document_id for d in current} == {"d-1", "d-2"}
        assert await documents_repo.documents_of_patient(session, "b" * 64) == []
        assert set(await documents_repo.documents_by_id(session, ["d-1", "d-9"])) == {"d-1"}
        assert [t.id for t in await tasks_repo.tasks(session, owner=SEVERANCE, statuses=["requested"])] == [
            "t-1"
        ]
        assert await tasks_repo.tasks(session, owner=SEVERANCE_CLINIC) == []
        assert [
            t.id for t in await tasks_repo.tasks_of_submission(session, SEVERANCE_CLINIC, KEY, ["d-2", "d-1"])
        ] == ["t-1"]
        assert await tasks_repo.tasks_of_submission(session, SEVERANCE_CLINIC, KEY, ["d-1"]) == []
    # The document id is the idempotency key: a second copy is refused by the database itself.
    with pytest.raises(IntegrityError):
        async with db.transaction() as session:
            documents_repo.add_document(session, document_row("d-1"))
    async with db.transaction() as session:
        row = await documents_repo.document(session, "d-1")
        assert row is not None
        assert documents_repo.add_recipients(row, [SEVERANCE, "31100002"])
        assert not documents_repo.add_recipients(row, ["31100002"])
    async with db.read_sessions() as session:
        row = await documents_repo.document(session, "d-1")
        assert row is not None
        assert row.recipients == [SEVERANCE, "31100002"]


@pytest.fixture
async def hub(
    pytestconfig: pytest.Config, registry: Any, database: tuple[str, str | None], tmp_path: Path
) -> AsyncIterator[tuple[Hub, ConsentDesk]]:
    nats = NatsServer(tmp_path / "js").start()
    url, schema = database
    desk = await ConsentDesk(b"").start(nats.url)
    running = await start_hub(pytestconfig, "severance", nats.url, registry.url, url, schema)
    desk.secret = running.settings.patient_key_bytes
    try:
        yield running, desk
    finally:
        await running.running.stop()
        await desk.stop()
        nats.stop()


async def test_referral_to_the_hub_hospital_of_the_same_hub(
    hub: tuple[Hub, ConsentDesk], registry: Any, rrn: str
) -> None:
    node, desk = hub
    desk.grant(rrn)
    clinic = {"Authorization": f"Bearer {await registry.token(SEVERANCE_CLINIC)}"}
    hospital = {"Authorization": f"Bearer {await registry.token(SEVERANCE)}"}
    doc = build_document(
        DocumentType.REFERRAL,
        author_code=SEVERANCE_CLINIC,
        author_name="의원",
        patient_rrn=rrn,
        recipient_code=SEVERANCE,
    )
    body = build_submission([doc], author_code=SEVERANCE_CLINIC, patient_rrn=rrn, recipients=[SEVERANCE])
    async with httpx.AsyncClient(base_url=node.fhir, timeout=15.0) as http:
        # Three racing copies of one publish (e.g. an EMR retrying on a timeout): one is stored.
        racing = await asyncio.gather(*(http.post("", json=body, headers=clinic) for _ in range(3)))
        assert {r.status_code for r in racing} <= {200, 409}, [r.text for r in racing]
        published = next(r for r in racing if r.status_code == 200)
        assert (await http.post("", json=body, headers=clinic)).json() == published.json()
        [task_id] = created_tasks(published.json())

        async def received() -> list[dict[str, Any]]:
            inbox = await http.get(
                "/Task", params={"owner": krnpi(SEVERANCE), "status": "received"}, headers=hospital
            )
            return [e["resource"] for e in inbox.json().get("entry", []) if e["resource"]["id"] == task_id]

        [task] = await eventually(received, "the Task received by the hub hospital")
        found = await http.get(
            "/DocumentReference", params={"patient.identifier": f"{RRN_SYSTEM}|{rrn}"}, headers=hospital
        )
        assert found.json()["total"] == 1
        for status in ("accepted", "completed"):
            moved = await http.put(f"/Task/{task_id}", json={**task, "status": status}, headers=hospital)
            assert moved.status_code == 200, moved.text
        requester_view = await http.get(f"/Task/{task_id}", headers=clinic)
        assert requester_view.json()["status"] == "completed"

    # One copy of the document and of the Task, though the delivery went to this very hub.
    key = desk.key(rrn)
    assert len([r for r in await node.rows("documents") if r["patient_key"] == key]) == 1
    assert [r["status"] for r in await node.rows("tasks") if r["patient_key"] == key] == ["completed"]
    db = Database(node.settings.database_url, node.settings.database_schema)
    try:
        async with db.read_sessions() as session:
            chain = await AuditTrail(
                PLATFORM.audit, Outbox(PLATFORM.outbox, Source(service="t", node="t")), "t"
            ).verify(session)
    finally:
        await db.dispose()
    assert chain.ok
    assert chain.records >= 4
