"""What the gateway's HTTP API returns."""

from __future__ import annotations

from pydantic import Field

from hie_schemas.model import FrozenModel


class StudyStatus(FrozenModel):
    """Where the instances of one study stand at this gateway (counts of instances per state)."""

    study_instance_uid: str
    exchange_id: str | None = Field(description="the exchange the study belongs to (the first, if several)")
    exchanges: list[str] = []
    received: int = Field(description="distinct instances received")
    queued: int = 0
    held: int = 0
    relayed: int = 0
    delivered: int = 0
    blocked: int = 0
    failed: int = 0
    purged: int = 0
    attempts: int = Field(0, description="the most failed relay attempts of any instance")
    last_error: str | None = Field(None, description="why the latest failed attempt failed, if any did")
    state: str
