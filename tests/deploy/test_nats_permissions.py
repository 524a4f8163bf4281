"""The central overlay's NATS configuration, run by the nats-server the project pins.

One server (no cluster) with the rendered accounts.conf; registry, consent and two hubs connect as
their users and do what the services do through the real Bus. Then a hub tries what it must not.
"""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from k8s_helpers import Rendered
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pydantic import BaseModel

from hie_platform.bus import Bus
from hie_platform.natsd import find_nats_server, free_port, wait_for_port
from hie_schemas import streams, subjects
from hie_schemas.envelope import Envelope, Source

HUB_A, HUB_B = "snubh", "severance"
HEARTBEAT = "hie.feed.consent.heartbeat"


def password(user: str) -> str:
    return f"test-{user}-password"


def password_env(accounts: str) -> dict[str, str]:
    """Every $VAR_PASSWORD the accounts file names, as nats-server reads them from the environment."""
    import re

    names = set(re.findall(r"password: \$([A-Z0-9_]+)", accounts))
    return {name: password(name.removesuffix("_PASSWORD").lower().replace("_", "-")) for name in names}


def user_url(port: int, user: str) -> str:
    secret = password(user.upper().replace("-", "_").lower().replace("_", "-"))
    return f"nats://{user}:{secret}@127.0.0.1:{port}"


def nats_files(rendered: dict[str, Rendered]) -> dict[str, str]:
    config = rendered["central"].find("ConfigMap", "nats-config")
    return dict(config["data"])


@pytest.fixture(scope="module")
def nats_port(rendered: dict[str, Rendered], tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    files = nats_files(rendered)
    folder = tmp_path_factory.mktemp("nats-accounts")
    (folder / "accounts.conf").write_text(files["accounts.conf"])
    port = free_port()
    # The rendered server settings that matter to clients; the cluster block needs the pods' DNS.
    (folder / "server.conf").write_text(
        f"listen: 127.0.0.1:{port}\n"
        "max_payload: 16MB\n"
        f"jetstream {{ store_dir: {folder / 'js'} }}\n"
        "system_account: SYS\n"
        "include accounts.conf\n"
    )
    env = {**os.environ, **password_env(files["accounts.conf"])}
    log = (folder / "nats.log").open("wb")
    process = subprocess.Popen(
        [find_nats_server(), "-c", str(folder / "server.conf")], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_for_port("127.0.0.1", port, 15.0, process)
        yield port
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def test_rendered_server_configuration_is_valid(rendered: dict[str, Rendered], tmp_path: Path) -> None:
    files = nats_files(rendered)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    env = {**os.environ, "POD_NAME": "nats-0", **password_env(files["accounts.conf"])}
    result = subprocess.run(
        [find_nats_server(), "-t", "-c", str(tmp_path / "nats.conf")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid" in result.stdout + result.stderr


def test_a_missing_password_stops_the_server(rendered: dict[str, Rendered], tmp_path: Path) -> None:
    """Why a hub's password goes into nats-users BEFORE its account (docs/operations.md)."""
    files = nats_files(rendered)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    env = {**os.environ, "POD_NAME": "nats-0", **password_env(files["accounts.conf"])}
    del env[f"HUB_{HUB_A.upper()}_PASSWORD"]
    result = subprocess.run(
        [find_nats_server(), "-t", "-c", str(tmp_path / "nats.conf")], env=env, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert f"HUB_{HUB_A.upper()}_PASSWORD" in result.stderr


# --- what the services do ------------------------------------------------------------------------


class Ping(BaseModel):
    n: int


def envelope(kind: str) -> Envelope:
    return Envelope(type=kind, source=Source(service="test", node="test"), data={"kind": kind})


async def within(awaitable: Awaitable[Any], seconds: float, what: str) -> Any:
    """Await with a deadline; a timeout names the step that did not happen."""
    try:
        return await asyncio.wait_for(awaitable, seconds)
    except TimeoutError:
        raise AssertionError(f"no {what} within {seconds}s") from None


async def _connect(port: int, user: str) -> Bus:
    return await Bus.connect(user_url(port, user), name=user, connect_timeout=3)


@pytest.fixture
async def buses(nats_port: int) -> AsyncIterator[dict[str, Bus]]:
    users = ["registry", "consent", f"hub-{HUB_A}", f"hub-{HUB_B}"]
    connected = {user: await _connect(nats_port, user) for user in users}
    yield connected
    for bus in connected.values():
        await bus.close()


async def test_services_do_their_work_under_their_permissions(buses: dict[str, Bus]) -> None:
    registry, consent = buses["registry"], buses["consent"]
    hub_a, hub_b = buses[f"hub-{HUB_A}"], buses[f"hub-{HUB_B}"]
    for bus in buses.values():  # every service does this at start-up (central first)
        await bus.ensure_streams()

    async def decide(request: Ping) -> Ping:
        return Ping(n=request.n + 1)

    await consent.serve(subjects.CONSENT_DECIDE, "consent", Ping, decide)
    await registry.serve(subjects.REGISTRY_LOCATE, "registry", Ping, decide)
    for bus in (consent, registry):
        await bus.nc.flush()  # the responders' interest has reached the server
    assert (await hub_a.request(subjects.CONSENT_DECIDE, Ping(n=1), Ping)).n == 2
    assert (await hub_b.request(subjects.REGISTRY_LOCATE, Ping(n=5), Ping)).n == 6
    # Federated search: a hub answers on its own rpc subjects, the other hubs ask it.
    await hub_b.serve(subjects.hub_rpc(HUB_B, "search"), "hub", Ping, decide)
    await hub_a.serve(subjects.hub_rpc(HUB_A, "retrieve"), "hub", Ping, decide)
    for bus in (hub_a, hub_b):
        await bus.nc.flush()
    assert (await hub_a.request(subjects.hub_rpc(HUB_B, "search"), Ping(n=10), Ping)).n == 11
    assert (await hub_b.request(subjects.hub_rpc(HUB_A, "retrieve"), Ping(n=20), Ping)).n == 21

    # Core subscriptions: the registry's changes and consent's heartbeat reach every hub.
    heard: asyncio.Queue[str] = asyncio.Queue()

    async def on_core(msg: Any) -> None:
        heard.put_nowait(msg.subject)

    for bus in (hub_a, hub_b):
        await bus.nc.subscribe(subjects.REGISTRY_INSTITUTION_CHANGED, cb=on_core)
        await bus.nc.subscribe(HEARTBEAT, cb=on_core)
        await bus.nc.flush()
    await registry.publish(subjects.REGISTRY_INSTITUTION_CHANGED, envelope("changed"))
    await consent.nc.publish(HEARTBEAT, envelope("beat").to_bytes())
    got = [await within(heard.get(), 10, f"core message {n + 1} of 4 (got {n})") for n in range(4)]
    assert sorted(got) == sorted([subjects.REGISTRY_INSTITUTION_CHANGED, HEARTBEAT] * 2)

    # Durable consumers: each service's own, created and pulled through the imports, acked.
    received: dict[str, asyncio.Queue[str]] = {}

    def consume(bus: Bus, stream: str, durable: str, subject: str) -> None:
        queue: asyncio.Queue[str] = asyncio.Queue()
        received[durable] = queue

        async def handler(env: Envelope) -> None:
            queue.put_nowait(env.type)

        bus.consume(stream, durable, subject, handler)

    consume(hub_b, streams.HUB_INBOX.name, f"hub-{HUB_B}-inbox", subjects.hub_inbox_wildcard(HUB_B))
    consume(hub_a, streams.HUB_INBOX.name, f"hub-{HUB_A}-inbox", subjects.hub_inbox_wildcard(HUB_A))
    consume(hub_a, streams.IMAGING_JOBS.name, f"imaging-{HUB_A}-relay", subjects.hub_imaging_jobs(HUB_A))
    consume(hub_a, streams.EXCHANGE.name, f"imaging-{HUB_A}-exchanges", subjects.EXCHANGE_SENT)
    consume(hub_a, streams.IMAGING.name, f"hub-{HUB_A}-imaging", subjects.IMAGING_STUDY_PROGRESS)
    consume(registry, streams.EXCHANGE.name, "registry-locator", "hie.exchange.>")
    consume(consent, streams.EXCHANGE.name, "consent-history", "hie.exchange.>")
    consume(consent, streams.AUDIT.name, "consent-access", subjects.AUDIT_RECORDED)

    await hub_a.publish(subjects.hub_inbox(HUB_B, "delivery"), envelope("delivery"))
    await hub_b.publish(subjects.hub_inbox(HUB_A, "task-status"), envelope("task-status"))
    await hub_a.publish(subjects.hub_imaging_jobs(HUB_A), envelope("relay"))
    await hub_a.publish(subjects.EXCHANGE_SENT, envelope("sent"))
    await hub_b.publish(subjects.AUDIT_RECORDED, envelope("audit"))
    await hub_b.publish(subjects.IMAGING_STUDY_PROGRESS, envelope("progress"))
    await consent.publish(subjects.CONSENT_RECORDED, envelope("consent"))
    expected = {
        f"hub-{HUB_B}-inbox": "delivery",
        f"hub-{HUB_A}-inbox": "task-status",
        f"imaging-{HUB_A}-relay": "relay",
        f"imaging-{HUB_A}-exchanges": "sent",
        f"hub-{HUB_A}-imaging": "progress",  # hub B's gateway reported it: every hub hears all
        "registry-locator": "sent",
        "consent-history": "sent",
        "consent-access": "audit",
    }
    for durable, kind in expected.items():
        assert await within(received[durable].get(), 20, f"{kind} for {durable}") == kind, durable

    # The hub's consent replica: a consumer by durable name, rebuilt by deleting it (consent_replica).
    js = hub_a.js
    durable = f"hub-{HUB_A}-consent"
    config = ConsumerConfig(
        durable_name=durable,
        filter_subject=subjects.CONSENT_RECORDED,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
    )
    await js.add_consumer(streams.CONSENT.name, config)
    assert await js.delete_consumer(streams.CONSENT.name, durable)
    await js.add_consumer(streams.CONSENT.name, config)
    sub = await js.pull_subscribe_bind(durable=durable, stream=streams.CONSENT.name)
    (msg,) = await sub.fetch(1, timeout=5)
    assert Envelope.from_bytes(msg.data).type == "consent"
    await msg.ack_sync()
    info = await js.consumer_info(streams.CONSENT.name, durable)
    assert info.num_ack_pending == 0
    # Consent's heartbeat reads the last recorded version's sequence.
    last = await consent.js.get_last_msg(streams.CONSENT.name, subjects.CONSENT_RECORDED)
    assert last.seq == info.delivered.stream_seq

    # Everything fetched was acknowledged through the imported $JS.ACK subjects.
    streams_of = {
        f"hub-{HUB_B}-inbox": streams.HUB_INBOX.name,
        f"hub-{HUB_A}-inbox": streams.HUB_INBOX.name,
        f"imaging-{HUB_A}-relay": streams.IMAGING_JOBS.name,
        f"imaging-{HUB_A}-exchanges": streams.EXCHANGE.name,
        f"hub-{HUB_A}-imaging": streams.IMAGING.name,
        "registry-locator": streams.EXCHANGE.name,
        "consent-history": streams.EXCHANGE.name,
        "consent-access": streams.AUDIT.name,
    }
    port = registry.nc.connected_url.port  # type: ignore[union-attr]
    ops = await nats.connect(user_url(port, "ops"))
    try:
        deadline = asyncio.get_running_loop().time() + 5
        for durable_name, stream in streams_of.items():
            while (await ops.jetstream().consumer_info(stream, durable_name)).num_ack_pending:
                assert asyncio.get_running_loop().time() < deadline, f"{durable_name} left unacknowledged"
                await asyncio.sleep(0.05)
    finally:
        await ops.close()


# --- what a hub must not do ----------------------------------------------------------------------


Attempt = Callable[[Any], Awaitable[Any]]


def _js_publish(subject: str) -> Attempt:
    return lambda nc: nc.jetstream(timeout=1).publish(subject, b"{}", timeout=1)


DENIED: dict[str, Attempt] = {
    "another hub's relay queue": _js_publish(f"hie.hub.{HUB_B}.imaging.relay"),
    "another hub's other rpc": lambda nc: nc.request(f"hie.hub.{HUB_B}.rpc.purge", b"", timeout=1),
    "answering as another hub": lambda nc: nc.subscribe(f"hie.hub.{HUB_B}.rpc.search"),
    "another inbox kind": _js_publish(f"hie.hub.{HUB_B}.inbox.other"),
    "a registry fact": _js_publish("hie.registry.institution.changed"),
    "a consent fact": _js_publish("hie.consent.consent.recorded"),
    "consent's heartbeat": lambda nc: nc.publish(HEARTBEAT, b"{}"),
    "another hub's inbox consumer": lambda nc: nc.jetstream(timeout=1).consumer_info(
        "HIE_HUB_INBOX", f"hub-{HUB_B}-inbox"
    ),
    "its own durable on every inbox": lambda nc: nc.jetstream(timeout=1).add_consumer(
        "HIE_HUB_INBOX",
        ConsumerConfig(
            name=f"hub-{HUB_A}-inbox", durable_name=f"hub-{HUB_A}-inbox", filter_subject="hie.hub.*.inbox.>"
        ),
    ),
    "its imaging durable on every imaging fact": lambda nc: nc.jetstream(timeout=1).add_consumer(
        "HIE_IMAGING",
        ConsumerConfig(
            name=f"hub-{HUB_A}-imaging", durable_name=f"hub-{HUB_A}-imaging", filter_subject="hie.imaging.>"
        ),
    ),
    "another hub's imaging consumer": lambda nc: nc.jetstream(timeout=1).consumer_info(
        "HIE_IMAGING", f"hub-{HUB_B}-imaging"
    ),
    "another hub's consent replica": lambda nc: nc.jetstream(timeout=1).delete_consumer(
        "HIE_CONSENT", f"hub-{HUB_B}-consent"
    ),
    "a stream update": lambda nc: nc.jetstream(timeout=1).update_stream(
        name="HIE_AUDIT", subjects=["hie.audit.>"], max_msgs=1
    ),
    "a stream purge": lambda nc: nc.jetstream(timeout=1).purge_stream("HIE_AUDIT"),
    "a stream delete": lambda nc: nc.jetstream(timeout=1).delete_stream("HIE_AUDIT"),
    "a message read": lambda nc: nc.jetstream(timeout=1).get_last_msg(
        "HIE_HUB_INBOX", f"hie.hub.{HUB_B}.inbox.delivery"
    ),
    "every subject": lambda nc: nc.subscribe("hie.>"),
}


@pytest.mark.parametrize("attempt", list(DENIED), ids=list(DENIED))
async def test_a_hub_is_refused(nats_port: int, attempt: str) -> None:
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(user_url(nats_port, f"hub-{HUB_A}"), error_cb=on_error, connect_timeout=3)
    try:
        try:
            await DENIED[attempt](nc)
            await nc.flush()
            await asyncio.sleep(0.2)
        except Exception as exc:  # the refusal shows as a timeout, an error reply, or no responders
            errors.append(f"{type(exc).__name__}: {exc}")
        assert errors, f"hub-{HUB_A} was allowed: {attempt}"
    finally:
        await nc.close()


async def test_a_hub_cannot_read_another_hubs_deliveries(buses: dict[str, Bus]) -> None:
    """Pull consumers deliver to the fetcher's _INBOX: another account never sees it."""
    hub_a, hub_b = buses[f"hub-{HUB_A}"], buses[f"hub-{HUB_B}"]
    for bus in buses.values():
        await bus.ensure_streams()
    seen: list[bytes] = []

    async def snoop(msg: Any) -> None:
        seen.append(msg.data)

    await hub_a.nc.subscribe("_INBOX.>", cb=snoop)
    await hub_a.nc.flush()
    secret = base64.b64encode(os.urandom(12)).decode()
    marker = envelope(f"delivery-{secret}")
    delivered: asyncio.Queue[str] = asyncio.Queue()

    async def handler(env: Envelope) -> None:
        delivered.put_nowait(env.type)

    hub_b.consume(streams.HUB_INBOX.name, f"hub-{HUB_B}-inbox", subjects.hub_inbox_wildcard(HUB_B), handler)
    await hub_a.publish(subjects.hub_inbox(HUB_B, "delivery"), marker)
    while (kind := await within(delivered.get(), 20, "the delivery")) != marker.type:
        assert kind.startswith("delivery")
    await asyncio.sleep(0.3)
    assert not any(secret.encode() in data for data in seen)
