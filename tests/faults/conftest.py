"""Fixtures of the fault suite: the federation as real processes on loopback (faults_support.py has
the classes and helpers). Each test gets its own NATS, databases and processes, so a fault in one
test cannot leak into the next."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fault_servers import NatsCluster


@pytest.fixture
async def single_nats(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    """One nats-server with JetStream (the embedded default)."""
    cluster = await NatsCluster(tmp_path / "nats", size=1).start()
    yield cluster
    cluster.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    # Generous: two shared cores; a request that gets no answer at all within a minute is a hang.
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(60.0), limits=httpx.Limits(max_connections=32)
    ) as client:
        yield client
