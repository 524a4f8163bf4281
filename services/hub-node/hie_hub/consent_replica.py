"""The hub's replica of the consent feed, so that the hub decides locally (design §4).

The replica itself is ``hie_platform.consent_replica`` (the same code the imaging gateways run); this
module binds it to the hub: its durable consumer ``hub-<slug>-consent`` (shared by the hub's
replicas), its ``consent_replica`` table and its settings.

Its settings are the hub's (``HubSettings`` includes ``hie_platform.settings.ReplicaSettings``:
``HIE_HUB_CONSENT_STALENESS_SECONDS``, ``HIE_HUB_CONSENT_SOURCE``, ``HIE_HUB_CONSENT_CONFIRM_DENIALS``…).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import Table

from hie_hub.models import Base, ConsentReplicaVersion
from hie_platform import consent_replica as shared
from hie_platform.consent_replica import ConsentWatch, Freshness
from hie_platform.runtime import Runtime
from hie_platform.settings import ConsentSource, ReplicaSettings

__all__ = ["ConsentReplica", "ConsentSource", "ConsentWatch", "Freshness"]


def replica_table() -> Table:
    """The hub's ``consent_replica`` table (declared by its model, hie_hub.models)."""
    return Base.metadata.tables[ConsentReplicaVersion.__tablename__]


class ConsentReplica(shared.ConsentReplica):
    """The shared replica on the hub's durable consumer and table."""

    def __init__(
        self,
        runtime: Runtime,
        hub: str,
        settings: ReplicaSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(runtime, f"hub-{hub}-consent", replica_table(), settings, clock=clock)
