"""Write the NATS accounts file of the central overlay: one account per hub, imports as permissions.

    python deploy/k8s/nats_accounts.py            # rewrite overlays/central/nats/accounts.conf
    python deploy/k8s/nats_accounts.py --check    # exit 1 if the committed file is stale

The hubs are the ``overlays/hub-<slug>`` directories, so adding a hub is: copy an overlay, rerun
this, add the hub's password to the ``nats-users`` Secret. The reasoning is written into the
generated file's comments, where an operator reading the server configuration will look for it.
Stdlib only: it runs with any python3.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

K8S = Path(__file__).resolve().parent
OUTPUT = K8S / "overlays" / "central" / "nats" / "accounts.conf"
_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")  # hie_schemas.subjects._TOKEN

# hie_schemas.streams.ALL: every service calls ensure_streams() at start-up (create, else update).
STREAMS = (
    "HIE_REGISTRY",
    "HIE_CONSENT",
    "HIE_EXCHANGE",
    "HIE_HUB_INBOX",
    "HIE_IMAGING",
    "HIE_IMAGING_JOBS",
    "HIE_AUDIT",
)
# Facts any hub publishes into the central streams (JetStream publish: the PubAck is the reply).
HUB_FACTS = ("hie.exchange.>", "hie.imaging.>", "hie.audit.>")
# The two kinds of work a hub addresses to another hub (hie_hub.exchange / hie_hub.tasks).
HUB_DELIVERIES = ("hie.hub.*.inbox.delivery", "hie.hub.*.inbox.task-status")
CENTRAL_RPC = ("hie.rpc.consent.decide", "hie.rpc.registry.locate")
# Federated search (hie_hub.federation asks, hie_hub.holder answers): hub to hub request/reply. Each
# hub answers these on its own subjects only; it may ask any other hub, and nothing else of theirs.
HUB_RPC = ("search", "retrieve")
INSTITUTION_CHANGED = "hie.registry.institution.changed"
# Core NATS, outside every stream: consent says once a second that its feed is current
# (hie_consent.events.FeedHeartbeat); hub nodes fail closed when it stops (hie_hub.consent_replica).
CONSENT_HEARTBEAT = "hie.feed.consent.heartbeat"
# What a hub subscribes to outside its inbox: cache invalidation and the consent feed's heartbeat.
HUB_SUBSCRIBES = (INSTITUTION_CHANGED, CONSENT_HEARTBEAT)
# In an account without JetStream the server itself answers every $JS.API.> request with "JetStream
# not enabled for account" (10039), ahead of any import of the same subject. A hub account therefore
# maps $JS.API.> to this local prefix, and imports the central API subjects it may use under it.
JS_LOCAL = "hie-js.api"


def hubs() -> list[str]:
    slugs = sorted(p.name.removeprefix("hub-") for p in (K8S / "overlays").glob("hub-*") if p.is_dir())
    for slug in slugs:
        if not _SLUG.fullmatch(slug):
            sys.exit(f"overlays/hub-{slug}: {slug!r} is not a valid hub slug (NATS subject token)")
    return slugs


@dataclass(frozen=True)
class Consumer:
    """A durable pull consumer a service creates and pulls from (stream, durable, filter subject)."""

    stream: str
    durable: str
    filter: str
    # hie_hub.consent_replica creates its consumer by durable name only (the legacy API, no filter in
    # the subject) and deletes it to rebuild the replica from the start of the stream.
    by_durable_name: bool = False


def consumers(slug: str) -> list[Consumer]:
    """The durable consumers of one hub's node and gateway."""
    return [
        Consumer("HIE_HUB_INBOX", f"hub-{slug}-inbox", f"hie.hub.{slug}.inbox.>"),  # hie_hub.inbox
        # hie_hub.studies: the studies its gateway delivered. Every gateway reports on the one subject,
        # so a hub reads the other hubs' study counts too (uids and exchange ids, no patient key).
        Consumer("HIE_IMAGING", f"hub-{slug}-imaging", "hie.imaging.study.progress"),
        # hie_hub.consent_replica: every hub replicates the whole consent feed, by design (§4).
        Consumer("HIE_CONSENT", f"hub-{slug}-consent", "hie.consent.consent.recorded", by_durable_name=True),
        Consumer("HIE_EXCHANGE", f"imaging-{slug}-exchanges", "hie.exchange.exchange.sent"),  # events
        Consumer("HIE_IMAGING_JOBS", f"imaging-{slug}-relay", f"hie.hub.{slug}.imaging.relay"),  # relay
    ]


CENTRAL_CONSUMERS = {
    "registry": [Consumer("HIE_EXCHANGE", "registry-locator", "hie.exchange.>")],
    "consent": [
        Consumer("HIE_EXCHANGE", "consent-history", "hie.exchange.>"),
        Consumer("HIE_AUDIT", "consent-access", "hie.audit.record.appended"),
    ],
}


def consumer_api(c: Consumer) -> list[tuple[str, str]]:
    """(subject, response type) of the JetStream API calls behind nats-py's pull_subscribe + fetch + ack."""
    api = f"$JS.API.CONSUMER.%s.{c.stream}.{c.durable}"
    calls = [(api % "INFO", "singleton")]
    if c.by_durable_name:
        calls += [(api % "DURABLE.CREATE", "singleton"), (api % "DELETE", "singleton")]
    else:
        # nats-py creates a named consumer with its filter in the subject (server >= 2.9), so the
        # subject itself pins the filter: a hub cannot create its durable on another hub's subjects.
        calls.append((f"{api % 'CREATE'}.{c.filter}", "singleton"))
    calls += [(api % "MSG.NEXT", "stream"), (f"$JS.ACK.{c.stream}.{c.durable}.>", "singleton")]
    return calls


def local(subject: str) -> str:
    """The ``to:`` of an import of a JetStream API subject (see JS_LOCAL); nothing for other subjects."""
    if subject.startswith("$JS.API."):
        return f", to: {q(JS_LOCAL + subject.removeprefix('$JS.API'))}"
    return ""


def q(subject: str) -> str:
    return f'"{subject}"'


def account_name(slug: str) -> str:
    return "HUB_" + slug.upper().replace("-", "_")


def password_var(slug: str) -> str:
    return f"$HUB_{slug.upper().replace('-', '_')}_PASSWORD"


def hub_publish(slug: str) -> list[str]:
    """The hub user's publish allow-list; the server checks it after the $JS.API mapping."""
    subjects = [
        *HUB_FACTS,
        f"hie.hub.{slug}.imaging.relay",
        *HUB_DELIVERIES,
        *CENTRAL_RPC,
        *(f"hie.hub.*.rpc.{op}" for op in HUB_RPC),
        *(f"$JS.API.STREAM.CREATE.{s}" for s in STREAMS),
    ]
    for consumer in consumers(slug):
        subjects += [s for s, _ in consumer_api(consumer)]
    return [JS_LOCAL + s.removeprefix("$JS.API") if s.startswith("$JS.API.") else s for s in subjects]


def central_user(user: str, publish: list[str], subscribe: list[str], responds: str) -> list[str]:
    """A central service's user: its facts, stream management (it owns the stream configuration, so
    CREATE and UPDATE), its own durable consumers, and replies to the requests it serves."""
    allowed = [*publish]
    for stream in STREAMS:
        allowed += [f"$JS.API.STREAM.CREATE.{stream}", f"$JS.API.STREAM.UPDATE.{stream}"]
    for consumer in CENTRAL_CONSUMERS[user]:
        allowed += [s for s, _ in consumer_api(consumer)]
    return [
        "      {",
        f"        user: {user}",
        f"        password: ${user.upper()}_PASSWORD",
        "        permissions: {",
        "          publish: {allow: [",
        *(f"            {q(s)}," for s in allowed),
        "          ]}",
        f'          subscribe: {{allow: ["_INBOX.>", {", ".join(q(s) for s in subscribe)}]}}',
        f"          allow_responses: true  # answers {responds}",
        "        }",
        "      }",
    ]


def render(slugs: list[str]) -> str:
    out: list[str] = [
        "# GENERATED by deploy/k8s/nats_accounts.py from the overlays/hub-* directories; do not edit.",
        "#",
        "# Accounts, not only users: a subscriber to `_INBOX.>` receives every reply in its account,",
        "# including the JetStream messages fetched by other clients (pull consumers deliver to the",
        "# fetcher's _INBOX) and other hubs' consent decisions. nats-py picks random inboxes and our Bus",
        "# sets no per-user inbox prefix, so users in one account could read each other's deliveries.",
        "# Each hub therefore has an account of its own (replies never cross accounts), and everything",
        "# it may do in the central account HIE, where the streams live, is an explicit import below.",
        "# The imports ARE the permissions; the user permissions repeat them as a second lock.",
        "#",
        "# What a hub may publish (all through imports from HIE):",
        "#   hie.exchange.> hie.imaging.> hie.audit.>   its facts (exchange sent/denied, task updated,",
        "#                                             document published, study progress, audit)",
        "#   hie.hub.<own>.imaging.relay               its gateway's own work queue, never another's",
        "#   hie.hub.*.inbox.delivery|task-status      referrals/returns and task notices to OTHER hubs;",
        "#                                             no other inbox kind, no other hub's relay queue",
        "#   hie.hub.<other>.rpc.search|retrieve       federated search, imported from each other hub's",
        "#                                             account; no other rpc operation of theirs",
        "#   hie.rpc.consent.decide, hie.rpc.registry.locate   central request/reply",
        "#   $JS.API.STREAM.CREATE.<7 streams>         ensure_streams() at start-up: an idempotent create",
        "#                                             of the same config; UPDATE, DELETE, PURGE are not",
        "#                                             imported, so a hub cannot shorten HIE_AUDIT",
        "#   $JS.API.CONSUMER.{INFO,CREATE,MSG.NEXT}.<stream>.<own durable>  and $JS.ACK of the same:",
        "#                                             its five durable consumers, CREATE pinned to",
        "#                                             its own filter subject (the consent replica's",
        "#                                             by durable name on HIE_CONSENT, plus DELETE to",
        "#                                             rebuild it)",
        "# What a hub may subscribe to: its account's _INBOX.> (replies, fetched messages),",
        "# hie.registry.institution.changed (the registry client's cache invalidation),",
        "# hie.feed.consent.heartbeat (its consent replica fails closed without it) and its own",
        "# hie.hub.<own>.rpc.search|retrieve, which it exports to the other hubs (never theirs).",
        "# hie.registry.> and hie.consent.> are published by the central services only.",
        "",
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
        *central_user(
            "registry",
            publish=["hie.registry.>", "hie.audit.>"],
            subscribe=[INSTITUTION_CHANGED, "hie.rpc.registry.locate"],
            responds="hie.rpc.registry.locate",
        ),
        *central_user(
            "consent",
            publish=[
                "hie.consent.>",
                "hie.audit.>",
                CONSENT_HEARTBEAT,
                # FeedHeartbeat reads the last ConsentRecorded sequence (get_last_msg).
                "$JS.API.STREAM.MSG.GET.HIE_CONSENT",
            ],
            subscribe=[INSTITUTION_CHANGED, "hie.rpc.consent.decide"],
            responds="hie.rpc.consent.decide",
        ),
        "      # The operators' user for the nats CLI: stream backups, consumer lag, repairs.",
        "      {user: ops, password: $OPS_PASSWORD}",
        "    ]",
        "    exports: [",
        "      # Shared by every hub.",
        *(f"      {{service: {q(s)}}}" for s in (*HUB_FACTS, *HUB_DELIVERIES, *CENTRAL_RPC)),
        *(f'      {{service: "$JS.API.STREAM.CREATE.{s}"}}' for s in STREAMS),
        *(f"      {{stream: {q(s)}}}" for s in HUB_SUBSCRIBES),
    ]
    for slug in slugs:
        account = account_name(slug)
        out.append(f"      # {slug}: its relay queue and its durable consumers, for its account only.")
        out.append(f'      {{service: "hie.hub.{slug}.imaging.relay", accounts: [{account}]}}')
        for consumer in consumers(slug):
            for subject, response in consumer_api(consumer):
                out.append(f"      {{service: {q(subject)}, response: {response}, accounts: [{account}]}}")
    out += ["    ]", "  }"]

    for slug in slugs:
        account = account_name(slug)
        imports = [
            f"      {{service: {{account: HIE, subject: {q(s)}}}}}"
            for s in (*HUB_FACTS, f"hie.hub.{slug}.imaging.relay", *HUB_DELIVERIES, *CENTRAL_RPC)
        ]
        imports += [
            f'      {{service: {{account: HIE, subject: "$JS.API.STREAM.CREATE.{s}"}}'
            f"{local('$JS.API.STREAM.CREATE.' + s)}}}"
            for s in STREAMS
        ]
        for consumer in consumers(slug):
            imports += [
                f"      {{service: {{account: HIE, subject: {q(s)}}}{local(s)}}}"
                for s, _ in consumer_api(consumer)
            ]
        imports += [f"      {{stream: {{account: HIE, subject: {q(s)}}}}}" for s in HUB_SUBSCRIBES]
        imports += [
            f'      {{service: {{account: {account_name(other)}, subject: "hie.hub.{other}.rpc.{op}"}}}}'
            for other in slugs
            if other != slug
            for op in HUB_RPC
        ]
        others = ", ".join(account_name(o) for o in slugs if o != slug)
        exports = [
            f'      {{service: "hie.hub.{slug}.rpc.{op}", accounts: [{others}]}}' for op in HUB_RPC if others
        ]
        subscribes = [*HUB_SUBSCRIBES, *(f"hie.hub.{slug}.rpc.{op}" for op in HUB_RPC)]
        out += [
            "",
            f"  # Hub {slug}: its hub node and imaging gateway connect as hub-{slug}.",
            f"  {account}: {{",
            f'    mappings: {{"$JS.API.>": "{JS_LOCAL}.>"}}',
            "    users: [",
            "      {",
            f"        user: hub-{slug}",
            f"        password: {password_var(slug)}",
            "        permissions: {",
            "          publish: {allow: [",
            *(f"            {q(s)}," for s in hub_publish(slug)),
            "          ]}",
            f'          subscribe: {{allow: ["_INBOX.>", {", ".join(q(s) for s in subscribes)}]}}',
            "          allow_responses: true  # answers other hubs' federated searches",
            "        }",
            "      }",
            "    ]",
            "    imports: [",
            *imports,
            "    ]",
            "    # Its federated search answers, for the other hubs.",
            "    exports: [",
            *exports,
            "    ]",
            "  }",
        ]
    out += ["}", ""]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed file is stale")
    args = parser.parse_args()
    text = render(hubs())
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            sys.stderr.write(f"{OUTPUT.relative_to(K8S)} is stale: run python {Path(__file__).name}\n")
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    sys.stdout.write(f"wrote {OUTPUT.relative_to(K8S)} for hubs: {', '.join(hubs())}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
