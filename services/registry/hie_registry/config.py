"""Registry settings (environment prefix HIE_REGISTRY_)."""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import model_validator
from pydantic_settings import SettingsConfigDict

from hie_platform.settings import ConfigError, ServiceSettings


class RegistrySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="HIE_REGISTRY_", extra="ignore")

    port: int = 8001
    database_url: str = "sqlite+aiosqlite:///./.hie/registry.db"
    token_ttl_seconds: int = 300
    # Development conveniences, used by `hie up`: seed the demo institutions, keep their generated
    # client secrets in a file, and take hub endpoints (FHIR base, imaging gateway) from a topology file.
    seed_demo: bool = False
    credentials_file: Path | None = None
    topology_file: Path | None = None

    @model_validator(mode="after")
    def _verifiable_lifetime(self) -> Self:
        # Every verifier refuses a token that lives longer than token_max_lifetime_seconds.
        if self.token_ttl_seconds > self.token_max_lifetime_seconds:
            raise ConfigError(
                f"token_ttl_seconds ({self.token_ttl_seconds}) exceeds token_max_lifetime_seconds "
                f"({self.token_max_lifetime_seconds}): the services would refuse every token"
            )
        return self
