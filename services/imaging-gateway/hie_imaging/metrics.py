"""Prometheus counters of the gateway, on the app's own registry (served at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

# attribute -> (metric name, help, labels): one row per counter, so that a new one is one row.
_COUNTERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "received": (
        "hie_imaging_instances_received_total",
        "C-STORE requests answered, by caller role and result (new, duplicate, refused)",
        ("role", "result"),
    ),
    "sent": (
        "hie_imaging_instances_sent_total",
        "Instances sent on, by outcome (stored, failed)",
        ("outcome",),
    ),
    "transcoded": (
        "hie_imaging_instances_transcoded_total",
        "Instances whose own transfer syntax the peer refused, by result: sent decoded into an "
        "uncompressed syntax, or failed (could not be decoded, not sent)",
        ("result",),
    ),
    "associations": (
        "hie_imaging_associations_total",
        "Outgoing associations, by outcome (ok, failed)",
        ("outcome",),
    ),
    "consent_unavailable": (
        "hie_imaging_consent_unavailable_total",
        "Consent decisions not obtained (the instances wait; fail closed)",
        (),
    ),
    "dicom_refused": (
        "hie_imaging_dicom_refusals_total",
        "DICOM connections and associations refused or closed, by reason: unknown-caller, "
        "wrong-host (a registered AE from another address), peer-limit, capacity, "
        "no-association-request (closed after the request timeout)",
        ("reason",),
    ),
    "blocked": ("hie_imaging_instances_blocked_total", "Instances the consent decision kept back", ()),
    "blocked_by_sender": (
        "hie_imaging_instances_blocked_by_sender_total",
        "Instances the consent decision kept back, by the institution (or calling AE) that sent them; "
        "that sender was answered Success when it stored them",
        ("sender",),
    ),
    "retries": (
        "hie_imaging_relay_retries_total",
        "Relay attempts that could not reach their destination (retried with backoff), by destination",
        ("destination",),
    ),
    "withheld": (
        "hie_imaging_instances_withheld_total",
        "Instances held back in the middle of an association because the patient's consent "
        "changed since the batch was decided (decided again before anything more is sent)",
        (),
    ),
}


class GatewayMetrics:
    received: Counter
    sent: Counter
    transcoded: Counter
    associations: Counter
    consent_unavailable: Counter
    dicom_refused: Counter
    blocked: Counter
    blocked_by_sender: Counter
    retries: Counter
    withheld: Counter

    def __init__(self, registry: CollectorRegistry) -> None:
        for attribute, (name, documentation, labels) in _COUNTERS.items():
            setattr(self, attribute, Counter(name, documentation, labels, registry=registry))
        self.unreachable = Gauge(
            "hie_imaging_destinations_unreachable",
            "Destinations (PACS or gateways) whose last relay attempt could not reach them",
            registry=registry,
        )
