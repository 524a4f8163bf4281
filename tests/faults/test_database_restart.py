"""The database restarted under load: requests fail cleanly (503 with an OperationOutcome) and recover.

The source hub runs on a private PostgreSQL cluster (initdb/pg_ctl from the Debian binaries, as the
postgres user, on a free loopback port, in a directory of its own; never the machine's shared
server). While referrals are published and searches read at that hub, the server is stopped
(``pg_ctl stop -m immediate``: every backend dies at once, as in a crash) and started again.

While it is down every request is answered, at once, with 503 and an OperationOutcome (issue code
``transient``, Retry-After) - never a 500, never a hang - and /readyz says not ready. Once it is back
the same requests succeed without restarting the hub. A referral answered 503 left nothing behind:
resent after the restart it is stored once, and every referral reaches the destination exactly once.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fault_referrals import (
    Referral,
    delivered_exactly_once,
)
from fault_servers import NatsCluster, PrivatePostgres, postgres_bin
from faults_support import (
    CLINIC,
    SOURCE_HUB,
    FaultFederation,
    eventually,
    new_rrn,
)

from hie_schemas.identifiers import KRNPI_SYSTEM, RRN_SYSTEM

PATIENTS = 4


@pytest.fixture
def postgres() -> Iterator[PrivatePostgres]:
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin (initdb, pg_ctl)")
    server = PrivatePostgres(bindir).init()
    server.start()
    yield server
    server.destroy()


@dataclass
class Answer:
    what: str
    status: int | None  # None: no HTTP answer at all (a cut connection or a client timeout)
    body: Any = None
    retry_after: str | None = None
    error: str = ""


@dataclass
class Load:
    """Referrals published and searches read at the source hub, every answer kept."""

    federation: FaultFederation
    http: httpx.AsyncClient
    rrns: list[str]
    answers: list[Answer] = field(default_factory=list)
    referrals: list[Referral] = field(default_factory=list)
    unanswered: list[Referral] = field(default_factory=list)  # answered 503: the EMR resends later
    stopping: bool = False

    def _keep(self, what: str, response: httpx.Response) -> Answer:
        body = response.json() if response.headers.get("content-type", "").endswith("json") else response.text
        answer = Answer(what, response.status_code, body, response.headers.get("retry-after"))
        self.answers.append(answer)
        return answer

    async def _call(self, what: str, call: Any) -> Answer:
        try:
            return self._keep(what, await call)
        except httpx.HTTPError as exc:
            answer = Answer(what, None, error=f"{type(exc).__name__}: {exc}")
            self.answers.append(answer)
            return answer

    async def writer(self, n: int) -> None:
        i = n
        while not self.stopping:
            referral = Referral.new(self.rrns[i % len(self.rrns)])
            i += 1
            answer = await self._call("publish", self.federation.publish(self.http, referral))
            self.referrals.append(referral)
            if answer.status == 200:
                referral.accept_body(answer.body)
            else:
                self.unanswered.append(referral)

    async def reader(self, n: int) -> None:
        fhir = self.federation.fhir(SOURCE_HUB)
        i = n
        while not self.stopping:
            headers = await self.federation.headers(self.http, CLINIC)
            if i % 2:
                params = {
                    "patient.identifier": f"{RRN_SYSTEM}|{self.rrns[i % len(self.rrns)]}",
                    "_count": "5",
                }
                call = self.http.get(f"{fhir}/DocumentReference", params=params, headers=headers)
                await self._call("search", call)
            else:
                params = {"requester": f"{KRNPI_SYSTEM}|{CLINIC}", "_count": "5"}
                await self._call("tasks", self.http.get(f"{fhir}/Task", params=params, headers=headers))
            i += 1

    def ok(self) -> int:
        return sum(1 for a in self.answers if a.status == 200)


def is_clean_503(answer: Answer) -> bool:
    body = answer.body
    return (
        answer.status == 503
        and isinstance(body, dict)
        and body.get("resourceType") == "OperationOutcome"
        and body["issue"][0]["code"] == "transient"
        and body["issue"][0]["severity"] == "error"
        and answer.retry_after is not None
    )


async def test_database_restart_under_load_fails_cleanly_and_recovers(
    single_nats: NatsCluster, postgres: PrivatePostgres, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    federation = FaultFederation(tmp_path / "hie", single_nats.url, hub_databases={SOURCE_HUB: postgres.url})
    await federation.start()
    hub = federation.hub(SOURCE_HUB)
    workers: list[asyncio.Task[None]] = []
    try:
        rrns = [new_rrn() for _ in range(PATIENTS)]
        for rrn in rrns:
            await federation.consent_to_exchange(http, rrn)
        load = Load(federation, http, rrns)
        workers += [asyncio.create_task(load.writer(n)) for n in range(3)]
        workers += [asyncio.create_task(load.reader(n)) for n in range(2)]

        async def served() -> bool:
            return load.ok() >= 30

        await eventually(served, "the hub serving under load")
        before = len(load.answers)

        await asyncio.to_thread(postgres.stop, "immediate")
        down_from = len(load.answers)
        # While the database is down: the hub answers, with 503 and an OperationOutcome.
        probe = Referral.new(rrns[0])
        published = await load._call("publish", federation.publish(http, probe))
        load.referrals.append(probe)
        load.unanswered.append(probe)
        headers = await federation.headers(http, CLINIC)
        found = await load._call(
            "search",
            http.get(
                f"{federation.fhir(SOURCE_HUB)}/DocumentReference",
                params={"patient.identifier": f"{RRN_SYSTEM}|{rrns[0]}"},
                headers=headers,
            ),
        )
        assert is_clean_503(published), published
        assert is_clean_503(found), found
        ready = await http.get(f"{hub.url}/readyz")
        assert (ready.status_code, ready.json()["checks"]["database"]) == (503, False)

        async def load_saw_outage() -> bool:
            return len(load.answers) >= down_from + 20

        await eventually(load_saw_outage, "requests answered while the database is down")
        during = load.answers[down_from:]

        await asyncio.to_thread(postgres.start)

        async def recovered() -> bool:
            return (await http.get(f"{hub.url}/readyz")).status_code == 200

        await eventually(recovered, "the hub ready again", 60.0)
        after_from = len(load.answers)

        async def serving_again() -> bool:
            return sum(1 for a in load.answers[after_from:] if a.status == 200) >= 30

        await eventually(serving_again, "the hub serving again")
        load.stopping = True
        await asyncio.gather(*workers)

        statuses = Counter((a.what, a.status) for a in load.answers)
        print(
            f"\n{len(load.answers)} answers ({before} before the stop, {len(during)} while down): "
            f"{dict(statuses)}; {len(load.unanswered)} referrals resent after the restart"
        )
        assert [a for a in load.answers if a.status is None] == [], "a request got no answer"
        assert all(a.status in (200, 503) for a in load.answers), statuses
        assert all(is_clean_503(a) for a in load.answers if a.status == 503)
        assert all(a.status == 503 for a in during[5:]), Counter(a.status for a in during)
        # After the restart, the last answers are all successes (the pool reconnected by itself).
        assert all(a.status == 200 for a in load.answers[-10:]), Counter(a.status for a in load.answers[-10:])

        # Every referral that got no 200 is resent as it was; each is stored once and delivered once.
        for referral in load.unanswered:
            response = await federation.publish(http, referral)
            assert response.status_code == 200, response.text
            referral.accept(response)
        await delivered_exactly_once(federation, http, load.referrals)
        assert not federation.logs_with("unhandled error"), federation.logs_with("unhandled error")
    finally:
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        federation.stop()
