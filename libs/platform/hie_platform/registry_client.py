"""A client of the registry's public directory that keeps its views in memory, current by events.

Institution views arrive with the registry's events (``InstitutionChanged`` on core NATS, ``follow``)
and are answered from memory: a consent decision asks two parties' standing and must not wait for
HTTP (issue 13 point 4). HTTP is used only

- on a miss: one request per institution however many callers ask at once (single-flight; the
  others await the same answer), at most ``max_fetches`` requests at a time;
- to refresh a view older than ``ttl`` (a core NATS event can be lost while disconnected): in the
  background, the caller gets the view it knew. A refresh never overwrites an event that arrived
  after it was sent;
- when a view is older than ``max_stale`` (the registry unreachable that long, so the view could
  miss a suspension): then it is a miss again, and a failure is ``ServiceUnavailable`` (fail closed).

At most ``max_entries`` institutions are kept; past that the one refreshed longest ago is dropped.
The hub list is kept the same way, except that an institution's event (a hub's endpoint may have
changed; the event carries no hub view) makes the next caller wait for a new list, single-flight.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx

from hie_platform.bus import Bus, RefusedMessage
from hie_platform.errors import ServiceUnavailable
from hie_platform.logging import get_logger
from hie_schemas import subjects
from hie_schemas.directory import HubView, InstitutionKind, InstitutionView
from hie_schemas.events import InstitutionChanged

log = get_logger(__name__)

V = TypeVar("V")
_HUBS = "hubs"  # the single-flight key of the hub list


@dataclass(frozen=True)
class _Known(Generic[V]):
    at: float  # monotonic time of the answer (an event's arrival, or when its request was sent)
    view: V


class RegistryClient:
    """Looks institutions and hubs up in the registry; see the module docstring for when it asks."""

    def __init__(
        self,
        base_url: str,
        http: httpx.AsyncClient,
        ttl: float = 30.0,
        *,
        max_stale: float = 300.0,
        max_entries: int = 50_000,
        max_fetches: int = 16,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = http
        self.ttl = ttl
        self.max_stale = max_stale
        self.max_entries = max_entries
        self._clock = clock
        self._institutions: dict[str, _Known[InstitutionView | None]] = {}
        self._hubs: _Known[list[HubView]] | None = None
        self._hubs_dropped_at = float("-inf")  # the last event that dropped the hub list
        self._inflight: dict[str, asyncio.Task[Any]] = {}
        self._fetches = asyncio.Semaphore(max_fetches)
        self.requests = 0  # HTTP requests sent (for metrics and tests)

    async def _get(self, path: str) -> Any:
        async with self._fetches:
            self.requests += 1
            try:
                response = await self.http.get(f"{self.base_url}{path}", timeout=5.0)
            except httpx.HTTPError as exc:
                raise ServiceUnavailable("the registry cannot be reached") from exc
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise ServiceUnavailable(f"the registry answered {response.status_code}")
        return response.json()

    # --- single flight ------------------------------------------------------------------------------

    def _flight(self, key: str, fetch: Callable[[], Coroutine[Any, Any, V]]) -> asyncio.Task[V]:
        """The one request for ``key`` in flight, started if there is none."""
        task: asyncio.Task[V] | None = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(fetch())
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._landed(key, done))
        return task

    def _landed(self, key: str, task: asyncio.Task[Any]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Retrieved here, so a background refresh nobody awaits is not an unretrieved error.
            log.debug("registry refresh failed", key=key, error=type(exc).__name__)

    def _fresh(self, known: _Known[Any]) -> bool | None:
        """True: use it; False: use it and refresh in the background; None: too old to use."""
        age = self._clock() - known.at
        if age > self.max_stale:
            return None
        return age < self.ttl

    # --- institutions -------------------------------------------------------------------------------

    async def _fetch_institution(self, code: str) -> InstitutionView | None:
        sent = self._clock()
        data = await self._get(f"/institutions/{code}")
        view = InstitutionView.model_validate(data) if data is not None else None
        known = self._institutions.get(code)
        if known is not None and known.at > sent:
            return known.view  # an event arrived while the request was out: it is newer
        self._keep(code, _Known(sent, view))
        return view

    def _keep(self, code: str, known: _Known[InstitutionView | None]) -> None:
        self._institutions.pop(code, None)  # re-inserted last: the dict's order is refresh order
        self._institutions[code] = known
        while len(self._institutions) > self.max_entries:
            del self._institutions[next(iter(self._institutions))]

    def known_institution(self, code: str) -> tuple[bool, InstitutionView | None]:
        """(found, view) from memory without waiting; starts a background refresh if it is due."""
        known = self._institutions.get(code)
        if known is None:
            return False, None
        fresh = self._fresh(known)
        if fresh is None:
            return False, None
        if not fresh:
            self._flight(code, lambda: self._fetch_institution(code))
        return True, known.view

    async def institution(self, code: str) -> InstitutionView | None:
        found, view = self.known_institution(code)
        if found:
            return view
        return await asyncio.shield(self._flight(code, lambda: self._fetch_institution(code)))

    def known_standing(self, code: str) -> bool | None:
        """The institution's standing if its view is known (no I/O), else None: ask ``in_good_standing``."""
        found, view = self.known_institution(code)
        if not found:
            return None
        return view is not None and view.in_good_standing

    async def in_good_standing(self, code: str) -> bool:
        view = await self.institution(code)
        return view is not None and view.in_good_standing

    # --- hubs ---------------------------------------------------------------------------------------

    async def _fetch_hubs(self) -> list[HubView]:
        hubs: list[HubView] = []
        for _ in range(3):  # an event while the request was out: that list may be older, ask again
            sent = self._clock()
            hubs = [HubView.model_validate(h) for h in await self._get("/hubs") or []]
            if self._hubs_dropped_at <= sent:
                self._hubs = _Known(sent, hubs)
                break
        return hubs

    async def hubs(self) -> list[HubView]:
        known = self._hubs
        fresh = None if known is None else self._fresh(known)
        if known is None or fresh is None:
            return await asyncio.shield(self._flight(_HUBS, self._fetch_hubs))
        if not fresh:
            self._flight(_HUBS, self._fetch_hubs)
        return known.view

    async def hub(self, slug: str) -> HubView | None:
        return next((h for h in await self.hubs() if h.slug == slug), None)

    # --- what other components ask ------------------------------------------------------------------

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

    # --- events -------------------------------------------------------------------------------------

    def apply(self, view: InstitutionView) -> None:
        now = self._clock()
        self._keep(view.code, _Known(now, view))
        self._hubs, self._hubs_dropped_at = None, now

    def invalidate(self) -> None:
        self._institutions.clear()
        self._hubs = None

    async def follow(self, bus: Bus) -> None:
        """Apply every institution change as it is published (core NATS: a cache, not a ledger)."""

        async def changed(change: InstitutionChanged) -> None:
            self.apply(change.institution)

        await bus.follow(subjects.REGISTRY_INSTITUTION_CHANGED, InstitutionChanged, changed)
