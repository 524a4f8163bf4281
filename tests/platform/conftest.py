"""Fixtures of the platform tests (the session's nats-server and databases come from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from hie_platform.bus import Bus


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    """A Bus on the session's nats-server, with the federation's streams (a module may override it)."""
    b = await Bus.connect(nats_url, "test")
    await b.ensure_streams()
    yield b
    await b.close()
