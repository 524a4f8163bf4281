"""Consent settings (environment prefix HIE_CONSENT_)."""

from __future__ import annotations

import hashlib
import hmac
from typing import Self

from pydantic import SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from hie_platform.settings import Environment, PatientKeySettings

DEV_PORTAL_SESSION_SECRET = "dev-only-portal-session-secret"


class ConsentSettings(PatientKeySettings):
    model_config = SettingsConfigDict(env_prefix="HIE_CONSENT_", extra="ignore")

    port: int = 8002
    database_url: str = "sqlite+aiosqlite:///./.hie/consent.db"
    # A consent may be dated slightly ahead of our clock (the desk PC's clock drifts), never further.
    max_future_skew_seconds: int = 300
    # The durable JetStream consumers that feed the patient's history; replicas share them.
    history_consumer: str = "consent-history"
    access_consumer: str = "consent-access"
    # How often the consent feed says it is alive (hubs fail closed when they stop hearing it).
    heartbeat_interval_seconds: float = 1.0
    # The signature image kept with a consent given at a desk (Consent.sourceAttachment).
    max_signature_bytes: int = 256 * 1024
    # Portal and call-centre consents are recorded in the operating agency's name (KHIS).
    agency_institution: str = "99000001"
    # Patient sessions: HS256 tokens signed with a key only this service holds.
    portal_session_secret: SecretStr = SecretStr(DEV_PORTAL_SESSION_SECRET)
    portal_session_seconds: int = 600
    # One-time codes: six digits, short-lived, few attempts, then a lockout of the patient's verification.
    code_ttl_seconds: int = 300
    code_max_attempts: int = 5
    code_lockout_seconds: int = 900

    @model_validator(mode="after")
    def _real_session_secret(self) -> Self:
        self.check_secret("portal_session_secret", self.portal_session_secret)
        return self

    @property
    def reveals_codes(self) -> bool:
        """Development providers show the code to the developer; never in any other environment."""
        return self.environment is Environment.DEVELOPMENT

    @property
    def session_key(self) -> bytes:
        """The HS256 key of patient sessions: 32 bytes derived from the secret, whatever its length."""
        return self._derived(b"hie-portal-session")

    @property
    def code_key(self) -> bytes:
        """The key of the one-time codes' hashes (separate from the session key)."""
        return self._derived(b"hie-one-time-code")

    def _derived(self, purpose: bytes) -> bytes:
        secret = self.portal_session_secret.get_secret_value().encode()
        return hmac.new(secret, purpose, hashlib.sha256).digest()
