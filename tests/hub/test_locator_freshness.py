"""Read-your-writes across hubs (issue 14 point 7): once ITI-65 answers at one hub, a walk-in search
from another hub finds the document, because the publishing hub told the record locator before it
answered (hie.rpc.registry.locate-add.<hub>); when the locator could not be told, ITI-65 still
succeeds and a search either finds the document or says that the result may be incomplete."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from statistics import mean, quantiles
from typing import Any

import httpx
from hub_support import (
    CNUH,
    SEVERANCE_CLINIC,
    Federation,
    eventually,
    located,
    matches,
    new_rrn,
    outcomes,
    submit,
)

from hie_hub.node import LocatorMemory
from hie_platform.bus import Bus
from hie_schemas.codes import DocumentType
from hie_schemas.contract import RPCS, Operation, rpc_subject
from hie_schemas.events import DocumentPublished, LocateReply
from hie_schemas.identifiers import RRN_SYSTEM

CRS = DocumentType.CARE_RECORD_SUMMARY
LOCATE_ADD = RPCS[Operation.REGISTRY_LOCATE_ADD].pattern()


async def walk_in_at_cnuh(fed: Federation, rrn: str) -> httpx.Response:
    return await fed.call(
        "GET",
        "cnuh",
        "/DocumentReference",
        as_=CNUH,
        params={"patient.identifier": f"{RRN_SYSTEM}|{rrn}", "_federated": "true"},
    )


async def publish_at_severance(fed: Federation, rrn: str) -> str:
    response = await fed.publish("severance", SEVERANCE_CLINIC, submit(CRS, SEVERANCE_CLINIC, rrn))
    assert response.status_code == 200, response.text
    [doc_id] = located(response, "DocumentReference")
    return doc_id


def incomplete(response: httpx.Response) -> list[str]:
    return [
        str(issue.get("diagnostics"))
        for outcome in outcomes(response)
        for issue in outcome["issue"]
        if issue["code"] == "incomplete" and issue["severity"] == "warning"
    ]


async def test_a_walk_in_search_at_another_hub_finds_what_was_just_published(federation: Federation) -> None:
    """Published at Severance's hub, searched at CNUH's the moment ITI-65 answers: no sleep, no
    polling, a new patient each time (the locator has never heard of them), 20 times in a row."""
    fed = federation
    for attempt in range(20):
        rrn = new_rrn()
        fed.desk.grant(rrn)
        doc_id = await publish_at_severance(fed, rrn)
        found = await walk_in_at_cnuh(fed, rrn)
        assert found.status_code == 200, found.text
        assert doc_id in [r["id"] for r in matches(found)], (attempt, outcomes(found))


def registry_runtime(fed: Federation) -> Any:
    return fed.registry.running.server.config.app.state.runtime


async def test_iti65_answers_when_the_locator_does_not_and_searches_do_not_miss_silently(
    federation: Federation,
) -> None:
    """The registry's locate-add subscription is taken away (the registry stays up for the rest):
    ITI-65 still succeeds, a search right after finds the document or carries an `incomplete`
    warning, and the event path (outbox, JetStream) makes the locator catch up."""
    fed = federation
    nc = registry_runtime(fed).bus.nc
    subs = [s for s in list(nc._subs.values()) if s.subject == LOCATE_ADD]
    assert subs, "the registry serves locate-add"
    kept = [(s.subject, s.queue, s._cb) for s in subs]
    for sub in subs:
        await sub.unsubscribe()
    try:
        for _ in range(5):
            rrn = new_rrn()
            fed.desk.grant(rrn)
            doc_id = await publish_at_severance(fed, rrn)  # 200, although nobody took the locate-add
            right_after = await walk_in_at_cnuh(fed, rrn)
            assert right_after.status_code == 200, right_after.text
            assert doc_id in [r["id"] for r in matches(right_after)] or incomplete(right_after)

            async def found_later(doc_id: str = doc_id, rrn: str = rrn) -> bool | None:
                return doc_id in [r["id"] for r in matches(await walk_in_at_cnuh(fed, rrn))] or None

            await eventually(found_later, "the locator to learn of the publication from its event")
    finally:
        for subject, queue, cb in kept:
            await nc.subscribe(subject, queue=queue, cb=cb)


async def test_a_patient_the_locator_confirmed_is_not_declared_again(federation: Federation) -> None:
    """The second publication for the same patient at the same hub sends no locate-add (the entry
    exists; its event follows), and a walk-in search at another hub still finds both documents."""
    fed = federation
    nc = registry_runtime(fed).bus.nc  # the registry's connection may read locate-add requests
    seen: list[str] = []

    async def count(msg: Any) -> None:
        seen.append(DocumentPublished.model_validate_json(msg.data).patient_key)

    watcher = await nc.subscribe(LOCATE_ADD, cb=count)
    try:
        rrn = new_rrn()
        fed.desk.grant(rrn)
        first = await publish_at_severance(fed, rrn)
        second = await publish_at_severance(fed, rrn)
        found = [r["id"] for r in matches(await walk_in_at_cnuh(fed, rrn))]
        assert first in found
        assert second in found
        # Read by the registry's connection before the walk-in's own locator request came in.
        assert seen == [fed.desk.key(rrn)]
    finally:
        await watcher.unsubscribe()


async def test_the_cost_of_telling_the_locator(federation: Federation) -> None:
    """What the extra step costs each ITI-65: one locate-add round trip (NATS request, the registry's
    check and upsert) for 100 publications. Printed, not asserted."""
    fed = federation
    bus = await Bus.connect(fed.hubs["severance"].settings.nats_url, name="test-locate-add-cost")
    subject = rpc_subject(Operation.REGISTRY_LOCATE_ADD, sender="severance")
    took: list[float] = []
    try:
        for n in range(100):
            published = DocumentPublished(
                hub="severance",
                patient_key=fed.desk.key(new_rrn()),
                author_institution=SEVERANCE_CLINIC,
                document_ids=[f"cost-{n}"],
                document_types=[CRS],
                published_at=datetime.now(UTC),
            )
            start = time.perf_counter()
            await bus.request(subject, published, LocateReply, timeout=5.0)
            took.append((time.perf_counter() - start) * 1000)
    finally:
        await bus.close()
    p95 = quantiles(took, n=20)[-1]
    print(
        f"\nlocate-add per ITI-65 over 100: mean {mean(took):.2f} ms, p95 {p95:.2f} ms, "
        f"max {max(took):.2f} ms"
    )


def test_the_locator_memory_keeps_the_most_recently_confirmed_keys() -> None:
    """What ITI-65 need not declare again (hie_hub.node.LocatorMemory): bounded, oldest out first."""
    memory = LocatorMemory(size=2)
    memory.add("a")
    memory.add("b")
    memory.add("a")  # confirmed again: now the most recent
    memory.add("c")
    assert "a" in memory
    assert "c" in memory
    assert "b" not in memory
