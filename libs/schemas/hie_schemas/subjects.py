"""NATS subject builders. No patient data or identifiers ever appear in a subject.

Facts are ``hie.<domain>.<entity>.<event>`` (past tense). What is addressed to one hub lives under
``hie.hub.<hub>.…``; request/reply operations under ``hie.hub.<hub>.rpc.<op>`` for a hub and
``hie.rpc.<service>.<op>`` for a central service (outside every stream, so a request is never
captured by JetStream).
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def _token(value: str, what: str) -> str:
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"invalid subject token for {what}: {value!r}")
    return value


def fact(domain: str, entity: str, event: str) -> str:
    """A past-tense fact, e.g. ``hie.exchange.referral.sent``."""
    return f"hie.{_token(domain, 'domain')}.{_token(entity, 'entity')}.{_token(event, 'event')}"


def domain_wildcard(domain: str) -> str:
    return f"hie.{_token(domain, 'domain')}.>"


def hub_inbox(hub: str, kind: str) -> str:
    """Work addressed to one hub, e.g. a delivered referral: ``hie.hub.snubh.inbox.delivery``."""
    return f"hie.hub.{_token(hub, 'hub')}.inbox.{_token(kind, 'kind')}"


def hub_inbox_wildcard(hub: str) -> str:
    return f"hie.hub.{_token(hub, 'hub')}.inbox.>"


def hub_rpc(hub: str, operation: str) -> str:
    return f"hie.hub.{_token(hub, 'hub')}.rpc.{_token(operation, 'operation')}"


def hub_imaging_jobs(hub: str) -> str:
    """The durable work queue of one hub's imaging gateway."""
    return f"hie.hub.{_token(hub, 'hub')}.imaging.relay"


def central_rpc(service: str, operation: str) -> str:
    return f"hie.rpc.{_token(service, 'service')}.{_token(operation, 'operation')}"


def audit_checkpoint(hub: str) -> str:
    """One hub's signed audit-chain checkpoints (stream HIE_AUDIT): ``hie.audit.checkpoint.<hub>``."""
    return f"hie.audit.checkpoint.{_token(hub, 'hub')}"


# Well-known subjects, built once from the functions above.
REGISTRY_INSTITUTION_CHANGED = fact("registry", "institution", "changed")
REGISTRY_KEY_RETIRED = fact("registry", "key", "retired")
CONSENT_RECORDED = fact("consent", "consent", "recorded")
EXCHANGE_DOCUMENT_PUBLISHED = fact("exchange", "document", "published")
EXCHANGE_SENT = fact("exchange", "exchange", "sent")
EXCHANGE_DENIED = fact("exchange", "exchange", "denied")
EXCHANGE_TASK_UPDATED = fact("exchange", "task", "updated")
IMAGING_STUDY_PROGRESS = fact("imaging", "study", "progress")
AUDIT_RECORDED = fact("audit", "record", "appended")
CONSENT_DECIDE = central_rpc("consent", "decide")
REGISTRY_LOCATE = central_rpc("registry", "locate")
