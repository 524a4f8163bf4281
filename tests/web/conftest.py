"""The console and the portal in a real headless Chromium, against the real registry (tests/conftest.py,
demo seed), a real consent service under uvicorn, NATS with JetStream and SQLite.

Screenshots go to tests/web/artifacts/ (git-ignored) or to $HIE_WEB_ARTIFACTS.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from web_flows import ConsentWeb, start_consent
from web_helpers import Browser, browser_missing

ARTIFACTS = Path(os.environ.get("HIE_WEB_ARTIFACTS") or Path(__file__).parent / "artifacts")


@pytest.fixture(scope="module")
async def consent_web(
    nats_url: str, registry: Any, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ConsentWeb]:
    import uuid

    name = f"consent-web-{uuid.uuid4().hex[:8]}"
    running, settings = await start_consent(nats_url, registry, tmp_path_factory.mktemp("consent"), name)
    yield ConsentWeb(running.url, settings, registry, nats_url)
    await running.stop()


@pytest.fixture
async def browser(request: pytest.FixtureRequest) -> AsyncIterator[Browser]:
    missing = browser_missing()
    if missing is not None:
        pytest.skip(missing)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    import asyncio

    opened = await asyncio.to_thread(Browser, ARTIFACTS, request.node.name)
    try:
        yield opened
    finally:
        await opened.close()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    shots = sorted(ARTIFACTS.glob("*.png")) if ARTIFACTS.exists() else []
    if shots:
        terminalreporter.write_line(f"web screenshots ({len(shots)}): {ARTIFACTS}")
