"""Who may associate: the allow-list of calling AE titles, taken from the registry, kept in memory.

Allowed are the PACS of this hub's institutions in good standing (they send studies out: origin
role) and the gateways of the other hubs (they relay studies in: destination role), each from the
DICOM host the registry records for it (`bind_to_host`; AE titles are public in the directory, so a
title alone proves nothing). Host names are resolved when the list is read (getaddrinfo in the event
loop's executor, never on a pynetdicom thread) and the peer's IP address is compared with the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from nats.aio.msg import Msg
from pydantic import TypeAdapter

from hie_imaging.dicom.admission import normalize_address
from hie_imaging.models import Role
from hie_imaging.service import Caller
from hie_platform.logging import get_logger
from hie_platform.runtime import Runtime
from hie_platform.workers import Worker
from hie_schemas import subjects
from hie_schemas.directory import HubView, InstitutionView

log = get_logger(__name__)

_INSTITUTIONS = TypeAdapter(list[InstitutionView])
_HUBS = TypeAdapter(list[HubView])
_RESOLVE_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class _Registered:
    caller: Caller
    host: str  # as registered
    addresses: frozenset[str]  # what it resolved to when the list was read (empty: did not resolve)


class RegistryUnavailableError(Exception):
    """The registry could not be read; the allow-list stays as it was."""


class CallerDirectory:
    """Calling AE title -> Caller, refreshed at start, on every institution change, and on demand
    (at most every `min_refresh_seconds`) when an unknown AE title calls."""

    def __init__(
        self,
        runtime: Runtime,
        hub: str,
        min_refresh_seconds: float = 5.0,
        *,
        bind_to_host: bool = True,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self._runtime = runtime
        self._hub = hub
        self._min_refresh = min_refresh_seconds
        self._bind_to_host = bind_to_host
        self._on_refused = on_refused
        self._callers: dict[str, _Registered] = {}
        self._per_address: dict[str, int] = {}
        self._attempted_at = float("-inf")
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._follower = Worker("imaging-allow-list", self._follow)
        self._subscription: Any = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await self.refresh()
        except RegistryUnavailableError as exc:
            # Fail closed: nobody may associate until the registry answers; the follower retries.
            log.warning("allow-list not loaded at start", error=str(exc))
            self._wake.set()

        async def on_change(_msg: Msg) -> None:
            self._wake.set()

        self._subscription = await self._runtime.bus.nc.subscribe(
            subjects.REGISTRY_INSTITUTION_CHANGED, cb=on_change
        )
        self._follower.start()

    async def stop(self) -> None:
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
        await self._follower.stop()

    def lookup(self, ae_title: str) -> Caller | None:
        entry = self._callers.get(ae_title.strip())
        return None if entry is None else entry.caller

    def registered_at(self, address: str) -> int:
        """How many allowed callers have `address` as their registered host (the SCP reserves
        connection slots for them). Answers from memory at once: it runs on the accepting thread."""
        return self._per_address.get(normalize_address(address), 0)

    def is_allowed(self, calling_ae: str, peer_address: str) -> bool:
        """StorageServer's allow-list check; runs on a pynetdicom thread, never on the event loop.

        An unknown AE title, or a known one from an address its host does not resolve to, triggers a
        registry read (rate-limited) so that a newly registered PACS, or a host name whose address
        changed, need not wait for the change event. An exception here makes the SCP reject (fail
        closed).
        """
        address = normalize_address(peer_address)
        verdict = self._verdict(calling_ae, address)
        if verdict and self._loop is not None and time.monotonic() - self._attempted_at >= self._min_refresh:
            future = asyncio.run_coroutine_threadsafe(self._refresh_if_stale(), self._loop)
            future.result(timeout=15)
            verdict = self._verdict(calling_ae, address)
        if verdict == "wrong-host":
            entry = self._callers.get(calling_ae)  # a refresh may have replaced the list since
            log.warning(
                "association refused: calling AE not registered for this address",
                calling_ae=calling_ae,
                address=address,
                registered_host=entry.host if entry is not None else None,
            )
        if verdict and self._on_refused is not None:
            self._on_refused(verdict)
        return not verdict

    def _verdict(self, calling_ae: str, address: str) -> str:
        """Empty if allowed, else why not: "unknown-caller" or "wrong-host"."""
        entry = self._callers.get(calling_ae)
        if entry is None:
            return "unknown-caller"
        if self._bind_to_host and address not in entry.addresses:
            return "wrong-host"
        return ""

    async def _refresh_if_stale(self) -> None:
        async with self._lock:
            if time.monotonic() - self._attempted_at >= self._min_refresh:
                await self._refresh_locked()

    async def refresh(self) -> None:
        async with self._lock:
            await self._refresh_locked()

    async def _refresh_locked(self) -> None:
        self._attempted_at = time.monotonic()
        institutions = _INSTITUTIONS.validate_python(await self._get("/institutions", {"hub": self._hub}))
        hubs = _HUBS.validate_python(await self._get("/hubs"))
        registered: dict[str, tuple[Caller, str]] = {}
        for inst in institutions:
            if inst.dicom is not None and inst.in_good_standing and inst.hub == self._hub:
                ae = inst.dicom.ae_title.strip()
                registered[ae] = (Caller(ae, Role.ORIGIN, institution=inst.code), inst.dicom.host)
        for hub in hubs:
            # A gateway's title wins over a PACS that happens to use the same one: it only relays in.
            if hub.gateway is not None and hub.slug != self._hub:
                ae = hub.gateway.ae_title.strip()
                registered[ae] = (Caller(ae, Role.DESTINATION, hub=hub.slug), hub.gateway.host)
        hosts = sorted({host for _, host in registered.values()})
        resolved = dict(zip(hosts, await asyncio.gather(*map(_resolve, hosts)), strict=True))
        callers = {ae: _Registered(c, host, resolved[host]) for ae, (c, host) in registered.items()}
        per_address: dict[str, int] = {}
        for entry in callers.values():
            for address in entry.addresses:
                per_address[address] = per_address.get(address, 0) + 1
        if callers != self._callers:
            log.info("allow-list loaded", callers=len(callers), addresses=len(per_address))
        self._callers, self._per_address = callers, per_address

    async def _get(self, path: str, params: dict[str, str] | None = None) -> Any:
        url = f"{self._runtime.settings.registry_url.rstrip('/')}{path}"
        try:
            response = await self._runtime.http.get(url, params=params, timeout=5.0)
        except httpx.HTTPError as exc:
            raise RegistryUnavailableError(f"registry unreachable: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise RegistryUnavailableError(f"registry answered {response.status_code} for {path}")
        return response.json()

    async def _follow(self) -> None:
        """Read the list again when woken; a registry away is tried again each second (logged each
        time). Anything else is a crash the worker logs and restarts after: the read still due."""
        while True:
            await self._wake.wait()
            await asyncio.sleep(0.1)  # one read for a burst of changes
            self._wake.clear()
            try:
                await self.refresh()
            except (RegistryUnavailableError, ValueError) as exc:
                log.warning("allow-list refresh failed; will retry", error=str(exc))
                await asyncio.sleep(1.0)
                self._wake.set()
            except Exception:
                self._wake.set()  # for the restarted loop
                raise


async def _resolve(host: str) -> frozenset[str]:
    """The IP addresses of a registered DICOM host (an IP address stands for itself)."""
    try:
        return frozenset({normalize_address(str(ipaddress.ip_address(host)))})
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(_RESOLVE_TIMEOUT_SECONDS):
            infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError) as exc:
        # Fail closed for this caller only: it cannot associate until its host resolves again.
        log.warning("registered DICOM host does not resolve", host=host, error=f"{type(exc).__name__}: {exc}")
        return frozenset()
    return frozenset(normalize_address(str(info[4][0])) for info in infos)
