"""Prometheus counters of the gateway, on the app's own registry (served at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.received = Counter(
            "hie_imaging_instances_received_total",
            "C-STORE requests answered, by caller role and result (new, duplicate, refused)",
            ["role", "result"],
            registry=registry,
        )
        self.sent = Counter(
            "hie_imaging_instances_sent_total",
            "Instances sent on, by outcome (stored, failed)",
            ["outcome"],
            registry=registry,
        )
        self.transcoded = Counter(
            "hie_imaging_instances_transcoded_total",
            "Instances whose own transfer syntax the peer refused, by result: sent decoded into an "
            "uncompressed syntax, or failed (could not be decoded, not sent)",
            ["result"],
            registry=registry,
        )
        self.associations = Counter(
            "hie_imaging_associations_total",
            "Outgoing associations, by outcome (ok, failed)",
            ["outcome"],
            registry=registry,
        )
        self.consent_unavailable = Counter(
            "hie_imaging_consent_unavailable_total",
            "Consent decisions not obtained (the instances wait; fail closed)",
            registry=registry,
        )
        self.dicom_refused = Counter(
            "hie_imaging_dicom_refusals_total",
            "DICOM connections and associations refused or closed, by reason: unknown-caller, "
            "wrong-host (a registered AE from another address), peer-limit, capacity, "
            "no-association-request (closed after the request timeout)",
            ["reason"],
            registry=registry,
        )
        self.blocked = Counter(
            "hie_imaging_instances_blocked_total",
            "Instances the consent decision kept back",
            registry=registry,
        )
        self.blocked_by_sender = Counter(
            "hie_imaging_instances_blocked_by_sender_total",
            "Instances the consent decision kept back, by the institution (or calling AE) that sent them; "
            "that sender was answered Success when it stored them",
            ["sender"],
            registry=registry,
        )
        self.retries = Counter(
            "hie_imaging_relay_retries_total",
            "Relay attempts that could not reach their destination (retried with backoff), by destination",
            ["destination"],
            registry=registry,
        )
        self.unreachable = Gauge(
            "hie_imaging_destinations_unreachable",
            "Destinations (PACS or gateways) whose last relay attempt could not reach them",
            registry=registry,
        )
        self.withheld = Counter(
            "hie_imaging_instances_withheld_total",
            "Instances held back in the middle of an association because the patient's consent "
            "changed since the batch was decided (decided again before anything more is sent)",
            registry=registry,
        )
