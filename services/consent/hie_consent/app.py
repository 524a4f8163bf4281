"""The consent service: create_app() and its lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from hie_consent import endpoints, events, portal_endpoints, portal_web
from hie_consent.config import ConsentSettings
from hie_consent.identity import (
    DevelopmentIdentityProvider,
    DevelopmentSmsSender,
    IdentityProvider,
    SmsSender,
)
from hie_consent.models import PLATFORM
from hie_platform.http import create_service_app
from hie_platform.logging import get_logger
from hie_platform.runtime import start_runtime

MIGRATIONS = Path(__file__).parent / "migrations"
log = get_logger(__name__)


def create_app(
    settings: ConsentSettings | None = None,
    *,
    identity: IdentityProvider | None = None,
    sms: SmsSender | None = None,
) -> FastAPI:
    """``identity`` and ``sms`` plug in the real 본인인증 provider and SMS gateway; the development
    ones deliver nothing and show the code only when the environment is development."""
    settings = settings or ConsentSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with start_runtime(settings, "consent", PLATFORM, MIGRATIONS) as runtime:
            app.state.settings = settings
            app.state.runtime = runtime
            app.state.identity = identity or DevelopmentIdentityProvider(reveal=settings.reveals_codes)
            app.state.sms = sms or DevelopmentSmsSender(reveal=settings.reveals_codes)
            if identity is None or sms is None:
                log.warning("development identity provider or SMS sender: no code is delivered to anyone")
            await events.start(runtime, settings)
            heartbeat = events.FeedHeartbeat(runtime, settings.heartbeat_interval_seconds)
            heartbeat.start()
            try:
                yield
            finally:
                await heartbeat.stop()

    return create_service_app(
        service="consent",
        title="HIE consent",
        version="0.1.0",
        description="Consent records (FHIR Consent, KHIS policy codes), the consent decision point, the "
        "patient portal and call centre (one-time codes), and the patient's exchange and access history.",
        lifespan=lifespan,
        routers=[endpoints.router, portal_endpoints.router, portal_web.router],
        max_body_bytes=settings.max_body_bytes,
    )
