"""The consent service under a real uvicorn with the real registry, NATS and database (SQLite, PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from consent_helpers import ConsentService, RunningApp, TokenSource

from hie_consent.app import create_app
from hie_consent.config import ConsentSettings
from hie_platform.natsd import free_port


@pytest.fixture
async def consent_service(
    nats_url: str, registry: TokenSource, database: tuple[str, str | None], unique: str
) -> AsyncIterator[ConsentService]:
    url, schema = database
    port = free_port()
    settings = ConsentSettings(
        database_url=url,
        database_schema=schema,
        nats_url=nats_url,
        registry_url=registry.url,
        port=port,
        node=f"consent-{unique}",
        # A durable of its own per test: the stream keeps earlier tests' events, and a consumer that
        # belonged to an app already stopped must not hold this test's messages.
        history_consumer=f"consent-history-{unique}",
        access_consumer=f"consent-access-{unique}",
    )
    running = await RunningApp(create_app(settings), port).start()
    yield ConsentService(running.url, settings, registry, nats_url)
    await running.stop()
