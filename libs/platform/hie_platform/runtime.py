"""What a service's lifespan holds: database, bus, outbox and relay, audit, registry client, verifier."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from hie_platform import heap
from hie_platform.audit import AuditTrail
from hie_platform.auth import ClaimsCheck, JwksFetcher, TokenVerifier
from hie_platform.bus import Bus
from hie_platform.db import Database, PlatformTables
from hie_platform.errors import Forbidden
from hie_platform.logging import configure_logging, get_logger
from hie_platform.migrations import upgrade
from hie_platform.outbox import Outbox, OutboxRelay, RetryPolicy
from hie_platform.registry_client import RegistryClient
from hie_platform.settings import ServiceSettings
from hie_schemas.auth import TokenClaims
from hie_schemas.envelope import Source

log = get_logger(__name__)


class StartupError(RuntimeError):
    """The service cannot start; the message is the one line an operator reads."""


@dataclass
class Runtime:
    settings: ServiceSettings
    source: Source
    db: Database
    bus: Bus
    tables: PlatformTables
    outbox: Outbox
    relay: OutboxRelay
    audit: AuditTrail
    http: httpx.AsyncClient
    registry: RegistryClient
    verifier: TokenVerifier


def redact_url(url: str) -> str:
    """The URL without its user and password, for logs and error lines."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def outbox_policy(settings: ServiceSettings) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=settings.outbox_max_attempts,
        base_seconds=settings.outbox_retry_base_seconds,
        max_seconds=settings.outbox_retry_max_seconds,
        publish_timeout=settings.outbox_publish_timeout_seconds,
    )


def http_jwks_fetcher(http: httpx.AsyncClient, registry_url: str) -> JwksFetcher:
    async def fetch() -> dict[str, Any]:
        response = await http.get(f"{registry_url.rstrip('/')}/.well-known/jwks.json", timeout=5.0)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    return fetch


async def open_database(
    stack: AsyncExitStack, settings: ServiceSettings, service: str, migrations: Path
) -> Database:
    """The service's database, migrated when configured to, refused at start if it does not answer."""
    db = Database(settings.database_url, settings.database_schema)
    stack.push_async_callback(db.dispose)
    if settings.migrate_on_start:
        try:
            await asyncio.to_thread(upgrade, migrations, settings.database_url, settings.database_schema)
        except Exception as exc:
            raise StartupError(f"{service}: database migration failed: {type(exc).__name__}: {exc}") from exc
    if not await db.ping():
        raise StartupError(f"{service}: database unreachable")
    await db.checkpoint_apart()
    return db


async def connect_bus(stack: AsyncExitStack, settings: ServiceSettings, service: str) -> Bus:
    """The NATS connection with the federation's streams in place."""
    try:
        bus = await Bus.connect(settings.nats_url, name=f"{service}-{settings.node}")
    except Exception as exc:
        raise StartupError(
            f"{service}: NATS unreachable at {settings.nats_url}: {type(exc).__name__}"
        ) from exc
    stack.push_async_callback(bus.close)
    await bus.ensure_streams(replicas=settings.nats_stream_replicas)
    return bus


def in_good_standing(registry: RegistryClient) -> ClaimsCheck:
    """The default check of a token's institution: a participant in good standing at the registry."""

    async def check(claims: TokenClaims) -> None:
        # Suspension or revocation takes effect as soon as the registry's event arrives.
        if not await registry.in_good_standing(claims.inst):
            raise Forbidden("the institution is not a participant in good standing")

    return check


@asynccontextmanager
async def start_runtime(
    settings: ServiceSettings,
    service: str,
    tables: PlatformTables,
    migrations: Path,
    *,
    jwks: JwksFetcher | None = None,
    check_claims: ClaimsCheck | None = None,
) -> AsyncIterator[Runtime]:
    """Open everything in order and close it in reverse; refuse to half-start."""
    configure_logging(service, settings.log_level, settings.log_json)
    source = Source(service=service, node=settings.node)
    async with AsyncExitStack() as stack:
        db = await open_database(stack, settings, service, migrations)
        bus = await connect_bus(stack, settings, service)
        http = await stack.enter_async_context(httpx.AsyncClient())
        registry = RegistryClient(settings.registry_url, http)
        await registry.follow(bus)
        outbox = Outbox(tables.outbox, source, max_payload=lambda: int(bus.nc.max_payload))
        relay = OutboxRelay(db, tables.outbox, bus, policy=outbox_policy(settings))
        relay.start()
        stack.push_async_callback(relay.stop)
        verifier = TokenVerifier(
            jwks or http_jwks_fetcher(http, settings.registry_url),
            settings.issuer,
            check=check_claims or in_good_standing(registry),
            max_lifetime_seconds=settings.token_max_lifetime_seconds,
        )
        await verifier.follow(bus)
        audit = AuditTrail(tables.audit, outbox, settings.node, sender=getattr(settings, "hub", service))
        runtime = Runtime(
            settings=settings,
            source=source,
            db=db,
            bus=bus,
            tables=tables,
            outbox=outbox,
            relay=relay,
            audit=audit,
            http=http,
            registry=registry,
            verifier=verifier,
        )
        log.info("started", node=settings.node, url=settings.base_url)
        yield runtime
        log.info("stopping")


def serve(app: Any, settings: ServiceSettings, *, workers: int = 1) -> None:
    """Run a service under uvicorn with our logging (no uvicorn access log: it would print queries).

    ``app`` is the app itself, or with ``workers`` > 1 the import string of a factory
    (``"module:function"``): uvicorn's supervisor then starts that many processes on the one port and
    each builds its own app (engine, NATS connection, workers) from the environment.

    uvloop and httptools are named, not left to uvicorn's "auto" (which falls back silently to
    asyncio's loop and the pure-Python h11 when they are missing): with them the hub spent 15-20 %
    less CPU per ITI-65 publish (docs/operations.md, "Sizing: hub publish path")."""
    import uvicorn

    heap.mark_serving()
    uvicorn.run(
        app,
        factory=workers > 1,
        workers=workers if workers > 1 else None,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        loop="uvloop",
        http="httptools",
        timeout_keep_alive=settings.http_keep_alive_seconds,
    )
