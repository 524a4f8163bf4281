"""A cached client of the registry's public directory, kept current by registry events."""

from __future__ import annotations

import time
from typing import Any

import httpx
from nats.aio.msg import Msg
from pydantic import ValidationError

from hie_platform.bus import Bus, RefusedMessage
from hie_platform.errors import ServiceUnavailable
from hie_platform.logging import get_logger
from hie_schemas import subjects
from hie_schemas.directory import HubView, InstitutionKind, InstitutionView
from hie_schemas.envelope import Envelope
from hie_schemas.events import InstitutionChanged

log = get_logger(__name__)


class RegistryClient:
    """Looks institutions and hubs up in the registry; entries live ``ttl`` seconds or until an event."""

    def __init__(self, base_url: str, http: httpx.AsyncClient, ttl: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = http
        self.ttl = ttl
        self._institutions: dict[str, tuple[float, InstitutionView | None]] = {}
        self._hubs: tuple[float, list[HubView]] | None = None

    async def _get(self, path: str) -> Any:
        try:
            response = await self.http.get(f"{self.base_url}{path}", timeout=5.0)
        except httpx.HTTPError as exc:
            raise ServiceUnavailable("the registry cannot be reached") from exc
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise ServiceUnavailable(f"the registry answered {response.status_code}")
        return response.json()

    async def institution(self, code: str) -> InstitutionView | None:
        cached = self._institutions.get(code)
        if cached and time.monotonic() - cached[0] < self.ttl:
            return cached[1]
        data = await self._get(f"/institutions/{code}")
        view = InstitutionView.model_validate(data) if data is not None else None
        self._institutions[code] = (time.monotonic(), view)
        return view

    async def hubs(self) -> list[HubView]:
        if self._hubs and time.monotonic() - self._hubs[0] < self.ttl:
            return self._hubs[1]
        data = await self._get("/hubs") or []
        hubs = [HubView.model_validate(h) for h in data]
        self._hubs = (time.monotonic(), hubs)
        return hubs

    async def hub(self, slug: str) -> HubView | None:
        return next((h for h in await self.hubs() if h.slug == slug), None)

    async def hub_of(self, code: str) -> str | None:
        """The hub an institution belongs to (a bus consumer's sender check); None if unknown."""
        try:
            view = await self.institution(code)
        except ValueError:
            return None
        return view.hub if view is not None else None

    async def check_asker(self, sender: str | None, requester: str, requester_hub: str) -> None:
        """A hub's request (the subject's asking hub ``sender``) speaks only for its own institutions,
        or for a public agency, which belongs to no hub and asks through the hub it reads at."""
        if sender is None or sender != requester_hub:
            raise RefusedMessage("sender-mismatch", "requester_hub is not the asking hub")
        view = await self.institution(requester)
        if view is None:
            raise RefusedMessage("unknown-institution", "the requester is not in the registry")
        if view.hub is None and view.kind is InstitutionKind.PUBLIC_AGENCY:
            return
        if view.hub != sender:
            raise RefusedMessage("sender-mismatch", "the requester belongs to another hub")

    async def in_good_standing(self, code: str) -> bool:
        view = await self.institution(code)
        return view is not None and view.in_good_standing

    def apply(self, view: InstitutionView) -> None:
        self._institutions[view.code] = (time.monotonic(), view)
        self._hubs = None

    def invalidate(self) -> None:
        self._institutions.clear()
        self._hubs = None

    async def follow(self, bus: Bus) -> None:
        """Apply every institution change as it is published (core NATS: a cache, not a ledger)."""

        async def on_msg(msg: Msg) -> None:
            try:
                change = Envelope.from_bytes(msg.data).payload(InstitutionChanged)
            except (ValidationError, ValueError):
                return
            self.apply(change.institution)

        await bus.nc.subscribe(subjects.REGISTRY_INSTITUTION_CHANGED, cb=on_msg)
