"""SIGKILL a hub node during a burst of 500 referrals: after the restart every acknowledged referral
is at the destination hub exactly once.

Acknowledged means: the source hub answered the ITI-65 transaction with 200 and its
transaction-response (the Task id). A request cut by the kill got no answer; the EMR resends the same
transaction (the same document ids), and the hub answers a replay as the first time, storing nothing
new. So at the end every one of the 500 referrals is acknowledged, and the destination must hold
exactly 500 Tasks and 500 referral notes: one per referral, none twice, none unknown.

Two kills in one burst: the source hub (its outbox holds committed, unpublished deliveries and
requests are in flight) and then the destination hub (its inbox consumer has fetched deliveries it
has not acknowledged; JetStream redelivers them, and the idempotent consumer applies each once).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
from fault_referrals import (
    Burst,
    Referral,
    delivered_exactly_once,
    requesters_told,
)
from fault_servers import NatsCluster
from faults_support import (
    DESTINATION_HUB,
    SOURCE_HUB,
    FaultFederation,
    new_rrn,
)

REFERRALS = 500
PATIENTS = 10


async def test_sigkill_of_a_hub_during_a_burst_delivers_every_referral_exactly_once(
    single_nats: NatsCluster, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    started = time.monotonic()
    federation = await FaultFederation(tmp_path / "hie", single_nats.url).start()
    running: list[asyncio.Task[None]] = []
    try:
        rrns = [new_rrn() for _ in range(PATIENTS)]
        for rrn in rrns:
            await federation.consent_to_exchange(http, rrn)
        referrals = [Referral.new(rrns[i % PATIENTS]) for i in range(REFERRALS)]
        burst = Burst(federation, referrals)
        up = time.monotonic()
        sending = asyncio.create_task(burst.run(http))
        running.append(sending)

        await burst.until_acknowledged(REFERRALS // 4)
        federation.hub(SOURCE_HUB).kill()
        killed_source_at = burst.acknowledged
        await federation.restart(f"hub-{SOURCE_HUB}")

        await burst.until_acknowledged(REFERRALS * 3 // 5)
        federation.hub(DESTINATION_HUB).kill()
        killed_destination_at = burst.acknowledged
        await federation.restart(f"hub-{DESTINATION_HUB}")

        await sending
        sent = time.monotonic()
        assert all(r.acknowledged for r in referrals)
        await delivered_exactly_once(federation, http, referrals)
        await requesters_told(federation, http, referrals)
        retried = sum(1 for r in referrals if len(r.attempts) > 1)
        print(
            f"\n{REFERRALS} referrals: source hub killed after {killed_source_at} acknowledgements, "
            f"destination hub after {killed_destination_at}; {retried} resent after a cut connection "
            f"({len(burst.errors)} failed tries: {sorted(set(burst.errors))}); federation up in "
            f"{up - started:.1f} s, burst {sent - up:.1f} s, "
            f"all delivered {time.monotonic() - sent:.1f} s later"
        )
        assert not federation.logs_with("unhandled error"), federation.logs_with("unhandled error")
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        federation.stop()
