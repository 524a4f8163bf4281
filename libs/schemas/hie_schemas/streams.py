"""The JetStream streams of the federation, as pure data; hie_platform creates them."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Retention(StrEnum):
    LIMITS = "limits"
    WORK_QUEUE = "workqueue"


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    retention: Retention = Retention.LIMITS
    max_age_seconds: int = 0  # 0 = keep until limits; facts are kept, consumers are durable
    duplicate_window_seconds: int = 120


REGISTRY = StreamSpec("HIE_REGISTRY", ("hie.registry.>",))
CONSENT = StreamSpec("HIE_CONSENT", ("hie.consent.>",))
EXCHANGE = StreamSpec("HIE_EXCHANGE", ("hie.exchange.>",))
HUB_INBOX = StreamSpec("HIE_HUB_INBOX", ("hie.hub.*.inbox.>",))
IMAGING = StreamSpec("HIE_IMAGING", ("hie.imaging.>",))
IMAGING_JOBS = StreamSpec("HIE_IMAGING_JOBS", ("hie.hub.*.imaging.relay",), Retention.WORK_QUEUE)
AUDIT = StreamSpec("HIE_AUDIT", ("hie.audit.>",))

ALL: tuple[StreamSpec, ...] = (REGISTRY, CONSENT, EXCHANGE, HUB_INBOX, IMAGING, IMAGING_JOBS, AUDIT)
