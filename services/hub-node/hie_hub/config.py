"""Hub node settings (environment prefix HIE_HUB_)."""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict
from sqlalchemy.engine import make_url

from hie_platform.settings import PatientKeySettings, ReplicaSettings
from hie_schemas import subjects


class HubSettings(PatientKeySettings, ReplicaSettings):
    """One hub node: its slug (as the registry knows the hub), database, consent timeout and the
    settings of its consent replica (``HIE_HUB_CONSENT_*``, hie_platform.consent_replica)."""

    model_config = SettingsConfigDict(env_prefix="HIE_HUB_", extra="ignore")

    hub: str
    port: int = 8010
    database_url: str = "sqlite+aiosqlite:///./.hie/hub.db"
    # Worker processes behind the one port (uvicorn's supervisor), each with its own event loop, so a
    # hub on one machine can use more than one core; PostgreSQL only (docs/operations.md, "Scaling a
    # hub past one core").
    workers: int = Field(default=1, ge=1)
    consent_timeout_seconds: float = 2.0
    # Federated search: how long the asking hub waits for the holding hubs (one deadline for all),
    # and how long a disclosed document may be retrieved through this hub afterwards.
    federated_timeout_seconds: float = 3.0
    federated_grant_seconds: float = 3600.0
    # Long polling of GET /fhir/Task (Prefer: wait=N): the longest wait granted.
    long_poll_max_seconds: float = 60.0
    # Webhooks (rest-hook Subscriptions): retries with exponential backoff, then given up.
    webhook_poll_seconds: float = 1.0
    webhook_timeout_seconds: float = 10.0
    webhook_backoff_seconds: float = 2.0
    webhook_max_backoff_seconds: float = 600.0
    webhook_max_attempts: int = 12
    webhook_retention_days: float = 7.0  # delivered or given-up deliveries are kept this long
    # Signed audit checkpoints (hie_hub.audit.checkpoints): the chain's head published to HIE_AUDIT
    # every N records and every T seconds when it moved. The Ed25519 key file is created (0600) if
    # missing, its public key beside it as <file>.pub; unset, there are no checkpoints.
    audit_checkpoint_key_file: Path | None = None
    audit_checkpoint_every: int = Field(default=100, ge=1)
    audit_checkpoint_seconds: float = Field(default=60.0, gt=0)

    @field_validator("hub")
    @classmethod
    def _slug(cls, value: str) -> str:
        # The slug becomes a NATS subject token (hie.hub.<hub>.inbox.…); refuse it now, not at first publish.
        subjects.hub_inbox_wildcard(value)
        return value

    @model_validator(mode="after")
    def _one_writer_on_sqlite(self) -> Self:
        if self.workers > 1 and make_url(self.database_url).get_backend_name() == "sqlite":
            raise ValueError(
                f"HIE_HUB_WORKERS={self.workers} needs PostgreSQL: a SQLite file has one writer and "
                "its writer lock is per process; keep HIE_HUB_WORKERS=1 on SQLite"
            )
        return self

    @property
    def fhir_base(self) -> str:
        return f"{self.base_url.rstrip('/')}/fhir"
