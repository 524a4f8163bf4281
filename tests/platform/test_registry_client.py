"""The registry client answers from memory, kept current by the registry's events (issue 13 point 4).

Against the real registry of the session (uvicorn, its NATS events on the session's nats-server).
HTTP requests are counted, and held back where a test needs a request in flight, with httpx's own
event hooks on the client the registry client is given.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from hie_platform.bus import Bus
from hie_platform.errors import ServiceUnavailable
from hie_platform.natsd import free_port
from hie_platform.registry_client import RegistryClient
from hie_schemas.directory import InstitutionState

ACTIVE = "11100001"  # a seeded hub hospital in good standing
DEADLINE = 30.0  # seconds: a bound to fail instead of hanging, not a measured figure


@dataclass
class Wire:
    """The HTTP requests a registry client sends, through an httpx client the test holds."""

    paths: list[str] = field(default_factory=list)
    open: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: int = 0

    async def hook(self, request: httpx.Request) -> None:
        self.paths.append(request.url.path)
        self.waiting += 1
        try:
            await self.open.wait()
        finally:
            self.waiting -= 1

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(event_hooks={"request": [self.hook]})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def wire() -> AsyncIterator[Wire]:
    found = Wire()
    found.open.set()
    yield found
    found.open.set()  # nothing left waiting behind a test that failed


async def test_concurrent_misses_send_one_request(registry: Any, wire: Wire) -> None:
    async with wire.client() as http:
        client = RegistryClient(registry.url, http)
        wire.open.clear()
        asking = [asyncio.ensure_future(client.institution(ACTIVE)) for _ in range(20)]
        while wire.waiting == 0:
            await asyncio.sleep(0.01)
        wire.open.set()
        views = await asyncio.wait_for(asyncio.gather(*asking), DEADLINE)
    assert wire.paths == [f"/institutions/{ACTIVE}"]
    assert {v.code for v in views if v is not None} == {ACTIVE}
    assert all(v is views[0] for v in views)


async def test_a_known_view_is_answered_while_its_refresh_is_in_flight(registry: Any, wire: Wire) -> None:
    clock = Clock()
    async with wire.client() as http:
        client = RegistryClient(registry.url, http, ttl=30.0, clock=clock)
        assert await client.in_good_standing(ACTIVE)
        clock.now += 31.0  # past the ttl: due for a refresh
        wire.open.clear()  # the refresh will wait in the wire until the test lets it go
        assert client.known_standing(ACTIVE) is True
        view = await asyncio.wait_for(client.institution(ACTIVE), DEADLINE)
        assert view is not None
        assert view.code == ACTIVE
        # Answered while the one refresh (single-flight: two asks, one request) is still out.
        assert (wire.waiting, len(wire.paths)) == (1, 2)
        wire.open.set()
        while wire.waiting:
            await asyncio.sleep(0.01)
        clock.now += 1.0
        assert client.known_standing(ACTIVE) is True
        assert len(wire.paths) == 2  # refreshed: not due again


async def test_events_keep_views_current_without_asking(registry: Any, nats_url: str, wire: Wire) -> None:
    code = f"78{random.randint(0, 999999):06d}"
    bus = await Bus.connect(nats_url, name="test-registry-client")
    try:
        async with wire.client() as http, httpx.AsyncClient() as agency_http:
            client = RegistryClient(registry.url, http)
            await client.follow(bus)
            assert await client.institution(code) is None  # not in the registry yet
            asked = len(wire.paths)
            agency = {"Authorization": f"Bearer {await registry.token('agency')}"}
            applied = await agency_http.post(
                f"{registry.url}/institutions",
                headers=agency,
                json={
                    "code": code,
                    "name": "테스트의원",
                    "kind": "clinic",
                    "region": "경기",
                    # Not snubh: the registry is the session's, and tests/registry/test_directory.py
                    # lists snubh's clinics exactly.
                    "hub": "severance",
                    "departments": ["2300"],
                    "contacts": {"person": "김담당", "phone": "031-000-0000"},
                    "samples": [],
                },
            )
            assert applied.status_code == 201, applied.text

            async def arrived() -> None:
                while client.known_institution(code)[1] is None:
                    await asyncio.sleep(0.01)

            await asyncio.wait_for(arrived(), DEADLINE)
            view = await client.institution(code)
            assert view is not None
            assert view.state is InstitutionState.APPLIED
            assert client.known_standing(code) is False  # applied is not yet a participant
            assert len(wire.paths) == asked  # the event, not a request
    finally:
        await bus.close()


async def test_the_cache_is_bounded(registry: Any, wire: Wire) -> None:
    codes = [ACTIVE, "31100002", "11301001"]
    async with wire.client() as http:
        client = RegistryClient(registry.url, http, max_entries=2)
        for code in codes:
            assert await client.institution(code) is not None
        assert len(wire.paths) == 3
        await client.institution(codes[2])  # kept
        assert len(wire.paths) == 3
        await client.institution(codes[0])  # the oldest was dropped: asked again
        assert wire.paths[-1] == f"/institutions/{codes[0]}"
        assert len(wire.paths) == 4


async def test_an_unconfirmed_view_expires_and_then_fails_closed(registry: Any, nats_url: str) -> None:
    """Past ``max_stale`` without an event or an answer, a view is not used: the caller gets 503."""
    clock = Clock()
    async with httpx.AsyncClient() as http:
        known = RegistryClient(registry.url, http)
        view = await known.institution(ACTIVE)
        assert view is not None
        # A client whose registry does not answer (nothing listens on the port), fed by an event.
        cut_off = RegistryClient(f"http://127.0.0.1:{free_port()}", http, ttl=30, max_stale=300, clock=clock)
        cut_off.apply(view)
        clock.now += 200  # past the ttl: answered, refreshed in the background (which fails)
        assert cut_off.known_standing(ACTIVE) is True
        assert await cut_off.in_good_standing(ACTIVE)
        clock.now += 101  # past max_stale: the view may miss a suspension
        assert cut_off.known_standing(ACTIVE) is None
        with pytest.raises(ServiceUnavailable):
            await cut_off.in_good_standing(ACTIVE)
