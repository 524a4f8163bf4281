"""Fixtures of the hub tests: real hub nodes under uvicorn with their own databases, the real
registry on the hubs' own nats-server, and a consent desk that answers the decision subject with the
real rule (hub_support.py has the classes and helpers; the names are re-exported here for modules
that import them from conftest).

The hubs get a nats-server of their own (not the session one): the consent decision subject is fixed
for the whole federation, so a real consent service started by another test directory on the shared
server would race the desk for the answers, and the durable inbox consumers are named after the hub.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from hub_support import (
    AGENCY_CLIENT,
    CNUH,
    CNUH_CLINIC,
    HUB_TABLES,
    HUBS,
    ROOT_CONFTEST,
    SEVERANCE,
    SEVERANCE_CLINIC,
    SEVERANCE_CLINIC_2,
    SNUBH,
    SNUBH_CLINIC,
    ConsentDesk,
    Federation,
    Hub,
    LogTap,
    eventually,
    krnpi,
    located,
    matches,
    new_rrn,
    outcomes,
    pseudonymised,
    refused,
    root_conftest,
    rrn_forms,
    start_hub,
    submit,
)

from hie_hub.config import HubSettings
from hie_platform.natsd import NatsServer, free_port

__all__ = [
    "AGENCY_CLIENT",
    "CNUH",
    "CNUH_CLINIC",
    "HUBS",
    "HUB_TABLES",
    "ROOT_CONFTEST",
    "SEVERANCE",
    "SEVERANCE_CLINIC",
    "SEVERANCE_CLINIC_2",
    "SNUBH",
    "SNUBH_CLINIC",
    "ConsentDesk",
    "Federation",
    "Hub",
    "LogTap",
    "eventually",
    "krnpi",
    "located",
    "matches",
    "new_rrn",
    "outcomes",
    "pseudonymised",
    "refused",
    "root_conftest",
    "rrn_forms",
    "start_hub",
    "submit",
]


@pytest.fixture
def rrn() -> str:
    return new_rrn()


@pytest.fixture(scope="module")
def hub_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = NatsServer(tmp_path_factory.mktemp("hub-nats") / "js").start()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
async def hub_registry(
    pytestconfig: pytest.Config, hub_nats: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Any]:
    """The real registry on the hubs' own nats-server, so that its record locator hears their events
    and answers their locate requests (the session registry lives on another server)."""
    import json

    from hie_registry.app import create_app as create_registry
    from hie_registry.config import RegistrySettings

    conftest = root_conftest(pytestconfig)
    data = tmp_path_factory.mktemp("hub-registry")
    port = free_port()
    settings = RegistrySettings(
        database_url=f"sqlite+aiosqlite:///{data / 'registry.db'}",
        nats_url=hub_nats,
        port=port,
        registry_url=f"http://127.0.0.1:{port}",
        seed_demo=True,
        credentials_file=data / "credentials.json",
        node="hub-test-registry",
    )
    running = await conftest.RunningApp(create_registry(settings), port).start()
    yield conftest.RegistryHandle(running, json.loads((data / "credentials.json").read_text()))
    await running.stop()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def hub_databases(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[str, str | None]]:
    """(database_url, schema) of each hub: a SQLite file each, or a PostgreSQL schema each."""
    if request.param == "postgres":
        pg = request.getfixturevalue("postgres_url")
        return {slug: (pg, f"t_{slug}_{uuid.uuid4().hex[:8]}") for slug in HUBS}
    data = tmp_path_factory.mktemp("hubs")
    return {slug: (f"sqlite+aiosqlite:///{data / f'{slug}.db'}", None) for slug in HUBS}


@pytest.fixture(scope="module")
async def federation(
    pytestconfig: pytest.Config,
    hub_registry: Any,
    hub_nats: str,
    hub_databases: dict[str, tuple[str, str | None]],
) -> AsyncIterator[Federation]:
    """Severance, SNUBH and CNUH as three hub nodes, the registry on their nats-server and a consent
    desk; once on SQLite and once on PostgreSQL."""
    registry = hub_registry
    databases = hub_databases
    hubs: dict[str, Hub] = {}
    desk = await ConsentDesk(HubSettings(hub="severance").patient_key_bytes).start(hub_nats)
    try:
        for slug in HUBS:
            url, schema = databases[slug]
            hubs[slug] = await start_hub(pytestconfig, slug, hub_nats, registry.url, url, schema)
        tap = LogTap([hub.running.url for hub in hubs.values()])
        logging.getLogger().addHandler(tap)  # after start-up: each service start resets the root handlers
        async with httpx.AsyncClient(timeout=15.0) as http:
            yield Federation(registry, desk, hubs, http, tap)
        logging.getLogger().removeHandler(tap)
    finally:
        for hub in reversed(hubs.values()):
            await hub.running.stop()
        await desk.stop()
        for url, schema in databases.values():
            if schema is not None:
                await root_conftest(pytestconfig)._drop_schema(url, schema)
