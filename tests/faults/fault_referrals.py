"""Referrals of the fault tests: the note a clinic sends, a burst of them, and the checks that each
was delivered exactly once and its requester told (split from faults_support.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from faults_support import CLINIC, HOSPITAL, FaultFederation, eventually

from hie_hub.core.bundles import created_tasks
from hie_schemas.codes import DocumentType
from hie_schemas.documents import profiles
from hie_schemas.documents.builders import build_document, build_submission

# --- referrals --------------------------------------------------------------------------------------


@dataclass
class Referral:
    """One referral note from the clinic to the destination hospital, with the ids the EMR chose."""

    rrn: str
    body: dict[str, Any]
    document_id: str = ""
    task_id: str | None = None  # from the acknowledged transaction-response
    attempts: list[str] = field(default_factory=list)  # what each try got: a status or an error

    @classmethod
    def new(cls, rrn: str, *, emergency: str | None = None) -> Referral:
        document = build_document(
            DocumentType.REFERRAL,
            author_code=CLINIC,
            author_name="의원",
            patient_rrn=rrn,
            recipient_code=HOSPITAL,
        )
        body = build_submission([document], author_code=CLINIC, patient_rrn=rrn, recipients=[HOSPITAL])
        if emergency is not None:
            submission_set = next(
                e["resource"] for e in body["entry"] if e["resource"]["resourceType"] == "List"
            )
            submission_set.setdefault("extension", []).extend(
                [
                    {
                        "url": profiles.PURPOSE_EXTENSION_URL,
                        "valueCoding": {"system": profiles.PURPOSE_SYSTEM, "code": "emergency"},
                    },
                    {"url": profiles.JUSTIFICATION_EXTENSION_URL, "valueString": emergency},
                ]
            )
        referral = cls(rrn, body)
        return referral

    @property
    def acknowledged(self) -> bool:
        return self.task_id is not None

    def accept(self, response: httpx.Response) -> None:
        self.accept_body(response.json())

    def accept_body(self, bundle: dict[str, Any]) -> None:
        """Read the transaction-response: the DocumentReference and the Task it created."""
        locations = [e.get("response", {}).get("location", "") for e in bundle.get("entry", [])]
        docrefs = [loc.split("/")[1] for loc in locations if loc.startswith("DocumentReference/")]
        tasks = created_tasks(bundle)  # on the DocumentReference's entry (one entry per request entry)
        assert (len(docrefs), len(tasks)) == (1, 1), bundle
        if self.task_id is not None:
            # A retry replays the first answer: the same Task, nothing new.
            assert (self.document_id, self.task_id) == (docrefs[0], tasks[0]), bundle
        self.document_id, self.task_id = docrefs[0], tasks[0]


def refusal_rules(response: httpx.Response) -> list[str]:
    """The consent rules an ITI-65 refusal names (``rule <name>`` in each issue's diagnostics)."""
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    rules = []
    for issue in body["issue"]:
        text = issue.get("diagnostics", "")
        if "rule " in text:
            rules.append(text.split("rule ", 1)[1].split()[0])
    return rules


@dataclass
class Burst:
    """``count`` referrals sent ``concurrency`` at a time, each retried until it is acknowledged.

    An EMR that loses its connection (or gets a 5xx) resends the same transaction with the same ids,
    as ITI-65 allows: a replay is answered as the first time and stores nothing new.
    """

    federation: FaultFederation
    referrals: list[Referral]
    concurrency: int = 6
    retry_for: float = 180.0
    acknowledged: int = 0
    errors: list[str] = field(default_factory=list)
    progress: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, http: httpx.AsyncClient) -> None:
        queue: asyncio.Queue[Referral] = asyncio.Queue()
        for referral in self.referrals:
            queue.put_nowait(referral)

        async def worker() -> None:
            while not queue.empty():
                await self._send(http, queue.get_nowait())

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))

    async def _send(self, http: httpx.AsyncClient, referral: Referral) -> None:
        deadline = time.monotonic() + self.retry_for
        while True:
            try:
                response = await self.federation.publish(http, referral)
                outcome = str(response.status_code)
            except httpx.HTTPError as exc:
                response, outcome = None, type(exc).__name__
            referral.attempts.append(outcome)
            if response is not None and response.status_code == 200:
                referral.accept(response)
                self.acknowledged += 1
                self.progress.set()
                return
            if response is not None and response.status_code < 500:
                pytest.fail(f"referral refused with {response.status_code}: {response.text[:500]}")
            self.errors.append(outcome)
            if time.monotonic() > deadline:
                pytest.fail(f"referral not acknowledged after {self.retry_for:.0f} s: {referral.attempts}")
            await asyncio.sleep(0.3)

    async def until_acknowledged(self, count: int, timeout: float = 180.0) -> None:
        async def reached() -> bool:
            return self.acknowledged >= count

        await eventually(reached, f"{count} acknowledged referrals", timeout)


async def delivered_exactly_once(
    federation: FaultFederation,
    http: httpx.AsyncClient,
    referrals: list[Referral],
    timeout: float = 150.0,
    unsearchable: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Wait until the destination holds a Task for every acknowledged referral; then prove that it
    holds each exactly once and nothing else, with the referral note found once per referral by the
    hospital's search (ITI-67) — except for ``unsearchable`` patients (no consent: the search is
    refused them, rightly; their emergency referrals are proven by their Tasks)."""
    expected = {r.task_id for r in referrals}
    assert None not in expected
    assert len(expected) == len(referrals)

    async def arrived() -> list[dict[str, Any]] | None:
        tasks = await federation.destination_tasks(http)
        return tasks if expected <= {t["id"] for t in tasks} else None

    tasks = await eventually(arrived, f"{len(expected)} referrals at the destination hub", timeout)
    ids = [t["id"] for t in tasks]
    assert len(ids) == len(set(ids)), "a Task was delivered twice"
    assert set(ids) == expected, f"unexpected Tasks at the destination: {set(ids) - expected}"
    assert all(t["status"] == "received" for t in tasks)
    assert {t["focus"]["reference"].split("/")[-1] for t in tasks} == {r.document_id for r in referrals}
    by_patient: dict[str, set[str]] = {}
    for referral in referrals:
        if referral.rrn not in set(unsearchable):
            by_patient.setdefault(referral.rrn, set()).add(referral.document_id)
    for rrn, documents in by_patient.items():
        found = await federation.destination_documents(http, rrn)
        assert len(found) == len(set(found)), f"a document was stored twice for a patient: {found}"
        assert set(found) == documents, (sorted(set(found) - documents), sorted(documents - set(found)))
    return tasks


async def requesters_told(
    federation: FaultFederation, http: httpx.AsyncClient, referrals: list[Referral]
) -> None:
    """The source hub's copy of every Task moves to ``received`` (the destination's notice came back)."""
    expected = {r.task_id for r in referrals}

    async def told() -> bool:
        tasks = {t["id"]: t["status"] for t in await federation.source_tasks(http)}
        return all(tasks.get(task_id) == "received" for task_id in expected)

    await eventually(told, "the destination's receipts at the source hub", 90.0)
