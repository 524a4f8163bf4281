"""The imaging gateway service: create_app() and its lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from prometheus_client import Gauge

from hie_imaging import endpoints
from hie_imaging.config import ImagingSettings
from hie_imaging.gateway import ImagingGateway
from hie_imaging.metrics import GatewayMetrics
from hie_imaging.models import PLATFORM
from hie_platform.consent_replica import ConsentReplica, Freshness
from hie_platform.http import create_service_app
from hie_platform.logging import get_logger
from hie_platform.runtime import start_runtime

log = get_logger(__name__)

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
    _replica_metrics(app)
    return app


def _replica_metrics(app: FastAPI) -> None:
    """How current the gateway's consent replica is (as the hubs' hie_hub_consent_replica_*)."""
    registry = app.state.metrics.registry

    def replica() -> ConsentReplica | None:
        gateway: ImagingGateway | None = getattr(app.state, "gateway", None)
        return None if gateway is None else gateway.worker.replica

    def staleness() -> float:
        current = replica()
        seconds = None if current is None else current.staleness_seconds()
        return float("nan") if seconds is None else seconds

    def current() -> float:
        found = replica()
        return 1.0 if found is not None and found.freshness() is Freshness.CURRENT else 0.0

    def sequence() -> float:
        found = replica()
        return float(found.applied_sequence) if found is not None else 0.0

    Gauge(
        "hie_imaging_consent_replica_staleness_seconds",
        "Seconds since the consent replica was last known to hold every recorded version (NaN: not yet)",
        registry=registry,
    ).set_function(staleness)
    Gauge(
        "hie_imaging_consent_replica_current",
        "1 while the gateway decides consent locally (within the staleness bound), 0 while starting or stale",
        registry=registry,
    ).set_function(current)
    Gauge(
        "hie_imaging_consent_replica_sequence",
        "HIE_CONSENT stream sequence of the newest consent version in the replica",
        registry=registry,
    ).set_function(sequence)
    Gauge(
        "hie_imaging_consent_replica_held_patients",
        "Patients with a consent version set aside for want of its predecessor: decided stale",
        registry=registry,
    ).set_function(lambda: float(len(found.held)) if (found := replica()) is not None else 0.0)
