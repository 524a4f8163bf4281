"""An instance and the exchange that claims it, arriving at the same moment, on SQLite and PostgreSQL.

The C-STORE recorder reads the study's links and writes the instance; the exchange consumer writes
the link and reads the study's instances. Run as two concurrent transactions, each must see the
other: the instance ends up queued for the exchange, never held with its exchange already known.
(Seen once in CI on PostgreSQL before the per-study lock: a CT series held at the origin gateway.)
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from hie_imaging import service
from hie_imaging.app import MIGRATIONS
from hie_imaging.models import PLATFORM, Instance, Role, State
from hie_platform.db import Database
from hie_platform.outbox import Outbox
from hie_schemas.codes import DocumentType
from hie_schemas.envelope import Source
from hie_schemas.events import ExchangeKind, ExchangeSent, StudyRef

HUB, OTHER_HUB = "severance", "snubh"
CLINIC, HOSPITAL = "11301001", "31302001"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


@pytest.fixture
async def db(migrated_database: Callable[[Path], Awaitable[Database]]) -> Database:
    return await migrated_database(MIGRATIONS)


def _uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


def _arrival(study_uid: str) -> service.Arrival:
    return service.Arrival(
        sop_instance_uid=_uid(),
        study_instance_uid=study_uid,
        series_instance_uid=_uid(),
        sop_class_uid=CT_IMAGE,
        transfer_syntax_uid=EXPLICIT_LE,
        size=1024,
        calling_ae="CLINIC_PACS",
        caller=service.Caller("CLINIC_PACS", Role.ORIGIN, institution=CLINIC),
        received_at=datetime.now(UTC),
        tag="t",
    )


def _referral(study_uid: str) -> ExchangeSent:
    now = datetime.now(UTC)
    return ExchangeSent(
        exchange_id=str(uuid.uuid4()),
        kind=ExchangeKind.REFERRAL,
        from_institution=CLINIC,
        from_hub=HUB,
        to_institution=HOSPITAL,
        to_hub=OTHER_HUB,
        patient_key="k" * 64,
        document_ids=[str(uuid.uuid4())],
        document_types=[DocumentType.REFERRAL],
        studies=[StudyRef(study_instance_uid=study_uid)],
        document_created_at=now,
        sent_at=now,
    )


@pytest.mark.parametrize("first", ["exchange", "instance"])
async def test_an_instance_and_its_exchange_arriving_together_end_up_queued(db: Database, first: str) -> None:
    outbox = Outbox(PLATFORM.outbox, Source(service="imaging-gateway", node="test"))
    study_uid = _uid()
    arrival, sent = _arrival(study_uid), _referral(study_uid)

    async def record_instance() -> None:
        async with db.transaction() as session:
            await service.record_instances(session, outbox, HUB, [arrival], datetime.now(UTC))

    async def link() -> None:
        async with db.transaction() as session:
            await service.link_exchange(session, outbox, HUB, sent, datetime.now(UTC))

    other: Callable[[], Awaitable[None]] = record_instance if first == "exchange" else link

    # The first transaction does its reads and writes and stays open while the second one runs.
    async with db.transaction() as session:
        if first == "exchange":
            await service.link_exchange(session, outbox, HUB, sent, datetime.now(UTC))
        else:
            await service.record_instances(session, outbox, HUB, [arrival], datetime.now(UTC))
        await session.flush()
        second = asyncio.create_task(other())
        await asyncio.sleep(0.5)  # long enough for the second one to read, had nothing held it back
    await asyncio.wait_for(second, timeout=30)

    async with db.read_sessions() as session:
        rows = (
            await session.execute(
                select(Instance.exchange_id, Instance.state).where(
                    Instance.sop_instance_uid == arrival.sop_instance_uid
                )
            )
        ).all()
    assert [(exchange, state) for exchange, state in rows] == [(sent.exchange_id, State.QUEUED.value)]
