"""The versioned event envelope that every NATS message of the federation travels in."""

from __future__ import annotations

import builtins
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

from pydantic import ConfigDict, Field

from hie_schemas.model import FrozenModel

SCHEMA_VERSION = 1

P = TypeVar("P", bound="EventPayload")


class EventPayload(FrozenModel):
    """Base for typed event payloads; each subclass names its event type and schema version."""

    model_config = ConfigDict(extra="forbid")

    event_type: ClassVar[str]
    schema_version: ClassVar[int] = SCHEMA_VERSION


class Source(FrozenModel):
    """Which service and which node emitted an event."""

    service: str
    node: str


class Envelope(FrozenModel):
    """A frozen, versioned wrapper: id (also the JetStream Nats-Msg-Id), type, time, source, data."""

    id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    type: str
    schema_version: int = SCHEMA_VERSION
    occurred_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    source: Source
    correlation_id: str | None = None
    data: dict[str, Any]

    @classmethod
    def wrap(
        cls,
        payload: EventPayload,
        source: Source,
        correlation_id: str | None = None,
        event_id: str | None = None,
    ) -> Envelope:
        """Wrap a typed payload; pass ``event_id`` to make a retried publish de-duplicate."""
        kwargs: dict[str, Any] = {}
        if event_id is not None:
            kwargs["id"] = event_id
        return cls(
            type=payload.event_type,
            schema_version=payload.schema_version,
            source=source,
            correlation_id=correlation_id,
            data=payload.model_dump(mode="json"),
            **kwargs,
        )

    def payload(self, model: builtins.type[P]) -> P:
        """Parse ``data`` as the given payload type, refusing a mismatched event type."""
        if self.type != model.event_type:
            raise ValueError(f"envelope carries {self.type!r}, not {model.event_type!r}")
        return model.model_validate(self.data)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Envelope:
        return cls.model_validate_json(raw)
