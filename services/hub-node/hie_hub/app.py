"""The hub node service: create_app() and its lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from prometheus_client import Gauge

from hie_hub.audit import endpoints as audit_api
from hie_hub.audit.checkpoints import AuditCheckpoints
from hie_hub.config import HubSettings
from hie_hub.consent import ConsentGate
from hie_hub.consent_replica import ConsentReplica, Freshness
from hie_hub.core import endpoints as fhir_api
from hie_hub.crs import endpoints as crs_api
from hie_hub.documents import cda_endpoints as cda_api
from hie_hub.documents import endpoints as documents_api
from hie_hub.documents import holder
from hie_hub.exchange.inbox import Inbox
from hie_hub.imaging import endpoints as imaging_api
from hie_hub.imaging import status as study_status
from hie_hub.imaging.service import StudyFeed
from hie_hub.lists import endpoints as list_api
from hie_hub.models import PLATFORM
from hie_hub.node import HubNode
from hie_hub.subscriptions import endpoints as subscription_api
from hie_hub.subscriptions.webhooks import WebhookSender
from hie_hub.tasks import endpoints as task_api
from hie_platform.http import create_service_app
from hie_platform.runtime import start_runtime

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION = "0.1.0"


def create_app(settings: HubSettings | None = None) -> FastAPI:
    settings = settings or HubSettings()  # hub comes from HIE_HUB_HUB

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with start_runtime(settings, "hub-node", PLATFORM, MIGRATIONS) as runtime:
            replica = ConsentReplica(runtime, settings.hub, settings)
            await replica.start()
            replicas.append(replica)
            gate = ConsentGate(runtime.bus, settings.consent_timeout_seconds, replica, hub=settings.hub)
            node = HubNode(settings, runtime, gate)
            app.state.runtime = runtime
            app.state.node = node
            Inbox(node).start()
            StudyFeed(node).start()
            await holder.serve(node)
            webhooks = WebhookSender(runtime.db, settings, node.webhooks_due, runtime.http)
            webhooks.start()
            checkpoints = AuditCheckpoints.attach(settings, runtime)
            if checkpoints is not None:
                checkpoints.start()
            try:
                yield
            finally:
                await webhooks.stop()
                if checkpoints is not None:
                    await checkpoints.stop()
                await replica.stop()
                replicas.remove(replica)

    replicas: list[ConsentReplica] = []
    app = create_service_app(
        service="hub-node",
        title=f"HIE hub node ({settings.hub})",
        version=VERSION,
        description=(
            "FHIR document repository of a hub and its clinics; referral/return exchange (IHE MHD); "
            "the imaging studies delivered to them (IHE XDS-I.b)."
        ),
        lifespan=lifespan,
        routers=[
            cda_api.router,  # before fhir_api/documents_api: K-CDA first, the rest handed on
            fhir_api.router,
            documents_api.router,
            imaging_api.router,
            study_status.router,
            list_api.router,
            task_api.router,
            subscription_api.router,
            crs_api.router,
            audit_api.router,
        ],
        max_body_bytes=settings.max_body_bytes,
    )
    _replica_metrics(app, replicas)
    return app


def app_from_environment() -> FastAPI:
    """The app of one worker process of ``python -m hie_hub`` with HIE_HUB_WORKERS > 1 (uvicorn's
    factory): its settings read from the environment in that process."""
    return create_app(HubSettings())


def _replica_metrics(app: FastAPI, replicas: list[ConsentReplica]) -> None:
    """How current the consent replica is: alert well before it reaches the staleness bound."""
    registry = app.state.metrics.registry

    def staleness() -> float:
        seconds = replicas[-1].staleness_seconds() if replicas else None
        return float("nan") if seconds is None else seconds

    def current() -> float:
        return 1.0 if replicas and replicas[-1].freshness() is Freshness.CURRENT else 0.0

    Gauge(
        "hie_hub_consent_replica_staleness_seconds",
        "Seconds since the consent replica was last known to hold every recorded version (NaN: not yet)",
        registry=registry,
    ).set_function(staleness)
    Gauge(
        "hie_hub_consent_replica_current",
        "1 while the replica decides locally (within the staleness bound), 0 while starting or stale",
        registry=registry,
    ).set_function(current)
    Gauge(
        "hie_hub_consent_replica_held_patients",
        "Patients with a consent version set aside for want of its predecessor: decided stale",
        registry=registry,
    ).set_function(lambda: float(len(replicas[-1].held)) if replicas else 0.0)
