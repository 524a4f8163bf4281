"""Proving a patient's identity with a one-time code: the pluggable senders and the code's life.

A code has six digits, lives ``code_ttl_seconds`` (5 min), and only its keyed hash is stored. Wrong
codes are counted per patient across the challenges of one lockout window; at ``code_max_attempts``
(5) the patient's verification is locked for ``code_lockout_seconds`` (15 min), in every channel.
The development implementations reveal the code (response field ``dev_code`` and one log line) only
when the service's environment is ``development``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, ClassVar, Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from hie_consent import repository
from hie_consent.config import ConsentSettings
from hie_consent.models import IdentityChallenge
from hie_consent.repository import as_utc
from hie_platform.db import raise_after_commit
from hie_platform.errors import Conflict, FhirError, NotFound, Unprocessable
from hie_platform.logging import get_logger
from hie_schemas.identifiers import Rrn

log = get_logger(__name__)


class ChallengePurpose(StrEnum):
    PORTAL = "portal"  # signing in to the patient portal
    CALL_CENTRE = "call-centre"  # completing a request taken by the call centre


@dataclass(frozen=True)
class IdentityClaim:
    """Who the person says they are: an RRN (never printed) and the mobile phone registered to it."""

    rrn: Rrn
    phone: str


@dataclass(frozen=True)
class Delivery:
    """What a sender reports; ``dev_code`` only from a development sender in development."""

    dev_code: str | None = None


class IdentityNotConfirmed(Unprocessable):
    """The identity provider could not confirm that the phone belongs to the RRN's holder."""

    def __init__(self) -> None:
        super().__init__("the identity could not be verified with this phone number")


class IdentityProvider(Protocol):
    """본인인증: checks that the phone belongs to the RRN's holder and sends the code to it."""

    async def send_code(self, claim: IdentityClaim, code: str, reference: str) -> Delivery:
        """Send ``code``; raise ``IdentityNotConfirmed`` if the claim does not hold."""
        ...


class SmsSender(Protocol):
    """A text-message gateway (the call centre's completion code)."""

    async def send_code(self, phone: str, code: str, reference: str) -> Delivery: ...


class _DevelopmentSender:
    """Delivers nothing; shows the code to the developer (one log line, ``dev_code``) only if ``reveal``."""

    def __init__(self, reveal: bool) -> None:
        self.reveal = reveal

    def _deliver(self, what: str, code: str, **reference: str) -> Delivery:
        if not self.reveal:
            return Delivery()
        log.info(what, **reference, dev_code=code)
        return Delivery(dev_code=code)


class DevelopmentIdentityProvider(_DevelopmentSender):
    """Confirms everyone and delivers nothing; shows the code to the developer in development only."""

    async def send_code(self, claim: IdentityClaim, code: str, reference: str) -> Delivery:
        return self._deliver("development identity code", code, challenge=reference)


class DevelopmentSmsSender(_DevelopmentSender):
    """Sends nothing; shows the code to the developer in development only."""

    async def send_code(self, phone: str, code: str, reference: str) -> Delivery:
        return self._deliver("development sms code", code, request=reference)


# --- errors the patient sees ----------------------------------------------------------------------


class CodeExpired(FhirError):
    status: ClassVar[int] = 410
    code: ClassVar[str] = "expired"

    def __init__(self) -> None:
        super().__init__("the code has expired or was replaced by a newer one; ask for a new code")


class VerificationLocked(FhirError):
    status: ClassVar[int] = 429
    code: ClassVar[str] = "throttled"

    def __init__(self, until: datetime, now: datetime) -> None:
        when = until.isoformat(timespec="seconds")
        super().__init__(f"too many wrong codes: identity verification is locked until {when}")
        self.retry_after = max(1, int((until - now).total_seconds()) + 1)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class WrongCode(Unprocessable):
    def __init__(self, attempts_left: int) -> None:
        super().__init__(f"wrong code; {attempts_left} attempt(s) left before a lockout")
        self.attempts_left = attempts_left


# --- the code's life ----------------------------------------------------------------------------


def code_hash(settings: ConsentSettings, challenge_id: str, code: str) -> str:
    """Keyed and bound to its challenge, so a stolen table gives neither codes nor a lookup table."""
    message = f"one-time-code:{challenge_id}:{code}".encode()
    return hmac.new(settings.code_key, message, hashlib.sha256).hexdigest()


async def open_challenge(
    session: AsyncSession,
    settings: ConsentSettings,
    patient_key: str,
    purpose: ChallengePurpose,
    now: datetime,
    *,
    agent_institution: str | None = None,
    request: dict[str, Any] | None = None,
) -> tuple[IdentityChallenge, str]:
    """A new code for the patient (refused while locked); earlier open codes stop working."""
    until = await repository.lock_of(session, patient_key, now)
    if until is not None:
        raise VerificationLocked(until, now)
    window_start = now - timedelta(seconds=settings.code_lockout_seconds)
    previous = await repository.latest_challenge(session, patient_key)
    carried = (
        previous.attempts
        if previous is not None
        and previous.verified_at is None
        and previous.locked_until is None
        and as_utc(previous.created_at) > window_start
        else 0
    )
    await repository.close_open_challenges(session, patient_key, now)
    challenge_id = str(uuid.uuid4())
    code = f"{secrets.randbelow(10**6):06d}"
    row = IdentityChallenge(
        id=challenge_id,
        purpose=purpose.value,
        patient_key=patient_key,
        code_hash=code_hash(settings, challenge_id, code),
        created_at=now,
        expires_at=now + timedelta(seconds=settings.code_ttl_seconds),
        attempts=carried,
        agent_institution=agent_institution,
        request=request,
    )
    repository.add_challenge(session, row)
    return row, code


async def check_code(
    session: AsyncSession,
    settings: ConsentSettings,
    challenge_id: str,
    purpose: ChallengePurpose,
    code: str,
    now: datetime,
) -> IdentityChallenge:
    """The verified challenge. A wrong code raises ``WrongCode`` (``VerificationLocked`` at the last
    attempt) marked with ``raise_after_commit``: the session's ``Database.transaction`` commits the
    counted attempt (and the lockout) before the error goes on, so guesses stay counted."""
    row = await repository.challenge(session, challenge_id)
    if row is None or row.purpose != purpose.value:
        raise NotFound("no such verification")
    until = await repository.lock_of(session, row.patient_key, now)
    if until is not None:
        raise VerificationLocked(until, now)
    if row.verified_at is not None:
        raise Conflict("this code has already been used")
    if now >= as_utc(row.expires_at):
        raise CodeExpired
    if hmac.compare_digest(row.code_hash, code_hash(settings, row.id, code)):
        row.verified_at = now
        return row
    row.attempts += 1
    if row.attempts >= settings.code_max_attempts:
        row.locked_until = now + timedelta(seconds=settings.code_lockout_seconds)
        log.warning("identity verification locked", purpose=purpose.value, attempts=row.attempts)
        raise raise_after_commit(session, VerificationLocked(row.locked_until, now))
    raise raise_after_commit(session, WrongCode(settings.code_max_attempts - row.attempts))


def attempts_left(settings: ConsentSettings, row: IdentityChallenge) -> int:
    return max(0, settings.code_max_attempts - row.attempts)
