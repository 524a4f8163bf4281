"""NATS subject builders. No patient data or identifiers ever appear in a subject.

Facts are ``hie.<domain>.<entity>.<event>`` (past tense), followed by the publishing hub when a hub
publishes them. What is addressed to one hub lives under ``hie.hub.<hub>.…``; request/reply operations
under ``hie.hub.<hub>.rpc.<op>.<asking hub>`` for a hub and ``hie.rpc.<service>.<op>`` for a central
service, followed by the asking hub where the answer depends on who asks (the consent decision),
outside every stream, so a request is never captured by JetStream. Which kind travels on
which subject, and who may publish it, is declared in ``hie_schemas.contract``.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def token(value: str, what: str) -> str:
    """``value`` as one subject token (a hub slug, a kind...); refuses dots, wildcards and spaces."""
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"invalid subject token for {what}: {value!r}")
    return value


_token = token


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching, as the server does it: ``*`` is exactly one token, a final ``>`` one or
    more. The one copy for every check of a subject against a stream's, a filter's or a permission's
    pattern."""
    want, have = pattern.split("."), subject.split(".")
    for i, piece in enumerate(want):
        if piece == ">":
            return len(have) > i
        if i >= len(have) or piece not in ("*", have[i]):
            return False
    return len(want) == len(have)


def fact(domain: str, entity: str, event: str) -> str:
    """A past-tense fact, e.g. ``hie.exchange.referral.sent``."""
    return f"hie.{_token(domain, 'domain')}.{_token(entity, 'entity')}.{_token(event, 'event')}"


def domain_wildcard(domain: str) -> str:
    return f"hie.{_token(domain, 'domain')}.>"


def hub_inbox_wildcard(hub: str) -> str:
    return f"hie.hub.{_token(hub, 'hub')}.inbox.>"


def hub_imaging_jobs(hub: str) -> str:
    """The durable work queue of one hub's imaging gateway."""
    return f"hie.hub.{_token(hub, 'hub')}.imaging.relay"


def central_rpc(service: str, operation: str) -> str:
    return f"hie.rpc.{_token(service, 'service')}.{_token(operation, 'operation')}"


def consent_decide(hub: str) -> str:
    """The consent decision asked by one hub (node or gateway): ``hie.rpc.consent.decide.<hub>``."""
    return f"{CONSENT_DECIDE_BASE}.{_token(hub, 'hub')}"


def audit_checkpoint(hub: str) -> str:
    """One hub's signed audit-chain checkpoints (stream HIE_AUDIT): ``hie.audit.checkpoint.<hub>``."""
    return f"hie.audit.checkpoint.{_token(hub, 'hub')}"


# The subjects of the central services' facts (only their own NATS users may publish them). A hub's
# facts end with the hub: build them with hie_schemas.contract.subject(kind, sender=hub).
REGISTRY_INSTITUTION_CHANGED = fact("registry", "institution", "changed")
REGISTRY_KEY_RETIRED = fact("registry", "key", "retired")
CONSENT_RECORDED = fact("consent", "consent", "recorded")
# An appended audit record's envelope type; its subject ends with the publishing hub or service
# (hie_schemas.contract.subject(Kind.AUDIT_RECORDED, sender=...)).
AUDIT_RECORDED = fact("audit", "record", "appended")
CONSENT_DECIDE_BASE = central_rpc("consent", "decide")
# What the consent service answers: every hub's decision subject (the last token is the asker).
CONSENT_DECIDE = f"{CONSENT_DECIDE_BASE}.*"
REGISTRY_LOCATE = central_rpc("registry", "locate")
