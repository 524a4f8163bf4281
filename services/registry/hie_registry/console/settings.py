"""Console settings (environment prefix HIE_REGISTRY_CONSOLE_): the session key and lifetimes."""

from __future__ import annotations

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from hie_platform.settings import ServiceSettings

DEV_CONSOLE_SESSION_SECRET = "dev-only-console-session-secret"


class ConsoleSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HIE_REGISTRY_CONSOLE_", extra="ignore")

    # Signs the session cookie and the form tokens (separate keys are derived from it).
    session_secret: SecretStr = SecretStr(DEV_CONSOLE_SESSION_SECRET)
    # A session ends after this long without a page, and in any case this long after sign-in.
    session_idle_seconds: int = 1800
    session_max_seconds: int = 8 * 3600
    form_ttl_seconds: int = 3600
    page_size: int = 20

    def checked(self, service: ServiceSettings) -> ConsoleSettings:
        """Refuse a placeholder session secret outside development, as the service refuses its own."""
        service.check_secret("console session_secret", self.session_secret)
        return self
