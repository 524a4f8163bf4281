"""Kill the JetStream stream leader of a 3-node NATS cluster during a burst of referrals: nothing lost.

Three nats-server processes clustered with JetStream; every service is given all three URLs and
creates the federation's streams with three replicas (HIE_*_NATS_STREAM_REPLICAS=3, as in
production). While referrals flow from one hub to the other, the server leading HIE_HUB_INBOX (the
stream the deliveries travel on) is SIGKILLed. The remaining two elect a new leader; the outbox relay
and the inbox consumer carry on. Every acknowledged referral reaches the destination exactly once, and
the stream itself holds each delivery once (publishes are de-duplicated by Nats-Msg-Id).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fault_referrals import (
    Burst,
    Referral,
    delivered_exactly_once,
    requesters_told,
)
from fault_servers import NatsCluster, stream_info
from faults_support import (
    DESTINATION_HUB,
    SOURCE_HUB,
    FaultFederation,
    eventually,
    new_rrn,
)

from hie_schemas import streams
from hie_schemas.contract import Kind, subject

REFERRALS = 200
PATIENTS = 5


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    nats = await NatsCluster(tmp_path / "nats", size=3).start()
    yield nats
    nats.stop()


async def test_killing_the_stream_leader_of_a_3_node_cluster_loses_nothing(
    cluster: NatsCluster, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    federation = FaultFederation(
        tmp_path / "hie",
        cluster.url,
        extra_env={"NATS_STREAM_REPLICAS": "3"},
    )
    await federation.start()
    running: list[asyncio.Task[None]] = []
    try:
        inbox = await stream_info(cluster.url, streams.HUB_INBOX.name)
        assert inbox.config.num_replicas == 3
        assert inbox.cluster is not None
        assert len(inbox.cluster.replicas or []) == 2
        rrns = [new_rrn() for _ in range(PATIENTS)]
        for rrn in rrns:
            await federation.consent_to_exchange(http, rrn)
        referrals = [Referral.new(rrns[i % PATIENTS]) for i in range(REFERRALS)]
        burst = Burst(federation, referrals)
        sending = asyncio.create_task(burst.run(http))
        running.append(sending)

        await burst.until_acknowledged(REFERRALS // 3)
        leader = (await stream_info(cluster.url, streams.HUB_INBOX.name)).cluster.leader
        cluster.kill(leader)
        killed_at, killed = burst.acknowledged, time.monotonic()

        async def new_leader() -> str | None:
            try:
                info = await stream_info(cluster.url, streams.HUB_INBOX.name)
            except Exception:
                return None
            return info.cluster.leader if info.cluster.leader not in (None, leader) else None

        elected = await eventually(new_leader, "a new leader of HIE_HUB_INBOX", 60.0)
        await sending
        assert all(r.acknowledged for r in referrals)
        await delivered_exactly_once(federation, http, referrals)
        await requesters_told(federation, http, referrals)
        # The stream holds each delivery once: no publish retried by the relay was stored twice.
        deliveries = subject(Kind.DELIVERY, to=DESTINATION_HUB, sender=SOURCE_HUB)
        info = await stream_info(cluster.url, streams.HUB_INBOX.name, subjects_filter=deliveries)
        assert (info.state.subjects or {}).get(deliveries) == REFERRALS
        print(
            f"\nleader {leader} of {streams.HUB_INBOX.name} killed after {killed_at} of {REFERRALS} "
            f"acknowledgements; {elected} leads now; {len(burst.errors)} failed tries "
            f"{sorted(set(burst.errors))}; all delivered {time.monotonic() - killed:.1f} s after the kill"
        )
        assert not federation.logs_with("unhandled error"), federation.logs_with("unhandled error")
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        federation.stop()
