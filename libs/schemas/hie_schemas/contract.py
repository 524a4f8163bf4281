"""The bus contract, declared once (design §4): every message kind and RPC operation, its subject, who
may publish it, who consumes it and through which durable consumer.

Publishers build subjects with ``subject()``, consumers dispatch on ``parse()`` (the handler is chosen
by the subject, never by the envelope's word), and the NATS accounts (deploy/k8s/nats_accounts.py, the
local run) are generated from the same tables, so the three cannot drift apart.

A subject's ``{sender}`` token names the hub that published it; a hub's NATS user may publish only
subjects whose sender token is its own slug, so a consumer knows who sent a message from its subject
and checks that this hub is the hub of the institution the message claims to come from.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from hie_schemas import events, streams, subjects
from hie_schemas.envelope import EventPayload
from hie_schemas.streams import StreamSpec

TO, SENDER, HUB = "{to}", "{sender}", "{hub}"


class Role(StrEnum):
    """Who connects to NATS. A hub node and its imaging gateway share the hub's NATS user."""

    REGISTRY = "registry"
    CONSENT = "consent"
    HUB = "hub"
    GATEWAY = "gateway"


HUB_ROLES = frozenset({Role.HUB, Role.GATEWAY})
CENTRAL_ROLES = frozenset({Role.REGISTRY, Role.CONSENT})
# Central services' sender tokens; never a hub slug (nats_accounts refuses a hub by these names).
RESERVED_SLUGS = frozenset({"registry", "consent", "central", "ops", "sys"})


class Kind(StrEnum):
    """Every kind of message on the bus."""

    INSTITUTION_CHANGED = "institution-changed"
    SIGNING_KEY_RETIRED = "signing-key-retired"
    CONSENT_RECORDED = "consent-recorded"
    CONSENT_HEARTBEAT = "consent-heartbeat"
    DOCUMENT_PUBLISHED = "document-published"
    EXCHANGE_SENT = "exchange-sent"
    EXCHANGE_DENIED = "exchange-denied"
    TASK_UPDATED = "task-updated"
    EMERGENCY_PERMITTED = "emergency-permitted"
    STUDY_PROGRESS = "study-progress"
    AUDIT_RECORDED = "audit-recorded"
    AUDIT_CHECKPOINT = "audit-checkpoint"
    DELIVERY = "delivery"
    TASK_STATUS = "task-status"
    DOCUMENT_STATUS = "document-status"
    RELAY_JOB = "relay-job"


class Operation(StrEnum):
    """Every request/reply operation."""

    CONSENT_DECIDE = "decide"
    REGISTRY_LOCATE = "locate"
    REGISTRY_LOCATE_ADD = "locate-add"
    HUB_SEARCH = "search"
    HUB_RETRIEVE = "retrieve"


def _fill(template: str, to: str | None, sender: str | None, hub: str | None = None) -> str:
    out = []
    for token in template.split("."):
        value = {TO: to, SENDER: sender, HUB: hub}.get(token, token)
        if value is None:
            raise ValueError(f"{template} needs a value for {token}")
        out.append(value if token not in (TO, SENDER, HUB) else subjects.token(value, token.strip("{}")))
    return ".".join(out)


def _pattern(template: str, to: str, sender: str) -> str:
    """The template with ``to`` and ``sender`` put in as given (``*`` for filters and permissions)."""
    return ".".join({TO: to, SENDER: sender}.get(t, t) for t in template.split("."))


def _match(template: str, subject: str) -> dict[str, str] | None:
    pattern, tokens = template.split("."), subject.split(".")
    if len(pattern) != len(tokens):
        return None
    found: dict[str, str] = {}
    for want, got in zip(pattern, tokens, strict=True):
        if want in (TO, SENDER):
            found[want.strip("{}")] = got
        elif want != got:
            return None
    return found


class _Addressed:
    """What a message kind and an RPC operation share: a subject template and how it is filled in."""

    template: str

    def subject(self, *, sender: str | None = None, to: str | None = None) -> str:
        return _fill(self.template, to, sender)

    def pattern(self, *, sender: str = "*", to: str = "*") -> str:
        """The subject with wildcards (``*``) or given values: filters and permissions."""
        return _pattern(self.template, to, sender)


@dataclass(frozen=True)
class Message(_Addressed):
    """One message kind: its envelope type, subject template, publishers, consumers and stream."""

    kind: Kind
    envelope_type: str
    template: str
    publishers: frozenset[Role]
    consumers: frozenset[Role]
    stream: StreamSpec | None  # None: core NATS (no stream captures it)
    payload: type[EventPayload] | None = None

    @property
    def sender_bound(self) -> bool:
        return SENDER in self.template.split(".")


@dataclass(frozen=True)
class Rpc(_Addressed):
    """One request/reply operation: its subject, who answers and who may ask."""

    operation: Operation
    template: str
    server: Role
    callers: frozenset[Role]


@dataclass(frozen=True)
class Durable:
    """A durable pull consumer: the service that owns it, its stream, name and filter (per hub)."""

    role: Role
    stream: StreamSpec
    name_template: str
    filter_template: str
    kinds: frozenset[Kind]
    # Created by durable name only (the legacy API, no filter in the subject) and deleted to rebuild
    # from the start of the stream: the consent replica.
    by_durable_name: bool = False

    def name(self, hub: str | None = None) -> str:
        if HUB not in self.name_template:
            return self.name_template
        if hub is None:
            raise ValueError(f"{self.name_template} needs a hub")
        return self.name_template.replace(HUB, subjects.token(hub, "hub"))

    def filter(self, hub: str | None = None) -> str:
        return ".".join(hub if t == HUB and hub else t for t in self.filter_template.split("."))


def _m(
    kind: Kind,
    type_: str,
    template: str,
    publishers: set[Role],
    consumers: set[Role],
    stream: StreamSpec | None,
    payload: type[EventPayload] | None = None,
) -> Message:
    return Message(kind, type_, template, frozenset(publishers), frozenset(consumers), stream, payload)


R, C, H, G = Role.REGISTRY, Role.CONSENT, Role.HUB, Role.GATEWAY
_INBOX = "hie.hub.{to}.inbox.%s.{sender}"

MESSAGES: dict[Kind, Message] = {
    m.kind: m
    for m in (
        # Central facts: only the central service's user may publish them, so no sender token.
        _m(
            Kind.INSTITUTION_CHANGED,
            events.InstitutionChanged.event_type,
            "hie.registry.institution.changed",
            {R},
            {R, C, H, G},  # every service's registry client (core subscription: a cache)
            streams.REGISTRY,
            events.InstitutionChanged,
        ),
        _m(
            Kind.SIGNING_KEY_RETIRED,
            events.SigningKeyRetired.event_type,
            "hie.registry.key.retired",
            {R},
            {R, C, H, G},  # every token verifier (core subscription: refuse the kid at once)
            streams.REGISTRY,
            events.SigningKeyRetired,
        ),
        _m(
            Kind.CONSENT_RECORDED,
            events.ConsentRecorded.event_type,
            "hie.consent.consent.recorded",
            {C},
            {H, G},  # the consent replicas
            streams.CONSENT,
            events.ConsentRecorded,
        ),
        _m(
            Kind.CONSENT_HEARTBEAT,
            events.ConsentFeedHeartbeat.event_type,
            "hie.feed.consent.heartbeat",
            {C},
            {H, G},
            None,  # core NATS: a stream would keep one message a second forever
            events.ConsentFeedHeartbeat,
        ),
        # Hub facts: the last token is the publishing hub (consent publishes emergency permits as
        # "consent", a name no hub may take).
        _m(
            Kind.DOCUMENT_PUBLISHED,
            events.DocumentPublished.event_type,
            "hie.exchange.document.published.{sender}",
            {H},
            {R, C},  # the record locator; the patient's history (document types)
            streams.EXCHANGE,
            events.DocumentPublished,
        ),
        _m(
            Kind.EXCHANGE_SENT,
            events.ExchangeSent.event_type,
            "hie.exchange.exchange.sent.{sender}",
            {H},
            {R, C, G},  # locator, patient's history, the gateways (imaging relay)
            streams.EXCHANGE,
            events.ExchangeSent,
        ),
        _m(
            Kind.EXCHANGE_DENIED,
            events.ExchangeDenied.event_type,
            "hie.exchange.exchange.denied.{sender}",
            {H},
            set(),  # kept for the agency (stream), read by nobody yet
            streams.EXCHANGE,
            events.ExchangeDenied,
        ),
        _m(
            Kind.TASK_UPDATED,
            events.TaskUpdated.event_type,
            "hie.exchange.task.updated.{sender}",
            {H},
            {C},
            streams.EXCHANGE,
            events.TaskUpdated,
        ),
        _m(
            Kind.EMERGENCY_PERMITTED,
            events.EmergencyAccessPermitted.event_type,
            "hie.exchange.emergency.permitted.{sender}",
            {H, C},
            {C},
            streams.EXCHANGE,
            events.EmergencyAccessPermitted,
        ),
        _m(
            Kind.STUDY_PROGRESS,
            events.StudyProgress.event_type,
            "hie.imaging.study.progress.{sender}",
            {G},
            {H},  # every hub reads every gateway's counts (uids and exchange ids, no patient key)
            streams.IMAGING,
            events.StudyProgress,
        ),
        _m(
            Kind.AUDIT_RECORDED,
            events.AuditRecorded.event_type,
            "hie.audit.record.appended.{sender}",
            {R, C, H, G},  # every service appends (hie_platform.audit): a hub as itself, central by name
            {C},
            streams.AUDIT,
            events.AuditRecorded,
        ),
        _m(
            Kind.AUDIT_CHECKPOINT,
            events.AuditCheckpoint.event_type,
            "hie.audit.checkpoint.{sender}",  # subjects.audit_checkpoint(hub)
            {H},
            set(),  # kept in HIE_AUDIT: the chain head, anchored outside the hub's database
            streams.AUDIT,
            events.AuditCheckpoint,
        ),
        # Addressed to one hub ({to}); the last token is the sending hub.
        _m(
            Kind.DELIVERY,
            events.Delivery.event_type,
            _INBOX % "delivery",
            {H},
            {H},
            streams.HUB_INBOX,
            events.Delivery,
        ),
        _m(
            Kind.TASK_STATUS,
            events.TaskStatusNotice.event_type,
            _INBOX % "task-status",
            {H},
            {H},
            streams.HUB_INBOX,
            events.TaskStatusNotice,
        ),
        _m(
            Kind.DOCUMENT_STATUS,
            events.DocumentStatusNotice.event_type,
            _INBOX % "document-status",
            {H},
            {H},
            streams.HUB_INBOX,
            events.DocumentStatusNotice,
        ),
        # A gateway's own work queue: published and consumed by the same hub's gateway.
        _m(
            Kind.RELAY_JOB,
            events.RelayJob.event_type,
            "hie.hub.{to}.imaging.relay",
            {G},
            {G},
            streams.IMAGING_JOBS,
            events.RelayJob,
        ),
    )
}

RPCS: dict[Operation, Rpc] = {
    r.operation: r
    for r in (
        # The asking hub is the last token: an emergency is recorded only for the holder's hub.
        Rpc(Operation.CONSENT_DECIDE, "hie.rpc.consent.decide.{sender}", C, frozenset({H, G})),
        Rpc(Operation.REGISTRY_LOCATE, "hie.rpc.registry.locate", R, frozenset({H})),
        # A hub tells the locator at once that it now holds documents for a patient (the same fact
        # as DocumentPublished, which follows through the outbox); the asking hub is the last token.
        Rpc(Operation.REGISTRY_LOCATE_ADD, "hie.rpc.registry.locate-add.{sender}", R, frozenset({H})),
        # Hub to hub: the asking hub is the last token, so the holder knows who asks.
        Rpc(Operation.HUB_SEARCH, "hie.hub.{to}.rpc.search.{sender}", H, frozenset({H})),
        Rpc(Operation.HUB_RETRIEVE, "hie.hub.{to}.rpc.retrieve.{sender}", H, frozenset({H})),
    )
}

DURABLES: tuple[Durable, ...] = (
    Durable(
        H,
        streams.HUB_INBOX,
        "hub-{hub}-inbox",
        "hie.hub.{hub}.inbox.>",
        frozenset({Kind.DELIVERY, Kind.TASK_STATUS, Kind.DOCUMENT_STATUS}),
    ),
    # A hub keeps the studies its own gateway delivered: that gateway's reports only.
    Durable(
        H,
        streams.IMAGING,
        "hub-{hub}-imaging",
        "hie.imaging.study.progress.{hub}",
        frozenset({Kind.STUDY_PROGRESS}),
    ),
    Durable(
        H,
        streams.CONSENT,
        "hub-{hub}-consent",
        "hie.consent.consent.recorded",
        frozenset({Kind.CONSENT_RECORDED}),
        by_durable_name=True,
    ),
    Durable(
        G,
        streams.CONSENT,
        "imaging-{hub}-consent",
        "hie.consent.consent.recorded",
        frozenset({Kind.CONSENT_RECORDED}),
        by_durable_name=True,
    ),
    Durable(
        G,
        streams.EXCHANGE,
        "imaging-{hub}-exchanges",
        "hie.exchange.exchange.sent.*",
        frozenset({Kind.EXCHANGE_SENT}),
    ),
    Durable(
        G,
        streams.IMAGING_JOBS,
        "imaging-{hub}-relay",
        "hie.hub.{hub}.imaging.relay",
        frozenset({Kind.RELAY_JOB}),
    ),
    Durable(
        R,
        streams.EXCHANGE,
        "registry-locator",
        "hie.exchange.>",
        frozenset({Kind.DOCUMENT_PUBLISHED, Kind.EXCHANGE_SENT}),
    ),
    Durable(
        C,
        streams.EXCHANGE,
        "consent-history",
        "hie.exchange.>",
        frozenset({Kind.EXCHANGE_SENT, Kind.TASK_UPDATED, Kind.DOCUMENT_PUBLISHED, Kind.EMERGENCY_PERMITTED}),
    ),
    Durable(
        C,
        streams.AUDIT,
        "consent-access",
        "hie.audit.record.appended.*",
        frozenset({Kind.AUDIT_RECORDED}),
    ),
)


def message(kind: Kind) -> Message:
    return MESSAGES[kind]


def subject(kind: Kind, *, sender: str | None = None, to: str | None = None) -> str:
    """The subject a publisher uses: ``subject(Kind.DELIVERY, to="snubh", sender="severance")``."""
    return MESSAGES[kind].subject(sender=sender, to=to)


def rpc_subject(operation: Operation, *, to: str | None = None, sender: str | None = None) -> str:
    return RPCS[operation].subject(to=to, sender=sender)


def durable(role: Role, stream: StreamSpec) -> Durable:
    """The durable consumer ``role`` keeps on ``stream`` (one per role and stream)."""
    return next(d for d in DURABLES if d.role is role and d.stream == stream)


@dataclass(frozen=True)
class Address:
    """What a subject says: its kind, the hub it is addressed to, and the hub (or service) that sent it."""

    kind: Kind
    to: str | None
    sender: str | None


def parse(subject: str) -> Address | None:
    """The message kind of a subject, or None when no kind is published on it."""
    for msg in MESSAGES.values():
        found = _match(msg.template, subject)
        if found is not None:
            return Address(msg.kind, found.get("to"), found.get("sender"))
    return None


def parse_rpc(subject: str) -> tuple[Operation, str | None, str | None] | None:
    """(operation, to, sender) of a request subject, or None."""
    for rpc in RPCS.values():
        found = _match(rpc.template, subject)
        if found is not None:
            return rpc.operation, found.get("to"), found.get("sender")
    return None


@dataclass(frozen=True)
class Claim:
    """Who a message says it comes from: hub fields that must equal the subject's sender, and
    institutions whose hub (in the registry) must be the sender; with ``any_institution`` one suffices."""

    hubs: tuple[str, ...] = ()
    institutions: tuple[str, ...] = ()
    any_institution: bool = False


def claim(payload: EventPayload) -> Claim:
    """The sender a hub-published payload claims; the consumer compares it with the subject."""
    match payload:
        case events.Delivery():
            sent = payload.exchange
            return Claim((sent.from_hub,), (sent.from_institution,))
        case events.TaskStatusNotice():
            return Claim((), (payload.update.by_institution,))
        case events.DocumentStatusNotice():
            return Claim((), (payload.by_institution,))
        case events.ExchangeSent() | events.ExchangeDenied():
            return Claim((payload.from_hub,), (payload.from_institution,))
        case events.TaskUpdated():
            return Claim((), (payload.by_institution,))
        case events.DocumentPublished():
            return Claim((payload.hub,), (payload.author_institution,))
        case events.StudyProgress() | events.AuditCheckpoint():
            return Claim((payload.hub,))
        case events.AuditRecorded():
            # The hub that wrote the record (its node's hub); None, from before it was stated: refused.
            return Claim((str(payload.hub),))
        case events.EmergencyAccessPermitted():
            # Decided by the data holder's hub, or by the hub a delivered copy is read at.
            return Claim((), (payload.holder, payload.recipient), any_institution=True)
    return Claim()
