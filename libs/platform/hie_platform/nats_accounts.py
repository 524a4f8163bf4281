"""The NATS accounts of a federation, generated from the bus contract (hie_schemas.contract).

Used by deploy/k8s/nats_accounts.py (the central overlay's accounts.conf) and by the local run
(hie_cli.launcher), so Kubernetes and `make run` enforce the same permissions. Passwords are
``$<USER>_PASSWORD`` variables that nats-server reads from its environment. Pure text: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

from hie_schemas import contract, streams, subjects
from hie_schemas.contract import CENTRAL_ROLES, DURABLES, HUB_ROLES, MESSAGES, RPCS, Durable, Kind, Role

# In an account without JetStream the server itself answers every $JS.API.> request with "JetStream
# not enabled for account" (10039), ahead of any import of the same subject. A hub account therefore
# maps $JS.API.> to this local prefix, and imports the central API subjects it may use under it.
JS_LOCAL = "hie-js.api"
STREAMS = tuple(s.name for s in streams.ALL)
# What a central service does beyond the contract: consent's heartbeat reads the last
# ConsentRecorded's sequence (FeedHeartbeat: get_last_msg).
CENTRAL_EXTRA = {Role.CONSENT: ("$JS.API.STREAM.MSG.GET.HIE_CONSENT",), Role.REGISTRY: ()}


class SlugError(ValueError):
    """A hub slug that cannot name a NATS user and subject token."""


def check_slug(slug: str) -> str:
    try:
        subjects.token(slug, "hub")
    except ValueError as exc:
        raise SlugError(f"{slug!r} is not a valid hub slug (NATS subject token)") from exc
    if slug in contract.RESERVED_SLUGS:
        raise SlugError(f"{slug!r} is reserved for a central service's sender token")
    return slug


def account_name(slug: str) -> str:
    return "HUB_" + slug.upper().replace("-", "_")


def hub_user(slug: str) -> str:
    return f"hub-{slug}"


def password_var(user: str) -> str:
    """The environment variable nats-server reads a user's password from (hub-snubh: HUB_SNUBH_PASSWORD)."""
    return user.upper().replace("-", "_") + "_PASSWORD"


def q(subject: str) -> str:
    return f'"{subject}"'


# --- what each user does, from the contract --------------------------------------------------------


def published(roles: frozenset[Role], sender: str) -> list[str]:
    """The fact and inbox subjects ``roles`` publish, bound to ``sender`` (a hub slug or service name)."""
    out: list[str] = []
    for msg in MESSAGES.values():
        if not msg.publishers & roles:
            continue
        if msg.sender_bound:
            out.append(msg.pattern(sender=sender, to="*"))
        elif contract.TO in msg.template.split("."):
            out.append(msg.pattern(to=sender))  # its own work queue
        else:
            out.append(msg.template)
    return out


def asked(roles: frozenset[Role]) -> list[contract.Rpc]:
    return [rpc for rpc in RPCS.values() if rpc.callers & roles]


def hub_to_hub(rpc: contract.Rpc) -> bool:
    return rpc.template.startswith("hie.hub.")


def central_asked(slug: str) -> list[str]:
    """The central operations a hub may ask, as it must ask them: with its own slug as the asker's
    token where the operation has one (the consent decision), else the operation's one subject."""
    return [rpc.subject(sender=slug) for rpc in asked(HUB_ROLES) if not hub_to_hub(rpc)]


def served(roles: frozenset[Role]) -> list[contract.Rpc]:
    return [rpc for rpc in RPCS.values() if rpc.server in roles]


def core_subscriptions(roles: frozenset[Role]) -> list[str]:
    """Kinds ``roles`` consume without a durable consumer: core subscriptions (caches, heartbeat)."""
    durable_kinds = {k for d in DURABLES if d.role in roles for k in d.kinds}
    return [m.template for m in MESSAGES.values() if m.consumers & roles and m.kind not in durable_kinds]


def durables(roles: frozenset[Role]) -> list[Durable]:
    return [d for d in DURABLES if d.role in roles]


def consumer_api(d: Durable, hub: str | None) -> list[tuple[str, str]]:
    """(subject, response type) of the JetStream API calls behind pull_subscribe + fetch + ack."""
    name = d.name(hub)
    api = f"$JS.API.CONSUMER.%s.{d.stream.name}.{name}"
    calls = [(api % "INFO", "singleton")]
    if d.by_durable_name:
        calls += [(api % "DURABLE.CREATE", "singleton"), (api % "DELETE", "singleton")]
    else:
        # nats-py creates a named consumer with its filter in the subject (server >= 2.9), so the
        # subject itself pins the filter: a hub cannot create its durable on another hub's subjects.
        calls.append((f"{api % 'CREATE'}.{d.filter(hub)}", "singleton"))
    calls += [(api % "MSG.NEXT", "stream"), (f"$JS.ACK.{d.stream.name}.{name}.>", "singleton")]
    return calls


def local(subject: str) -> str:
    """A $JS.API subject as a hub account sees it (see JS_LOCAL)."""
    return JS_LOCAL + subject.removeprefix("$JS.API") if subject.startswith("$JS.API.") else subject


# --- a hub's account -------------------------------------------------------------------------------


def hub_publish(slug: str) -> list[str]:
    """The hub user's publish allow-list (node and gateway); checked after the $JS.API mapping."""
    out = published(HUB_ROLES, slug)
    out += [rpc.pattern(to="*", sender=slug) for rpc in asked(HUB_ROLES) if hub_to_hub(rpc)]
    out += central_asked(slug)
    out += [f"$JS.API.STREAM.CREATE.{s}" for s in STREAMS]
    for d in durables(HUB_ROLES):
        out += [s for s, _ in consumer_api(d, slug)]
    return [local(s) for s in out]


def hub_subscribe(slug: str) -> list[str]:
    own_rpc = [rpc.pattern(to=slug, sender="*") for rpc in served(HUB_ROLES)]
    return ["_INBOX.>", *core_subscriptions(HUB_ROLES), *own_rpc]


def hub_imports(slug: str, slugs: list[str]) -> list[str]:
    """Everything a hub may do in HIE (where the streams live) and at the other hubs, as imports."""
    central = [*published(HUB_ROLES, slug), *central_asked(slug)]
    lines = [f"      {{service: {{account: HIE, subject: {q(s)}}}}}" for s in central]
    api = [f"$JS.API.STREAM.CREATE.{s}" for s in STREAMS]
    for d in durables(HUB_ROLES):
        api += [s for s, _ in consumer_api(d, slug)]
    for s in api:
        to = f", to: {q(local(s))}" if s.startswith("$JS.API.") else ""
        lines.append(f"      {{service: {{account: HIE, subject: {q(s)}}}{to}}}")
    lines += [f"      {{stream: {{account: HIE, subject: {q(s)}}}}}" for s in core_subscriptions(HUB_ROLES)]
    for other in slugs:
        if other == slug:
            continue
        for rpc in asked(HUB_ROLES):
            if rpc.template.startswith("hie.hub."):
                subject = rpc.subject(to=other, sender=slug)
                lines.append(f"      {{service: {{account: {account_name(other)}, subject: {q(subject)}}}}}")
    return lines


def hub_account(slug: str, slugs: list[str]) -> list[str]:
    others = [o for o in slugs if o != slug]
    exports = [
        f"      {{service: {q(rpc.subject(to=slug, sender=other))}, accounts: [{account_name(other)}]}}"
        for rpc in served(HUB_ROLES)
        for other in others
    ]
    return [
        "",
        f"  # Hub {slug}: its hub node and imaging gateway connect as {hub_user(slug)}.",
        f"  {account_name(slug)}: {{",
        f'    mappings: {{"$JS.API.>": "{JS_LOCAL}.>"}}',
        "    users: [",
        *user_block(
            hub_user(slug),
            hub_publish(slug),
            hub_subscribe(slug),
            "answers other hubs' federated searches",
        ),
        "    ]",
        "    imports: [",
        *hub_imports(slug, slugs),
        "    ]",
        "    # Its federated search answers, each for the one hub that asks on that subject.",
        "    exports: [",
        *exports,
        "    ]",
        "  }",
    ]


# --- the central account ---------------------------------------------------------------------------


def user_block(user: str, publish: Iterable[str], subscribe: Iterable[str], responds: str) -> list[str]:
    return [
        "      {",
        f"        user: {user}",
        f"        password: ${password_var(user)}",
        "        permissions: {",
        "          publish: {allow: [",
        *(f"            {q(s)}," for s in publish),
        "          ]}",
        f"          subscribe: {{allow: [{', '.join(q(s) for s in subscribe)}]}}",
        f"          allow_responses: true  # {responds}",
        "        }",
        "      }",
    ]


def central_user(role: Role) -> list[str]:
    """A central service: its facts, stream management (it owns the stream configuration, so CREATE
    and UPDATE), its own durable consumers, and replies to the requests it serves."""
    roles = frozenset({role})
    allowed = [*published(roles, role.value), *CENTRAL_EXTRA[role]]
    allowed += [rpc.pattern() for rpc in asked(roles)]
    for stream in STREAMS:
        allowed += [f"$JS.API.STREAM.CREATE.{stream}", f"$JS.API.STREAM.UPDATE.{stream}"]
    for d in durables(roles):
        allowed += [s for s, _ in consumer_api(d, None)]
    subscribe = ["_INBOX.>", *core_subscriptions(roles), *(r.pattern() for r in served(roles))]
    answers = ", ".join(r.pattern() for r in served(roles))
    return user_block(role.value, allowed, subscribe, f"answers {answers}")


def central_exports(slugs: list[str]) -> list[str]:
    out = ["      # Central request/reply, for every hub (one that names its asker: below, per hub)."]
    out += [
        f"      {{service: {q(rpc.template)}}}"
        for rpc in asked(HUB_ROLES)
        if not hub_to_hub(rpc) and contract.SENDER not in rpc.template.split(".")
    ]
    out += [f'      {{service: "$JS.API.STREAM.CREATE.{s}"}}' for s in STREAMS]
    out += [f"      {{stream: {q(s)}}}" for s in core_subscriptions(HUB_ROLES)]
    central_rpcs = {rpc.template for rpc in asked(HUB_ROLES) if not hub_to_hub(rpc)}
    for slug in slugs:
        account = account_name(slug)
        out.append(f"      # {slug}: the facts and inbox messages it sends, its durable consumers.")
        own = [*published(HUB_ROLES, slug), *(s for s in central_asked(slug) if s not in central_rpcs)]
        out += [f"      {{service: {q(s)}, accounts: [{account}]}}" for s in own]
        for d in durables(HUB_ROLES):
            for subject, response in consumer_api(d, slug):
                out.append(f"      {{service: {q(subject)}, response: {response}, accounts: [{account}]}}")
    return out


HEADER = """\
# GENERATED from the bus contract (libs/schemas/hie_schemas/contract.py) by
# libs/platform/hie_platform/nats_accounts.py; do not edit. Kubernetes: deploy/k8s/nats_accounts.py
# (one hub per overlays/hub-* directory); the local run (`hie up`) renders the same for its hubs.
#
# Accounts, not only users: a subscriber to `_INBOX.>` receives every reply in its account,
# including the JetStream messages fetched by other clients (pull consumers deliver to the
# fetcher's _INBOX) and other hubs' consent decisions. Each hub therefore has an account of its own
# (replies never cross accounts), and everything it may do in the central account HIE, where the
# streams live, is an explicit import below. The imports ARE the permissions; the user permissions
# repeat them as a second lock.
#
# The sender is in the subject: a hub's facts end with its slug (hie.exchange.exchange.sent.<hub>,
# its audit records hie.audit.record.appended.<hub>), what it addresses to another hub ends with
# its slug (hie.hub.<to>.inbox.delivery.<hub>), and so do its federated requests
# (hie.hub.<to>.rpc.search.<hub>) and its consent decision requests (hie.rpc.consent.decide.<hub>).
# A hub may publish only subjects that end with its own slug, so consumers know who sent a message
# and check it against the institution the message claims (hie_platform.bus.check_sender). A hub
# answers only its own rpc subjects; it cannot publish hie.registry.> or hie.consent.> (central
# facts), another hub's relay queue, or any inbox kind the contract does not declare. Streams: a hub
# may only CREATE them (an idempotent create of the same config); UPDATE, DELETE, PURGE and message
# reads are the central services' and the operators'. Durable consumers: only its own, CREATE
# pinned to its own filter subject.
"""


def render(slugs: list[str]) -> str:
    slugs = sorted(check_slug(s) for s in slugs)
    out = [
        HEADER,
        "accounts: {",
        "  # Server monitoring (`nats server ...` with the sys user); no application traffic.",
        "  SYS: {",
        "    users: [{user: sys, password: $SYS_PASSWORD}]",
        "  }",
        "",
        "  # The agency's account: the JetStream streams, registry and consent.",
        "  HIE: {",
        "    jetstream: enabled",
        "    users: [",
        *(line for role in sorted(CENTRAL_ROLES) for line in central_user(role)),
        "      # The operators' user for the nats CLI: stream backups, consumer lag, repairs.",
        "      {user: ops, password: $OPS_PASSWORD}",
        "    ]",
        "    exports: [",
        *central_exports(slugs),
        "    ]",
        "  }",
    ]
    for slug in slugs:
        out += hub_account(slug, slugs)
    out += ["}", ""]
    return "\n".join(out)


def users(slugs: list[str]) -> list[str]:
    """Every user the rendered file names (a password each)."""
    return ["sys", "ops", *sorted(r.value for r in CENTRAL_ROLES), *(hub_user(s) for s in sorted(slugs))]


__all__ = ["Kind", "account_name", "hub_user", "password_var", "render", "users"]
