"""Telling EMRs about their Tasks: rest-hook Subscriptions (signed, retried, durable across restarts)
and long polling for EMRs that cannot receive calls."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from hub_support import (
    SEVERANCE,
    SEVERANCE_CLINIC,
    SNUBH,
    ConsentDesk,
    Federation,
    eventually,
    krnpi,
    located,
    matches,
    refused,
    root_conftest,
    start_hub,
    submit,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from hie_hub.subscriptions.endpoints import CONTENT_URL, FILTER_URL, SECRET_URL
from hie_hub.subscriptions.service import TOPIC
from hie_platform.natsd import NatsServer, free_port
from hie_schemas.codes import DocumentType
from hie_schemas.fhir import parse_resource

REFERRAL = DocumentType.REFERRAL


class Receiver:
    """An EMR's webhook endpoint: keeps what it is sent; answers 500 while ``failing`` > 0."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.failing = 0
        self.running: Any = None

        async def hook(request: Request) -> Response:
            body = await request.body()
            if self.failing > 0:
                self.failing -= 1
                return Response(status_code=500)
            self.received.append((dict(request.headers), body))
            return Response(status_code=204)

        self.app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])

    async def start(self, config: pytest.Config, port: int | None = None) -> Receiver:
        self.running = await root_conftest(config).RunningApp(self.app, port or free_port()).start()
        return self

    @property
    def url(self) -> str:
        return f"{self.running.url}/hook"

    def bundles(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.received]


@pytest.fixture
async def receiver(pytestconfig: pytest.Config) -> AsyncIterator[Receiver]:
    receiver = await Receiver().start(pytestconfig)
    yield receiver
    await receiver.running.stop()


def subscription(endpoint: str, filter_: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "EMR inbox",
        "criteria": TOPIC,
        "channel": {
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "_payload": {"extension": [{"url": CONTENT_URL, "valueCode": "full-resource"}]},
            "header": ["X-EMR-Tenant: snubh-ward-3"],
        },
    }
    if filter_ is not None:
        body["_criteria"] = {"extension": [{"url": FILTER_URL, "valueString": filter_}]}
    return body | extra


def signed(headers: dict[str, str], body: bytes, secret: str) -> bool:
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers["x-hie-signature-256"], expected)


async def test_a_webhook_is_told_about_new_tasks_signed_and_retried(
    federation: Federation, receiver: Receiver, rrn: str
) -> None:
    fed = federation
    fed.desk.grant(rrn)
    created = await fed.call(
        "POST",
        "snubh",
        "/Subscription",
        as_=SNUBH,
        json=subscription(receiver.url, f"Task?owner={krnpi(SNUBH)}"),
    )
    assert created.status_code == 201, created.text
    parse_resource(created.json(), "Subscription")
    assert created.json()["status"] == "active"
    secret = next(e["valueString"] for e in created.json()["extension"] if e["url"] == SECRET_URL)
    subscription_id = created.json()["id"]
    assert created.headers["location"].endswith(f"/Subscription/{subscription_id}")
    read = await fed.call("GET", "snubh", f"/Subscription/{subscription_id}", as_=SNUBH)
    assert SECRET_URL not in read.text  # the secret is shown once

    receiver.failing = 2  # the EMR is briefly away: the hub retries with backoff
    published = await fed.publish(
        "severance", SEVERANCE_CLINIC, submit(REFERRAL, SEVERANCE_CLINIC, rrn, [SNUBH])
    )
    [task_id] = located(published, "Task")

    async def notified() -> list[dict[str, Any]] | None:
        found = [
            b
            for b in receiver.bundles()
            if any(e["fullUrl"].endswith(f"/Task/{task_id}") for e in b["entry"])
        ]
        return found or None

    [bundle] = await eventually(notified, "the webhook notification")
    headers, body = next((h, b) for h, b in receiver.received if task_id in b.decode())
    assert signed(headers, body, secret)
    assert headers["x-emr-tenant"] == "snubh-ward-3"
    assert headers["content-type"].startswith("application/fhir+json")
    parse_resource(bundle, "Bundle")
    assert bundle["type"] == "history"
    status, task_entry = bundle["entry"]
    parse_resource(status["resource"], "Parameters")
    values = {p["name"]: p for p in status["resource"]["parameter"]}
    assert values["topic"]["valueCanonical"] == TOPIC
    assert values["type"]["valueCode"] == "event-notification"
    assert task_entry["resource"]["id"] == task_id
    assert task_entry["resource"]["status"] == "received"

    async def recorded() -> list[tuple[str, int]] | None:
        # The hub records the delivery once the receiver's answer is back, a moment after it arrived.
        rows = await fed.hubs["snubh"].rows("webhook_deliveries")
        states = [(r["state"], r["attempts"]) for r in rows if r["subscription_id"] == subscription_id]
        return states if all(state != "pending" for state, _ in states) else None

    assert await eventually(recorded, "the delivery to be recorded") == [("delivered", 3)]

    # The hub hospital accepts the Task: a second notification, numbered after the first.
    moved = await fed.call(
        "PUT", "snubh", f"/Task/{task_id}", as_=SNUBH, json={**task_entry["resource"], "status": "accepted"}
    )
    assert moved.status_code == 200, moved.text
    await eventually(lambda: _count(receiver, 2), "the second notification")
    numbers = [
        next(
            p
            for p in b["entry"][0]["resource"]["parameter"]
            if p["name"] == "events-since-subscription-start"
        )["valueString"]
        for b in receiver.bundles()
    ]
    assert numbers == ["1", "2"]

    # Stopped: no more notifications; another institution cannot see or stop it.
    refused(await fed.call("GET", "snubh", f"/Subscription/{subscription_id}", as_="31302001"), 404)
    assert (
        await fed.call("DELETE", "snubh", f"/Subscription/{subscription_id}", as_=SNUBH)
    ).status_code == 204
    listed = matches(await fed.call("GET", "snubh", "/Subscription", as_=SNUBH))
    assert {s["id"]: s["status"] for s in listed}[subscription_id] == "off"


async def _count(receiver: Receiver, n: int) -> bool:
    return len(receiver.received) >= n


async def test_subscriptions_that_cannot_be_served_are_refused(federation: Federation) -> None:
    fed = federation
    url = "https://emr.example.kr/hook"

    async def create(body: Any) -> httpx.Response:
        return await fed.call("POST", "snubh", "/Subscription", as_=SNUBH, json=body)

    refused(await create({**subscription(url), "criteria": "Task?status=requested"}), 422)
    refused(await create(subscription(url, f"Task?owner={krnpi(SEVERANCE)}")), 422)  # someone else's Tasks
    refused(await create(subscription(url, "Patient?name=x")), 422)
    email = subscription(url)
    email["channel"] = {**email["channel"], "type": "email"}
    refused(await create(email), 422)
    refused(await create(subscription("ftp://emr.example.kr/hook")), 422)
    short = subscription(url, extension=[{"url": SECRET_URL, "valueString": "short"}])
    refused(await create(short), 422)
    refused(await create({"resourceType": "Subscription", "status": "nonsense"}), 400)
    refused(await create([1, 2]), 400)
    assert [
        s
        for s in matches(await fed.call("GET", "snubh", "/Subscription", as_=SNUBH))
        if s["channel"]["endpoint"] == url
    ] == []


async def test_long_polling_returns_as_soon_as_a_task_arrives(federation: Federation, rrn: str) -> None:
    fed = federation
    fed.desk.grant(rrn)
    since = datetime.now(UTC).isoformat()

    async def poll(wait: int) -> httpx.Response:
        return await fed.call(
            "GET",
            "snubh",
            "/Task",
            as_=SNUBH,
            headers={"Prefer": f"wait={wait}"},
            params={"owner": krnpi(SNUBH), "_since": since},
        )

    started = time.monotonic()
    empty = await poll(1)
    assert matches(empty) == []
    assert time.monotonic() - started >= 0.9
    assert empty.headers["preference-applied"] == "wait=1"

    waiting = asyncio.create_task(poll(20))
    await asyncio.sleep(0.3)
    started = time.monotonic()
    published = await fed.publish(
        "severance", SEVERANCE_CLINIC, submit(REFERRAL, SEVERANCE_CLINIC, rrn, [SNUBH])
    )
    [task_id] = located(published, "Task")
    answered = await waiting
    assert time.monotonic() - started < 20  # answered by the arrival, not by the end of its wait
    assert task_id in [t["id"] for t in matches(answered)]
    last = max(t["meta"]["lastUpdated"] for t in matches(answered))
    # Asking again from the newest change seen returns nothing new (no busy loop).
    again = await fed.call("GET", "snubh", "/Task", as_=SNUBH, params={"owner": krnpi(SNUBH), "_since": last})
    assert task_id not in [t["id"] for t in matches(again)]


async def test_an_inbox_larger_than_a_page_is_read_whole_page_by_page(
    federation: Federation, rrn: str
) -> None:
    """A burst bigger than `_count`: following `next` (newest first, or from `_since` oldest first)
    yields every Task once; a poller advancing `_since` never skips one."""
    fed = federation
    fed.desk.grant(rrn)
    since = datetime.now(UTC).isoformat()
    sent = []
    for _ in range(7):
        published = await fed.publish(
            "severance", SEVERANCE_CLINIC, submit(REFERRAL, SEVERANCE_CLINIC, rrn, [SNUBH])
        )
        sent += located(published, "Task")

    async def arrived() -> bool:
        response = await fed.call(
            "GET", "snubh", "/Task", as_=SNUBH, params={"owner": krnpi(SNUBH), "_since": since, "_count": 50}
        )
        return {t["id"] for t in matches(response)} >= set(sent)

    await eventually(arrived, "the seven referrals in SNUBH's inbox")

    async def walk(params: dict[str, Any]) -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        response = await fed.call("GET", "snubh", "/Task", as_=SNUBH, params=params)
        while True:
            bundle = response.json()
            assert len(matches(response)) <= 3
            seen += matches(response)
            following = [link["url"] for link in bundle.get("link", []) if link["relation"] == "next"]
            if not following:
                return seen
            assert following[0].startswith(fed.hubs["snubh"].fhir)
            response = await fed.call(
                "GET", "snubh", following[0].removeprefix(fed.hubs["snubh"].fhir), as_=SNUBH
            )

    newest_first = await walk({"owner": krnpi(SNUBH), "_count": 3})
    ids = [t["id"] for t in newest_first]
    assert len(ids) == len(set(ids))
    assert set(sent) <= set(ids)
    stamps = [t["meta"]["lastUpdated"] for t in newest_first]
    assert stamps == sorted(stamps, reverse=True)

    oldest_first = await walk({"owner": krnpi(SNUBH), "_since": since, "_count": 3})
    assert [t["id"] for t in oldest_first if t["id"] in sent] == [t for t in reversed(ids) if t in sent]
    assert {t["id"] for t in oldest_first} == set(sent)


async def test_undelivered_notifications_survive_a_restart(
    pytestconfig: pytest.Config, registry: Any, tmp_path: Path, rrn: str
) -> None:
    nats = NatsServer(tmp_path / "js").start()
    desk = await ConsentDesk(b"").start(nats.url)
    url = f"sqlite+aiosqlite:///{tmp_path / 'hub.db'}"
    hub = await start_hub(pytestconfig, "severance", nats.url, registry.url, url)
    desk.secret = hub.settings.patient_key_bytes
    desk.grant(rrn)
    port = free_port()  # nothing listens there yet: the EMR is down
    receiver = Receiver()
    try:
        async with httpx.AsyncClient(base_url=hub.fhir, timeout=15.0) as http:
            hospital = {"Authorization": f"Bearer {await registry.token(SEVERANCE)}"}
            clinic = {"Authorization": f"Bearer {await registry.token(SEVERANCE_CLINIC)}"}
            body = subscription(f"http://127.0.0.1:{port}/hook")
            assert (await http.post("/Subscription", json=body, headers=hospital)).status_code == 201
            referral = submit(REFERRAL, SEVERANCE_CLINIC, rrn, [SEVERANCE])
            assert (await http.post("", json=referral, headers=clinic)).status_code == 200

        async def tried() -> list[dict[str, Any]] | None:
            rows = await hub.rows("webhook_deliveries")
            return rows if rows and all(r["attempts"] >= 1 for r in rows) else None

        await eventually(tried, "a failed first attempt")
        await hub.running.stop()
        await receiver.start(pytestconfig, port)
        hub = await start_hub(pytestconfig, "severance", nats.url, registry.url, url)
        await eventually(lambda: _count(receiver, 2), "the notifications after the restart")

        # The hub records a delivery after the receiver's answer: a moment after the bundle came.
        async def all_delivered() -> list[dict[str, Any]] | None:
            rows = await hub.rows("webhook_deliveries")
            return rows if {r["state"] for r in rows} == {"delivered"} else None

        rows = await eventually(all_delivered, "every delivery recorded as delivered")
        assert len(rows) == 2
        statuses = [b["entry"][1]["resource"]["status"] for b in receiver.bundles()]
        assert sorted(statuses) == ["received", "requested"]  # the Task as sent, then as received
    finally:
        await hub.running.stop()
        if receiver.running is not None:
            await receiver.running.stop()
        await desk.stop()
        nats.stop()
