"""The console's sessions, held server-side: the cookie only names one, so signing out ends it.

In memory, in the registry's one process (deploy/k8s runs one registry replica): a restart signs
everyone out, which fails closed. Entries live no longer than the idle and absolute limits.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass


@dataclass
class ConsoleSession:
    client_id: str
    authenticated_at: int
    seen_at: int


class SessionStore:
    """Open sessions by id; a session is valid only while it is here."""

    def __init__(self, idle_seconds: int, max_seconds: int) -> None:
        self.idle_seconds = idle_seconds
        self.max_seconds = max_seconds
        self._sessions: dict[str, ConsoleSession] = {}

    def open(self, client_id: str) -> tuple[str, ConsoleSession]:
        self._prune()
        now = int(time.time())
        sid = secrets.token_urlsafe(32)
        session = ConsoleSession(client_id, now, now)
        self._sessions[sid] = session
        return sid, session

    def get(self, sid: str, client_id: str) -> ConsoleSession | None:
        """The live session ``sid`` of ``client_id``, marked as seen now; None once ended or expired."""
        session = self._sessions.get(sid)
        if session is None or session.client_id != client_id:
            return None
        now = int(time.time())
        if self._expired(session, now):
            self._sessions.pop(sid, None)
            return None
        session.seen_at = now
        return session

    def end(self, sid: str) -> None:
        self._sessions.pop(sid, None)

    def _expired(self, session: ConsoleSession, now: int) -> bool:
        return now - session.seen_at > self.idle_seconds or now - session.authenticated_at > self.max_seconds

    def _prune(self) -> None:
        now = int(time.time())
        for sid in [s for s, v in self._sessions.items() if self._expired(v, now)]:
            self._sessions.pop(sid, None)
