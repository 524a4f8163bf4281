"""The consent service down: hubs keep deciding within the staleness bound, then fail closed.

The hubs decide over their replica of the consent feed (services/hub-node/hie_hub/consent_replica.py).
With the consent service SIGKILLed the feed's heartbeat stops. Until the replica is older than its
bound (HIE_HUB_CONSENT_STALENESS_SECONDS, 30 s here) the source hub still permits a referral of a
consented patient and refuses one of a patient who never consented; once past the bound it refuses
every referral (rule deny-consent-feed-stale) except emergency access with a justification, which
needs no consent (의료법 §21-2 exception). When the consent service is back, the hub decides as before.
Every permitted referral, emergency ones included, reaches the destination once; no refused one does.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from fault_referrals import (
    Referral,
    delivered_exactly_once,
    refusal_rules,
)
from fault_servers import NatsCluster
from faults_support import (
    SOURCE_HUB,
    FaultFederation,
    eventually,
    new_rrn,
)

from hie_platform.settings import DEV_PATIENT_KEY_SECRET
from hie_schemas.identifiers import patient_key_from_rrn

STALENESS_SECONDS = (
    30  # wide enough that the within-bound requests finish inside it on a loaded 2-core machine
)
JUSTIFICATION = "의식 없는 응급환자, 보호자 없음"


def replicated_versions(federation: FaultFederation, rrn: str) -> list[int]:
    """The consent versions of the patient in the source hub's replica (its own SQLite database)."""
    key = patient_key_from_rrn(rrn, DEV_PATIENT_KEY_SECRET.encode())
    path = federation.data / "db" / f"hub-{SOURCE_HUB}.db"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT version FROM consent_replica WHERE patient_key = ?", (key,)).fetchall()
    return sorted(row[0] for row in rows)


async def test_consent_service_down_hubs_decide_within_the_bound_then_fail_closed(
    single_nats: NatsCluster, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    federation = FaultFederation(
        tmp_path / "hie", single_nats.url, extra_env={"CONSENT_STALENESS_SECONDS": str(STALENESS_SECONDS)}
    )
    await federation.start()
    permitted: list[Referral] = []

    async def send(referral: Referral) -> httpx.Response:
        response = await federation.publish(http, referral)
        if response.status_code == 200:
            referral.accept(response)
            permitted.append(referral)
        return response

    try:
        consented, never = new_rrn(), new_rrn()
        await federation.consent_to_exchange(http, consented)

        async def in_replica() -> bool:
            return replicated_versions(federation, consented) == [1]

        await eventually(in_replica, "the consent in the source hub's replica")

        async def replica_current() -> bool:
            # Deciding locally: the replica has counted a heartbeat (until then, the central point).
            metrics = await http.get(f"{federation.hub(SOURCE_HUB).url}/metrics")
            # No patient is decided stale for a consent version set aside (the gauge is exported).
            held = "hie_hub_consent_replica_held_patients 0.0" in metrics.text
            return held and "hie_hub_consent_replica_current 1.0" in metrics.text

        await eventually(replica_current, "the source hub's replica to be current")
        assert (await send(Referral.new(consented))).status_code == 200

        federation.consent.kill()
        killed = time.monotonic()
        with pytest.raises(httpx.ConnectError):
            await http.get(f"{federation.consent_url}/healthz")

        # Within the bound: decided locally, as before.
        within = await send(Referral.new(consented))
        assert within.status_code == 200, within.text
        refused = await send(Referral.new(never))
        assert refused.status_code == 403, refused.text
        assert refusal_rules(refused) == ["deny-no-consent"]
        emergency_within = await send(Referral.new(never, emergency=JUSTIFICATION))
        assert emergency_within.status_code == 200, emergency_within.text

        # Past the bound: the same referral of the consented patient is refused (fail closed).
        kept_deciding = 0

        async def fails_closed() -> httpx.Response | None:
            nonlocal kept_deciding
            response = await send(Referral.new(consented))
            if response.status_code == 200:
                kept_deciding += 1
                return None
            return response

        closed = await eventually(fails_closed, "the source hub to fail closed", 4 * STALENESS_SECONDS)
        stale_after = time.monotonic() - killed
        assert closed.status_code == 403, closed.text
        assert closed.json()["resourceType"] == "OperationOutcome"
        assert refusal_rules(closed) == ["deny-consent-feed-stale"]
        never_stale = await send(Referral.new(never))
        assert (never_stale.status_code, refusal_rules(never_stale)) == (403, ["deny-consent-feed-stale"])
        # Emergency access needs no consent: still permitted, for either patient.
        for rrn in (never, consented):
            emergency = await send(Referral.new(rrn, emergency=JUSTIFICATION))
            assert emergency.status_code == 200, emergency.text

        # The consent service comes back: the feed is heard again and the hub decides as before.
        await federation.restart("consent")

        async def decides_again() -> httpx.Response | None:
            response = await send(Referral.new(consented))
            return response if response.status_code == 200 else None

        await eventually(decides_again, "the source hub deciding again", 90.0)
        back = await send(Referral.new(never))
        assert (back.status_code, refusal_rules(back)) == (403, ["deny-no-consent"])

        await delivered_exactly_once(federation, http, permitted, unsearchable=[never])
        print(
            f"\nconsent service killed; the hub kept deciding for {kept_deciding} more referrals and "
            f"failed closed {stale_after:.1f} s later (bound {STALENESS_SECONDS} s); "
            f"{len(permitted)} permitted referrals delivered once"
        )
        assert not federation.logs_with("unhandled error"), federation.logs_with("unhandled error")
    finally:
        federation.stop()
