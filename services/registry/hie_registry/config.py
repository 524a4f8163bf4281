"""Registry settings (environment prefix HIE_REGISTRY_)."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import SettingsConfigDict

from hie_platform.settings import ServiceSettings


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
