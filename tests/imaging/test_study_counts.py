"""A study's counts as the progress reporter and GET /studies read them: several studies in one
pass give each study what it alone gives (real SQLite and PostgreSQL, with the gateway's migrations)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert

from hie_imaging import service
from hie_imaging.models import NO_EXCHANGE, Instance, Role, State
from hie_imaging.repository import StudyCounts, studies_counts
from hie_platform.db import Database

MIGRATIONS = Path(service.__file__).parent / "migrations"
T0 = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)


@pytest.fixture
async def db(migrated_database: Callable[[Path], Awaitable[Database]]) -> Database:
    return await migrated_database(MIGRATIONS)


def _rows(rng: random.Random, studies: list[str]) -> list[dict[str, object]]:
    """Instances of each study in one or two exchanges (or none: held), in every state, some with
    attempts and errors at distinct times."""
    rows: list[dict[str, object]] = []
    states = list(State)
    for s, study in enumerate(studies):
        exchanges = [NO_EXCHANGE] if s == 0 else [f"ex-{s}-{e}" for e in range(1 + s % 2)]
        for i in range(rng.randrange(1, 9)):
            for exchange in exchanges:
                erred = rng.random() < 0.3
                rows.append(
                    {
                        "sop_instance_uid": f"2.25.{s}{i:03d}",
                        "exchange_id": exchange,
                        "study_instance_uid": study,
                        "series_instance_uid": f"{study}.1",
                        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                        "size": 1024,
                        "calling_ae": "MODALITY",
                        "sender_institution": "11301001",
                        "role": Role.ORIGIN.value,
                        "state": State.HELD.value if exchange == NO_EXCHANGE else rng.choice(states).value,
                        "attempts": rng.randrange(0, 4) if erred else 0,
                        "last_error": f"error {s}.{i}.{exchange}" if erred else None,
                        "received_at": T0,
                        "updated_at": T0 + timedelta(seconds=len(rows)),
                    }
                )
    return rows


def _expected(rows: list[dict[str, object]], study: str) -> StudyCounts | None:
    """The counts computed from the rows themselves."""
    mine = [r for r in rows if r["study_instance_uid"] == study]
    if not mine:
        return None
    erred = sorted((r for r in mine if r["last_error"] is not None), key=lambda r: str(r["updated_at"]))
    return StudyCounts(
        received=len({r["sop_instance_uid"] for r in mine}),
        by_state=dict(Counter(str(r["state"]) for r in mine)),
        exchange_ids=sorted({str(r["exchange_id"]) for r in mine} - {NO_EXCHANGE}),
        attempts=max(int(str(r["attempts"])) for r in mine),
        last_error=str(erred[-1]["last_error"]) if erred else None,
    )


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_many_studies_at_once_count_as_each_alone(db: Database, seed: int) -> None:
    rng = random.Random(seed)
    studies = [f"1.2.826.0.1.{seed}.{n}" for n in range(6)]
    rows = _rows(rng, studies[:5])  # the sixth study has no instance here
    async with db.transaction() as session:
        await session.execute(insert(Instance), rows)

    async with db.read_sessions() as session:
        together = await studies_counts(session, studies)
        alone = {study: await studies_counts(session, [study]) for study in studies}
        status = await service.studies_status(session, studies)

    assert set(together) == set(studies[:5])
    for study in studies:
        expected = _expected(rows, study)
        assert together.get(study) == expected
        assert alone[study].get(study) == expected
        if expected is not None:
            assert status[study].received == expected.received
            assert status[study].last_error == expected.last_error
            assert status[study].exchanges == expected.exchange_ids
    assert await _empty(db) == {}


async def _empty(db: Database) -> dict[str, StudyCounts]:
    async with db.read_sessions() as session:
        return await studies_counts(session, [])
