"""Imaging gateway settings (environment prefix HIE_IMAGING_)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Self

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from hie_platform.settings import ConfigError, Environment, ReplicaSettings, ServiceSettings
from hie_schemas import subjects

# PS3.5 §6.2: an AE title is 1-16 characters of the default repertoire, no backslash or control code.
_AE_TITLE = re.compile(r"^[ -\[\]-~]{1,16}$")


class ImagingSettings(ServiceSettings, ReplicaSettings):
    """One hub's gateway: its DICOM listener, spool, database, and how hard it tries to relay.

    The consent replica's settings (``CONSENT_STALENESS_SECONDS``, ``CONSENT_SOURCE``,
    ``CONSENT_CONFIRM_DENIALS``, ``CONSENT_REPLICA_BATCH``, ``CONSENT_REPLICA_ACK_WAIT_SECONDS``) are
    the hubs' (hie_platform.consent_replica), read with this prefix.
    """

    model_config = SettingsConfigDict(env_prefix="HIE_IMAGING_", extra="ignore")

    hub: str
    port: int = 8020
    dicom_host: str | None = None  # defaults to `host`
    dicom_port: int = 11112
    ae_title: str
    spool_dir: Path = Path("./.hie/spool")
    database_url: str = "sqlite+aiosqlite:///./.hie/imaging.db"
    hold_seconds: float = 86400.0  # unmatched (held) studies are purged after this
    spool_min_free_bytes: int = 256 * 1024 * 1024
    relay_max_attempts: int = 20  # with the default backoff, about 15 minutes of trying
    consent_timeout_seconds: float = 2.0  # the central decision point, while starting or to confirm
    # Tuning; the defaults suit a hub. The backoff doubles per failed attempt up to its maximum.
    relay_batch: int = 64
    relay_linger_seconds: float = 0.05  # a pause this long in the jobs ends a batch
    relay_concurrency: int = 2  # batches in flight, and associations per batch (see docs/imaging.md)
    relay_backoff_seconds: float = 0.5
    relay_backoff_max_seconds: float = 60.0
    relay_ack_wait_seconds: float = 120.0
    allowlist_refresh_seconds: float = 5.0  # an unknown caller re-reads the registry at most this often
    purge_interval_seconds: float = 60.0
    # Who may connect to the DICOM listener (docs/imaging.md, "Who may connect").
    # A registered AE title only from the address(es) its registered DICOM host resolves to. Off
    # only in the local run (`hie up` passes false); refused in production.
    bind_callers_to_host: bool = True
    dicom_max_associations: int = Field(default=16, ge=1)  # connection slots shared by every address
    dicom_max_connections_per_peer: int = Field(default=8, ge=1)  # of the shared slots, per source IP
    dicom_reserved_per_caller: int = Field(default=1, ge=0)  # extra slots per registered AE, at its host
    dicom_request_timeout_seconds: float = Field(default=5.0, gt=0)  # connect -> whole A-ASSOCIATE-RQ
    dicom_idle_timeout_seconds: float = Field(default=60.0, gt=0)  # an association with no traffic ends

    @field_validator("hub")
    @classmethod
    def _slug(cls, value: str) -> str:
        subjects.hub_imaging_jobs(value)  # the slug becomes a subject token; refuse it now
        return value

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        value = value.strip()
        if not _AE_TITLE.fullmatch(value):
            raise ValueError("ae_title must be 1-16 printable characters without a backslash")
        return value

    @model_validator(mode="after")
    def _callers_bound_in_production(self) -> Self:
        if not self.bind_callers_to_host and self.environment is Environment.PRODUCTION:
            raise ConfigError("bind_callers_to_host=false is for the local run only, not production")
        return self

    @property
    def dicom_bind_host(self) -> str:
        return self.dicom_host or self.host

    @property
    def exchange_consumer(self) -> str:
        return f"imaging-{self.hub}-exchanges"

    @property
    def relay_consumer(self) -> str:
        return f"imaging-{self.hub}-relay"

    @property
    def consent_consumer(self) -> str:
        """The durable consumer of the consent feed (HIE_CONSENT) this gateway's replica applies."""
        return f"imaging-{self.hub}-consent"
