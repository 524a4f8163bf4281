"""The central overlay's NATS configuration, run by the nats-server the project pins.

One server (no cluster) with the rendered accounts.conf; registry, consent and two hubs connect as
their users and do, through the real Bus, everything the bus contract (hie_schemas.contract) says
they do: every kind published by each of its publishers on its subject, every durable consumer and
core subscription, every RPC. Then a hub tries what it must not (issue 12 points 5 and 6).
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
from hie_schemas import contract, streams, subjects
from hie_schemas.contract import DURABLES, HUB_ROLES, MESSAGES, RPCS, Durable, Kind, Message, Role
from hie_schemas.envelope import Envelope, Source

HUB_A, HUB_B, HUB_C = "snubh", "severance", "cnuh"
USERS = {
    Role.REGISTRY: "registry",
    Role.CONSENT: "consent",
    Role.HUB: f"hub-{HUB_A}",
    Role.GATEWAY: f"hub-{HUB_A}",
}


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


# --- what the services do, from the contract ------------------------------------------------------


class Ping(BaseModel):
    n: int


def envelope(subject: str) -> Envelope:
    return Envelope(type=subject, source=Source(service="test", node="test"), data={"subject": subject})


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


def publication(msg: Message, role: Role) -> tuple[str, str]:
    """(user, subject) of ``role`` publishing ``msg``: a hub's inbox kinds go from hub B to hub A."""
    tokens = msg.template.split(".")
    if role not in HUB_ROLES:
        return role.value, msg.subject(sender=role.value) if msg.sender_bound else msg.template
    if msg.sender_bound and contract.TO in tokens:
        return f"hub-{HUB_B}", msg.subject(to=HUB_A, sender=HUB_B)
    if contract.TO in tokens:
        return f"hub-{HUB_A}", msg.subject(to=HUB_A)
    return f"hub-{HUB_A}", msg.subject(sender=HUB_A) if msg.sender_bound else msg.template


PUBLISHED = sorted({(m.kind, *publication(m, role)) for m in MESSAGES.values() for role in m.publishers})


def hub_of(d: Durable) -> str | None:
    return HUB_A if d.role in HUB_ROLES else None


def expected(d: Durable) -> set[str]:
    return {
        subject
        for kind, _, subject in PUBLISHED
        if MESSAGES[kind].stream == d.stream and subjects.matches(d.filter(hub_of(d)), subject)
    }


def core_kinds(role: Role) -> list[Message]:
    """What ``role`` consumes without a durable consumer: a core subscription."""
    durable = {k for d in DURABLES if d.role is role for k in d.kinds}
    return [m for m in MESSAGES.values() if role in m.consumers and m.kind not in durable]


async def _durable(bus: Bus, d: Durable, received: dict[str, asyncio.Queue[str]]) -> None:
    queue: asyncio.Queue[str] = asyncio.Queue()
    received[d.name(hub_of(d))] = queue

    async def handler(env: Envelope) -> None:
        queue.put_nowait(env.data["subject"])

    if not d.by_durable_name:
        bus.consume(d.stream.name, d.name(hub_of(d)), d.filter(hub_of(d)), handler)
        return
    # The consent replica: a consumer by durable name, rebuilt by deleting it (hie_platform.consent_replica).
    config = ConsumerConfig(
        durable_name=d.name(hub_of(d)),
        filter_subject=d.filter(hub_of(d)),
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
    )
    await bus.js.add_consumer(d.stream.name, config)
    assert await bus.js.delete_consumer(d.stream.name, d.name(hub_of(d)))
    await bus.js.add_consumer(d.stream.name, config)
    sub = await bus.js.pull_subscribe_bind(durable=d.name(hub_of(d)), stream=d.stream.name)

    async def pull() -> None:
        while True:
            try:
                for msg in await sub.fetch(1, timeout=1):
                    queue.put_nowait(Envelope.from_bytes(msg.data).data["subject"])
                    await msg.ack_sync()
            except (nats.errors.TimeoutError, TimeoutError):
                continue

    bus._start_consumer(d.name(hub_of(d)), pull)  # stopped with the bus, as its own consumers are


async def _serve_rpcs(buses: dict[str, Bus]) -> None:
    async def answer(request: Ping) -> Ping:
        return Ping(n=request.n + 1)

    for rpc in RPCS.values():
        if rpc.server in HUB_ROLES:  # hub A answers its own, asked by any hub
            await buses[f"hub-{HUB_A}"].serve(rpc.pattern(to=HUB_A), "hub", Ping, answer)
        else:
            await buses[USERS[rpc.server]].serve(rpc.pattern(), rpc.server.value, Ping, answer)
    for bus in buses.values():
        await bus.nc.flush()  # the responders' interest has reached the server


async def test_services_do_their_work_under_their_permissions(buses: dict[str, Bus]) -> None:
    for bus in buses.values():  # every service does this at start-up (central first)
        await bus.ensure_streams()
    await _serve_rpcs(buses)
    for rpc in RPCS.values():
        for role in rpc.callers:
            user, subject = (f"hub-{HUB_B}", rpc.subject(to=HUB_A, sender=HUB_B))
            if rpc.server not in HUB_ROLES:  # a central operation, asked as the hub itself
                user, subject = USERS[role], rpc.subject(sender=HUB_A)
            assert (await buses[user].request(subject, Ping(n=1), Ping)).n == 2, (rpc.operation, role)

    heard: dict[str, asyncio.Queue[str]] = {}
    for role in Role:
        for msg in core_kinds(role):
            queue = heard.setdefault(f"{role.value}:{msg.kind.value}", asyncio.Queue())

            async def on_core(m: Any, queue: asyncio.Queue[str] = queue) -> None:
                queue.put_nowait(m.subject)

            await buses[USERS[role]].nc.subscribe(msg.pattern(), cb=on_core)
    received: dict[str, asyncio.Queue[str]] = {}
    for d in DURABLES:
        await _durable(buses[USERS[d.role]], d, received)
    for bus in buses.values():
        await bus.nc.flush()

    for kind, user, subject in PUBLISHED:
        if MESSAGES[kind].stream is None:
            await buses[user].nc.publish(subject, envelope(subject).to_bytes())
        else:
            await buses[user].publish(subject, envelope(subject))  # a PubAck, or an error
    for name, queue in heard.items():
        await within(queue.get(), 10, f"core message for {name}")
    for d in DURABLES:
        want, got = expected(d), set()
        while not want <= got:
            got.add(
                await within(received[d.name(hub_of(d))].get(), 20, f"{want - got} for {d.name(hub_of(d))}")
            )

    # Consent's heartbeat reads the last recorded version's sequence.
    consent = buses["consent"]
    assert (await consent.js.get_last_msg(streams.CONSENT.name, contract.subject(Kind.CONSENT_RECORDED))).seq
    # Everything fetched was acknowledged through the imported $JS.ACK subjects.
    port = consent.nc.connected_url.port  # type: ignore[union-attr]
    ops = await nats.connect(user_url(port, "ops"))
    try:
        deadline = asyncio.get_running_loop().time() + 10
        for d in DURABLES:
            name = d.name(hub_of(d))
            while (await ops.jetstream().consumer_info(d.stream.name, name)).num_ack_pending:
                assert asyncio.get_running_loop().time() < deadline, f"{name} left unacknowledged"
                await asyncio.sleep(0.05)
    finally:
        await ops.close()


# --- what a hub must not do ----------------------------------------------------------------------


Attempt = Callable[[Any], Awaitable[Any]]


def _publish(msg: Message, subject: str) -> Attempt:
    if msg.stream is None:
        return lambda nc: nc.publish(subject, b"{}")
    return lambda nc: nc.jetstream(timeout=1).publish(subject, b"{}", timeout=1)


def forged() -> dict[str, Attempt]:
    """Hub A publishing as someone else: every hub kind claiming hub B, every central kind."""
    out: dict[str, Attempt] = {}
    for msg in MESSAGES.values():
        to = HUB_C if contract.TO in msg.template.split(".") else None
        if msg.sender_bound and msg.publishers & HUB_ROLES:
            out[f"{msg.kind.value} claiming another hub"] = _publish(msg, msg.subject(to=to, sender=HUB_B))
        for central in sorted(msg.publishers - HUB_ROLES, key=lambda role: role.value):
            if not msg.sender_bound and msg.publishers & HUB_ROLES:
                continue  # a subject every service shares (the audit trail): not a forgery
            subject = msg.subject(sender=central.value) if msg.sender_bound else msg.template
            out[f"{msg.kind.value} as {central.value}"] = _publish(msg, subject)
    return out


def _consumer(stream: str, name: str, filter_subject: str) -> Attempt:
    config = ConsumerConfig(name=name, durable_name=name, filter_subject=filter_subject)
    return lambda nc: nc.jetstream(timeout=1).add_consumer(stream, config)


SEARCH = RPCS[contract.Operation.HUB_SEARCH]
DECIDE = RPCS[contract.Operation.CONSENT_DECIDE]
DENIED: dict[str, Attempt] = {
    **forged(),
    "another hub's relay queue": _publish(MESSAGES[Kind.RELAY_JOB], f"hie.hub.{HUB_B}.imaging.relay"),
    "an undeclared inbox kind": _publish(MESSAGES[Kind.DELIVERY], f"hie.hub.{HUB_B}.inbox.other.{HUB_A}"),
    "another hub's other rpc": lambda nc: nc.request(f"hie.hub.{HUB_B}.rpc.purge.{HUB_A}", b"", timeout=1),
    "asking as another hub": lambda nc: nc.request(SEARCH.subject(to=HUB_B, sender=HUB_C), b"", timeout=1),
    "asking the consent decision as another hub": lambda nc: nc.request(
        DECIDE.subject(sender=HUB_B), b"", timeout=1
    ),
    "asking the consent decision as no hub": lambda nc: nc.request("hie.rpc.consent.decide", b"", timeout=1),
    "answering another hub's search": lambda nc: nc.subscribe(SEARCH.pattern(to=HUB_B)),
    "answering as another hub for itself": lambda nc: nc.subscribe(SEARCH.subject(to=HUB_B, sender=HUB_A)),
    "another hub's inbox consumer": lambda nc: nc.jetstream(timeout=1).consumer_info(
        "HIE_HUB_INBOX", f"hub-{HUB_B}-inbox"
    ),
    "its own durable on every inbox": _consumer("HIE_HUB_INBOX", f"hub-{HUB_A}-inbox", "hie.hub.*.inbox.>"),
    "its imaging durable on every gateway's reports": _consumer(
        "HIE_IMAGING", f"hub-{HUB_A}-imaging", "hie.imaging.study.progress.*"
    ),
    "another hub's imaging consumer": lambda nc: nc.jetstream(timeout=1).consumer_info(
        "HIE_IMAGING", f"hub-{HUB_B}-imaging"
    ),
    "another hub's consent replica": lambda nc: nc.jetstream(timeout=1).delete_consumer(
        "HIE_CONSENT", f"hub-{HUB_B}-consent"
    ),
    "another gateway's consent replica": lambda nc: nc.jetstream(timeout=1).delete_consumer(
        "HIE_CONSENT", f"imaging-{HUB_B}-consent"
    ),
    "a stream update": lambda nc: nc.jetstream(timeout=1).update_stream(
        name="HIE_AUDIT", subjects=["hie.audit.>"], max_msgs=1
    ),
    "a stream purge": lambda nc: nc.jetstream(timeout=1).purge_stream("HIE_AUDIT"),
    "a stream delete": lambda nc: nc.jetstream(timeout=1).delete_stream("HIE_AUDIT"),
    "a message read": lambda nc: nc.jetstream(timeout=1).get_last_msg(
        "HIE_HUB_INBOX", f"hie.hub.{HUB_B}.inbox.delivery.{HUB_A}"
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
    marker = Envelope(type="delivery", source=Source(service="t", node="t"), data={"secret": secret})
    delivered: asyncio.Queue[str] = asyncio.Queue()

    async def handler(env: Envelope) -> None:
        delivered.put_nowait(env.data.get("secret", ""))

    inbox = contract.durable(Role.HUB, streams.HUB_INBOX)
    hub_b.consume(streams.HUB_INBOX.name, inbox.name(HUB_B), inbox.filter(HUB_B), handler)
    await hub_a.publish(contract.subject(Kind.DELIVERY, to=HUB_B, sender=HUB_A), marker)
    while await within(delivered.get(), 20, "the delivery") != secret:
        pass
    await asyncio.sleep(0.3)
    assert not any(secret.encode() in data for data in seen)
