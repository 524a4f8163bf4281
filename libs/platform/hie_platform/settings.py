"""The settings base every service extends with its own ``env_prefix`` (HIE_HUB_, HIE_CONSENT_...)."""

from __future__ import annotations

from enum import StrEnum
from typing import Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Values that mark a secret as a development placeholder; refused outside development.
_PLACEHOLDER_MARKERS = ("dev-only", "changeme", "change-me", "placeholder", "secret")
DEV_PATIENT_KEY_SECRET = "dev-only-federation-patient-key-secret"


class Environment(StrEnum):
    DEVELOPMENT = "development"
    TEST = "test"
    PRODUCTION = "production"


class ConfigError(ValueError):
    """A setting that makes the service unsafe or unable to start; reported as one line."""


def is_placeholder(value: str) -> bool:
    lowered = value.strip().lower()
    return not lowered or any(
        marker == lowered or lowered.startswith(marker) for marker in _PLACEHOLDER_MARKERS
    )


class ServiceSettings(BaseSettings):
    """Settings common to every service; subclasses set ``env_prefix`` and service defaults."""

    model_config = SettingsConfigDict(extra="ignore", env_prefix="HIE_")

    environment: Environment = Environment.DEVELOPMENT
    node: str = "local"
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str | None = None
    database_url: str = "sqlite+aiosqlite:///./.hie/service.db"
    database_schema: str | None = None
    migrate_on_start: bool = True
    nats_url: str = "nats://127.0.0.1:4222"  # a cluster: comma-separated URLs
    # JetStream replicas of the federation's streams: 3 on the production 3-node cluster (R3).
    nats_stream_replicas: int = Field(default=1, ge=1, le=5)
    registry_url: str = "http://127.0.0.1:8001"
    token_issuer: str | None = None
    # The longest access token (exp - iat) a verifier accepts; at least the registry's token lifetime.
    token_max_lifetime_seconds: int = Field(default=600, ge=60)
    log_level: str = "INFO"
    log_json: bool = True
    max_body_bytes: int = 10 * 1024 * 1024
    # How long an idle HTTP keep-alive connection stays open. Longer than the clients' own expiry
    # (httpx 5 s, most EMR stacks and load balancers 60 s): a server that closes first races the
    # client's next request on that connection, which then fails with a read error.
    http_keep_alive_seconds: int = Field(default=75, ge=1)
    # Outbox relay: a row that fails to publish is retried after base * 2^(attempt-1) seconds (at
    # most max), and set aside as a dead letter after max_attempts (docs/operations.md, Monitoring).
    outbox_max_attempts: int = Field(default=10, ge=1)
    outbox_retry_base_seconds: float = Field(default=1.0, gt=0)
    outbox_retry_max_seconds: float = Field(default=300.0, gt=0)
    outbox_publish_timeout_seconds: float = Field(default=5.0, gt=0)

    @property
    def base_url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"

    @property
    def issuer(self) -> str:
        return self.token_issuer or self.registry_url

    @property
    def is_development(self) -> bool:
        return self.environment is not Environment.PRODUCTION

    def check_secret(self, name: str, value: SecretStr) -> None:
        """Refuse an empty or placeholder secret outside development."""
        if not self.is_development and is_placeholder(value.get_secret_value()):
            raise ConfigError(f"{name} is a placeholder; set a real secret for {self.environment.value}")


class PatientKeySettings(ServiceSettings):
    """For services that turn an RRN into the federation's pseudonymous patient key."""

    patient_key_secret: SecretStr = SecretStr(DEV_PATIENT_KEY_SECRET)

    @model_validator(mode="after")
    def _real_secret(self) -> Self:
        self.check_secret("patient_key_secret", self.patient_key_secret)
        return self

    @property
    def patient_key_bytes(self) -> bytes:
        return self.patient_key_secret.get_secret_value().encode()


class ConsentSource(StrEnum):
    AUTO = "auto"
    REPLICA = "replica"
    CENTRAL = "central"


class ReplicaSettings(BaseSettings):
    """The replica's settings. Each service reads them with its own prefix (a subclass that sets
    ``env_prefix``: ``HIE_HUB_`` for a hub node, ``HIE_IMAGING_`` for a gateway)."""

    model_config = SettingsConfigDict(extra="ignore")

    consent_staleness_seconds: float = 30.0
    # auto: local once current, the central decision point while starting; replica: local only,
    # failing closed while starting; central: always the central point.
    consent_source: ConsentSource = ConsentSource.AUTO
    # A local consent-based denial is checked with the central point when it answers (read-your-writes
    # for a consent recorded a moment ago); a permit never waits for it.
    consent_confirm_denials: bool = True
    consent_replica_batch: int = 256
    consent_replica_ack_wait_seconds: float = 10.0
    # How often the memory reads the versions other processes of this service applied (module
    # docstring, "Memory"); the heartbeat's read (every second) is the guarantee, this is latency.
    consent_replica_poll_seconds: float = 0.1
    # A version whose predecessor has not come this long after it entered the stream is set aside
    # (hie_platform.consent_versions): its patient is decided stale, the rest of the feed goes on.
    consent_replica_hold_seconds: float = Field(default=5.0, gt=0)
