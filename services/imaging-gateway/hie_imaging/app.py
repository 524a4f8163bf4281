"""The imaging gateway service: create_app() and its lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from hie_imaging import endpoints
from hie_imaging.config import ImagingSettings
from hie_imaging.gateway import ImagingGateway
from hie_imaging.metrics import GatewayMetrics
from hie_imaging.models import PLATFORM
from hie_platform.http import create_service_app
from hie_platform.runtime import start_runtime

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION = "0.1.0"


def create_app(settings: ImagingSettings | None = None) -> FastAPI:
    settings = settings or ImagingSettings()  # hub and ae_title come from HIE_IMAGING_HUB, _AE_TITLE

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with start_runtime(settings, "imaging-gateway", PLATFORM, MIGRATIONS) as runtime:
            gateway = ImagingGateway(settings, runtime, app.state.gateway_metrics)
            app.state.runtime = runtime
            app.state.gateway = gateway
            await gateway.start()
            try:
                yield
            finally:
                await gateway.stop()

    app = create_service_app(
        service="imaging-gateway",
        title=f"HIE imaging gateway ({settings.hub})",
        version=VERSION,
        description="DICOM C-STORE relay of the studies that belong to an exchange (XDS-I.b in spirit).",
        lifespan=lifespan,
        routers=[endpoints.router],
        max_body_bytes=settings.max_body_bytes,
    )
    app.state.gateway_metrics = GatewayMetrics(app.state.metrics.registry)
    return app
