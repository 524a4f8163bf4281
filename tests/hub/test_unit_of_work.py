"""The hub's per-request unit of work (hie_hub/core/unit.py): read phases first, then the write session;
a step taken out of order fails at once instead of holding a connection under load."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import InvalidRequestError

from hie_hub.core.unit import ReadPhaseOpen, UnitOfWork, outside_read_phase
from hie_platform.db import Database


@pytest.fixture
async def unit(tmp_path: Path) -> AsyncIterator[UnitOfWork]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'hub.db'}")
    async with db.sessions() as session:
        yield UnitOfWork(db, session)
    await db.dispose()


async def test_the_write_session_and_the_gate_wait_for_the_read_phase_to_end(unit: UnitOfWork) -> None:
    async with unit.reading() as read:
        assert (await read.execute(text("SELECT 1"))).scalar() == 1
        with pytest.raises(ReadPhaseOpen):
            unit.writing()
        with pytest.raises(ReadPhaseOpen):
            outside_read_phase("the consent gate asked")  # as disclosure.decisions does
        with pytest.raises(ReadPhaseOpen):
            async with unit.reading():
                pass
    outside_read_phase("the consent gate asked")
    write = unit.writing()
    assert (await write.execute(text("SELECT 2"))).scalar() == 2


async def test_a_read_session_is_closed_for_good_when_its_phase_ends(unit: UnitOfWork) -> None:
    async with unit.reading() as read:
        await read.execute(text("SELECT 1"))
    with pytest.raises(InvalidRequestError):
        await read.execute(text("SELECT 1"))
